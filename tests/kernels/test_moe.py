"""Tests for minimind_kernels/moe.py, the routed MoE experts (counting sort by expert, grouped GEMMs, gather-combine).

Without CUDA the kernels run in Triton's interpreter (fp32, small odd shapes: a single token, N*K not a multiple of the
sort block or of the row tile, D and F not multiples of the column tiles). The output and every gradient (x,
topk_weight, and the three stacked weights) are checked with the shared tolerance rule: the kernel's error against a
float64 truth (the reference run in float64) may not exceed the reference's own error at the same dtype by more than a
margin. Also checked: an expert that gets no tokens (exactly zero weight gradients, still returned), every token on one
expert, the sort itself, that no host synchronisation is reachable from forward or backward, opcheck, and
torch.compile(fullgraph=True). The `gpu` tests repeat at MiniMind2-MoE's shapes natively in fp32 and bf16, and run
forward + backward under torch.cuda.set_sync_debug_mode("error").
"""

from __future__ import annotations

import ast
import inspect
import zlib

import pytest
import torch
from _tolerance import assert_close_to_truth

pytest.importorskip("triton")

import minimind_kernels.moe as moe  # noqa: E402
from minimind_kernels import reference  # noqa: E402

E = 4
GRAD_NAMES = ("y", "d_x", "d_topk_weight", "d_w_gate", "d_w_up", "d_w_down")


def _gen(tag: str, device: str = "cpu") -> torch.Generator:
    # A fresh random stream per case, reproducible from the case's name.
    return torch.Generator(device).manual_seed(zlib.crc32(tag.encode()))


def _inputs(n: int, d: int, f: int, k: int, tag: str, *, experts: list[int] | None = None, device: str = "cpu"):
    """fp64 inputs whose values are exact in bf16 (every dtype sees the same numbers). Each token picks k distinct
    experts from `experts` (default: all E); weights are positive and sum to 1 per token, as the router makes them."""
    g = _gen(tag, device)
    f64 = dict(generator=g, device=device, dtype=torch.float64)
    pool = torch.tensor(experts if experts is not None else list(range(E)), device=device)
    picks = torch.rand(n, len(pool), generator=g, device=device).argsort(dim=1)[:, :k]
    idx = pool[picks]
    w = torch.rand(n, k, **f64) + 0.1
    w = w / w.sum(dim=1, keepdim=True)
    x = torch.randn(n, d, **f64)
    wg = torch.randn(E, f, d, **f64) / d**0.5
    wu = torch.randn(E, f, d, **f64) / d**0.5
    wd = torch.randn(E, d, f, **f64) / f**0.5
    dy = torch.randn(n, d, **f64)
    x, w, wg, wu, wd, dy = (t.bfloat16().double() for t in (x, w, wg, wu, wd, dy))
    return (x, idx, w, wg, wu, wd), dy


def _run(fn, inputs, dy, dtype):
    """y and the gradients of x, topk_weight, w_gate, w_up, w_down, computed by fn at `dtype` on leaf copies."""
    x, idx, w, wg, wu, wd = inputs
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, w, wg, wu, wd)]
    y = fn(leaves[0], idx, *leaves[1:])
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def _check(inputs, dy, dtype=torch.float32, factor: float = 2.0):
    truth = _run(reference.moe_experts, inputs, dy, torch.float64)
    ref = _run(reference.moe_experts, inputs, dy, dtype)
    ours = _run(moe.moe_experts, inputs, dy, dtype)
    for name, o, r, t in zip(GRAD_NAMES, ours, ref, truth):
        assert o is not None, f"{name}: no gradient"
        assert_close_to_truth(o, r, t, factor=factor, name=name)
    return ours


CASES = [  # (N, D, F, K): a single token, N*K below / across the 32-pair sort block, partial tiles everywhere
    (1, 80, 48, 1),
    (1, 96, 112, 2),
    (5, 80, 112, 2),
    (5, 96, 48, 1),
    (37, 80, 112, 2),
    (37, 96, 48, 2),
    (37, 96, 112, 1),
]


