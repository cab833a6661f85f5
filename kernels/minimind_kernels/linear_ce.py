"""Fused linear + cross-entropy (the LM head and its loss) in Triton, without materialising the [N, V] logits.

Shape legend: N tokens, D hidden, V vocab, C rows in one token chunk.

Math, per token i with logits z_i = h_i W^T (z_i in R^V), label y_i, token weight w_i (1 when none is given):
    lse_i  = log sum_v exp(z_iv)
    loss_i = w_i * (lse_i - z_{i,y_i})                        (0 when y_i == ignore_index)
    "sum": L = sum_i loss_i      "mean": L = sum_i loss_i / count,  count = #{i : y_i != ignore_index} (at least 1)
    "none": L_i = loss_i, fp32 [N]
    dL/dz_iv = s_i * (softmax(z_i)_v - [v == y_i]),  s_i = w_i / count ("mean"), w_i ("sum"), g_i * w_i ("none",
               g = the incoming per-token gradient), 0 for ignored tokens
    dL/dh_i = dz_i W          dL/dW = sum_i dz_i^T h_i

Algorithm. Tokens are processed in chunks of C rows: logits_CV = h_CD W^T goes through cuBLAS in the compute dtype
(bf16 under autocast, fp32 otherwise; fp32 accumulation either way) into one reused [C, V] buffer. A row-wise Triton
kernel then walks each row in vocab blocks with an online log-sum-exp (Milakov & Gimelshein 2018, "Online normalizer
calculation for softmax", alg. 3: m' = max(m, max_b z), s' = s * exp(m - m') + sum_b exp(z - m')), all in fp32, writes
the row's loss and lse, and in a second sweep overwrites the row in place with dL/dz (cast back to the compute dtype).
Two more cuBLAS calls per chunk turn that into dL/dh (the chunk's rows) and add dz^T h into a [V, D] fp32
accumulator for dL/dW; with bf16 inputs on CUDA they write fp32 results directly (out_dtype) where torch can, so dW is
rounded to bf16 once, as in the reference, not once per chunk. The largest temporary is one [C, V] chunk in the
compute dtype.

"mean" and "sum": the gradients are computed in the forward pass (the loss is linear in its scalar grad_output), kept,
and scaled by the scalar grad_output in backward. "none": the per-token grad_output g_i is only known in backward and
dL/dW = sum_i g_i dz_i^T h_i does not factor out of the sum, so forward computes only the loss and each row's lse
(kept as the pair (max, log-sum), fp32 [N, 2]) and backward recomputes each chunk's logits and writes
g_i * w_i * (softmax - onehot) from the saved pair in one sweep.
Gradients are computed only for the inputs that require them (a frozen lm_head skips the dW matmuls).

The chunk size follows Liger-Kernel's rule (about ceil(V / D) chunks, so one chunk of logits is about as large as
hidden itself), with a floor of 256 rows. Vocab blocks are at most 2048 columns; V need not be a multiple of the
block (masked loads). Labels outside [0, V) other than ignore_index are not checked (that would cost a host sync).
torch.compile sees the forward and the "none" backward as two custom ops (minimind::linear_ce_fwd,
minimind::linear_ce_bwd) with fake implementations, tied together by register_autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_REDUCTIONS = ("mean", "sum", "none")
_MAX_BLOCK_V = 2048
# A chunk of a few rows gains no memory worth having (hidden is tiny then) and costs: the row kernel's grid is one
# program per row, a matmul with a handful of rows leaves most of the GPU idle, and BLAS switches to a matrix-vector
# path whose long sequential sums round worse than the reference's single matmul.
_MIN_CHUNK_ROWS = 256


@triton.jit
def _dlogits_sweep(row_ptr, V, label, row_max, log_sum, scale, BLOCK_V: tl.constexpr):
    """Overwrite one row of logits with scale * (softmax - onehot(label)), in the buffer's dtype."""
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        # (z - max) - log_sum rather than z - lse: lse rounded to fp32 carries an error of ulp(max), which would
        # turn into a relative error of that size in every probability.
        p = tl.exp((z - row_max) - log_sum)
        d = (p - tl.where(cols == label, 1.0, 0.0)) * scale
        tl.store(row_ptr + cols, d.to(row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_ce_fwd_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    token_weight_ptr,
    inv_count_ptr,
    loss_ptr,
    lse_parts_ptr,
    V,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row of a chunk: online lse, weighted loss, and (WRITE_GRAD) dL/dz in place of the logits."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index

    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    log_sum = tl.log(s)

    # Read the target logit before the sweep below overwrites the row; ignored rows read column 0 harmlessly.
    z_label = tl.load(row_ptr + tl.where(valid, label, 0)).to(tl.float32)
    w = tl.load(token_weight_ptr + row).to(tl.float32) if HAS_WEIGHT else 1.0
    loss = tl.where(valid, ((m - z_label) + log_sum) * w, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_parts_ptr + 2 * row, m)
    tl.store(lse_parts_ptr + 2 * row + 1, log_sum)

    if WRITE_GRAD:
        scale = tl.where(valid, w * tl.load(inv_count_ptr), 0.0)
        _dlogits_sweep(row_ptr, V, label, m, log_sum, scale, BLOCK_V)


@triton.jit
def _linear_ce_bwd_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    token_weight_ptr,
    grad_loss_ptr,
    lse_parts_ptr,
    V,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: dL/dz = g_i * w_i * (softmax(z) - onehot) in place, from the (max, log-sum) pair that
    the forward saved for the row."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    w = tl.load(token_weight_ptr + row).to(tl.float32) if HAS_WEIGHT else 1.0
    scale = tl.where(valid, tl.load(grad_loss_ptr + row).to(tl.float32) * w, 0.0)
    row_max = tl.load(lse_parts_ptr + 2 * row)
    log_sum = tl.load(lse_parts_ptr + 2 * row + 1)
    _dlogits_sweep(logits_ptr + row * stride_row, V, label, row_max, log_sum, scale, BLOCK_V)


# ----------------------------------------------------------------------------------------------------------------------
# Host launchers: plain tensors in and out, no autograd.


# Rows per chunk in place of chunk_rows' rule, for measuring another size side by side (bench/bench_kernels.py's
# "triton-chunk4096"); None: the rule.
CHUNK_ROWS: int | None = None


def chunk_rows(n: int, v: int, d: int) -> int:
    """Rows per token chunk. Liger-Kernel's rule: ceil(V / D) chunks of a power-of-two size, so that one chunk of
    logits [C, V] is about the size of hidden [N, D] (at most twice it); but never fewer than _MIN_CHUNK_ROWS rows.
    CHUNK_ROWS, when set, replaces the rule."""
    if CHUNK_ROWS is not None:
        return CHUNK_ROWS
    n_chunks = triton.cdiv(v, d)
    return max(_MIN_CHUNK_ROWS, triton.next_power_of_2(max(1, triton.cdiv(n, n_chunks))))


def _block_v(v: int) -> int:
    return min(triton.next_power_of_2(v), _MAX_BLOCK_V)


def _check_inputs(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor) -> None:
    assert hidden_ND.dim() == 2 and weight_VD.dim() == 2, "hidden [N, D] and weight [V, D] expected"
    assert hidden_ND.shape[1] == weight_VD.shape[1], (
        f"hidden {tuple(hidden_ND.shape)} vs weight {tuple(weight_VD.shape)}"
    )
    assert hidden_ND.dtype == weight_VD.dtype, "hidden and weight must share the compute dtype"
    assert labels_N.shape == (hidden_ND.shape[0],), f"labels {tuple(labels_N.shape)} vs {hidden_ND.shape[0]} tokens"


def linear_ce_fwd(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_N: torch.Tensor,
    token_weight_N: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    grad_hidden: bool,
    grad_weight: bool,
    chunk: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, lse_N2, dL/dhidden [N, D] fp32 or empty, dL/dW [V, D] fp32 or empty).

    loss is a 0-dim fp32 tensor for "mean"/"sum", the fp32 [N] per-token loss for "none". The gradients are those of
    the loss itself (grad_output 1) and are computed only for "mean"/"sum" and only where asked. lse_N2 holds each
    row's (max, log sum exp(z - max)) in fp32: lse = their sum, kept apart for precision (see _dlogits_sweep)."""
    _check_inputs(hidden_ND, weight_VD, labels_N)
    assert reduction in _REDUCTIONS, reduction
    n, d = hidden_ND.shape
    v = weight_VD.shape[0]
    hidden_ND, weight_VD, labels_N = hidden_ND.contiguous(), weight_VD.contiguous(), labels_N.contiguous()
    has_weight = token_weight_N is not None
    tw_N = token_weight_N.to(torch.float32).contiguous() if has_weight else labels_N  # dummy pointer when absent
    write_grad = reduction != "none" and (grad_hidden or grad_weight)

    loss_N = torch.empty(n, dtype=torch.float32, device=hidden_ND.device)
    lse_N2 = torch.empty(n, 2, dtype=torch.float32, device=hidden_ND.device)
    # 1/count stays on the device: no host sync. Weights are not part of the denominator (see reference.py).
    count = (labels_N != ignore_index).sum().clamp(min=1)
    inv_count = (1.0 / count.to(torch.float32)) if reduction == "mean" else torch.ones((), device=hidden_ND.device)
    inv_count = inv_count.reshape(1)
    # dL/dhidden is kept in fp32 until backward scales it by grad_output, so that it is rounded to bf16 only once.
    gh_ND = hidden_ND.new_empty(n, d, dtype=torch.float32) if write_grad and grad_hidden else hidden_ND.new_empty(0)
    gw_VD = torch.zeros(v, d, dtype=torch.float32, device=hidden_ND.device) if write_grad and grad_weight else None

    c = chunk or chunk_rows(n, v, d)
    bv = block_v or _block_v(v)
    logits_CV = torch.empty(min(c, n), v, dtype=hidden_ND.dtype, device=hidden_ND.device)
    for start in range(0, n, c):
        stop = min(start + c, n)
        rows = stop - start
        h_CD = hidden_ND[start:stop]
        z_CV = logits_CV[:rows]
        torch.mm(h_CD, weight_VD.t(), out=z_CV)
        _linear_ce_fwd_kernel[(rows,)](
            z_CV,
            z_CV.stride(0),
            labels_N[start:stop],
            tw_N[start:stop],
            inv_count,
            loss_N[start:stop],
            lse_N2[start:stop],
            v,
            ignore_index,
            HAS_WEIGHT=has_weight,
            WRITE_GRAD=write_grad,
            BLOCK_V=bv,
            num_warps=8,
        )
        if write_grad:
            _accumulate_grads(z_CV, h_CD, weight_VD, gh_ND[start:stop] if grad_hidden else None, gw_VD)

    if reduction == "none":
        loss = loss_N
    else:
        loss = loss_N.sum() if reduction == "sum" else loss_N.sum() / count
    return loss, lse_N2, gh_ND, gw_VD if gw_VD is not None else hidden_ND.new_empty(0, dtype=torch.float32)


_FP32_OUT_MM: dict[torch.device, bool] = {}


def _fp32_out_mm(device: torch.device) -> bool:
    """Whether bf16/fp16 matmuls can write an fp32 result directly here (out_dtype: torch >= 2.8, CUDA only).
    Probed once per device, numerically, so that any build without it falls back to rounding each chunk's product."""
    if device.type != "cuda":
        return False
    if device not in _FP32_OUT_MM:
        try:
            a = torch.randn(64, 48, device=device, dtype=torch.bfloat16)
            b = torch.randn(48, 32, device=device, dtype=torch.bfloat16)
            acc = torch.ones(64, 32, device=device)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            prod = torch.empty(64, 32, device=device)
            torch.mm(a, b, out_dtype=torch.float32, out=prod)
            want = a.float() @ b.float()
            ok = torch.allclose(acc, want + 1, rtol=1e-3, atol=1e-3) and torch.allclose(
                prod, want, rtol=1e-3, atol=1e-3
            )
        except (RuntimeError, TypeError):
            ok = False
        _FP32_OUT_MM[device] = ok
    return _FP32_OUT_MM[device]


def _accumulate_grads(
    dz_CV: torch.Tensor, h_CD: torch.Tensor, weight_VD: torch.Tensor, gh_CD: torch.Tensor | None, gw_VD: torch.Tensor
) -> None:
    """gh_CD = dz_CV @ W (gh_CD in fp32 or the compute dtype), gw_VD += dz_CV^T @ h_CD (gw_VD in fp32).

    cuBLAS accumulates in fp32 either way; writing fp32 results directly keeps dW from being rounded to bf16 once per
    chunk (the reference rounds it once in all) and dhidden from being rounded before the grad_output scaling."""
    same = dz_CV.dtype == torch.float32
    wide = not same and _fp32_out_mm(dz_CV.device)
    if gh_CD is not None:
        if same or gh_CD.dtype == dz_CV.dtype:
            torch.mm(dz_CV, weight_VD, out=gh_CD)
        elif wide:
            torch.mm(dz_CV, weight_VD, out_dtype=torch.float32, out=gh_CD)
        else:
            gh_CD.copy_(dz_CV @ weight_VD)
    if gw_VD is not None:
        if same:
            gw_VD.addmm_(dz_CV.t(), h_CD)
        elif wide:
            torch.addmm(gw_VD, dz_CV.t(), h_CD, out_dtype=torch.float32, out=gw_VD)
        else:
            gw_VD.add_(dz_CV.t() @ h_CD)


def linear_ce_bwd(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_N: torch.Tensor,
    token_weight_N: torch.Tensor | None,
    lse_N2: torch.Tensor,
    grad_loss_N: torch.Tensor,
    ignore_index: int,
    grad_hidden: bool,
    grad_weight: bool,
    chunk: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of the "none" reduction for an arbitrary per-token grad_loss_N: recomputes each chunk's logits and
    returns (dL/dhidden [N, D] in the compute dtype or empty, dL/dW [V, D] fp32 or empty)."""
    _check_inputs(hidden_ND, weight_VD, labels_N)
    n, d = hidden_ND.shape
    v = weight_VD.shape[0]
    hidden_ND, weight_VD, labels_N = hidden_ND.contiguous(), weight_VD.contiguous(), labels_N.contiguous()
    has_weight = token_weight_N is not None
    tw_N = token_weight_N.to(torch.float32).contiguous() if has_weight else labels_N
    g_N = grad_loss_N.to(torch.float32).contiguous()  # may arrive expanded (stride 0) from a .sum()
    lse_N2 = lse_N2.contiguous()
    gh_ND = torch.empty_like(hidden_ND) if grad_hidden else hidden_ND.new_empty(0)
    gw_VD = torch.zeros(v, d, dtype=torch.float32, device=hidden_ND.device) if grad_weight else None
    if not (grad_hidden or grad_weight):
        return gh_ND, hidden_ND.new_empty(0, dtype=torch.float32)

    c = chunk or chunk_rows(n, v, d)
    bv = block_v or _block_v(v)
    logits_CV = torch.empty(min(c, n), v, dtype=hidden_ND.dtype, device=hidden_ND.device)
    for start in range(0, n, c):
        stop = min(start + c, n)
        rows = stop - start
        h_CD = hidden_ND[start:stop]
        z_CV = logits_CV[:rows]
        torch.mm(h_CD, weight_VD.t(), out=z_CV)
        _linear_ce_bwd_kernel[(rows,)](
            z_CV,
            z_CV.stride(0),
            labels_N[start:stop],
            tw_N[start:stop],
            g_N[start:stop],
            lse_N2[start:stop],
            v,
            ignore_index,
            HAS_WEIGHT=has_weight,
            BLOCK_V=bv,
            num_warps=8,
        )
        _accumulate_grads(z_CV, h_CD, weight_VD, gh_ND[start:stop] if grad_hidden else None, gw_VD)
    return gh_ND, gw_VD if gw_VD is not None else hidden_ND.new_empty(0, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Custom ops (what torch.compile sees) and their autograd.


@torch.library.custom_op("minimind::linear_ce_fwd", mutates_args=())
def _linear_ce_fwd_op(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_N: torch.Tensor,
    token_weight_N: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    grad_hidden: bool,
    grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return linear_ce_fwd(
        hidden_ND, weight_VD, labels_N, token_weight_N, ignore_index, reduction, grad_hidden, grad_weight
    )


@_linear_ce_fwd_op.register_fake
def _(hidden_ND, weight_VD, labels_N, token_weight_N, ignore_index, reduction, grad_hidden, grad_weight):
    n, d = hidden_ND.shape
    v = weight_VD.shape[0]
    f32 = torch.float32
    write_grad = reduction != "none" and (grad_hidden or grad_weight)
    loss = hidden_ND.new_empty(n, dtype=f32) if reduction == "none" else hidden_ND.new_empty((), dtype=f32)
    gh = hidden_ND.new_empty(n, d, dtype=f32) if write_grad and grad_hidden else hidden_ND.new_empty(0)
    gw = hidden_ND.new_empty(v, d, dtype=f32) if write_grad and grad_weight else hidden_ND.new_empty(0, dtype=f32)
    return loss, hidden_ND.new_empty(n, 2, dtype=f32), gh, gw


@torch.library.custom_op("minimind::linear_ce_bwd", mutates_args=())
def _linear_ce_bwd_op(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_N: torch.Tensor,
    token_weight_N: torch.Tensor | None,
    lse_N2: torch.Tensor,
    grad_loss_N: torch.Tensor,
    ignore_index: int,
    grad_hidden: bool,
    grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_ce_bwd(
        hidden_ND, weight_VD, labels_N, token_weight_N, lse_N2, grad_loss_N, ignore_index, grad_hidden, grad_weight
    )


@_linear_ce_bwd_op.register_fake
def _(hidden_ND, weight_VD, labels_N, token_weight_N, lse_N2, grad_loss_N, ignore_index, grad_hidden, grad_weight):
    v, d = weight_VD.shape
    gh = torch.empty_like(hidden_ND) if grad_hidden else hidden_ND.new_empty(0)
    gw = hidden_ND.new_empty(v, d, dtype=torch.float32) if grad_weight else hidden_ND.new_empty(0, dtype=torch.float32)
    return gh, gw


class _LinearCEFn:
    """The autograd of minimind::linear_ce_fwd, registered through torch.library.register_autograd (the custom-op
    form of a torch.autograd.Function: setup_context saves, backward scales or recomputes)."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        hidden_ND, weight_VD, labels_N, token_weight_N, ignore_index, reduction, grad_hidden, grad_weight = inputs
        _, lse_N2, gh_ND, gw_VD = output
        ctx.reduction, ctx.ignore_index = reduction, ignore_index
        ctx.grad_hidden, ctx.grad_weight = grad_hidden, grad_weight
        ctx.hidden_dtype, ctx.weight_dtype = hidden_ND.dtype, weight_VD.dtype
        ctx.mark_non_differentiable(lse_N2, gh_ND, gw_VD)
        if reduction == "none":
            ctx.save_for_backward(hidden_ND, weight_VD, labels_N, token_weight_N, lse_N2)
        else:
            ctx.save_for_backward(gh_ND, gw_VD)

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_gh, _grad_gw):
        rest = (None,) * 6  # labels, token_weight, ignore_index, reduction and the two flags
        if grad_loss is None:
            return (None, None, *rest)
        if ctx.reduction == "none":
            hidden_ND, weight_VD, labels_N, token_weight_N, lse_N2 = ctx.saved_tensors
            gh, gw = _linear_ce_bwd_op(
                hidden_ND,
                weight_VD,
                labels_N,
                token_weight_N,
                lse_N2,
                grad_loss,
                ctx.ignore_index,
                ctx.grad_hidden,
                ctx.grad_weight,
            )
        else:
            gh, gw = ctx.saved_tensors
            gh, gw = gh * grad_loss, gw * grad_loss
        return (
            gh.to(ctx.hidden_dtype) if ctx.grad_hidden else None,
            gw.to(ctx.weight_dtype) if ctx.grad_weight else None,
            *rest,
        )


_linear_ce_fwd_op.register_autograd(_LinearCEFn.backward, setup_context=_LinearCEFn.setup_context)


def linear_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_N: torch.Tensor,
    ignore_index: int = -100,
    token_weight_N: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of softmax(hidden @ weight.T) against labels; same contract as reference.linear_cross_entropy
    (reduction "mean" | "sum" | "none", weights outside the mean's denominator, fp32 loss), fused and chunked."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    weight_VD = weight_VD.to(hidden_ND.dtype)
    grad_on = torch.is_grad_enabled()
    loss, _, _, _ = _linear_ce_fwd_op(
        hidden_ND,
        weight_VD,
        labels_N,
        token_weight_N,
        ignore_index,
        reduction,
        grad_on and hidden_ND.requires_grad,
        grad_on and weight_VD.requires_grad,
    )
    return loss
