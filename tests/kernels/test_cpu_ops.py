"""minimind_kernels.cpu: ops that train faster on a CPU, held to the reference by the kernel tolerance rule."""

import dataclasses

import pytest
import torch
from _tolerance import check_op

import minimind_kernels as kernels
from minimind_fast.config import from_preset
from minimind_fast.model import MiniMind
from minimind_kernels import cpu, reference


def _qkv_BTHD(b, h, hkv, t, d, dtype, seed=0):
    """Leaves laid out [B, T, heads, D] as the model's projections give them; the ops see transposed views."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g).to(dtype).requires_grad_(True)
    k = torch.randn(b, t, hkv, d, generator=g).to(dtype).requires_grad_(True)
    v = torch.randn(b, t, hkv, d, generator=g).to(dtype).requires_grad_(True)
    return q, k, v


def _on_views(fn):
    return lambda q, k, v: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


@pytest.mark.parametrize("shape", [(2, 8, 2, 64, 32), (1, 4, 4, 37, 64), (2, 8, 2, 130, 80)])
def test_bf16_causal_attention_and_its_gradients_are_no_worse_than_the_reference(shape):
    q, k, v = _qkv_BTHD(*shape, torch.bfloat16)
    check_op(_on_views(cpu.attention), _on_views(reference.attention), (q, k, v), name=f"cpu attention {shape}")


def test_the_forward_is_the_reference_forward_and_the_backward_differs_only_in_rounding():
    q, k, v = _qkv_BTHD(2, 8, 2, 96, 32, torch.bfloat16, seed=1)
    out = _on_views(cpu.attention)(q, k, v)
    want = _on_views(reference.attention)(q, k, v)
    assert out.grad_fn is not None and "_CausalFlashFp32Backward" in type(out.grad_fn).__name__
    assert torch.equal(out, want)  # the same CPU flash forward kernel on the same bf16 inputs
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    ours = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
        rel = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert 0 < rel < 2e-2, rel  # fp32 vs bf16 arithmetic: different, but only by bf16 rounding


@pytest.mark.parametrize("case", ["fp32", "mask", "not causal", "no grad", "kv cache"])
def test_every_other_call_is_the_reference_call(case):
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    q, k, v = (t.transpose(1, 2) for t in _qkv_BTHD(2, 4, 2, 9, 16, dtype, seed=3))
    kwargs = {}
    if case == "mask":
        kwargs["attn_mask"] = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    if case == "not causal":
        kwargs["is_causal"] = False
    if case == "kv cache":  # one new query against nine cached keys
        q = q[:, :, -1:]
        kwargs["is_causal"] = False
    with torch.set_grad_enabled(case != "no grad"):
        out = cpu.attention(q, k, v, **kwargs)
        want = reference.attention(q, k, v, **kwargs)
    assert torch.equal(out, want)
    assert out.grad_fn is None or "_CausalFlashFp32Backward" not in type(out.grad_fn).__name__


def test_auto_without_cuda_takes_the_cpu_attention_and_torch_stays_the_reference(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    auto = kernels.resolve("auto")
    assert auto.attention is cpu.attention and auto.impl["attention"] == "cpu"
    assert {auto.impl[op] for op in kernels.OP_NAMES if op not in ("attention", "linear_cross_entropy")} == {"torch"}
    assert kernels.resolve("auto,attention=torch").attention is reference.attention
    assert set(kernels.resolve("torch").impl.values()) == {"torch"}
    assert kernels.resolve("torch,attention=cpu").attention is cpu.attention
    with pytest.raises(kernels.KernelSpecError, match="no cpu implementation"):
        kernels.resolve("torch,rope=cpu")
    assert kernels.resolve("auto").linear_cross_entropy is cpu.linear_cross_entropy
    with pytest.raises(kernels.KernelSpecError, match="implements only attention, linear_cross_entropy"):
        kernels.resolve("cpu")


def test_a_bf16_autocast_training_step_matches_the_reference_model():
    """The tiny model under CPU bf16 autocast, once with the cpu ops and once with the reference: the same loss up to
    fp32 summation order (same forward) and parameter gradients that differ by bf16 rounding only."""
    torch.manual_seed(0)
    cfg = from_preset("tiny")
    ref_ops = kernels.resolve("torch")
    cpu_ops = dataclasses.replace(ref_ops, attention=cpu.attention, linear_cross_entropy=cpu.linear_cross_entropy)
    ours = MiniMind(cfg, ops=cpu_ops)
    ref = MiniMind(cfg, ops=ref_ops)
    ref.load_state_dict(ours.state_dict())
    x = torch.randint(3, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(4))
    losses = []
    for model in (ours, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        rel = ((a.grad - b.grad).norm() / b.grad.norm()).item()
        assert rel < 3e-2, (name, rel)


# ---- linear + cross-entropy -----------------------------------------------------------------------------------------
def _lce_inputs(n=150, v=300, d=48, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100  # every fifth row unlabelled
    return h, w, labels, torch.rand(n, generator=g) * 2


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_bf16_linear_cross_entropy_and_its_gradients_are_no_worse_than_the_reference(monkeypatch, reduction, weighted):
    monkeypatch.setattr(cpu, "CE_CHUNK_ROWS", 64)  # three chunks, the last one short
    h, w, labels, tw = _lce_inputs()
    tw = tw if weighted else None

    def run(fn):
        return lambda h, w: fn(h, w, labels, -100, tw, reduction)

    check_op(run(cpu.linear_cross_entropy), run(reference.linear_cross_entropy), (h, w), name=f"lce {reduction}")
    out = cpu.linear_cross_entropy(h, w, labels, -100, tw, reduction)
    assert out.grad_fn is not None and "_LinearCrossEntropy" in type(out.grad_fn).__name__


def test_linear_cross_entropy_with_no_labelled_row_is_zero_with_zero_gradients():
    h, w, labels, _ = _lce_inputs(n=20)
    labels[:] = -100
    loss = cpu.linear_cross_entropy(h, w, labels)
    want = reference.linear_cross_entropy(h, w, labels)
    loss.backward()
    assert loss.item() == want.item() == 0.0
    assert not h.grad.any() and not w.grad.any()


def test_linear_cross_entropy_scales_its_gradient_by_the_upstream_one():
    """A loss used inside a larger sum (aux loss, / accumulation steps) gets the upstream gradient applied."""
    h, w, labels, _ = _lce_inputs(seed=5)
    (dh1, dw1) = torch.autograd.grad(cpu.linear_cross_entropy(h, w, labels), (h, w))
    (dh3, dw3) = torch.autograd.grad(cpu.linear_cross_entropy(h, w, labels) * 0.25, (h, w))
    torch.testing.assert_close(dh3.float(), dh1.float() * 0.25, rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(dw3.float(), dw1.float() * 0.25, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("case", ["fp32", "none", "no grad"])
def test_other_linear_cross_entropy_calls_are_the_reference_call(case):
    h, w, labels, _ = _lce_inputs(dtype=torch.float32 if case == "fp32" else torch.bfloat16, seed=6)
    reduction = "none" if case == "none" else "mean"
    with torch.set_grad_enabled(case != "no grad"):
        out = cpu.linear_cross_entropy(h, w, labels, reduction=reduction)
        want = reference.linear_cross_entropy(h, w, labels, reduction=reduction)
    assert torch.equal(out, want)
    assert out.grad_fn is None or "_LinearCrossEntropy" not in type(out.grad_fn).__name__