@pytest.mark.parametrize("n,d,f,k", CASES)
def test_matches_reference(n, d, f, k):
    inputs, dy = _inputs(n, d, f, k, f"match/{n}/{d}/{f}/{k}")
    _check(inputs, dy)


def test_expert_with_no_tokens():
    """Expert 2 gets nothing: its weight gradients exist and are exactly zero; everything else matches."""
    inputs, dy = _inputs(37, 80, 112, 2, "empty-expert", experts=[0, 1, 3])
    ours = _check(inputs, dy)
    for name, grad in zip(GRAD_NAMES[3:], ours[3:]):
        assert torch.count_nonzero(grad[2]) == 0, f"{name}: expert 2 got no tokens but a non-zero gradient"
        assert torch.count_nonzero(grad[[0, 1, 3]]) > 0, f"{name}: the used experts got no gradient"


@pytest.mark.parametrize("k", [1, 2])
def test_all_tokens_on_one_expert(k):
    """Every pair on expert 1 (for K=2 both slots pick it: the op does not require distinct picks). Three experts are
    empty and the row-tile grid is mostly programs past the last real tile."""
    inputs, dy = _inputs(37, 96, 48, k, f"one-expert/{k}")
    x, idx, *rest = inputs
    ours = _check((x, torch.ones_like(idx), *rest), dy)
    for grad in ours[3:]:
        assert torch.count_nonzero(grad[[0, 2, 3]]) == 0


def test_out_of_range_expert_id_contributes_nothing():
    """An id outside [0, E) is skipped, as in the reference (which matches no expert for it)."""
    inputs, dy = _inputs(5, 80, 48, 2, "bad-id")
    x, idx, *rest = inputs
    idx = idx.clone()
    idx[1, 0], idx[3, 1] = E, -1
    _check((x, idx, *rest), dy)


@pytest.mark.parametrize("m,block", [(1, 32), (74, 32), (200, 64)])
def test_route_is_a_stable_counting_sort(m, block):
    g = _gen(f"route/{m}/{block}")
    idx = torch.randint(0, E, (m, 1), generator=g)
    idx[idx == 2] = 3  # one empty expert
    sorted_pair, pair_pos, offsets = moe.moe_route(idx, E, block)
    flat = idx.reshape(-1)
    assert torch.equal(sorted_pair.long(), torch.sort(flat, stable=True).indices)
    assert torch.equal(pair_pos.long()[sorted_pair.long()], torch.arange(m))
    counts = torch.stack([(flat == e).sum() for e in range(E)])
    assert torch.equal(offsets.long(), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))


# --- no host synchronisation -----------------------------------------------------------------------------------

_SYNC_CALLS = ("item", "tolist", "nonzero", "cpu", "numpy", "synchronize", "bincount", "unique", "repeat_interleave")


def test_source_has_no_sync_calls():
    """No call in minimind_kernels/moe.py to a method or function that copies device values to the host."""
    tree = ast.parse(inspect.getsource(moe))
    called = {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }
    assert not called & set(_SYNC_CALLS), f"host-syncing calls in minimind_kernels/moe.py: {called & set(_SYNC_CALLS)}"


class _KernelStub:
    """Stands in for a @triton.jit kernel: records the launch and checks that its grid is plain ints, i.e. computed
    from shapes and not from device values. A grid given as a function of the launch's meta-parameters (the GEMMs':
    their tiles) is evaluated on them, as Triton does."""

    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            sizes = grid(kwargs) if callable(grid) else grid
            assert all(type(g) is int for g in sizes), f"{self.name}: grid {sizes} is not plain ints"
            self.launches.append(self.name)

        return launch


