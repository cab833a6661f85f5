"""RMSNorm and the residual add fused with it, in Triton.

Shapes: x, delta [..., D] are flattened to N rows of D (D = hidden size, 512/640/768 for the presets); weight [D].

Forward, one row r (Zhang & Sennrich 2019, eq. 4, without the bias; casting as in HF Llama / reference.py):
    h       = x + delta                                  (add_rmsnorm only; stored in x's dtype)
    rstd_r  = 1 / sqrt(mean_j h_rj^2 + eps)              fp32 sum of squares; rstd saved per row for backward
    xhat_rj = h_rj * rstd_r                              fp32, rounded to x's dtype (the reference's cast)
    y_rj    = xhat_rj * w_j                              fp32 product, rounded to x's dtype, stored in y's dtype
Backward, with g = dy * w (fp32 throughout):
    dh_rj   = rstd_r * (g_rj - xhat_rj * mean_j(g_rj * xhat_rj))   (+ the upstream dh for add_rmsnorm)
    dw_j    = sum_r dy_rj * xhat_rj
add_rmsnorm hands the same dh to x and to delta (h = x + delta). dw is reduced without atomics: each program of a
persistent grid walks a contiguous range of rows, accumulates its own fp32 partial [D], and the partials [P, D] are
summed at the end.

A program handles BLOCK_M rows of BLOCK_N = next_pow2(D) columns (masked, so D = 80 or 640 works); for the model's
hidden sizes that is a 4-8 row tile of ~4096 elements, which amortises the per-program cost over several short rows.

Output dtype under autocast. The model keeps its residual stream in fp32 under bf16 autocast, and every consumer of
a norm output is a linear layer, which autocast feeds bf16 (an extra cast kernel that re-reads the fp32 output). So
when autocast is on for x's device, `rmsnorm` and `add_rmsnorm` store y directly in autocast's dtype
(torch.get_autocast_dtype): the value the reference's fp32 y has after that cast, y_rj rounded to x's dtype and then
to autocast's (one rounding when x is fp32), in half the bytes. The residual sum h, rstd and dx stay in x's dtype and
dw in the weight's; the backward reads dy in whatever dtype it arrives in (bf16 then). Outside autocast, or with
AUTOCAST_OUTPUT off, y is in x's dtype as in reference.py. The dtype is read at the entry points and passed to the
launchers and ops as the argument `out_dtype`, so the ops stay pure functions of their arguments.

    AUTOCAST_OUTPUT = True      module setting, on by default; a benchmark may set it to False to compare. The
                                environment variable MINIMIND_NORM_AUTOCAST_OUT=0 turns it off at import.

Entry points: `rmsnorm(x, weight, eps)` and `add_rmsnorm(x, delta, weight, eps)`, with exactly the signatures of
reference.py. Eager calls go through `_RMSNormFn` / `_AddRMSNormFn` (torch.autograd.Function, low overhead);
under torch.compile the same launchers are reached through the torch.library ops `minimind::rmsnorm_fwd` etc., whose
fake and autograd registrations let the compiler trace through without a graph break.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from minimind_kernels._compat import persistent_programs, rows

# Store the norm output in autocast's dtype when autocast is on (see the module docstring); read at each call.
AUTOCAST_OUTPUT = os.environ.get("MINIMIND_NORM_AUTOCAST_OUT", "1") != "0"


@triton.jit
def _rmsnorm_fwd_kernel(
    X, DELTA, H, Y, W, RSTD,
    n_rows, n_cols, stride_x, stride_delta, stride_h, stride_y, eps,
    HAS_DELTA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, BLOCK_N)
    row_ok = row < n_rows
    mask = row_ok[:, None] & (col < n_cols)[None, :]
    row64 = row.to(tl.int64)[:, None]
    x = tl.load(X + row64 * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(DELTA + row64 * stride_delta + col[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + d).to(H.dtype.element_ty)
        tl.store(H + row64 * stride_h + col[None, :], h, mask=mask)
        x = h.to(tl.float32)  # the norm sees h as stored, like the reference
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    # rounded to x's dtype (the reference's casts), then to y's (autocast's cast at the next linear; none without it)
    xhat = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + col, mask=col < n_cols, other=0.0).to(tl.float32)
    y = (xhat * w[None, :]).to(X.dtype.element_ty).to(Y.dtype.element_ty)
    tl.store(Y + row64 * stride_y + col[None, :], y, mask=mask)
    tl.store(RSTD + row, rstd, mask=row_ok)


@triton.jit
def _rmsnorm_bwd_kernel(
    DY, X, W, RSTD, DH, DX, DW_PARTIAL,
    n_rows, n_cols, stride_dy, stride_x, stride_dh, stride_dx, rows_per_program,
    HAS_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    col = tl.arange(0, BLOCK_N)
    col_ok = col < n_cols
    w = tl.load(W + col, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, BLOCK_M):
        row = start + tl.arange(0, BLOCK_M)
        row_ok = row < last
        mask = row_ok[:, None] & col_ok[None, :]
        row64 = row.to(tl.int64)[:, None]
        x = tl.load(X + row64 * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + col[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        dx = (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None]) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + row64 * stride_dh + col[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row64 * stride_dx + col[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += dy * xhat
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + col, tl.sum(dw, axis=0), mask=col_ok)


def _tile(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N columns, num_warps): ~4096-element tiles, 8 warps (4 for small tiles)."""
    block_n = triton.next_power_of_2(n_cols)
    assert block_n <= 65536, f"rmsnorm: rows of {n_cols} elements do not fit one tile"
    block_m = max(1, min(16, 4096 // block_n))
    num_warps = 4 if block_m * block_n <= 1024 else (8 if block_n <= 8192 else 16)
    return block_m, block_n, num_warps


def _check_weight(weight: torch.Tensor, n_cols: int) -> torch.Tensor:
    assert weight.shape == (n_cols,), f"weight shape {tuple(weight.shape)} != ({n_cols},)"
    return weight.contiguous()


def _norm_fwd(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None
):
    n_cols = x.shape[-1]
    w = _check_weight(weight, n_cols)
    x2 = rows(x)
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=out_dtype or x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if delta is not None:
        assert delta.shape == x.shape, f"add_rmsnorm: delta {tuple(delta.shape)} != x {tuple(x.shape)}"
        d2 = rows(delta)
        h = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    else:
        d2, h = x2, y  # unused: HAS_DELTA is off
    if n_rows:
        block_m, block_n, num_warps = _tile(n_cols)
        _rmsnorm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, d2, h, y, w, rstd,
            n_rows, n_cols, x2.stride(0), d2.stride(0), h.stride(0), y.stride(0), eps,
            HAS_DELTA=delta is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
    return h.view(x.shape), y.view(x.shape), rstd


def _norm_bwd(dy: torch.Tensor, dh: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
              need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    n_cols = x.shape[-1]
    w = _check_weight(weight, n_cols)
    x2, dy2 = rows(x), rows(dy)
    dh2 = rows(dh) if dh is not None else dy2
    n_rows = x2.shape[0]
    assert dy2.shape == x2.shape and dh2.shape == x2.shape and rstd.shape == (n_rows,)
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    block_m, block_n, num_warps = _tile(n_cols)
    blocks = triton.cdiv(n_rows, block_m)
    programs = persistent_programs(x.device, blocks)
    partial = torch.empty((programs, n_cols) if need_dw else (0,), dtype=torch.float32, device=x.device)
    if n_rows:
        _rmsnorm_bwd_kernel[(programs,)](
            dy2, x2, w, rstd, dh2, dx, partial,
            n_rows, n_cols, dy2.stride(0), x2.stride(0), dh2.stride(0), dx.stride(0),
            triton.cdiv(blocks, programs) * block_m,
            HAS_DH=dh is not None, COMPUTE_DW=need_dw, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
    if not need_dw:
        dw = weight.new_empty(0)
    elif n_rows:
        dw = partial.sum(0).to(weight.dtype)
    else:
        dw = torch.zeros_like(weight)
    return dx.view(x.shape), dw


# ---- host launchers: plain tensors in and out -------------------------------------------------------------------


def rmsnorm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = rmsnorm(x) * weight, shaped like x in out_dtype (None: x's dtype); rstd [N] fp32 (one per row) for the
    backward."""
    _, y, rstd = _norm_fwd(x, None, weight, eps, out_dtype)
    return y, rstd


def rmsnorm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, need_dw: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dw in weight's dtype); dw is an empty tensor when need_dw is False."""
    return _norm_bwd(dy, None, x, weight, rstd, need_dw)


def add_rmsnorm_fwd(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h = x + delta, rmsnorm(h) * weight, rstd [N] fp32); h is in x's dtype, the norm in out_dtype (None: x's)."""
    return _norm_fwd(x, delta, weight, eps, out_dtype)


def add_rmsnorm_bwd(
    dh: torch.Tensor | None, dn: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, need_dw: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh_total = dh + norm backward of dn, in h's dtype: the gradient of both x and delta; dw or an empty tensor)."""
    return _norm_bwd(dn, dh, h, weight, rstd, need_dw)


# ---- torch.library ops: what torch.compile traces (the launchers cannot run on fake tensors) --------------------

_rmsnorm_fwd_op = torch.library.custom_op("minimind::rmsnorm_fwd", mutates_args=())(rmsnorm_fwd)
_rmsnorm_bwd_op = torch.library.custom_op("minimind::rmsnorm_bwd", mutates_args=())(rmsnorm_bwd)
_add_rmsnorm_fwd_op = torch.library.custom_op("minimind::add_rmsnorm_fwd", mutates_args=())(add_rmsnorm_fwd)
_add_rmsnorm_bwd_op = torch.library.custom_op("minimind::add_rmsnorm_bwd", mutates_args=())(add_rmsnorm_bwd)


def _fake_rstd(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


def _fake_dw(weight: torch.Tensor, need_dw: bool) -> torch.Tensor:
    return torch.empty_like(weight) if need_dw else weight.new_empty(0)


@_rmsnorm_fwd_op.register_fake
def _(x, weight, eps, out_dtype=None):
    y = torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format)
    return y, _fake_rstd(x)


@_rmsnorm_bwd_op.register_fake
def _(dy, x, weight, rstd, need_dw):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _fake_dw(weight, need_dw)


@_add_rmsnorm_fwd_op.register_fake
def _(x, delta, weight, eps, out_dtype=None):
    h = torch.empty_like(x, memory_format=torch.contiguous_format)
    return h, torch.empty_like(h, dtype=out_dtype or x.dtype), _fake_rstd(x)


@_add_rmsnorm_bwd_op.register_fake
def _(dh, dn, h, weight, rstd, need_dw):
    return torch.empty_like(h, memory_format=torch.contiguous_format), _fake_dw(weight, need_dw)


# ---- autograd -------------------------------------------------------------------------------------------------------
# One setup_context / backward pair per op serves both paths: the autograd.Function (eager) calls the launchers, the
# op's registered autograd (torch.compile) calls the backward op.


def _rmsnorm_setup(ctx, inputs, output):
    x, weight = inputs[:2]
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, output[1])


def _rmsnorm_backward(bwd, ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[1]
    dx, dw = bwd(dy, x, weight, rstd, need_dw)
    return (dx, dw if need_dw else None) + (None,) * (ctx.n_inputs - 2)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, eps, out_dtype):
        return rmsnorm_fwd(x, weight, eps, out_dtype)

    setup_context = staticmethod(_rmsnorm_setup)

    @staticmethod
    def backward(ctx, dy, drstd):
        return _rmsnorm_backward(rmsnorm_bwd, ctx, dy, drstd)


def _add_rmsnorm_setup(ctx, inputs, output):
    x, delta, weight = inputs[:3]
    ctx.n_inputs = len(inputs)
    h, _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # an unused h (the last layer's residual) costs no zero tensor
    ctx.save_for_backward(h, weight, rstd)
    ctx.delta_dtype = delta.dtype


def _add_rmsnorm_backward(bwd, ctx, dh, dn, _drstd):
    h, weight, rstd = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[2]
    if dn is None:  # the norm output is unused: only the residual path carries a gradient
        dx = dh if dh is not None else torch.zeros_like(h)
        dw = torch.zeros_like(weight) if need_dw else None
    else:
        dx, dw = bwd(dh, dn, h, weight, rstd, need_dw)
    ddelta = dx if ctx.delta_dtype == dx.dtype else dx.to(ctx.delta_dtype)
    return (dx, ddelta, dw if need_dw else None) + (None,) * (ctx.n_inputs - 3)


class _AddRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(x, delta, weight, eps, out_dtype):
        return add_rmsnorm_fwd(x, delta, weight, eps, out_dtype)

    setup_context = staticmethod(_add_rmsnorm_setup)

    @staticmethod
    def backward(ctx, dh, dn, drstd):
        return _add_rmsnorm_backward(add_rmsnorm_bwd, ctx, dh, dn, drstd)


_rmsnorm_fwd_op.register_autograd(functools.partial(_rmsnorm_backward, _rmsnorm_bwd_op), setup_context=_rmsnorm_setup)
_add_rmsnorm_fwd_op.register_autograd(
    functools.partial(_add_rmsnorm_backward, _add_rmsnorm_bwd_op), setup_context=_add_rmsnorm_setup
)


# ---- public ops -----------------------------------------------------------------------------------------------------


def _out_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the norm output is stored in: autocast's when it is on for x's device and AUTOCAST_OUTPUT is set and
    it differs from x's; else None (x's dtype)."""
    if AUTOCAST_OUTPUT and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return dtype if dtype != x.dtype else None
    return None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """y = (x / sqrt(mean(x^2) + eps)) * weight over the last dim; see minimind_kernels.reference.rmsnorm.
    Under autocast y is in autocast's dtype (module docstring)."""
    out_dtype = _out_dtype(x)
    if torch.compiler.is_compiling():
        return _rmsnorm_fwd_op(x, weight, eps, out_dtype)[0]
    return _RMSNormFn.apply(x, weight, eps, out_dtype)[0]


def add_rmsnorm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + delta; returns (h, rmsnorm(h)) in one pass; see minimind_kernels.reference.add_rmsnorm. h is in x's
    dtype; under autocast the norm is in autocast's dtype (module docstring)."""
    out_dtype = _out_dtype(x)
    if torch.compiler.is_compiling():
        h, n, _ = _add_rmsnorm_fwd_op(x, delta, weight, eps, out_dtype)
    else:
        h, n, _ = _AddRMSNormFn.apply(x, delta, weight, eps, out_dtype)
    return h, n
