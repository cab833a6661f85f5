"""qk_norm_rope.py against reference.py.qk_norm_rope (rope(rmsnorm(q), rmsnorm(k))): normalised and rotated q and k
and the gradients of q, k, q_weight and k_weight, error vs a float64 truth within the margin of
tests/kernels/_tolerance.py.

Without CUDA the kernels run in Triton's interpreter (fp32); tests marked `gpu` repeat the cases natively in bf16
(with fp32 and bf16 gains) and at the model's real shapes, and compile with Inductor.
"""

import pytest
import torch
from _tolerance import check_op

import minimind_kernels as kernels
from minimind_kernels import qk_norm_rope as K
from minimind_kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6  # MiniMind-3's rms_norm_eps

# (B, T, H, Hkv, D, per-sequence tables): head_dim 32, 64, 80, 96 and 20 (D/2 = 40, 48 and 10 are not powers of two
# and are masked), a single token, T not a power of two, Hkv < H (H/2, H/4, and 3 query heads on 1 key head) and
# Hkv = H, [T, D/2] and [B, T, D/2] tables. Case 3 has 66 tokens in backward blocks of 4: 17 blocks over the
# interpreter's 4 persistent backward programs, so each program loops over several blocks and the last block is
# partial.
CASES = [
    (2, 5, 4, 2, 32, False),
    (1, 1, 8, 4, 96, False),
    (3, 7, 8, 4, 96, True),
    (2, 33, 8, 2, 64, False),
    (2, 6, 3, 1, 80, True),
    (2, 5, 4, 4, 20, True),
    (1, 3, 8, 2, 80, False),
]


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _tables(shape, gen, offset=0):
    """cos/sin rows of random angles; `offset` rows in, as a KV cache's next positions would be."""
    big = torch.randn((*shape[:-2], shape[-2] + offset, shape[-1]), generator=gen, device=DEVICE) * 3
    ang = big[..., offset:, :]
    return ang.cos(), ang.sin()


def _gain(d, gen, dtype=torch.float32, grad=True):
    """A learned gain near 1 (norm weights start at 1), far enough from it that a gain applied to the wrong half or
    the wrong tensor shows."""
    w = 1.0 + 0.3 * torch.randn(d, generator=gen, device=DEVICE)
    return w.to(dtype).requires_grad_(grad)


def _inputs(b, t, h, hkv, d, gen, dtype=torch.float32, scale=1.0):
    q = (torch.randn(b, t, h, d, generator=gen, device=DEVICE) * scale).to(dtype).requires_grad_()
    k = (torch.randn(b, t, hkv, d, generator=gen, device=DEVICE) * scale).to(dtype).requires_grad_()
    return q, k