def test_host_code_never_reads_device_values(monkeypatch):
    """Forward and backward host code (launchers, custom ops, autograd) with every way of pulling a tensor's value to
    the host made to raise. The kernels are stubbed: the interpreter itself reads tensors on the host, and the GPU
    test below covers the kernels under torch.cuda.set_sync_debug_mode("error")."""
    launches: list[str] = []
    kernel_names = [n for n in dir(moe) if n.startswith("_moe_") and n.endswith("_kernel")]
    for name in kernel_names:
        monkeypatch.setattr(moe, name, _KernelStub(name, launches))
    inputs, dy = _inputs(37, 80, 48, 2, "nosync")
    x, idx, w, wg, wu, wd = (t.float() if t.is_floating_point() else t for t in inputs)
    leaves = [t.requires_grad_() for t in (x, w, wg, wu, wd)]

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"host sync: {what}")

        return fail

    for meth in ("item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, meth, forbidden(f"Tensor.{meth}"))
    for fn in ("nonzero", "bincount", "unique", "masked_select", "repeat_interleave"):
        monkeypatch.setattr(torch, fn, forbidden(f"torch.{fn}"))
    y = moe.moe_experts(leaves[0], idx, *leaves[1:])
    y.backward(dy.float())
    monkeypatch.undo()
    assert all(t.grad is not None for t in leaves)
    assert sorted(set(launches)) == sorted(kernel_names), "every kernel should have been launched"


# --- tiles and autotuning (planned as on a GPU; nothing runs) ----------------------------------------------------

GEMM_KINDS = {
    "_moe_gate_up_fwd_kernel": "row",
    "_moe_down_fwd_kernel": "row",
    "_moe_down_bwd_kernel": "row",
    "_moe_gate_up_bwd_kernel": "row",
    "_moe_gate_up_dw_kernel": "dw",
    "_moe_down_dw_kernel": "dw",
}


def test_candidate_configs():
    """4-8 candidates per GEMM and operand width, power-of-two tiles the tensor cores take (>= 16), the fixed tiles
    first, and each GEMM kernel wrapped with one autotuner per width over exactly those candidates."""
    fixed = {  # the tiles used before autotuning, kept as the AUTOTUNE-off tiles
        ("row", "16-bit"): (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), 8, 3),
        ("row", "fp32"): (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 4, 3),
        ("dw", "16-bit"): (dict(BLOCK_P=128, BLOCK_Q=128, BLOCK_K=64), 8, 3),
        ("dw", "fp32"): (dict(BLOCK_P=64, BLOCK_Q=64, BLOCK_K=32), 4, 3),
    }
    for (kind, width), (tiles, warps, stages) in fixed.items():
        configs = moe._CANDIDATES[kind][width]
        assert 4 <= len(configs) <= 8
        assert (configs[0].kwargs, configs[0].num_warps, configs[0].num_stages) == (tiles, warps, stages)
        assert len({str(c) for c in configs}) == len(configs), "duplicate candidates"
        for c in configs:
            assert set(c.kwargs) == set(tiles) and c.num_warps in (4, 8) and c.num_stages in (3, 4)
            assert all(v >= 16 and v & (v - 1) == 0 for v in c.kwargs.values()), c
    for name, kind in GEMM_KINDS.items():
        kernel = getattr(moe, name)
        assert isinstance(kernel, moe._TunedGemm)
        for width, tuner in kernel.tuners.items():
            assert tuner.keys == ["D", "F", "E"] and tuner.configs == moe._CANDIDATES[kind][width]
            assert tuner.fn is kernel.fn and not tuner.reset_to_zero and not tuner.restore_value


def test_tuned_gemm_dispatch(monkeypatch):
    """Tiles in the launch: the plain kernel. None: the autotuner for the first argument's width."""
    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **meta: calls.append((self.name, meta))

    kernel = moe._moe_down_fwd_kernel
    monkeypatch.setattr(kernel, "fn", Recorder("plain"))
    monkeypatch.setattr(kernel, "tuners", {"16-bit": Recorder("16-bit"), "fp32": Recorder("fp32")})
    grid = moe._row_grid(10, E, 64)
    kernel[grid](torch.empty(1, dtype=torch.bfloat16), BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1)
    kernel[grid](torch.empty(1, dtype=torch.bfloat16), E_PAD=4)
    kernel[grid](torch.empty(1, dtype=torch.float16))
    kernel[grid](torch.empty(1, dtype=torch.float32))
    assert [c[0] for c in calls] == ["plain", "16-bit", "16-bit", "fp32"]


