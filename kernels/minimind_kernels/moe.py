"""Routed MoE experts in Triton: a device-side counting sort by expert, grouped GEMMs, a gather-combine.

Math (same op as reference.moe_experts). Each token n picks K experts idx[n,k] with weights w[n,k]; pair p = n*K + k.
    G_p = x_n Wg_e^T,  U_p = x_n Wu_e^T          (e = idx[n,k]; [F] each)
    H_p = silu(G_p) * U_p,  O_p = H_p Wd_e^T      ([F], [D])
    y_n = sum_k w[n,k] O_{nK+k}
Backward, with dO_p = w[n,k] dy_n and silu'(g) = s (1 + g (1 - s)), s = sigmoid(g):
    dw[n,k] = <dy_n, O_p>
    dH_p = dO_p Wd_e,  dG_p = dH_p * U_p * silu'(G_p),  dU_p = dH_p * silu(G_p)
    dx_n = sum_k (dG_p Wg_e + dU_p Wu_e)
    dWd_e = sum_{p in e} dO_p^T H_p,  dWg_e = sum_{p in e} dG_p^T x_n,  dWu_e = sum_{p in e} dU_p^T x_n

Pipeline, all on the device with no host synchronisation (grids come from shapes only):
 1. routing: a stable two-pass counting sort of the M = N*K pairs by expert. _moe_count_kernel counts each expert
    per block of pairs; _moe_scatter_kernel turns those counts into per-(block, expert) bases and writes every pair's
    sorted position. Outputs: sorted_pair[M] (pair id at each sorted row), pair_pos[M] (its inverse, -1 for an
    expert id outside [0, E), which then contributes nothing, as in the reference), offsets[E+1] (rows of expert e
    are offsets[e]:offsets[e+1]).
 2. grouped GEMMs over the sorted rows. Row tiles never straddle two experts. The grid has an upper bound of row
    tiles, cdiv(M, BLOCK_M) + E - 1 (>= sum_e cdiv(count_e, BLOCK_M)), times the column tiles; each program reads
    offsets, finds which expert its tile index falls in (_expert_rows) and exits at once when it is past the last
    real tile. x rows are gathered through sorted_pair // K inside the GEMM (no permuted copy of x).
    _moe_gate_up_fwd_kernel: G, U and H = silu(G) * U in one pass (two accumulators, SwiGLU in the epilogue);
    _moe_down_fwd_kernel: O = H Wd_e^T.
 3. combine: each token gathers its K rows of O through pair_pos and sums them with its weights (no atomics, so
    the result is deterministic).
 Backward: _moe_topk_weight_bwd_kernel (dw), _moe_down_bwd_kernel (dH GEMM with the SwiGLU backward in its epilogue,
 dO = w * dy gathered in its prologue), _moe_gate_up_bwd_kernel (dX rows, both GEMMs in one loop) followed by the
 combine kernel without weights, and the per-expert weight gradients as grouped "transposed" GEMMs
 (_moe_gate_up_dw_kernel, _moe_down_dw_kernel): one program per (expert, output tile) reduces over that expert's
 rows, so an expert with no rows gets an exact zero gradient.

Layouts (all contiguous, row-major): x [N, D]; topk_idx [N, K] int64; topk_weight [N, K]; w_gate, w_up [E, F, D];
w_down [E, D, F]; saved for backward: GU [2, M, F] (G and U, compute dtype), O [M, D] (compute dtype), sorted_pair,
pair_pos [M] and offsets [E+1] int32. H is recomputed from G and U in backward. Every GEMM accumulates in fp32 (fp32
inputs use IEEE fp32 dot products, not TF32, to match torch.matmul's default); the combine, the SwiGLU epilogues and
dw run in fp32; stored tensors have the compute dtype (x's dtype: bf16 under autocast, fp32 otherwise).

Tiles. On a GPU the six grouped GEMMs are autotuned (triton.autotune): each has a few candidate tile configs per
operand width (_ROW_CANDIDATES for the four row-tile GEMMs, _DW_CANDIDATES for the two weight-gradient ones), timed on
the first call for each (D, F, E, dtype) and reused for every token count after it (M is not in the key: the first
call's M decides). Every grid is a function of the launch's META, so the row-tile bound cdiv(M, BLOCK_M) + E - 1
follows the chosen BLOCK_M; routing does not depend on BLOCK_M (each GEMM derives its tiles from offsets with its own
BLOCK_M). No kernel accumulates into its output or reads what it writes (every output element is stored once, by one
program), so the autotuner's repeated launches need no reset_to_zero / restore_value. AUTOTUNE = False (or
MINIMIND_MOE_AUTOTUNE=0 in the environment, read at import) launches the first candidate of each list instead, the
fixed tiles. The CPU interpreter always uses small fixed tiles, so that the tests' small shapes span several tiles per
expert and partial tiles. tools/compile_check.py compiles every candidate for sm_90.

torch.compile: the forward and backward are custom ops (minimind::moe_experts, minimind::moe_experts_backward) with
fake implementations, and autograd is registered on the forward op, so compiled graphs keep them as single nodes.

Shape legend: N tokens, D hidden, F expert FFN width, E experts, K experts per token, M = N*K (token, slot) pairs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from minimind_kernels._compat import gpu_plan

# Autotune the grouped GEMMs' tiles on a GPU (False: the first candidate of each list, fixed). Read once, at import.
AUTOTUNE = os.environ.get("MINIMIND_MOE_AUTOTUNE", "1") != "0"

# ---------------------------------------------------------------------------------------------------------------
# Tile candidates and the autotuned launch
# ---------------------------------------------------------------------------------------------------------------


def _config(warps: int, stages: int, **tiles: int) -> triton.Config:
    return triton.Config(tiles, num_warps=warps, num_stages=stages)


# Row-tile GEMMs (BLOCK_M sorted rows x BLOCK_N output columns, BLOCK_K of the reduction per step), by operand
# dtype. bf16/fp16 go through the tensor cores (wgmma on sm_90); 128 x 128 tiles only with 8 warps (the gate/up
# forward's two fp32 accumulators then take 128 registers per thread). fp32 uses IEEE fp32 dot products (FMA, no
# tensor cores), hence smaller tiles. Most shared memory: the gate/up backward stages 2 A + 2 B tiles per step, at
# bf16 128x128x64 and 3 stages 192 KiB (sm_90 allows 227 KiB per block); tools/compile_check.py reports each.
_ROW_CANDIDATES: dict[str, list[triton.Config]] = {
    "16-bit": [
        _config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),  # first: the fixed tiles (AUTOTUNE off)
        _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
        _config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
        _config(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
        _config(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
        _config(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
    ],
    "fp32": [
        _config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
        _config(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16),
        _config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
        _config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32),
    ],
}
# Weight-gradient GEMMs (BLOCK_P x BLOCK_Q of one expert's dW, reducing over BLOCK_K of its rows per step). Their
# grid is E x (output tiles) only, 2-4 programs per SM at 128 x 128 on the moe preset, so smaller tiles are candidates.
_DW_CANDIDATES: dict[str, list[triton.Config]] = {
    "16-bit": [
        _config(8, 3, BLOCK_P=128, BLOCK_Q=128, BLOCK_K=64),  # first: the fixed tiles (AUTOTUNE off)
        _config(8, 4, BLOCK_P=128, BLOCK_Q=128, BLOCK_K=32),
        _config(4, 3, BLOCK_P=128, BLOCK_Q=64, BLOCK_K=64),
        _config(4, 3, BLOCK_P=64, BLOCK_Q=128, BLOCK_K=64),
        _config(4, 4, BLOCK_P=64, BLOCK_Q=64, BLOCK_K=64),
        _config(4, 4, BLOCK_P=64, BLOCK_Q=64, BLOCK_K=32),
    ],
    "fp32": [
        _config(4, 3, BLOCK_P=64, BLOCK_Q=64, BLOCK_K=32),
        _config(4, 4, BLOCK_P=64, BLOCK_Q=64, BLOCK_K=16),
        _config(4, 3, BLOCK_P=32, BLOCK_Q=64, BLOCK_K=32),
        _config(8, 3, BLOCK_P=64, BLOCK_Q=128, BLOCK_K=32),
    ],
}
_CANDIDATES = {"row": _ROW_CANDIDATES, "dw": _DW_CANDIDATES}
# The CPU interpreter's tiles: small, so that the tests' small shapes span several tiles per expert and partial tiles.
_INTERPRETER_TILES = {
    "row": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1),
    "dw": dict(BLOCK_P=64, BLOCK_Q=64, BLOCK_K=16, num_warps=4, num_stages=1),
}


def _width(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16-bit"


class _TunedGemm:
    """A grouped-GEMM @triton.jit kernel with its autotuner, launched like the kernel: k[grid](*args, **meta).

    When meta names the tiles (num_warps among them: the interpreter's, or a GPU's fixed ones with AUTOTUNE off), the
    plain kernel runs with them. Otherwise triton.autotune picks among the candidates for the operands' width (read
    from the first argument, an operand in every GEMM here), keyed on D, F, E and the arguments' dtypes. `grid` is a
    function of META either way."""

    def __init__(self, fn: Any, candidates: dict[str, list[triton.Config]]) -> None:
        self.fn = fn
        self.tuners = {w: triton.autotune(configs=cs, key=["D", "F", "E"])(fn) for w, cs in candidates.items()}

    def __getitem__(self, grid: Callable[[dict[str, Any]], tuple[int, ...]]) -> Callable[..., Any]:
        def launch(*args: Any, **meta: Any) -> Any:
            if "num_warps" in meta:
                return self.fn[grid](*args, **meta)
            return self.tuners[_width(args[0].dtype)][grid](*args, **meta)

        return launch


def _autotuned(kind: str) -> Callable[[Any], _TunedGemm]:
    return lambda fn: _TunedGemm(fn, _CANDIDATES[kind])


def _gemm_meta(kind: str, x: torch.Tensor) -> dict[str, int]:
    """Tile meta-parameters of a grouped-GEMM launch ("row" or "dw"): the interpreter's small tiles on a CPU; on a GPU
    none (the autotuner chooses), or with AUTOTUNE off the first candidate's."""
    if not gpu_plan(x.device):
        return dict(_INTERPRETER_TILES[kind])
    if AUTOTUNE:
        return {}
    first = _CANDIDATES[kind][_width(x.dtype)][0]
    return {**first.kwargs, "num_warps": first.num_warps, "num_stages": first.num_stages}


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _moe_count_kernel(idx_ptr, counts_ptr, M, E, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    """counts[b, e] = number of pairs in block b routed to expert e."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    lanes = tl.arange(0, E_PAD)
    e = tl.load(idx_ptr + offs, mask=offs < M, other=-1).to(tl.int32)
    hit = ((e[:, None] == lanes[None, :]) & (lanes[None, :] < E)).to(tl.int32)
    tl.store(counts_ptr + pid * E_PAD + lanes, tl.sum(hit, axis=0))


@triton.jit
def _moe_scatter_kernel(
    idx_ptr,
    counts_ptr,
    offsets_ptr,
    sorted_pair_ptr,
    pair_pos_ptr,
    M,
    E,
    NB,
    BLOCK: tl.constexpr,
    E_PAD: tl.constexpr,
    NB_PAD: tl.constexpr,
):
    """Second pass of the counting sort: position = expert start + count in earlier blocks + rank inside the block."""
    pid = tl.program_id(0)
    lanes = tl.arange(0, E_PAD)
    blocks = tl.arange(0, NB_PAD)
    c = tl.load(counts_ptr + blocks[:, None] * E_PAD + lanes[None, :], mask=(blocks < NB)[:, None], other=0)
    total = tl.sum(c, axis=0)
    before = tl.sum(tl.where((blocks < pid)[:, None], c, 0), axis=0)
    ends = tl.cumsum(total, axis=0)
    base = ends - total + before
    if pid == 0:
        tl.store(offsets_ptr + 1 + lanes, ends, mask=lanes < E)
        tl.store(offsets_ptr + lanes, tl.zeros_like(ends), mask=lanes == 0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < M
    e = tl.load(idx_ptr + offs, mask=valid, other=-1).to(tl.int32)
    hit = ((e[:, None] == lanes[None, :]) & (lanes[None, :] < E)).to(tl.int32)
    # Exclusive prefix count along the block keeps pairs of one expert in their original order (a stable sort).
    rank = tl.cumsum(hit, axis=0) - hit
    pos = tl.sum(hit * (base[None, :] + rank), axis=1)
    placed = tl.sum(hit, axis=1) > 0
    tl.store(sorted_pair_ptr + pos, offs, mask=valid & placed)
    tl.store(pair_pos_ptr + offs, tl.where(placed, pos, -1), mask=valid)


@triton.jit
def _expert_rows(offsets_ptr, tile, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """Row tile index -> (expert, first row, end row). Expert tiles are laid out one expert after the other; a tile
    index past the last real tile returns an expert >= E."""
    lanes = tl.arange(0, E_PAD)
    start = tl.load(offsets_ptr + lanes, mask=lanes < E, other=0)
    end = tl.load(offsets_ptr + lanes + 1, mask=lanes < E, other=0)
    n_tiles = (end - start + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(n_tiles, axis=0)
    e = tl.sum((tiles_end <= tile).to(tl.int32), axis=0)
    mine = lanes == e
    row_start = tl.sum(tl.where(mine, start + (tile - (tiles_end - n_tiles)) * BLOCK_M, 0), axis=0)
    row_end = tl.sum(tl.where(mine, end, 0), axis=0)
    return e, row_start, row_end


@_autotuned("row")
@triton.jit
def _moe_gate_up_fwd_kernel(
    x_ptr,
    wg_ptr,
    wu_ptr,
    sorted_pair_ptr,
    offsets_ptr,
    g_ptr,
    u_ptr,
    h_ptr,
    D,
    F,
    E,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    E_PAD: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """G, U = x_rows @ Wg_e^T, x_rows @ Wu_e^T; H = silu(G) * U. Tile: BLOCK_M sorted rows x BLOCK_N of F."""
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(F, BLOCK_N)
    e, row_start, row_end = _expert_rows(offsets_ptr, pid // n_col_tiles, E, BLOCK_M, E_PAD)
    if e >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    tok = (tl.load(sorted_pair_ptr + rows, mask=row_ok, other=0) // K).to(tl.int64)
    cols = (pid % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    ks = tl.arange(0, BLOCK_K)
    w_base = e.to(tl.int64) * F * D
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        a = tl.load(x_ptr + tok[:, None] * D + kk[None, :], mask=row_ok[:, None] & (kk < D)[None, :], other=0.0)
        b_off = w_base + cols[None, :] * D + kk[:, None]
        b_ok = col_ok[None, :] & (kk < D)[:, None]
        acc_g = tl.dot(a, tl.load(wg_ptr + b_off, mask=b_ok, other=0.0), acc_g, input_precision=DOT_PREC)
        acc_u = tl.dot(a, tl.load(wu_ptr + b_off, mask=b_ok, other=0.0), acc_u, input_precision=DOT_PREC)
    out = rows.to(tl.int64)[:, None] * F + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(g_ptr + out, acc_g.to(g_ptr.dtype.element_ty), mask=ok)
    tl.store(u_ptr + out, acc_u.to(u_ptr.dtype.element_ty), mask=ok)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=ok)


@_autotuned("row")
@triton.jit
def _moe_down_fwd_kernel(
    h_ptr,
    wd_ptr,
    offsets_ptr,
    o_ptr,
    D,
    F,
    E,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    E_PAD: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """O = H_rows @ Wd_e^T. Tile: BLOCK_M sorted rows x BLOCK_N of D, reducing over F."""
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(D, BLOCK_N)
    e, row_start, row_end = _expert_rows(offsets_ptr, pid // n_col_tiles, E, BLOCK_M, E_PAD)
    if e >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    cols = (pid % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    ks = tl.arange(0, BLOCK_K)
    w_base = e.to(tl.int64) * D * F
    a_rows = rows.to(tl.int64)[:, None] * F
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        kk = k0 + ks
        a = tl.load(h_ptr + a_rows + kk[None, :], mask=row_ok[:, None] & (kk < F)[None, :], other=0.0)
        b = tl.load(
            wd_ptr + w_base + cols[None, :] * F + kk[:, None], mask=col_ok[None, :] & (kk < F)[:, None], other=0.0
        )
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    out = rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(o_ptr + out, acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_combine_kernel(
    src_ptr,
    pair_pos_ptr,
    weight_ptr,
    out_ptr,
    N,
    D,
    K: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out_n = sum_k [w[n,k] *] src[pair_pos[n*K+k]]: each token gathers its own rows, so no atomics."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = toks < N
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for j in tl.static_range(K):
            pos = tl.load(pair_pos_ptr + toks * K + j, mask=tok_ok, other=-1)
            ok = tok_ok & (pos >= 0)
            v = tl.load(
                src_ptr + pos.to(tl.int64)[:, None] * D + dd[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0
            )
            v = v.to(tl.float32)
            if HAS_WEIGHT:
                v = v * tl.load(weight_ptr + toks * K + j, mask=tok_ok, other=0.0).to(tl.float32)[:, None]
            acc += v
        tl.store(
            out_ptr + toks.to(tl.int64)[:, None] * D + dd[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=tok_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def _moe_topk_weight_bwd_kernel(
    dy_ptr, o_ptr, pair_pos_ptr, dw_ptr, N, D, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
):
    """dw[n,k] = <dy_n, O[pair_pos[n*K+k]]>, in fp32."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = toks < N
    for j in tl.static_range(K):
        pos = tl.load(pair_pos_ptr + toks * K + j, mask=tok_ok, other=-1)
        ok = tok_ok & (pos >= 0)
        acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            g = tl.load(
                dy_ptr + toks.to(tl.int64)[:, None] * D + dd[None, :], mask=tok_ok[:, None] & d_ok[None, :], other=0.0
            )
            o = tl.load(
                o_ptr + pos.to(tl.int64)[:, None] * D + dd[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0
            )
            acc += tl.sum(g.to(tl.float32) * o.to(tl.float32), axis=1)
        tl.store(dw_ptr + toks * K + j, acc.to(dw_ptr.dtype.element_ty), mask=tok_ok)


@_autotuned("row")
@triton.jit
def _moe_down_bwd_kernel(
    dy_ptr,
    topk_w_ptr,
    wd_ptr,
    g_ptr,
    u_ptr,
    sorted_pair_ptr,
    offsets_ptr,
    dg_ptr,
    du_ptr,
    D,
    F,
    E,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    E_PAD: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dH = (w * dy)_rows @ Wd_e, then the SwiGLU backward: dG = dH * U * silu'(G), dU = dH * silu(G)."""
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(F, BLOCK_N)
    e, row_start, row_end = _expert_rows(offsets_ptr, pid // n_col_tiles, E, BLOCK_M, E_PAD)
    if e >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    pair = tl.load(sorted_pair_ptr + rows, mask=row_ok, other=0)
    tok = (pair // K).to(tl.int64)
    w_row = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    cols = (pid % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    ks = tl.arange(0, BLOCK_K)
    w_base = e.to(tl.int64) * D * F
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        a = tl.load(dy_ptr + tok[:, None] * D + kk[None, :], mask=row_ok[:, None] & (kk < D)[None, :], other=0.0)
        a = (a.to(tl.float32) * w_row[:, None]).to(wd_ptr.dtype.element_ty)
        b = tl.load(
            wd_ptr + w_base + kk[:, None] * F + cols[None, :], mask=(kk < D)[:, None] & col_ok[None, :], other=0.0
        )
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    out = rows.to(tl.int64)[:, None] * F + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    g = tl.load(g_ptr + out, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + out, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dg_ptr + out, (acc * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=ok)
    tl.store(du_ptr + out, (acc * g * s).to(du_ptr.dtype.element_ty), mask=ok)


@_autotuned("row")
@triton.jit
def _moe_gate_up_bwd_kernel(
    dg_ptr,
    du_ptr,
    wg_ptr,
    wu_ptr,
    offsets_ptr,
    dxs_ptr,
    D,
    F,
    E,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    E_PAD: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dX_rows = dG_rows @ Wg_e + dU_rows @ Wu_e (sorted rows; summed per token by the combine kernel)."""
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(D, BLOCK_N)
    e, row_start, row_end = _expert_rows(offsets_ptr, pid // n_col_tiles, E, BLOCK_M, E_PAD)
    if e >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    cols = (pid % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    ks = tl.arange(0, BLOCK_K)
    w_base = e.to(tl.int64) * F * D
    a_rows = rows.to(tl.int64)[:, None] * F
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        kk = k0 + ks
        a_ok = row_ok[:, None] & (kk < F)[None, :]
        b_off = w_base + kk[:, None] * D + cols[None, :]
        b_ok = (kk < F)[:, None] & col_ok[None, :]
        acc = tl.dot(
            tl.load(dg_ptr + a_rows + kk[None, :], mask=a_ok, other=0.0),
            tl.load(wg_ptr + b_off, mask=b_ok, other=0.0),
            acc,
            input_precision=DOT_PREC,
        )
        acc = tl.dot(
            tl.load(du_ptr + a_rows + kk[None, :], mask=a_ok, other=0.0),
            tl.load(wu_ptr + b_off, mask=b_ok, other=0.0),
            acc,
            input_precision=DOT_PREC,
        )
    out = rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(dxs_ptr + out, acc.to(dxs_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@_autotuned("dw")
@triton.jit
def _moe_gate_up_dw_kernel(
    dgu_ptr,
    dgu_stride,
    x_ptr,
    sorted_pair_ptr,
    offsets_ptr,
    dwg_ptr,
    dwu_ptr,
    D,
    F,
    E,
    K,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dW_e[f, d] = sum over expert e's rows of dA[row, f] * x[token(row), d], with dA = dG (axis 1 = 0) or dU.
    One program per (expert, F tile, D tile); the reduction runs over the expert's rows from offsets. E (the number of
    experts) is only part of the autotuner's key: the grid is E x the output tiles."""
    pid = tl.program_id(0)
    which = tl.program_id(1)
    n_q = tl.cdiv(D, BLOCK_Q)
    per_expert = tl.cdiv(F, BLOCK_P) * n_q
    e = pid // per_expert
    tile_p = (pid % per_expert) // n_q
    ps = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = (pid % n_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = ps < F
    q_ok = qs < D
    a_ptr = dgu_ptr + which * dgu_stride
    row_start = tl.load(offsets_ptr + e)
    row_end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_ok = rows < row_end
        tok = (tl.load(sorted_pair_ptr + rows, mask=row_ok, other=0) // K).to(tl.int64)
        a = tl.load(
            a_ptr + rows.to(tl.int64)[:, None] * F + ps[None, :], mask=row_ok[:, None] & p_ok[None, :], other=0.0
        )
        b = tl.load(x_ptr + tok[:, None] * D + qs[None, :], mask=row_ok[:, None] & q_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PREC)
    out = e.to(tl.int64) * F * D + ps[:, None] * D + qs[None, :]
    ok = p_ok[:, None] & q_ok[None, :]
    if which == 0:
        tl.store(dwg_ptr + out, acc.to(dwg_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(dwu_ptr + out, acc.to(dwu_ptr.dtype.element_ty), mask=ok)


@_autotuned("dw")
@triton.jit
def _moe_down_dw_kernel(
    dy_ptr,
    topk_w_ptr,
    g_ptr,
    u_ptr,
    sorted_pair_ptr,
    offsets_ptr,
    dwd_ptr,
    D,
    F,
    E,
    K,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dWd_e[d, f] = sum over expert e's rows of (w * dy)[row, d] * H[row, f], H = silu(G) * U recomputed. E: only
    part of the autotuner's key, as in _moe_gate_up_dw_kernel."""
    pid = tl.program_id(0)
    n_q = tl.cdiv(F, BLOCK_Q)
    per_expert = tl.cdiv(D, BLOCK_P) * n_q
    e = pid // per_expert
    tile_p = (pid % per_expert) // n_q
    ps = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = (pid % n_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = ps < D
    q_ok = qs < F
    row_start = tl.load(offsets_ptr + e)
    row_end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_ok = rows < row_end
        pair = tl.load(sorted_pair_ptr + rows, mask=row_ok, other=0)
        tok = (pair // K).to(tl.int64)
        w_row = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
        a = tl.load(dy_ptr + tok[:, None] * D + ps[None, :], mask=row_ok[:, None] & p_ok[None, :], other=0.0)
        a = (a.to(tl.float32) * w_row[:, None]).to(dwd_ptr.dtype.element_ty)
        h_off = rows.to(tl.int64)[:, None] * F + qs[None, :]
        h_ok = row_ok[:, None] & q_ok[None, :]
        g = tl.load(g_ptr + h_off, mask=h_ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + h_off, mask=h_ok, other=0.0).to(tl.float32)
        h = (g * tl.sigmoid(g) * u).to(dwd_ptr.dtype.element_ty)
        acc = tl.dot(tl.trans(a), h, acc, input_precision=DOT_PREC)
    out = e.to(tl.int64) * D * F + ps[:, None] * F + qs[None, :]
    tl.store(dwd_ptr + out, acc.to(dwd_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Host launchers: plain tensors in and out, no autograd, no host synchronisation.
# ---------------------------------------------------------------------------------------------------------------

_SORT_BLOCK_GPU = 1024


def _sort_block(x: torch.Tensor) -> int:
    """Pairs per block of the counting sort: 1024 on a GPU; 32 in the interpreter, so tests span several blocks."""
    return _SORT_BLOCK_GPU if gpu_plan(x.device) else 32


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def moe_route(topk_idx_NK: torch.Tensor, n_experts: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counting sort of the N*K pairs by expert, on the device. Returns sorted_pair [M], pair_pos [M], offsets [E+1]
    (int32). Pairs of one expert keep their order (stable)."""
    idx = topk_idx_NK.reshape(-1)
    m = idx.numel()
    nb = triton.cdiv(m, block)
    e_pad = _pow2(n_experts)
    dev = idx.device
    counts = torch.empty(nb, e_pad, dtype=torch.int32, device=dev)
    sorted_pair = torch.empty(m, dtype=torch.int32, device=dev)
    pair_pos = torch.empty(m, dtype=torch.int32, device=dev)
    offsets = torch.empty(n_experts + 1, dtype=torch.int32, device=dev)
    _moe_count_kernel[(nb,)](idx, counts, m, n_experts, BLOCK=block, E_PAD=e_pad)
    _moe_scatter_kernel[(nb,)](
        idx, counts, offsets, sorted_pair, pair_pos, m, n_experts, nb, BLOCK=block, E_PAD=e_pad, NB_PAD=_pow2(nb)
    )
    return sorted_pair, pair_pos, offsets


def _row_tiles_bound(m: int, n_experts: int, block_m: int) -> int:
    # sum_e cdiv(c_e, B) <= cdiv(sum_e c_e, B) + E - 1: each expert wastes less than one tile.
    return triton.cdiv(m, block_m) + n_experts - 1


def _row_grid(m: int, n_experts: int, cols: int) -> Callable[[dict[str, Any]], tuple[int]]:
    """Grid of a row-tile GEMM with `cols` output columns, for whichever BLOCK_M / BLOCK_N the launch uses."""
    return lambda meta: (_row_tiles_bound(m, n_experts, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)


def _dw_grid(n_experts: int, rows: int, cols: int, programs: int = 1) -> Callable[[dict[str, Any]], tuple[int, int]]:
    """Grid of a weight-gradient GEMM: one program per (expert, BLOCK_P x BLOCK_Q tile of its [rows, cols] dW)."""
    return lambda meta: (n_experts * triton.cdiv(rows, meta["BLOCK_P"]) * triton.cdiv(cols, meta["BLOCK_Q"]), programs)


def moe_experts_fwd(
    x_ND: torch.Tensor,
    topk_idx_NK: torch.Tensor,
    topk_weight_NK: torch.Tensor,
    w_gate_EFD: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward. Returns y [N, D] and what backward needs: GU [2, M, F], O [M, D], sorted_pair, pair_pos, offsets."""
    n, d = x_ND.shape
    k = topk_idx_NK.shape[1]
    e, f, _ = w_gate_EFD.shape
    assert topk_idx_NK.shape == (n, k) and topk_weight_NK.shape == (n, k), "topk_idx / topk_weight must be [N, K]"
    assert w_gate_EFD.shape == w_up_EFD.shape == (e, f, d) and w_down_EDF.shape == (e, d, f), "weight shapes"
    assert x_ND.dtype == w_gate_EFD.dtype == w_up_EFD.dtype == w_down_EDF.dtype, "x and expert weights share a dtype"
    for t in (x_ND, topk_idx_NK, topk_weight_NK, w_gate_EFD, w_up_EFD, w_down_EDF):
        assert t.is_contiguous(), "moe_experts_fwd takes contiguous tensors"
    m = n * k
    dev, dt = x_ND.device, x_ND.dtype
    y = torch.empty(n, d, dtype=dt, device=dev)
    gu = torch.empty(2, m, f, dtype=dt, device=dev)
    o = torch.empty(m, d, dtype=dt, device=dev)
    if m == 0:
        empty = torch.empty(0, dtype=torch.int32, device=dev)
        return y, gu, o, empty, empty.clone(), torch.zeros(e + 1, dtype=torch.int32, device=dev)
    sorted_pair, pair_pos, offsets = moe_route(topk_idx_NK, e, _sort_block(x_ND))
    h = torch.empty(m, f, dtype=dt, device=dev)
    common = dict(E_PAD=_pow2(e), DOT_PREC=_dot_precision(dt), **_gemm_meta("row", x_ND))
    _moe_gate_up_fwd_kernel[_row_grid(m, e, f)](
        x_ND, w_gate_EFD, w_up_EFD, sorted_pair, offsets, gu[0], gu[1], h, d, f, e, k, **common
    )
    _moe_down_fwd_kernel[_row_grid(m, e, d)](h, w_down_EDF, offsets, o, d, f, e, **common)
    _moe_combine_kernel[(triton.cdiv(n, 16),)](
        o, pair_pos, topk_weight_NK, y, n, d, K=k, HAS_WEIGHT=True, BLOCK_T=16, BLOCK_D=_combine_block_d(d)
    )
    return y, gu, o, sorted_pair, pair_pos, offsets


def _combine_block_d(d: int) -> int:
    return min(256, triton.next_power_of_2(d))


def moe_experts_bwd(
    dy_ND: torch.Tensor,
    x_ND: torch.Tensor,
    topk_weight_NK: torch.Tensor,
    w_gate_EFD: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    gu: torch.Tensor,
    o_MD: torch.Tensor,
    sorted_pair: torch.Tensor,
    pair_pos: torch.Tensor,
    offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward. Returns dx [N, D], d topk_weight [N, K], dW_gate [E, F, D], dW_up [E, F, D], dW_down [E, D, F]."""
    n, d = x_ND.shape
    k = topk_weight_NK.shape[1]
    e, f, _ = w_gate_EFD.shape
    m = n * k
    dev, dt = x_ND.device, x_ND.dtype
    dy_ND = dy_ND.contiguous()
    assert dy_ND.shape == (n, d) and gu.shape == (2, m, f) and o_MD.shape == (m, d), "saved tensors do not match"
    dx = torch.empty(n, d, dtype=dt, device=dev)
    dw = torch.empty(n, k, dtype=topk_weight_NK.dtype, device=dev)
    dwg = torch.empty(e, f, d, dtype=dt, device=dev)
    dwu = torch.empty(e, f, d, dtype=dt, device=dev)
    dwd = torch.empty(e, d, f, dtype=dt, device=dev)
    if m == 0:
        return dx, dw, dwg.zero_(), dwu.zero_(), dwd.zero_()
    prec = _dot_precision(dt)
    _moe_topk_weight_bwd_kernel[(triton.cdiv(n, 16),)](
        dy_ND, o_MD, pair_pos, dw, n, d, K=k, BLOCK_T=16, BLOCK_D=_combine_block_d(d)
    )
    common = dict(E_PAD=_pow2(e), DOT_PREC=prec, **_gemm_meta("row", x_ND))
    dgu = torch.empty(2, m, f, dtype=dt, device=dev)
    _moe_down_bwd_kernel[_row_grid(m, e, f)](
        dy_ND, topk_weight_NK, w_down_EDF, gu[0], gu[1], sorted_pair, offsets, dgu[0], dgu[1], d, f, e, k, **common
    )
    dxs = torch.empty(m, d, dtype=dt, device=dev)
    _moe_gate_up_bwd_kernel[_row_grid(m, e, d)](dgu[0], dgu[1], w_gate_EFD, w_up_EFD, offsets, dxs, d, f, e, **common)
    _moe_combine_kernel[(triton.cdiv(n, 16),)](
        dxs, pair_pos, dxs, dx, n, d, K=k, HAS_WEIGHT=False, BLOCK_T=16, BLOCK_D=_combine_block_d(d)
    )
    dw_common = dict(DOT_PREC=prec, **_gemm_meta("dw", x_ND))
    _moe_gate_up_dw_kernel[_dw_grid(e, f, d, programs=2)](
        dgu, m * f, x_ND, sorted_pair, offsets, dwg, dwu, d, f, e, k, **dw_common
    )
    _moe_down_dw_kernel[_dw_grid(e, d, f)](
        dy_ND, topk_weight_NK, gu[0], gu[1], sorted_pair, offsets, dwd, d, f, e, k, **dw_common
    )
    return dx, dw, dwg, dwu, dwd


# ---------------------------------------------------------------------------------------------------------------
# Autograd and torch.compile: custom ops with fake implementations; autograd is registered on the forward op (in
# place of a torch.autograd.Function) so that torch.compile and torch.library.opcheck see one differentiable op.
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("minimind::moe_experts", mutates_args=())
def _moe_experts_op(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return moe_experts_fwd(x, topk_idx, topk_weight, w_gate, w_up, w_down)


@_moe_experts_op.register_fake
def _(x, topk_idx, topk_weight, w_gate, w_up, w_down):
    n, d = x.shape
    m = n * topk_idx.shape[1]
    e, f, _ = w_gate.shape
    i32 = dict(dtype=torch.int32, device=x.device)
    return (
        x.new_empty(n, d),
        x.new_empty(2, m, f),
        x.new_empty(m, d),
        torch.empty(m, **i32),
        torch.empty(m, **i32),
        torch.empty(e + 1, **i32),
    )


@torch.library.custom_op("minimind::moe_experts_backward", mutates_args=())
def _moe_experts_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    gu: torch.Tensor,
    o: torch.Tensor,
    sorted_pair: torch.Tensor,
    pair_pos: torch.Tensor,
    offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return moe_experts_bwd(dy, x, topk_weight, w_gate, w_up, w_down, gu, o, sorted_pair, pair_pos, offsets)


@_moe_experts_backward_op.register_fake
def _(dy, x, topk_weight, w_gate, w_up, w_down, gu, o, sorted_pair, pair_pos, offsets):
    return (
        torch.empty_like(x),
        torch.empty_like(topk_weight),
        torch.empty_like(w_gate),
        torch.empty_like(w_up),
        torch.empty_like(w_down),
    )


def _setup_context(ctx, inputs, output):
    x, _, topk_weight, w_gate, w_up, w_down = inputs
    _, gu, o, sorted_pair, pair_pos, offsets = output
    ctx.mark_non_differentiable(gu, o, sorted_pair, pair_pos, offsets)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, topk_weight, w_gate, w_up, w_down, gu, o, sorted_pair, pair_pos, offsets)


def _backward(ctx, dy, *_unused):
    if dy is None:
        return None, None, None, None, None, None
    x, topk_weight, w_gate, w_up, w_down, gu, o, sorted_pair, pair_pos, offsets = ctx.saved_tensors
    dx, dw, dwg, dwu, dwd = _moe_experts_backward_op(
        dy.contiguous(), x, topk_weight, w_gate, w_up, w_down, gu, o, sorted_pair, pair_pos, offsets
    )
    return dx, None, dw, dwg, dwu, dwd


_moe_experts_op.register_autograd(_backward, setup_context=_setup_context)


def moe_experts(
    x_ND: torch.Tensor,
    topk_idx_NK: torch.Tensor,
    topk_weight_NK: torch.Tensor,
    w_gate_EFD: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts: y_n = sum_k topk_weight[n,k] * FFN_{topk_idx[n,k]}(x_n); see reference.moe_experts.

    Weights and topk_weight are cast to x's dtype (as the reference does); the output has x's dtype. Expert ids must
    lie in [0, E); an id outside contributes nothing (as in the reference). No host synchronisation anywhere.
    """
    dt = x_ND.dtype
    y, *_ = _moe_experts_op(
        x_ND.contiguous(),
        topk_idx_NK.contiguous(),
        topk_weight_NK.to(dt).contiguous(),
        w_gate_EFD.to(dt).contiguous(),
        w_up_EFD.to(dt).contiguous(),
        w_down_EDF.to(dt).contiguous(),
    )
    return y
