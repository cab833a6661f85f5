"""QK-norm fused with rotary position embedding, for queries and keys in one Triton launch (MiniMind-3 / Qwen3).

Shapes: q [B, T, H, D], k [B, T, Hkv, D] (any strides with unit stride along D, e.g. a .view of a [B, T, H*D]
projection, or a slice of a wider one); gains q_weight, k_weight [D], one shared by all query heads and one by all key
heads; cos, sin [T, D2] or [B, T, D2] fp32 with D2 = D / 2, one row per position (a KV-cache offset or per-sequence
positions come through these rows). Outputs are new contiguous tensors in q's and k's dtypes.

Forward, for one head vector x in R^D of one token (a query head with w = q_weight, or a key head with w = k_weight);
RMSNorm (Zhang & Sennrich 2019, eq. 4, without the bias) over head_dim, then the non-interleaved "rotate-half" RoPE
(RoFormer, Su et al. 2021, eq. 34, the two halves of the head as the coordinates of each pair), for i < D2:
    rstd    = 1 / sqrt(mean_j x_j^2 + eps)
    xhat_j  = x_j * rstd
    y_j     = xhat_j * w_j
    out_i      = y_i * cos_i - y_{i+D2} * sin_i
    out_{i+D2} = y_{i+D2} * cos_i + y_i * sin_i
all in fp32 and rounded once to the input's dtype. reference.qk_norm_rope composes rmsnorm and rope and so rounds
xhat, y and out each to the input's dtype; in fp32 the two agree to a few ulps, in bf16 the fused result is the more
accurate one.

Backward, with go = dL/dout (any strides, unit stride along D) for that head:
  through the rotation: out = R y with R a rotation of each pair (i, i + D2), so dL/dy = R^T go = R^{-1} go, the
  inverse rotation (sin -> -sin):
    gy_i      = go_i * cos_i + go_{i+D2} * sin_i
    gy_{i+D2} = go_{i+D2} * cos_i - go_i * sin_i
  through the gain and the norm (the RMSNorm backward, as in rmsnorm.py), with g = gy * w:
    dx_j    = rstd * (g_j - xhat_j * mean_k(g_k * xhat_k))
    dw_j    = sum over all tokens and all heads of the tensor of gy_j * xhat_j
cos and sin get no gradient. The backward recomputes rstd from the saved input x (it reads x anyway to form xhat):
one sum of squares per head vector, free in a memory-bound kernel, instead of an extra [B*T, H + Hkv] fp32 output to
keep alive between the passes. Everything above is fp32; dx is rounded once to the input's dtype, dw to the gain's.

dw is reduced without atomics, as in rmsnorm.py: the backward runs a persistent grid in which each program walks a
contiguous range of tokens, accumulates its fp32 partial dw for q's gain and for k's in registers, and stores them as
one row of a [P, D] buffer each; the host sums the P rows (deterministic for a given grid).

A program handles BLOCK_R consecutive (b, t) tokens: a [BLOCK_R, BLOCK_H, BLOCK_D2] tile of q's halves and one of
k's (BLOCK_HKV heads), sharing one [BLOCK_R, BLOCK_D2] load of cos and sin, as in rope.py (about 2048 elements of
q per half-tile in the forward, 1024 in the backward, which holds more per element). Head counts and D2
(32/40/48 for head_dim 64/80/96) are padded to powers of two and masked; masked lanes load 0 and add nothing to the
sums of squares, whose mean divides by the true D. D2 is a compile-time constant (HALF, one compiled kernel per
head_dim) for the reasons rope.py gives (16-byte vector accesses for D2 = 40 and 48 too).

Entry point `qk_norm_rope(q, k, q_weight, k_weight, eps, cos, sin)` has exactly the signature of
minimind_kernels.reference.qk_norm_rope. Eager calls go through `_QKNormRoPEFn`; under torch.compile the launchers are
reached through the torch.library ops `minimind::qk_norm_rope_fwd` / `minimind::qk_norm_rope_bwd`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from minimind_kernels._compat import persistent_programs


@triton.jit
def _norm_rotate_heads(
    X, OUT, w1, w2, cos, sin, b, t, r64, r_ok, i, i_ok, n_heads, sx_b, sx_t, sx_h, eps,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Forward of the heads of one tensor (q or k) for BLOCK_R tokens: norm, gain, rotation; output contiguous."""
    h = tl.arange(0, BLOCK_H)
    mask = r_ok[:, None, None] & (h < n_heads)[None, :, None] & i_ok[None, None, :]
    src = X + (b * sx_b + t * sx_t)[:, None, None] + (h * sx_h)[None, :, None] + i[None, None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2)) / (2 * HALF) + eps)[:, :, None]
    y1 = x1 * rstd * w1
    y2 = x2 * rstd * w2
    dst = OUT + (r64 * n_heads * 2 * HALF)[:, None, None] + (h * 2 * HALF)[None, :, None] + i[None, None, :]
    tl.store(dst, (y1 * cos - y2 * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (y2 * cos + y1 * sin).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    Q, K, QW, KW, COS, SIN, QO, KO,
    n_rows, seq_len, n_heads, n_kv_heads, eps,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sc_b, sc_t, ss_b, ss_t,
    HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr,
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
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    r64 = r.to(tl.int64)
    qw1 = tl.load(QW + i, mask=i_ok, other=0.0).to(tl.float32)[None, None, :]
    qw2 = tl.load(QW + HALF + i, mask=i_ok, other=0.0).to(tl.float32)[None, None, :]
    kw1 = tl.load(KW + i, mask=i_ok, other=0.0).to(tl.float32)[None, None, :]
    kw2 = tl.load(KW + HALF + i, mask=i_ok, other=0.0).to(tl.float32)[None, None, :]
    _norm_rotate_heads(Q, QO, qw1, qw2, cos, sin, b, t, r64, r_ok, i, i_ok, n_heads, sq_b, sq_t, sq_h, eps,
                       HALF, BLOCK_H)  # fmt: skip
    _norm_rotate_heads(K, KO, kw1, kw2, cos, sin, b, t, r64, r_ok, i, i_ok, n_kv_heads, sk_b, sk_t, sk_h, eps,
                       HALF, BLOCK_HKV)  # fmt: skip


@triton.jit
def _norm_rotate_heads_bwd(
    DO, X, DX, w1, w2, cos, sin, b, t, r64, r_ok, i, i_ok, n_heads, so_b, so_t, so_h, sx_b, sx_t, sx_h, eps,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Backward of the heads of one tensor for BLOCK_R tokens: stores dx (contiguous) and returns the two halves of
    this tile's terms gy * xhat of the gain's gradient (not yet summed)."""
    h = tl.arange(0, BLOCK_H)
    mask = r_ok[:, None, None] & (h < n_heads)[None, :, None] & i_ok[None, None, :]
    src = X + (b * sx_b + t * sx_t)[:, None, None] + (h * sx_h)[None, :, None] + i[None, None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2)) / (2 * HALF) + eps)[:, :, None]
    xh1 = x1 * rstd
    xh2 = x2 * rstd
    grd = DO + (b * so_b + t * so_t)[:, None, None] + (h * so_h)[None, :, None] + i[None, None, :]
    go1 = tl.load(grd, mask=mask, other=0.0).to(tl.float32)
    go2 = tl.load(grd + HALF, mask=mask, other=0.0).to(tl.float32)
    # inverse rotation: the gradient with respect to y = xhat * w
    gy1 = go1 * cos + go2 * sin
    gy2 = go2 * cos - go1 * sin
    g1 = gy1 * w1
    g2 = gy2 * w2
    mean_gx = ((tl.sum(g1 * xh1, axis=2) + tl.sum(g2 * xh2, axis=2)) / (2 * HALF))[:, :, None]
    dst = DX + (r64 * n_heads * 2 * HALF)[:, None, None] + (h * 2 * HALF)[None, :, None] + i[None, None, :]
    tl.store(dst, ((g1 - xh1 * mean_gx) * rstd).to(DX.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, ((g2 - xh2 * mean_gx) * rstd).to(DX.dtype.element_ty), mask=mask)
    return gy1 * xh1, gy2 * xh2


@triton.jit
def _qk_norm_rope_bwd_kernel(
    DQO, DKO, Q, K, QW, KW, COS, SIN, DQ, DK, DQW_PARTIAL, DKW_PARTIAL,
    n_rows, seq_len, n_heads, n_kv_heads, rows_per_program, eps,
    sdq_b, sdq_t, sdq_h, sdk_b, sdk_t, sdk_h, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sc_b, sc_t, ss_b, ss_t,
    HALF: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_HKV: tl.constexpr, BLOCK_D2: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    i = tl.arange(0, BLOCK_D2)
    i_ok = i < HALF
    qw1 = tl.load(QW + i, mask=i_ok, other=0.0).to(tl.float32)[None, None, :]
    qw2 = tl.load(QW + HALF + i, mask=i_ok, other=0.0).to(tl.float32)[None, None, :]
    kw1 = tl.load(KW + i, mask=i_ok, other=0.0).to(tl.float32)[None, None, :]
    kw2 = tl.load(KW + HALF + i, mask=i_ok, other=0.0).to(tl.float32)[None, None, :]
    # per-element partial sums of gy * xhat, reduced over tokens and heads once at the end
    dqw1 = tl.zeros((BLOCK_R, BLOCK_H, BLOCK_D2), dtype=tl.float32)
    dqw2 = tl.zeros((BLOCK_R, BLOCK_H, BLOCK_D2), dtype=tl.float32)
    dkw1 = tl.zeros((BLOCK_R, BLOCK_HKV, BLOCK_D2), dtype=tl.float32)
    dkw2 = tl.zeros((BLOCK_R, BLOCK_HKV, BLOCK_D2), dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        r_ok = r < last
        b = (r // seq_len).to(tl.int64)
        t = (r % seq_len).to(tl.int64)
        cs_mask = r_ok[:, None] & i_ok[None, :]
        cos = tl.load(COS + (b * sc_b + t * sc_t)[:, None] + i[None, :], mask=cs_mask, other=0.0).to(tl.float32)
        sin = tl.load(SIN + (b * ss_b + t * ss_t)[:, None] + i[None, :], mask=cs_mask, other=0.0).to(tl.float32)
        cos = cos[:, None, :]
        sin = sin[:, None, :]
        r64 = r.to(tl.int64)
        a1, a2 = _norm_rotate_heads_bwd(DQO, Q, DQ, qw1, qw2, cos, sin, b, t, r64, r_ok, i, i_ok, n_heads,
                                        sdq_b, sdq_t, sdq_h, sq_b, sq_t, sq_h, eps, HALF, BLOCK_H)  # fmt: skip
        c1, c2 = _norm_rotate_heads_bwd(DKO, K, DK, kw1, kw2, cos, sin, b, t, r64, r_ok, i, i_ok, n_kv_heads,
                                        sdk_b, sdk_t, sdk_h, sk_b, sk_t, sk_h, eps, HALF, BLOCK_HKV)  # fmt: skip
        if COMPUTE_DW:
            dqw1 += a1
            dqw2 += a2
            dkw1 += c1
            dkw2 += c2
    if COMPUTE_DW:
        dst = pid.to(tl.int64) * 2 * HALF + i
        tl.store(DQW_PARTIAL + dst, tl.sum(tl.sum(dqw1, axis=1), axis=0), mask=i_ok)
        tl.store(DQW_PARTIAL + dst + HALF, tl.sum(tl.sum(dqw2, axis=1), axis=0), mask=i_ok)
        tl.store(DKW_PARTIAL + dst, tl.sum(tl.sum(dkw1, axis=1), axis=0), mask=i_ok)
        tl.store(DKW_PARTIAL + dst + HALF, tl.sum(tl.sum(dkw2, axis=1), axis=0), mask=i_ok)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _table(c: torch.Tensor, b: int, t: int, half: int) -> tuple[torch.Tensor, int, int]:
    """A cos/sin table and its (batch, time) strides; a [T, D2] table gets batch stride 0 (shared by all rows)."""
    c = _unit_last(c)
    if c.dim() == 2:
        assert c.shape == (t, half), f"qk_norm_rope: table {tuple(c.shape)} != ({t}, {half})"
        return c, 0, c.stride(0)
    assert c.shape == (b, t, half), f"qk_norm_rope: table {tuple(c.shape)} != ({b}, {t}, {half})"
    return c, c.stride(0), c.stride(1)


def _gain(w: torch.Tensor, dim: int, name: str) -> torch.Tensor:
    assert w.shape == (dim,), f"qk_norm_rope: {name} shape {tuple(w.shape)} != ({dim},)"
    return w.contiguous()


def _shapes(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(B, T, H, Hkv, D) after checking that q [B, T, H, D] and k [B, T, Hkv, D] agree and D is even."""
    assert q.dim() == 4 and k.dim() == 4, "qk_norm_rope: q and k must be [B, T, heads, D]"
    bsz, seq, n_heads, dim = q.shape
    n_kv = k.shape[2]
    assert k.shape == (bsz, seq, n_kv, dim), f"qk_norm_rope: k {tuple(k.shape)} does not match q {tuple(q.shape)}"
    assert dim % 2 == 0, "qk_norm_rope: head_dim must be even"
    return bsz, seq, n_heads, n_kv, dim


# Elements of q per half-tile. Forward: 2048, as rope.py (4 tokens of 8 heads of 96). The backward holds about twice
# as much per element (x and the output gradient, and the gains' partial sums) and gets half the tokens: with 2048 it
# compiled to 231-252 registers per thread on sm_90 (4 warps), at the edge of the 255 that spill; with 1024, 128-167.
_FWD_TILE, _BWD_TILE = 2048, 1024


def _tile(n_heads: int, n_kv: int, half: int, elements: int) -> tuple[int, int, int, int]:
    """(BLOCK_R tokens, BLOCK_H, BLOCK_HKV, BLOCK_D2) for about `elements` elements of q per half-tile."""
    block_h, block_hkv, block_d2 = (triton.next_power_of_2(n) for n in (n_heads, n_kv, half))
    block_r = max(1, min(16, elements // (block_h * block_d2)))
    return block_r, block_h, block_hkv, block_d2


# ---- host launchers: plain tensors in and out -------------------------------------------------------------------


def qk_norm_rope_fwd(
    q_BTHD: torch.Tensor,
    k_BTHkvD: torch.Tensor,
    q_weight_D: torch.Tensor,
    k_weight_D: torch.Tensor,
    eps: float,
    cos_TD2: torch.Tensor,
    sin_TD2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise each head of q and k with its gain, then rotate by the angles in cos/sin. Returns new contiguous
    [B, T, H, D] and [B, T, Hkv, D] tensors in q's and k's dtypes."""
    bsz, seq, n_heads, n_kv, dim = _shapes(q_BTHD, k_BTHkvD)
    half = dim // 2
    q, k = _unit_last(q_BTHD), _unit_last(k_BTHkvD)
    qw, kw = _gain(q_weight_D, dim, "q_weight"), _gain(k_weight_D, dim, "k_weight")
    cos, sc_b, sc_t = _table(cos_TD2, bsz, seq, half)
    sin, ss_b, ss_t = _table(sin_TD2, bsz, seq, half)
    q_out = torch.empty((bsz, seq, n_heads, dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((bsz, seq, n_kv, dim), dtype=k.dtype, device=k.device)
    n_rows = bsz * seq
    if n_rows == 0:
        return q_out, k_out
    block_r, block_h, block_hkv, block_d2 = _tile(n_heads, n_kv, half, _FWD_TILE)
    _qk_norm_rope_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        q, k, qw, kw, cos, sin, q_out, k_out,
        n_rows, seq, n_heads, n_kv, eps,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), sc_b, sc_t, ss_b, ss_t,
        HALF=half, BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_HKV=block_hkv, BLOCK_D2=block_d2, num_warps=4,
    )  # fmt: skip
    return q_out, k_out


def qk_norm_rope_bwd(
    dq_out: torch.Tensor,
    dk_out: torch.Tensor,
    q_BTHD: torch.Tensor,
    k_BTHkvD: torch.Tensor,
    q_weight_D: torch.Tensor,
    k_weight_D: torch.Tensor,
    eps: float,
    cos_TD2: torch.Tensor,
    sin_TD2: torch.Tensor,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq in q's dtype, dk in k's dtype, dq_weight, dk_weight in the gains' dtypes) from the output gradients and the
    forward's inputs; the gains' gradients are empty tensors when need_dw is False."""
    bsz, seq, n_heads, n_kv, dim = _shapes(q_BTHD, k_BTHkvD)
    half = dim // 2
    assert dq_out.shape == q_BTHD.shape and dk_out.shape == k_BTHkvD.shape, "qk_norm_rope: gradient shapes"
    q, k, dqo, dko = (_unit_last(x) for x in (q_BTHD, k_BTHkvD, dq_out, dk_out))
    qw, kw = _gain(q_weight_D, dim, "q_weight"), _gain(k_weight_D, dim, "k_weight")
    cos, sc_b, sc_t = _table(cos_TD2, bsz, seq, half)
    sin, ss_b, ss_t = _table(sin_TD2, bsz, seq, half)
    dq = torch.empty((bsz, seq, n_heads, dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((bsz, seq, n_kv, dim), dtype=k.dtype, device=k.device)
    n_rows = bsz * seq
    block_r, block_h, block_hkv, block_d2 = _tile(n_heads, n_kv, half, _BWD_TILE)
    blocks = triton.cdiv(n_rows, block_r)
    programs = persistent_programs(q.device, blocks)
    shape = (programs, dim) if need_dw else (0,)
    dqw_partial = torch.empty(shape, dtype=torch.float32, device=q.device)
    dkw_partial = torch.empty(shape, dtype=torch.float32, device=q.device)
    if n_rows:
        _qk_norm_rope_bwd_kernel[(programs,)](
            dqo, dko, q, k, qw, kw, cos, sin, dq, dk, dqw_partial, dkw_partial,
            n_rows, seq, n_heads, n_kv, triton.cdiv(blocks, programs) * block_r, eps,
            dqo.stride(0), dqo.stride(1), dqo.stride(2), dko.stride(0), dko.stride(1), dko.stride(2),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), sc_b, sc_t, ss_b, ss_t,
            HALF=half, COMPUTE_DW=need_dw, BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_HKV=block_hkv,
            BLOCK_D2=block_d2, num_warps=4,
        )  # fmt: skip
    if not need_dw:
        dqw, dkw = q_weight_D.new_empty(0), k_weight_D.new_empty(0)
    elif n_rows:
        dqw, dkw = dqw_partial.sum(0).to(q_weight_D.dtype), dkw_partial.sum(0).to(k_weight_D.dtype)
    else:
        dqw, dkw = torch.zeros_like(q_weight_D), torch.zeros_like(k_weight_D)
    return dq, dk, dqw, dkw


# ---- torch.library ops: what torch.compile traces (the launchers cannot run on fake tensors) --------------------

_fwd_op = torch.library.custom_op("minimind::qk_norm_rope_fwd", mutates_args=())(qk_norm_rope_fwd)
_bwd_op = torch.library.custom_op("minimind::qk_norm_rope_bwd", mutates_args=())(qk_norm_rope_bwd)


@_fwd_op.register_fake
def _(q_BTHD, k_BTHkvD, q_weight_D, k_weight_D, eps, cos_TD2, sin_TD2):
    fmt = torch.contiguous_format
    return torch.empty_like(q_BTHD, memory_format=fmt), torch.empty_like(k_BTHkvD, memory_format=fmt)


@_bwd_op.register_fake
def _(dq_out, dk_out, q_BTHD, k_BTHkvD, q_weight_D, k_weight_D, eps, cos_TD2, sin_TD2, need_dw):
    fmt = torch.contiguous_format
    dq, dk = torch.empty_like(q_BTHD, memory_format=fmt), torch.empty_like(k_BTHkvD, memory_format=fmt)
    if not need_dw:
        return dq, dk, q_weight_D.new_empty(0), k_weight_D.new_empty(0)
    return dq, dk, torch.empty_like(q_weight_D), torch.empty_like(k_weight_D)


# ---- autograd -------------------------------------------------------------------------------------------------------
# setup_context / backward serve both the autograd.Function (eager, calls the launcher) and the forward op's
# registered autograd (torch.compile, calls the backward op).


def _setup(ctx, inputs, output):
    q, k, q_weight, k_weight, eps, cos, sin = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)
    ctx.eps = eps
    ctx.set_materialize_grads(False)


def _backward(bwd, ctx, dq_out, dk_out):
    q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
    if dq_out is None and dk_out is None:
        return (None,) * 7
    # q and k go through one launch: an unused output contributes a zero gradient
    if dq_out is None:
        dq_out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    if dk_out is None:
        dk_out = torch.zeros_like(k, memory_format=torch.contiguous_format)
    need_qw, need_kw = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    dq, dk, dqw, dkw = bwd(dq_out, dk_out, q, k, q_weight, k_weight, ctx.eps, cos, sin, need_qw or need_kw)
    return dq, dk, dqw if need_qw else None, dkw if need_kw else None, None, None, None


class _QKNormRoPEFn(torch.autograd.Function):
    @staticmethod
    def forward(q, k, q_weight, k_weight, eps, cos, sin):
        return qk_norm_rope_fwd(q, k, q_weight, k_weight, eps, cos, sin)

    setup_context = staticmethod(_setup)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        return _backward(qk_norm_rope_bwd, ctx, dq_out, dk_out)


_fwd_op.register_autograd(functools.partial(_backward, _bwd_op), setup_context=_setup)


# ---- public op ------------------------------------------------------------------------------------------------------


def qk_norm_rope(
    q_BTHD: torch.Tensor,
    k_BTHkvD: torch.Tensor,
    q_weight_D: torch.Tensor,
    k_weight_D: torch.Tensor,
    eps: float,
    cos_TD2: torch.Tensor,
    sin_TD2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of each head of q [B, T, H, D] and k [B, T, Hkv, D] over head_dim with gains q_weight / k_weight [D],
    then rotary embedding by cos/sin [T, D/2] or [B, T, D/2] (fp32); see minimind_kernels.reference.qk_norm_rope."""
    if torch.compiler.is_compiling():
        return _fwd_op(q_BTHD, k_BTHkvD, q_weight_D, k_weight_D, eps, cos_TD2, sin_TD2)
    return _QKNormRoPEFn.apply(q_BTHD, k_BTHkvD, q_weight_D, k_weight_D, eps, cos_TD2, sin_TD2)
