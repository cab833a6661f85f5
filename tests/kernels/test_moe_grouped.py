"""Tests for minimind_kernels/moe_grouped.py, the routed MoE experts through torch._grouped_mm, and its registry entry.

On a CPU torch._grouped_mm runs its fallback (a loop of mm over the groups) in fp32 / bf16; it takes no float64, so the
op runs in fp32 and is judged by the shared tolerance rule against the reference's float64 truth (check_op), and also
checked against the fp32 reference directly with a tight tolerance. Covered: K = 1 and 2, an expert with no rows
(exactly zero weight gradients), expert ids outside [0, E), the expanded (stride-0) output gradient of y.sum() in fp32
and bf16, no host synchronisation in forward or backward, the CUDA constraints' messages, the ops registry
(`--kernels triton,moe_experts=grouped`), and a whole tiny MoE model giving the reference's loss and gradients. The
`gpu` tests repeat at MiniMind2-MoE's shapes in bf16 on a GPU that has _grouped_mm's grouped kernel (sm_90 / sm_100).
"""

from __future__ import annotations

import ast
import inspect
import zlib

import pytest
import torch
from _tolerance import check_op

import minimind_kernels as kernels
from minimind_fast.config import from_preset
from minimind_fast.model import MiniMind
from minimind_kernels import moe_grouped, reference

E = 4


def _inputs(n: int, d: int, f: int, k: int, tag: str, *, experts: list[int] | None = None, device: str = "cpu"):
    """fp32 leaves (x, topk_weight, w_gate, w_up, w_down require grad) and int64 ids; each token picks k distinct
    experts from `experts` (default all E) with positive weights summing to 1, as the router makes them."""
    g = torch.Generator(device).manual_seed(zlib.crc32(tag.encode()))
    pool = torch.tensor(experts if experts is not None else list(range(E)), device=device)
    idx = pool[torch.rand(n, len(pool), generator=g, device=device).argsort(dim=1)[:, :k]]
    w = torch.rand(n, k, generator=g, device=device) + 0.1
    w = w / w.sum(dim=1, keepdim=True)
    x = torch.randn(n, d, generator=g, device=device)
    wg = torch.randn(E, f, d, generator=g, device=device) / d**0.5
    wu = torch.randn(E, f, d, generator=g, device=device) / d**0.5
    wd = torch.randn(E, d, f, generator=g, device=device) / f**0.5
    return tuple(t.requires_grad_() if t.is_floating_point() else t for t in (x, idx, w, wg, wu, wd))


def _grads(fn, args, dy=None, dtype=torch.float32):
    """y and the gradients of x, topk_weight, w_gate, w_up, w_down (fn at `dtype`; dy None: backward of y.sum())."""
    x, idx, *rest = args
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, *rest)]
    y = fn(leaves[0], idx, *leaves[1:])
    (y.sum() if dy is None else (y * dy.to(dtype)).sum()).backward()
    return [y.detach()] + [t.grad for t in leaves]


