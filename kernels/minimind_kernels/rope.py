"""Rotary position embedding of q and k in one Triton launch.

Shapes: q [B, T, H, D], k [B, T, Hkv, D] (any strides with unit stride along D, e.g. a .view of a projection or
the transpose of a [B, H, T, D] gradient); cos, sin [T, D2] or [B, T, D2] fp32 with D2 = D / 2, one row per position
(a KV-cache offset or per-sequence positions come through these rows). Outputs are new contiguous tensors in q's and
k's dtypes: rotating out of place leaves autograd's view of the inputs intact.

Non-interleaved "rotate-half" layout (HF Llama; RoFormer, Su et al. 2021, eq. 34, with the two halves of the head
as the coordinates of each pair): for i < D2,
    out_i      = x_i * cos_i - x_{i+D2} * sin_i
    out_{i+D2} = x_{i+D2} * cos_i + x_i * sin_i
in fp32. The map is a rotation, so the backward is the inverse rotation (sin -> -sin) applied to the gradients; cos
and sin never get gradients.

A program rotates BLOCK_R consecutive (b, t) rows: a [BLOCK_R, BLOCK_H, BLOCK_D2] tile of q's halves and one of
k's, sharing one [BLOCK_R, BLOCK_D2] load of cos and sin. Head counts and D2 (32/40/48 for the presets) are padded to
powers of two and masked. D2 is a compile-time constant (HALF, one compiled kernel per head_dim): the compiler then
knows the offset of the second half and that the mask changes only every 8 elements, and issues 16-byte vector loads
and stores for D2 = 40 too. As a runtime argument, only a D2 divisible by 16 (32, 48) got them, from Triton's
specialisation of integer arguments; D2 = 40 got one 2-byte access per bf16 element.

Entry point `rope(q, k, cos, sin)` has exactly the signature of minimind_kernels.reference.rope. Eager calls go through
`_RoPEFn`; under torch.compile the launcher is reached through the torch.library op `minimind::rope`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN,
    n_rows, seq_len, n_heads, n_kv_heads,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sc_b, sc_t, ss_b, ss_t,
    HALF: tl.constexpr, INVERSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr,
    BLOCK_D2: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < n_rows
    b = (r // seq_len).to(tl.int64)
    t = (r % seq_len).to(tl.int64)
    i = tl.arange(0, BLOCK_D2)
    i_ok = i < HALF
    cs_mask = r_ok[:, None] & i_ok[None, :]
    cos = tl.load(COS + (b * sc_b + t * sc_t)[:, None] + i[None, :], mask=cs_mask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + (b * ss_b + t * ss_t)[:, None] + i[None, :], mask=cs_mask, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    r64 = r.to(tl.int64)

    # q: input at its own strides, output contiguous [n_rows, H, D]
    h = tl.arange(0, BLOCK_H)
    mask = r_ok[:, None, None] & (h < n_heads)[None, :, None] & i_ok[None, None, :]
    src = Q + (b * sq_b + t * sq_t)[:, None, None] + (h * sq_h)[None, :, None] + i[None, None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = QO + (r64 * n_heads * 2 * HALF)[:, None, None] + (h * 2 * HALF)[None, :, None] + i[None, None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(QO.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(QO.dtype.element_ty), mask=mask)

    # k: the same rotation with the key heads
    h = tl.arange(0, BLOCK_HKV)
    mask = r_ok[:, None, None] & (h < n_kv_heads)[None, :, None] & i_ok[None, None, :]
    src = K + (b * sk_b + t * sk_t)[:, None, None] + (h * sk_h)[None, :, None] + i[None, None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = KO + (r64 * n_kv_heads * 2 * HALF)[:, None, None] + (h * 2 * HALF)[None, :, None] + i[None, None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(KO.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(KO.dtype.element_ty), mask=mask)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _table(c: torch.Tensor, b: int, t: int, half: int) -> tuple[torch.Tensor, int, int]:
    """A cos/sin table and its (batch, time) strides; a [T, D2] table gets batch stride 0 (shared by all rows)."""
    c = _unit_last(c)
    if c.dim() == 2:
        assert c.shape == (t, half), f"rope: table {tuple(c.shape)} != ({t}, {half})"
        return c, 0, c.stride(0)
    assert c.shape == (b, t, half), f"rope: table {tuple(c.shape)} != ({b}, {t}, {half})"
    return c, c.stride(0), c.stride(1)


# ---- host launcher: plain tensors in and out --------------------------------------------------------------------


def rope_fwd(
    q_BTHD: torch.Tensor, k_BTHkvD: torch.Tensor, cos_TD2: torch.Tensor, sin_TD2: torch.Tensor, inverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by the angles in cos/sin (or by their negatives when `inverse`: the backward of the rotation).

    Returns new contiguous [B, T, H, D] and [B, T, Hkv, D] tensors in q's and k's dtypes.
    """
    assert q_BTHD.dim() == 4 and k_BTHkvD.dim() == 4, "rope: q and k must be [B, T, heads, D]"
    bsz, seq, n_heads, dim = q_BTHD.shape
    n_kv = k_BTHkvD.shape[2]
    assert k_BTHkvD.shape == (bsz, seq, n_kv, dim), f"rope: k {tuple(k_BTHkvD.shape)} does not match q"
    assert dim % 2 == 0, "rope: head_dim must be even"
    half = dim // 2
    q, k = _unit_last(q_BTHD), _unit_last(k_BTHkvD)
    cos, sc_b, sc_t = _table(cos_TD2, bsz, seq, half)
    sin, ss_b, ss_t = _table(sin_TD2, bsz, seq, half)
    q_out = torch.empty((bsz, seq, n_heads, dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((bsz, seq, n_kv, dim), dtype=k.dtype, device=k.device)
    n_rows = bsz * seq
    if n_rows == 0:
        return q_out, k_out
    block_h, block_hkv = triton.next_power_of_2(n_heads), triton.next_power_of_2(n_kv)
    block_d2 = triton.next_power_of_2(half)
    # ~2048 elements of q per half-tile: 4 tokens for 8 heads of 64
    block_r = max(1, min(16, 2048 // (block_h * block_d2)))
    _rope_kernel[(triton.cdiv(n_rows, block_r),)](
        q, k, q_out, k_out, cos, sin,
        n_rows, seq, n_heads, n_kv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), sc_b, sc_t, ss_b, ss_t,
        HALF=half, INVERSE=inverse, BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_HKV=block_hkv, BLOCK_D2=block_d2,
        num_warps=4,
    )  # fmt: skip
    return q_out, k_out


def rope_bwd(
    dq: torch.Tensor, dk: torch.Tensor, cos_TD2: torch.Tensor, sin_TD2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of q and k: the inverse rotation of the output gradients."""
    return rope_fwd(dq, dk, cos_TD2, sin_TD2, inverse=True)


# ---- torch.library op: what torch.compile traces (the launcher cannot run on fake tensors) -----------------------

_rope_op = torch.library.custom_op("minimind::rope", mutates_args=())(rope_fwd)


@_rope_op.register_fake
def _(q_BTHD, k_BTHkvD, cos_TD2, sin_TD2, inverse=False):
    fmt = torch.contiguous_format
    return torch.empty_like(q_BTHD, memory_format=fmt), torch.empty_like(k_BTHkvD, memory_format=fmt)


# ---- autograd -------------------------------------------------------------------------------------------------------
# setup_context / backward serve both the autograd.Function (eager, calls the launcher) and the op's registered
# autograd (torch.compile, calls the op again with inverse flipped).


def _rope_setup(ctx, inputs, output):
    q, k, cos, sin = inputs[:4]
    ctx.save_for_backward(cos, sin)
    ctx.inverse = bool(inputs[4]) if len(inputs) > 4 else False
    ctx.n_inputs = len(inputs)
    ctx.q_meta, ctx.k_meta = (q.shape, q.dtype), (k.shape, k.dtype)
    ctx.set_materialize_grads(False)


def _rope_backward(rotate, ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    nones = (None,) * (ctx.n_inputs - 2)
    if dq is None and dk is None:
        return (None, None) + nones
    # q and k rotate in one launch: an unused output contributes a zero gradient
    if dq is None:
        dq = torch.zeros(ctx.q_meta[0], dtype=ctx.q_meta[1], device=cos.device)
    if dk is None:
        dk = torch.zeros(ctx.k_meta[0], dtype=ctx.k_meta[1], device=cos.device)
    return rotate(dq, dk, cos, sin, not ctx.inverse) + nones


class _RoPEFn(torch.autograd.Function):
    @staticmethod
    def forward(q, k, cos, sin):
        return rope_fwd(q, k, cos, sin)

    setup_context = staticmethod(_rope_setup)

    @staticmethod
    def backward(ctx, dq, dk):
        return _rope_backward(rope_fwd, ctx, dq, dk)


_rope_op.register_autograd(functools.partial(_rope_backward, _rope_op), setup_context=_rope_setup)


# ---- public op ------------------------------------------------------------------------------------------------------


def rope(
    q_BTHD: torch.Tensor, k_BTHkvD: torch.Tensor, cos_TD2: torch.Tensor, sin_TD2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [B, T, H, D] and k [B, T, Hkv, D]; cos/sin [T, D/2] or [B, T, D/2] (fp32)."""
    if torch.compiler.is_compiling():
        return _rope_op(q_BTHD, k_BTHkvD, cos_TD2, sin_TD2)
    return _RoPEFn.apply(q_BTHD, k_BTHkvD, cos_TD2, sin_TD2)
