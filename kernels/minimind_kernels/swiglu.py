"""SwiGLU activation, silu(gate) * up, in Triton (Shazeer 2020, "GLU Variants Improve Transformer", FFN_SwiGLU
without the projections).

Shapes: gate, up [..., F] (F = FFN width, 1408/1728/2048 for the presets), flattened to N rows; each may have its own
row stride (e.g. halves of a fused gate/up projection), unit stride along F. Output [..., F] contiguous in gate's
dtype.

With s = sigmoid(g), all in fp32:
    y     = g * s * u
    dg    = dy * u * s * (1 + g * (1 - s))          (d silu(g) / dg = s + g * s * (1 - s))
    du    = dy * g * s
The backward recomputes s from the saved gate instead of keeping silu(g) [N, F] alive between the passes.

Tiles are BLOCK_M rows by BLOCK_N = 128 columns (2048 elements, 4 warps): 128 divides 1408 and 2048 and leaves half a
block of 1728, and short rows of any F are masked.

Entry point `swiglu(gate, up)` has exactly the signature of minimind_kernels.reference.swiglu. Eager calls go through
`_SwiGLUFn`; under torch.compile the launchers are reached through the torch.library ops `minimind::swiglu_fwd` /
`minimind::swiglu_bwd`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from minimind_kernels._compat import rows

_BLOCK_M, _BLOCK_N = 16, 128


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y, n_rows, n_cols, stride_g, stride_u, stride_y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (row < n_rows)[:, None] & (col < n_cols)[None, :]
    row64 = row.to(tl.int64)[:, None]
    g = tl.load(G + row64 * stride_g + col[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row64 * stride_u + col[None, :], mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row64 * stride_y + col[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU, n_rows, n_cols, stride_dy, stride_g, stride_u, stride_dg, stride_du,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (row < n_rows)[:, None] & (col < n_cols)[None, :]
    row64 = row.to(tl.int64)[:, None]
    dy = tl.load(DY + row64 * stride_dy + col[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row64 * stride_g + col[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row64 * stride_u + col[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * g * s
    tl.store(DG + row64 * stride_dg + col[None, :], dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row64 * stride_du + col[None, :], du.to(DU.dtype.element_ty), mask=mask)


def _grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    return triton.cdiv(n_rows, _BLOCK_M), triton.cdiv(n_cols, _BLOCK_N)


# ---- host launchers: plain tensors in and out -------------------------------------------------------------------


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, shaped like gate, contiguous, in gate's dtype."""
    assert gate.shape == up.shape, f"swiglu: gate {tuple(gate.shape)} != up {tuple(up.shape)}"
    g, u = rows(gate), rows(up)
    n_rows, n_cols = g.shape
    y = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if y.numel():
        _swiglu_fwd_kernel[_grid(n_rows, n_cols)](
            g, u, y, n_rows, n_cols, g.stride(0), u.stride(0), y.stride(0), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N
        )
    return y.view(gate.shape)


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate in gate's dtype, dup in up's dtype), both contiguous and shaped like gate."""
    assert dy.shape == gate.shape == up.shape, "swiglu: dy, gate and up must have one shape"
    d, g, u = rows(dy), rows(gate), rows(up)
    n_rows, n_cols = g.shape
    dg = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    du = torch.empty((n_rows, n_cols), dtype=up.dtype, device=up.device)
    if dg.numel():
        _swiglu_bwd_kernel[_grid(n_rows, n_cols)](
            d, g, u, dg, du, n_rows, n_cols,
            d.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0),
            BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
        )  # fmt: skip
    return dg.view(gate.shape), du.view(gate.shape)


# ---- torch.library ops: what torch.compile traces (the launchers cannot run on fake tensors) --------------------

_swiglu_fwd_op = torch.library.custom_op("minimind::swiglu_fwd", mutates_args=())(swiglu_fwd)
_swiglu_bwd_op = torch.library.custom_op("minimind::swiglu_bwd", mutates_args=())(swiglu_bwd)


@_swiglu_fwd_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@_swiglu_bwd_op.register_fake
def _(dy, gate, up):
    fmt = torch.contiguous_format
    return torch.empty_like(gate, memory_format=fmt), torch.empty_like(up, memory_format=fmt)


# ---- autograd -------------------------------------------------------------------------------------------------------
# setup_context / backward serve both the autograd.Function (eager, calls the launcher) and the op's registered
# autograd (torch.compile, calls the backward op).


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(bwd, ctx, dy):
    gate, up = ctx.saved_tensors
    return bwd(dy, gate, up)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(gate, up):
        return swiglu_fwd(gate, up)

    setup_context = staticmethod(_swiglu_setup)

    @staticmethod
    def backward(ctx, dy):
        return _swiglu_backward(swiglu_bwd, ctx, dy)


_swiglu_fwd_op.register_autograd(functools.partial(_swiglu_backward, _swiglu_bwd_op), setup_context=_swiglu_setup)


# ---- public op ------------------------------------------------------------------------------------------------------


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; see minimind_kernels.reference.swiglu."""
    if torch.compiler.is_compiling():
        return _swiglu_fwd_op(gate, up)
    return _SwiGLUFn.apply(gate, up)