@pytest.mark.parametrize("case", range(len(CASES)))
def test_qk_norm_rope_matches_reference(case):
    b, t, h, hkv, d, batched = CASES[case]
    gen = _gen(case)
    q, k = _inputs(b, t, h, hkv, d, gen)
    qw, kw = _gain(d, gen), _gain(d, gen)
    cos, sin = _tables((b, t, d // 2) if batched else (t, d // 2), gen, offset=case)
    check_op(K.qk_norm_rope, reference.qk_norm_rope, (q, k, qw, kw, EPS, cos, sin), seed=case,
             name=f"qk_norm_rope {CASES[case]}")  # fmt: skip


def test_eps_is_applied():
    # Head vectors with mean square 1e-6 next to eps = 1e-5: eps dominates rstd, so a dropped or misplaced eps fails.
    gen = _gen(10)
    q, k = _inputs(2, 3, 4, 2, 32, gen, scale=1e-3)
    qw, kw = _gain(32, gen), _gain(32, gen)
    cos, sin = _tables((3, 16), gen)
    out = K.qk_norm_rope(q, k, qw, kw, 1e-5, cos, sin)
    # mean square of out about 1e-6 / (1e-6 + 1e-5) * mean(w^2) = 0.1; it would be about mean(w^2) = 1.1 without eps
    assert out[0].pow(2).mean() < 0.25 and out[1].pow(2).mean() < 0.25
    check_op(K.qk_norm_rope, reference.qk_norm_rope, (q, k, qw, kw, 1e-5, cos, sin), name="qk_norm_rope eps")


@pytest.mark.parametrize("batched", [False, True])
def test_non_contiguous_inputs(batched):
    b, t, h, hkv, d = 2, 9, 4, 2, 48
    gen = _gen(20 + batched)
    # q as a view of a wider projection [B, T, H*D + 8]; k as the transpose of a [B, Hkv, T, D] tensor; the gains as
    # strided slices; the tables as column slices of wider ones (row stride > D/2)
    proj = torch.randn(b, t, h * d + 8, generator=gen, device=DEVICE, requires_grad=True)
    k_bhtd = torch.randn(b, hkv, t, d, generator=gen, device=DEVICE, requires_grad=True)
    w2 = (1.0 + 0.3 * torch.randn(2, d, generator=gen, device=DEVICE)).requires_grad_()
    cos, sin = _tables((b, t, d) if batched else (t, d), gen)

    def fn(impl):
        def run(proj, k_bhtd, w2, cos, sin):
            q = proj[..., : h * d].reshape(b, t, h, d)
            return impl.qk_norm_rope(
                q, k_bhtd.transpose(1, 2), w2[0], w2.t()[:, 1], EPS, cos[..., : d // 2], sin[..., 3 : 3 + d // 2]
            )

        return run

    check_op(fn(K), fn(reference), (proj, k_bhtd, w2, cos, sin), name="qk_norm_rope non-contiguous")


def test_attention_layout_gradients():
    # The model's consumer reads q and k transposed to [B, heads, T, D]: the output gradients arrive as transposed
    # (non-contiguous) views, which the backward reads at their own strides.
    gen = _gen(25)
    q, k = _inputs(2, 5, 8, 4, 96, gen)
    qw, kw = _gain(96, gen), _gain(96, gen)
    cos, sin = _tables((5, 48), gen)

    def fn(impl):
        return lambda *a: tuple(o.transpose(1, 2).contiguous() for o in impl.qk_norm_rope(*a))

    check_op(fn(K), fn(reference), (q, k, qw, kw, EPS, cos, sin), name="qk_norm_rope transposed consumer")


def test_one_output_unused_and_frozen_gains():
    gen = _gen(30)
    q, k = _inputs(2, 4, 4, 2, 32, gen)
    qw, kw = _gain(32, gen), _gain(32, gen)
    cos, sin = _tables((4, 16), gen)
    args = (q, k, qw, kw, EPS, cos, sin)
    check_op(lambda *a: K.qk_norm_rope(*a)[0], lambda *a: reference.qk_norm_rope(*a)[0], args, name="q only")
    check_op(lambda *a: K.qk_norm_rope(*a)[1], lambda *a: reference.qk_norm_rope(*a)[1], args, name="k only")
    frozen = (q, k, _gain(32, gen, grad=False), _gain(32, gen, grad=False), EPS, cos, sin)
    check_op(K.qk_norm_rope, reference.qk_norm_rope, frozen, name="frozen gains")
    one_frozen = (q, k, qw, _gain(32, gen, grad=False), EPS, cos, sin)
    check_op(K.qk_norm_rope, reference.qk_norm_rope, one_frozen, name="k gain frozen")


def test_bf16_gains_with_fp32_activations():
    # The gains keep their own dtype: their gradients are bf16 like the reference's, q and k's stay fp32.
    gen = _gen(35)
    q, k = _inputs(2, 3, 4, 2, 64, gen)
    qw, kw = _gain(64, gen, torch.bfloat16), _gain(64, gen, torch.bfloat16)
    cos, sin = _tables((2, 3, 32), gen)
    check_op(K.qk_norm_rope, reference.qk_norm_rope, (q, k, qw, kw, EPS, cos, sin), name="bf16 gains")


def test_empty_input():
    q, k = torch.randn(2, 0, 4, 32, requires_grad=True), torch.randn(2, 0, 2, 32, requires_grad=True)
    qw, kw = _gain(32, _gen(36)).cpu(), _gain(32, _gen(37)).cpu()
    qo, ko = K.qk_norm_rope(q, k, qw, kw, EPS, torch.ones(0, 16), torch.zeros(0, 16))
    (qo.sum() + ko.sum()).backward()
    assert qo.shape == q.shape and ko.shape == k.shape
    assert not qw.grad.any() and not kw.grad.any() and q.grad.shape == q.shape


def test_registry_resolves_to_this_kernel():
    ops = kernels.resolve("triton")
    assert ops.qk_norm_rope is K.qk_norm_rope and ops.impl["qk_norm_rope"] == "triton"
    assert kernels.resolve("torch").qk_norm_rope is reference.qk_norm_rope


def test_torch_library_ops_pass_opcheck():
    gen = _gen(40)
    q, k = _inputs(2, 3, 4, 2, 16, gen)
    qw, kw = _gain(16, gen), _gain(16, gen)
    dq, dk = torch.randn(2, 3, 4, 16, generator=gen, device=DEVICE), torch.randn(2, 3, 2, 16, generator=gen,
                                                                                 device=DEVICE)  # fmt: skip
    for shape in ((3, 8), (2, 3, 8)):
        cos, sin = _tables(shape, gen)
        torch.library.opcheck(torch.ops.minimind.qk_norm_rope_fwd.default, (q, k, qw, kw, EPS, cos, sin))
        for need_dw in (True, False):
            saved = (q.detach(), k.detach(), qw.detach(), kw.detach(), EPS, cos, sin, need_dw)
            torch.library.opcheck(torch.ops.minimind.qk_norm_rope_bwd.default, (dq, dk, *saved))


def _attn_like(impl, q, k, qw, kw, cos, sin):
    qr, kr = impl.qk_norm_rope(q, k, qw, kw, EPS, cos, sin)
    return qr * 2.0, kr.transpose(1, 2)  # a consumer that reads k transposed, like attention


def _compiled_matches_eager(backend):
    gen = _gen(50)
    q, k = _inputs(2, 5, 4, 2, 80, gen)
    qw, kw = _gain(80, gen), _gain(80, gen)
    cos, sin = _tables((5, 40), gen)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: _attn_like(K, *a), backend=backend, fullgraph=True)
    check_op(compiled, lambda *a: _attn_like(reference, *a), (q, k, qw, kw, cos, sin), name=f"compiled ({backend})")


def test_compiles_without_graph_breaks():
    _compiled_matches_eager("aot_eager")


@pytest.mark.gpu
def test_compiles_with_inductor():
    _compiled_matches_eager("inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_bf16(case, weight_dtype):
    # fp32 gains with bf16 activations is the model under autocast; bf16 gains a model cast to bf16
    b, t, h, hkv, d, batched = CASES[case]
    gen = _gen(60 + case)
    q, k = _inputs(b, t, h, hkv, d, gen, torch.bfloat16)
    qw, kw = _gain(d, gen, weight_dtype), _gain(d, gen, weight_dtype)
    cos, sin = _tables((b, t, d // 2) if batched else (t, d // 2), gen)
    check_op(K.qk_norm_rope, reference.qk_norm_rope, (q, k, qw, kw, EPS, cos, sin), seed=case,
             name=f"qk_norm_rope bf16 {CASES[case]} gains {weight_dtype}")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 96])
def test_model_shapes(d, dtype):
    # MiniMind-3: 8 query heads, 4 key/value heads, head_dim 96 (and 64); 8 rows of 2049 tokens
    gen = _gen(d)
    q, k = _inputs(8, 2049, 8, 4, d, gen, dtype)
    qw, kw = _gain(d, gen), _gain(d, gen)
    cos, sin = _tables((2049, d // 2), gen)
    check_op(K.qk_norm_rope, reference.qk_norm_rope, (q, k, qw, kw, EPS, cos, sin), name=f"qk_norm_rope {dtype} {d}")
