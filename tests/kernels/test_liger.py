"""minimind_kernels.liger (Liger-Kernel behind our signatures) against minimind_kernels.reference, with the rule of
tests/kernels/_tolerance.py.

Liger's rope and fused linear cross-entropy run in Triton's CPU interpreter and are tested here in fp32. Its
rms_norm, fused add rms_norm and swiglu kernels do not run there (they call `.to` on scalar arguments, which the
interpreter passes as Python floats), so those tests are marked `gpu`, as are the bf16 variants.
"""

import pytest
import torch
from _tolerance import check_op

pytest.importorskip("liger_kernel")

import minimind_kernels as kernels  # noqa: E402
from minimind_kernels import liger as L  # noqa: E402
from minimind_kernels import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _randn(shape, gen, dtype=torch.float32, grad=True, scale=1.0):
    return (torch.randn(shape, generator=gen, device=DEVICE) * scale).to(dtype).requires_grad_(grad)


# ---- rope: interpreter ----------------------------------------------------------------------------------------------

ROPE_CASES = [(2, 5, 4, 2, 16, False), (1, 1, 8, 2, 80, False), (3, 7, 8, 2, 96, True), (2, 6, 3, 1, 80, True)]


def _tables(shape, gen):
    ang = torch.randn(shape, generator=gen, device=DEVICE) * 3
    return ang.cos(), ang.sin()


def _rope_case(case, dtype):
    b, t, h, hkv, d, batched = ROPE_CASES[case]
    gen = _gen(case)
    q, k = _randn((b, t, h, d), gen, dtype), _randn((b, t, hkv, d), gen, dtype)
    cos, sin = _tables((b, t, d // 2) if batched else (t, d // 2), gen)
    check_op(L.rope, reference.rope, (q, k, cos, sin), seed=case, name=f"liger rope {dtype} {ROPE_CASES[case]}")


@pytest.mark.parametrize("case", range(len(ROPE_CASES)))
def test_rope_matches_reference(case):
    _rope_case(case, torch.float32)


def test_rope_non_contiguous_q():
    b, t, h, hkv, d = 2, 5, 4, 2, 64
    gen = _gen(10)
    proj = _randn((b, t, h * d + 8), gen)  # q as a view of a wider projection: Liger copies it
    k = _randn((b, t, hkv, d), gen)
    cos, sin = _tables((t, d // 2), gen)

    def fn(impl):
        return lambda p, k, c, s: impl.rope(p[..., : h * d].reshape(b, t, h, d), k, c, s)

    check_op(fn(L), fn(reference), (proj, k, cos, sin), name="liger rope non-contiguous q")


# ---- fused linear cross-entropy: interpreter ------------------------------------------------------------------------


def _ce_inputs(gen, n=37, d=48, v=101, dtype=torch.float32):
    hidden, weight = _randn((n, d), gen, dtype), _randn((v, d), gen, dtype, scale=0.5)
    labels = torch.randint(0, v, (n,), generator=gen, device=DEVICE)
    labels[::5] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_reference(reduction):
    hidden, weight, labels = _ce_inputs(_gen(20))

    def fn(impl):
        return lambda h, w: impl.linear_cross_entropy(h, w, labels, -100, None, reduction)

    check_op(fn(L), fn(reference), (hidden, weight), name=f"liger linear_ce {reduction}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_token_weights_fall_back(reduction):
    gen = _gen(21)
    hidden, weight, labels = _ce_inputs(gen)
    token_weight = torch.rand(labels.shape, generator=gen, device=DEVICE) * 10

    def fn(impl):
        return lambda h, w: impl.linear_cross_entropy(h, w, labels, -100, token_weight, reduction)

    check_op(fn(L), fn(reference), (hidden, weight), name=f"liger linear_ce weighted {reduction}")


def test_linear_cross_entropy_all_ignored_is_zero():
    hidden, weight, _ = _ce_inputs(_gen(22))
    labels = torch.full((hidden.shape[0],), -100, device=DEVICE)
    loss = L.linear_cross_entropy(hidden, weight, labels)
    assert loss.item() == 0.0 == reference.linear_cross_entropy(hidden, weight, labels).item()
    loss.backward()
    assert not hidden.grad.any() and not weight.grad.any()


def test_registry_resolves_liger_family():
    ops = kernels.resolve("liger")
    assert ops.rope is L.rope and ops.linear_cross_entropy is L.linear_cross_entropy
    assert ops.rmsnorm is L.rmsnorm and ops.swiglu is L.swiglu


# ---- GPU only: the norms and swiglu (not in the interpreter), bf16 ------------------------------------------------

NORM_SHAPES = [((2, 3), 80), ((1,), 96), ((150,), 96), ((5,), 640)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(NORM_SHAPES)))
def test_norms_match_reference(case, dtype):
    lead, d = NORM_SHAPES[case]
    gen = _gen(30 + case)
    x, delta, w = _randn((*lead, d), gen, dtype), _randn((*lead, d), gen, dtype), _randn((d,), gen)
    check_op(L.rmsnorm, reference.rmsnorm, (x, w, 1e-5), seed=case, name=f"liger rmsnorm {dtype}")
    check_op(L.add_rmsnorm, reference.add_rmsnorm, (x, delta, w, 1e-5), seed=case, name=f"liger add_rmsnorm {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 200), (1, 1408), (33, 96), (2, 3, 1728)])
def test_swiglu_matches_reference(shape, dtype):
    gen = _gen(sum(shape))
    gate, up = _randn(shape, gen, dtype, scale=3.0), _randn(shape, gen, dtype, scale=3.0)
    check_op(L.swiglu, reference.swiglu, (gate, up), name=f"liger swiglu {dtype} {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(ROPE_CASES)))
def test_rope_bf16(case):
    _rope_case(case, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_bf16(reduction):
    hidden, weight, labels = _ce_inputs(_gen(40), n=1000, d=512, v=6400, dtype=torch.bfloat16)

    def fn(impl):
        return lambda h, w: impl.linear_cross_entropy(h, w, labels, -100, None, reduction)

    check_op(fn(L), fn(reference), (hidden, weight), name=f"liger linear_ce bf16 {reduction}")
