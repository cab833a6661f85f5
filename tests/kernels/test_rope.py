"""rope.py against reference.py.rope: rotated q and k and their gradients, error vs a float64 truth within
the margin of tests/kernels/_tolerance.py.

Without CUDA the kernel runs in Triton's interpreter (fp32); tests marked `gpu` repeat the cases natively in bf16
and at the model's real shapes, and compile with Inductor.
"""

import pytest
import torch
from _tolerance import check_op

from minimind_kernels import reference
from minimind_kernels import rope as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, T, H, Hkv, D, per-sequence tables): head_dim 64/80/96 and 20 (D/2 = 40, 48 and 10 are not powers of two; the
# kernel is compiled per D/2, and 10 is masked in pairs only), a single token, a partial last block of rows (2 * 33
# rows in blocks of 8), odd head counts, [T, D/2] and [B, T, D/2] tables.
CASES = [
    (2, 5, 4, 2, 16, False),
    (1, 1, 8, 2, 80, False),
    (3, 7, 8, 2, 96, True),
    (2, 33, 8, 2, 64, False),
    (2, 6, 3, 1, 80, True),
    (2, 5, 4, 2, 20, True),
]


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _tables(shape, gen, offset=0):
    """cos/sin rows of random angles; `offset` rows in, as a KV cache's next positions would be."""
    big = torch.randn((*shape[:-2], shape[-2] + offset, shape[-1]), generator=gen, device=DEVICE) * 3
    ang = big[..., offset:, :]
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("case", range(len(CASES)))
def test_rope_matches_reference(case):
    b, t, h, hkv, d, batched = CASES[case]
    gen = _gen(case)
    q = torch.randn(b, t, h, d, generator=gen, device=DEVICE, requires_grad=True)
    k = torch.randn(b, t, hkv, d, generator=gen, device=DEVICE, requires_grad=True)
    cos, sin = _tables((b, t, d // 2) if batched else (t, d // 2), gen, offset=case)
    check_op(K.rope, reference.rope, (q, k, cos, sin), seed=case, name=f"rope {CASES[case]}")


@pytest.mark.parametrize("batched", [False, True])
def test_non_contiguous_inputs(batched):
    b, t, h, hkv, d = 2, 9, 4, 2, 48
    gen = _gen(20 + batched)
    # q as a view of a wider projection [B, T, H*D + 8]; k as the transpose of a [B, Hkv, T, D] tensor; the tables
    # as column slices of wider ones (row stride > D/2)
    proj = torch.randn(b, t, h * d + 8, generator=gen, device=DEVICE, requires_grad=True)
    k_bhtd = torch.randn(b, hkv, t, d, generator=gen, device=DEVICE, requires_grad=True)
    cos, sin = _tables((b, t, d) if batched else (t, d), gen)

    def fn(impl):
        def run(proj, k_bhtd, cos, sin):
            q = proj[..., : h * d].reshape(b, t, h, d)
            return impl.rope(q, k_bhtd.transpose(1, 2), cos[..., : d // 2], sin[..., 3 : 3 + d // 2])

        return run

    check_op(fn(K), fn(reference), (proj, k_bhtd, cos, sin), name="rope non-contiguous")


def test_one_output_unused():
    gen = _gen(30)
    q = torch.randn(2, 4, 4, 32, generator=gen, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 4, 2, 32, generator=gen, device=DEVICE, requires_grad=True)
    cos, sin = _tables((4, 16), gen)
    check_op(lambda *a: K.rope(*a)[0], lambda *a: reference.rope(*a)[0], (q, k, cos, sin), name="rope q only")


def test_torch_library_op_passes_opcheck():
    gen = _gen(31)
    q = torch.randn(2, 3, 4, 16, generator=gen, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 3, 2, 16, generator=gen, device=DEVICE, requires_grad=True)
    for shape in ((3, 8), (2, 3, 8)):
        cos, sin = _tables(shape, gen)
        for inverse in (False, True):
            torch.library.opcheck(torch.ops.minimind.rope.default, (q, k, cos, sin, inverse))


def _attn_like(impl, q, k, cos, sin):
    qr, kr = impl.rope(q, k, cos, sin)
    return qr * 2.0, kr.transpose(1, 2)  # a consumer that reads k transposed, like attention


def _compiled_matches_eager(backend):
    gen = _gen(32)
    q = torch.randn(2, 5, 4, 80, generator=gen, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 5, 2, 80, generator=gen, device=DEVICE, requires_grad=True)
    cos, sin = _tables((5, 40), gen)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: _attn_like(K, *a), backend=backend, fullgraph=True)
    check_op(compiled, lambda *a: _attn_like(reference, *a), (q, k, cos, sin), name=f"compiled ({backend})")


def test_compiles_without_graph_breaks():
    _compiled_matches_eager("aot_eager")


@pytest.mark.gpu
def test_compiles_with_inductor():
    _compiled_matches_eager("inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(CASES)))
def test_bf16(case):
    b, t, h, hkv, d, batched = CASES[case]
    gen = _gen(40 + case)
    q = torch.randn(b, t, h, d, generator=gen, device=DEVICE).bfloat16().requires_grad_()
    k = torch.randn(b, t, hkv, d, generator=gen, device=DEVICE).bfloat16().requires_grad_()
    cos, sin = _tables((b, t, d // 2) if batched else (t, d // 2), gen)
    check_op(K.rope, reference.rope, (q, k, cos, sin), seed=case, name=f"rope bf16 {CASES[case]}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 80, 96])
def test_model_shapes(d, dtype):
    gen = _gen(d)
    q = torch.randn(8, 2049, 8, d, generator=gen, device=DEVICE).to(dtype).requires_grad_()
    k = torch.randn(8, 2049, 2, d, generator=gen, device=DEVICE).to(dtype).requires_grad_()
    cos, sin = _tables((2049, d // 2), gen)
    check_op(K.rope, reference.rope, (q, k, cos, sin), name=f"rope {dtype} {d}")