class _LaunchRecorder:
    """Stands in for a kernel: records (name, grid, meta) of each launch."""

    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((self.name, grid, meta))


@pytest.mark.parametrize("autotune", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_plan_grids_follow_the_chosen_tiles(monkeypatch, autotune, dtype):
    """As planned for a GPU (plan_as_gpu, kernels stubbed): with AUTOTUNE on, every GEMM launch leaves the tiles to the
    autotuner and its grid, evaluated for each candidate, covers every real tile (sum over experts of the row tiles
    times the column tiles; dW: E x the output tiles); with AUTOTUNE off, the launch names the first candidate."""
    from minimind_kernels._compat import plan_as_gpu

    launches: list = []
    for name in [n for n in dir(moe) if n.startswith("_moe_") and n.endswith("_kernel")]:
        monkeypatch.setattr(moe, name, _LaunchRecorder(name, launches))
    monkeypatch.setattr(moe, "AUTOTUNE", autotune)
    n, d, f, k = 37, 80, 112, 2
    x, idx, w, wg, wu, wd = (t.to(dtype) if t.is_floating_point() else t for t in _inputs(n, d, f, k, "plan")[0])
    x, idx, w, wg, wu, wd = (t.contiguous() for t in (x, idx, w, wg, wu, wd))
    idx[:20] = 0  # skewed: expert 0 has most rows
    counts = torch.bincount(idx.reshape(-1), minlength=E).tolist()
    m = n * k
    with plan_as_gpu(132):
        y, gu, o, sorted_pair, pair_pos, offsets = moe.moe_experts_fwd(x, idx, w, wg, wu, wd)
        moe.moe_experts_bwd(torch.ones_like(x), x, w, wg, wu, wd, gu, o, sorted_pair, pair_pos, offsets)
    cols = {
        "_moe_gate_up_fwd_kernel": f,
        "_moe_down_fwd_kernel": d,
        "_moe_down_bwd_kernel": f,
        "_moe_gate_up_bwd_kernel": d,
        "_moe_gate_up_dw_kernel": (f, d),
        "_moe_down_dw_kernel": (d, f),
    }
    gemms = [launch for launch in launches if launch[0] in GEMM_KINDS]
    assert sorted(g[0] for g in gemms) == sorted(GEMM_KINDS)
    width = moe._width(dtype)
    for name, grid, meta in gemms:
        kind = GEMM_KINDS[name]
        configs = moe._CANDIDATES[kind][width]
        tile_names = set(configs[0].kwargs)
        if autotune:
            assert not tile_names & set(meta) and "num_warps" not in meta, (name, meta)
        else:
            assert {key: meta[key] for key in tile_names} == configs[0].kwargs
            assert (meta["num_warps"], meta["num_stages"]) == (configs[0].num_warps, configs[0].num_stages)
            configs = configs[:1]
        for c in configs:
            sizes = grid({**meta, **c.kwargs})
            assert all(type(v) is int for v in sizes)
            if kind == "row":
                needed = sum(-(-cnt // c.kwargs["BLOCK_M"]) for cnt in counts) * -(-cols[name] // c.kwargs["BLOCK_N"])
                bound = (m // c.kwargs["BLOCK_M"] + 1 + E - 1) * -(-cols[name] // c.kwargs["BLOCK_N"])
                assert needed <= sizes[0] <= bound, (name, c, sizes, needed)
            else:
                rows_, cols_ = cols[name]
                tiles = E * -(-rows_ // c.kwargs["BLOCK_P"]) * -(-cols_ // c.kwargs["BLOCK_Q"])
                assert sizes == (tiles, 2 if name == "_moe_gate_up_dw_kernel" else 1), (name, c, sizes)


# --- torch.library / torch.compile -----------------------------------------------------------------------------


def test_opcheck():
    """Schema, fake tensors, autograd registration and AOT dispatch of both custom ops (runs in the interpreter)."""
    inputs, dy = _inputs(5, 80, 48, 2, "opcheck")
    x, idx, w, wg, wu, wd = (t.float() if t.is_floating_point() else t for t in inputs)
    args = (x.requires_grad_(), idx, w.requires_grad_(), wg.requires_grad_(), wu.requires_grad_(), wd.requires_grad_())
    torch.library.opcheck(torch.ops.minimind.moe_experts, args)
    with torch.no_grad():
        _, gu, o, sorted_pair, pair_pos, offsets = torch.ops.minimind.moe_experts(*args)
    bwd_args = (dy.float(), *(t.detach() for t in (x, w, wg, wu, wd)), gu, o, sorted_pair, pair_pos, offsets)
    torch.library.opcheck(torch.ops.minimind.moe_experts_backward, bwd_args)


def test_compile_fullgraph():
    """torch.compile traces the op without graph breaks (aot_eager: no C++ toolchain needed) and gives the same
    output and gradients as eager."""
    inputs, dy = _inputs(5, 96, 48, 2, "compile")
    fn = torch.compile(moe.moe_experts, backend="aot_eager", fullgraph=True)
    eager = _run(moe.moe_experts, inputs, dy, torch.float32)
    compiled = _run(fn, inputs, dy, torch.float32)
    for name, a, b in zip(GRAD_NAMES, compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_registry_maps_triton_moe_here():
    import minimind_kernels as kernels

    ops = kernels.resolve("torch,moe_experts=triton")
    assert ops.moe_experts is moe.moe_experts and ops.impl["moe_experts"] == "triton"


# --- GPU: MiniMind2-MoE shapes, native fp32 and bf16 -----------------------------------------------------------

N_GPU, D_GPU, F_GPU, K_GPU = 16384, 640, 1728, 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_real_shapes(dtype):
    inputs, dy = _inputs(N_GPU, D_GPU, F_GPU, K_GPU, f"gpu/{dtype}", device="cuda")
    _check(inputs, dy, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_skewed_routing(dtype):
    """Expert 2 empty and most pairs on expert 0: a skewed grid, an empty expert, at real shapes."""
    inputs, dy = _inputs(N_GPU, D_GPU, F_GPU, K_GPU, f"gpu-skew/{dtype}", experts=[0, 1, 3], device="cuda")
    x, idx, *rest = inputs
    idx = idx.clone()
    idx[: N_GPU * 3 // 4, 0] = 0
    idx[: N_GPU * 3 // 4, 1] = 3
    ours = _check((x, idx, *rest), dy, dtype)
    for grad in ours[3:]:
        assert torch.count_nonzero(grad[2]) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_no_host_sync(dtype):
    """Forward and backward (after a warm-up that compiles the kernels) raise on any synchronising CUDA call."""
    inputs, dy = _inputs(N_GPU, D_GPU, F_GPU, K_GPU, f"gpu-sync/{dtype}", device="cuda")
    x, idx, *rest = inputs
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, *rest)]
    dy = dy.to(dtype)
    moe.moe_experts(leaves[0], idx, *leaves[1:]).backward(dy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = moe.moe_experts(leaves[0], idx, *leaves[1:])
        y.backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()


@pytest.mark.gpu
def test_gpu_compile_inductor():
    inputs, dy = _inputs(2048, D_GPU, F_GPU, K_GPU, "gpu-compile", device="cuda")
    fn = torch.compile(moe.moe_experts, fullgraph=True)
    eager = _run(moe.moe_experts, inputs, dy, torch.bfloat16)
    compiled = _run(fn, inputs, dy, torch.bfloat16)
    for name, a, b in zip(GRAD_NAMES, compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