def _check(args, name: str):
    check_op(moe_grouped.moe_experts, reference.moe_experts, args, name=name)
    # The CPU fallback multiplies the same row slices as the reference's per-expert loop: near-identical in fp32.
    dy = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(7))
    for a, b in zip(_grads(moe_grouped.moe_experts, args, dy), _grads(reference.moe_experts, args, dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,d,f,k", [(1, 16, 24, 1), (5, 80, 112, 2), (37, 96, 48, 1), (37, 80, 112, 2)])
def test_matches_reference(n, d, f, k):
    _check(_inputs(n, d, f, k, f"match/{n}/{d}/{f}/{k}"), f"N{n} D{d} F{f} K{k}")


@pytest.mark.parametrize("k", [1, 2])
def test_idle_expert_gets_exactly_zero_weight_gradients(k):
    args = _inputs(37, 80, 112, k, f"idle/{k}", experts=[0, 1, 3])
    _check(args, f"idle expert K{k}")
    _, _, _, dwg, dwu, dwd = _grads(moe_grouped.moe_experts, args)
    for name, grad in (("w_gate", dwg), ("w_up", dwu), ("w_down", dwd)):
        assert torch.count_nonzero(grad[2]) == 0, f"{name}: expert 2 has no rows but a non-zero gradient"
        assert torch.count_nonzero(grad[[0, 1, 3]]) > 0, f"{name}: the used experts got no gradient"


def test_all_pairs_on_one_expert():
    x, idx, *rest = _inputs(19, 48, 40, 2, "one-expert")
    _check((x, torch.full_like(idx, 1), *rest), "one expert")


def test_out_of_range_expert_id_contributes_nothing():
    """As in the reference, a pair whose id is outside [0, E) adds nothing to y, and its topk_weight gradient is 0."""
    x, idx, *rest = _inputs(5, 80, 48, 2, "bad-id")
    idx = idx.clone()
    idx[1, 0], idx[3, 1] = E, -1
    _check((x, idx, *rest), "out-of-range ids")
    dw = _grads(moe_grouped.moe_experts, (x, idx, *rest))[2]
    assert dw[1, 0] == 0 and dw[3, 1] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expanded_output_gradient(dtype):
    """y.sum().backward() hands the op a stride-0 gradient; the op gives the reference's gradients (bf16: both run the
    same bf16 matmuls on a CPU). The module's _grouped_mm alone takes a stride-0 gradient too (torch's derivative
    rejects one that reaches it unchanged)."""
    a = torch.randn(10, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(3, 8, 16, dtype=dtype, requires_grad=True)
    moe_grouped._grouped_mm(a, w, torch.tensor([4, 4, 10], dtype=torch.int32)).sum().backward()
    assert torch.count_nonzero(w.grad[1]) == 0 and torch.count_nonzero(w.grad[[0, 2]]) > 0
    args = _inputs(13, 32, 48, 2, f"expanded/{dtype}")
    for a, b in zip(
        _grads(moe_grouped.moe_experts, args, None, dtype), _grads(reference.moe_experts, args, None, dtype)
    ):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-6)


def test_no_float64():
    x, idx, *rest = _inputs(3, 16, 24, 1, "fp64")
    with pytest.raises(RuntimeError, match="moe_experts=grouped cannot run here: .*float64"):
        moe_grouped.moe_experts(x.double(), idx, *(t.double() for t in rest))


# --- no host synchronisation -----------------------------------------------------------------------------------

_SYNC_CALLS = ("item", "tolist", "nonzero", "cpu", "numpy", "synchronize", "bincount", "unique", "repeat_interleave")


def test_source_has_no_sync_calls():
    tree = ast.parse(inspect.getsource(moe_grouped))
    called = {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }
    assert not called & set(_SYNC_CALLS), f"host-syncing calls in moe_grouped.py: {called & set(_SYNC_CALLS)}"


def test_forward_and_backward_never_read_device_values(monkeypatch):
    """Every way of pulling a tensor's value to the host raises, in forward and in backward (torch's CPU _grouped_mm
    reads offs on the host inside the kernel, below Python, as the CUDA fallback this module refuses would)."""
    x, idx, *rest = _inputs(11, 32, 24, 2, "nosync")

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"host sync: {what}")

        return fail

    for meth in ("item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, meth, forbidden(f"Tensor.{meth}"))
    for fn in ("nonzero", "bincount", "unique", "masked_select", "repeat_interleave"):
        monkeypatch.setattr(torch, fn, forbidden(f"torch.{fn}"))
    y = moe_grouped.moe_experts(x, idx, *rest)
    y.backward(torch.ones_like(y))
    monkeypatch.undo()
    assert all(t.grad is not None for t in (x, *rest))


# --- where it can run ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "capability, dtype, d, f, msg",
    [
        ((8, 0), torch.bfloat16, 640, 1728, r"compute capability 9\.x or 10\.x \(this GPU is 8\.0\)"),
        ((9, 0), torch.float32, 640, 1728, "bf16 only on CUDA"),
        ((9, 0), torch.bfloat16, 644, 1728, "16-byte-aligned rows.*D=644"),
        ((9, 0), torch.bfloat16, 640, 1728, None),
        ((10, 0), torch.bfloat16, 640, 1728, None),
    ],
)
def test_cuda_constraints(monkeypatch, capability, dtype, d, f, msg):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    why = moe_grouped.cannot_run(torch.device("cuda"), dtype, d, f)
    if msg is None:
        assert why == ""
    else:
        import re

        assert re.search(msg, why), why
        assert "\n" not in why


# --- registry --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["torch", "triton"])
def test_registry_override(base):
    assert kernels.parse_spec(f"{base},moe_experts=grouped") == (base, {"moe_experts": "grouped"})
    ops = kernels.resolve(f"{base},moe_experts=grouped")
    assert ops.moe_experts is moe_grouped.moe_experts and ops.impl["moe_experts"] == "grouped"
    assert {ops.impl[op] for op in kernels.OP_NAMES if op not in ("moe_experts", "attention")} == {base}
    table = kernels.describe(ops)
    assert any(line.split() == ["moe_experts", "grouped"] for line in table.splitlines()), table


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("torch,rope=grouped", r"op 'rope' has no grouped implementation \(grouped implements only moe_experts\)"),
        ("torch,attention=grouped", "op 'attention' has no grouped implementation"),
        ("grouped", "'grouped' implements only moe_experts: name it per op, e.g. triton,moe_experts=grouped"),
        ("torch,moe_experts=grouped_mm", "unknown implementation 'grouped_mm'.*grouped"),
    ],
)
def test_registry_errors(spec, msg):
    with pytest.raises(kernels.KernelSpecError, match=msg):
        kernels.resolve(spec)


