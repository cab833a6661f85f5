"""minimind_kernels.sdpa: attention with one SDPA backend forced, chosen per op in the kernels spec."""

import math

import pytest
import torch

import minimind_kernels as kernels
from minimind_kernels import sdpa


def _qkv(mask: bool):
    g = torch.Generator().manual_seed(0)
    b, h, hkv, t, d = 2, 4, 2, 7, 16
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64)
    attn_mask = None
    if mask:  # left padding of two positions in row 0, causal everywhere
        attn_mask = torch.ones(t, t, dtype=torch.bool).tril().expand(b, 1, t, t).clone()
        attn_mask[0, :, :, :2] = False
        attn_mask[0, :, :2, :2] = torch.eye(2, dtype=torch.bool)  # padded rows still see themselves (finite output)
    return q, k, v, attn_mask


def _by_hand(q, k, v, attn_mask):
    """Softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1) with each key/value head shared by H/Hkv query heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    t = q.shape[2]
    allowed = torch.ones(t, t, dtype=torch.bool).tril() if attn_mask is None else attn_mask
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("mask", [False, True])
def test_math_backend_from_the_spec_equals_attention_by_hand(mask):
    ops = kernels.resolve("torch,attention=math")
    assert ops.impl["attention"] == "math" and ops.attention is sdpa.attention_math
    q, k, v, attn_mask = _qkv(mask)
    q.requires_grad_(True)
    out = ops.attention(q, k, v, attn_mask=attn_mask)
    want = _by_hand(q, k, v, attn_mask)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, q, g)
    (dq_want,) = torch.autograd.grad(want, q, g)
    torch.testing.assert_close(dq, dq_want, rtol=1e-10, atol=1e-10)


def test_every_backend_is_an_attention_override_and_nothing_else():
    for name in sdpa.BACKENDS:
        ops = kernels.resolve(f"torch,attention={name}", check_runnable=False)
        assert ops.attention is getattr(sdpa, f"attention_{name}")
    with pytest.raises(kernels.KernelSpecError, match="no flash implementation"):
        kernels.resolve("torch,rope=flash")


@pytest.mark.parametrize("name", ["flash", "cudnn", "efficient"])
def test_a_cuda_backend_without_cuda_is_refused_at_resolve(monkeypatch, name):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(kernels.KernelSpecError, match=f"'{name}' cannot run here: needs CUDA"):
        kernels.resolve(f"torch,attention={name}")
    # tools/compile_check.py resolves without the check: the spec itself is valid
    assert kernels.resolve(f"torch,attention={name}", check_runnable=False).impl["attention"] == name


def test_forced_backend_compiles_in_one_graph():
    q, k, v, _ = _qkv(False)
    q, k, v = q.float(), k.float(), v.float()
    fn = torch.compile(sdpa.attention_math, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), sdpa.attention_math(q, k, v))