def test_registry_refuses_a_gpu_without_the_grouped_kernel(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(kernels.KernelSpecError, match="kernels 'grouped' cannot run here: .*9.x or 10.x"):
        kernels.resolve("torch,moe_experts=grouped")


# --- whole model -----------------------------------------------------------------------------------------------


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels)
    loss = out.loss + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_moe_model_same_loss_and_gradients_as_torch(one_thread):
    """The tiny MoE model (hidden 80, expert FFN 256) with moe_experts=grouped gives the reference's loss and every
    gradient, the experts' included, in fp32."""
    torch.manual_seed(0)
    shape = dict(hidden_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=500)
    cfg = from_preset("tiny", use_moe=True, **shape)
    ref = MiniMind(cfg, ops=kernels.resolve("torch"))
    grp = MiniMind(cfg, ops=kernels.resolve("torch,moe_experts=grouped"))
    grp.load_state_dict(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    labels = ids.clone()
    labels[0, :5] = -100
    loss_ref, grads_ref = _loss_and_grads(ref, ids, labels)
    loss_grp, grads_grp = _loss_and_grads(grp, ids, labels)
    torch.testing.assert_close(loss_grp, loss_ref, rtol=1e-6, atol=1e-6)
    assert grads_grp.keys() == grads_ref.keys()
    assert any("w_gate" in n for n in grads_ref), sorted(grads_ref)
    for name, g in grads_ref.items():
        scale = g.abs().max().item() + 1e-12
        err = (grads_grp[name] - g).abs().max().item()
        assert err <= 1e-5 * scale + 1e-8, f"{name}: max error {err:.3g} vs gradient scale {scale:.3g}"


# --- GPU: MiniMind2-MoE shapes, bf16 ---------------------------------------------------------------------------

N_GPU, D_GPU, F_GPU, K_GPU = 16384, 640, 1728, 2


def _grouped_kernel_here() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)


@pytest.mark.gpu
@pytest.mark.skipif(not _grouped_kernel_here(), reason="needs sm_90 / sm_100 for _grouped_mm's grouped kernel")
def test_gpu_bf16_against_reference_and_no_host_sync():
    """bf16 at real shapes, expert 2 idle: within bf16 rounding of the reference, the idle expert's weight gradients
    exactly zero, and a second forward + backward raises on no synchronising CUDA call."""
    args = _inputs(N_GPU, D_GPU, F_GPU, K_GPU, "gpu", experts=[0, 1, 3], device="cuda")
    dy = torch.randn(N_GPU, D_GPU, device="cuda")
    ours = _grads(moe_grouped.moe_experts, args, dy, torch.bfloat16)
    ref = _grads(reference.moe_experts, args, dy, torch.bfloat16)
    for a, b in zip(ours, ref):
        rel = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert rel < 2e-2, rel
    for grad in ours[3:]:
        assert torch.count_nonzero(grad[2]) == 0
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _grads(moe_grouped.moe_experts, args, dy, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
