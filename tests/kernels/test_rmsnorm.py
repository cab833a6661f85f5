"""rmsnorm.py (rmsnorm, add_rmsnorm) against kernels.reference: outputs and every gradient, error vs a float64
truth within the margin of tests/kernels/_tolerance.py.

Without CUDA the kernels run in Triton's interpreter (fp32); tests marked `gpu` repeat them natively in bf16 and at
the model's real shapes, and compile with Inductor.
"""

import pytest
import torch
from _tolerance import check_op

from minimind_kernels import reference
from minimind_kernels import rmsnorm as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (leading shape, hidden): non-powers of two (80, 96, 640), a single row, a partial last row block and a row count
# that makes each persistent backward program loop over several blocks (150 rows of 96 = 10 blocks of 16, 4 programs).
SHAPES = [((2, 3), 80), ((1,), 96), ((150,), 96), ((5,), 640), ((3, 7), 512)]


def _leaf(shape, dtype=torch.float32, grad=True, gen=None):
    return torch.randn(shape, generator=gen, device=DEVICE).to(dtype).requires_grad_(grad)


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_rmsnorm_matches_reference(case):
    lead, d = SHAPES[case]
    gen = _gen(case)
    x, w = _leaf((*lead, d), gen=gen), _leaf((d,), gen=gen)
    check_op(K.rmsnorm, reference.rmsnorm, (x, w, 1e-5), seed=case, name=f"rmsnorm {lead}x{d}")


@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_add_rmsnorm_matches_reference(case):
    lead, d = SHAPES[case]
    gen = _gen(100 + case)
    x, delta, w = _leaf((*lead, d), gen=gen), _leaf((*lead, d), gen=gen), _leaf((d,), gen=gen)
    check_op(K.add_rmsnorm, reference.add_rmsnorm, (x, delta, w, 1e-5), seed=case, name=f"add_rmsnorm {lead}x{d}")


def test_non_contiguous_inputs():
    gen = _gen(7)
    base = _leaf((6, 5, 96 + 9), gen=gen)  # rows of a wider tensor: a row stride > hidden, viewed without a copy
    base_t = _leaf((96, 30), gen=gen)  # a transposed view (stride 30 along hidden): copied
    w = _leaf((96,), gen=gen)
    check_op(lambda b, w: K.rmsnorm(b[..., :96], w, 1e-6), lambda b, w: reference.rmsnorm(b[..., :96], w, 1e-6),
             (base, w), name="rmsnorm row-strided")  # fmt: skip
    check_op(lambda b, w: K.rmsnorm(b.t(), w, 1e-5), lambda b, w: reference.rmsnorm(b.t(), w, 1e-5), (base_t, w),
             name="rmsnorm transposed")  # fmt: skip

    def fused(impl):
        return lambda b, bt, w: impl.add_rmsnorm(b[..., :96].reshape(30, 96), bt.t(), w, 1e-5)

    check_op(fused(K), fused(reference), (base, base_t, w), name="add_rmsnorm non-contiguous")


def test_frozen_weight_and_unused_outputs():
    gen = _gen(8)
    x, delta, w = _leaf((9, 80), gen=gen), _leaf((9, 80), gen=gen), _leaf((80,), grad=False, gen=gen)
    check_op(K.rmsnorm, reference.rmsnorm, (x, w, 1e-5), name="rmsnorm frozen weight")
    # h unused (dh is None), the norm unused (dn is None)
    check_op(lambda *a: K.add_rmsnorm(*a)[1], lambda *a: reference.add_rmsnorm(*a)[1], (x, delta, w, 1e-5),
             name="add_rmsnorm norm only")  # fmt: skip
    w.requires_grad_(True)
    check_op(lambda *a: K.add_rmsnorm(*a)[0], lambda *a: reference.add_rmsnorm(*a)[0], (x, delta, w, 1e-5),
             name="add_rmsnorm residual only")  # fmt: skip


def test_mixed_dtypes_keep_the_first_activation_dtype():
    # fp32 residual + bf16 branch output (autocast): h and the norm are fp32, delta's gradient is bf16
    gen = _gen(9)
    x, delta, w = _leaf((4, 3, 96), gen=gen), _leaf((4, 3, 96), torch.bfloat16, gen=gen), _leaf((96,), gen=gen)
    h, n = K.add_rmsnorm(x, delta, w, 1e-5)
    assert h.dtype == n.dtype == torch.float32
    check_op(K.add_rmsnorm, reference.add_rmsnorm, (x, delta, w, 1e-5), name="add_rmsnorm fp32 + bf16")


def test_empty_input():
    x, w = _leaf((0, 80)), _leaf((80,))
    y = K.rmsnorm(x, w, 1e-5)
    y.sum().backward()
    assert y.shape == (0, 80) and w.grad is not None and not w.grad.any()


def test_torch_library_ops_pass_opcheck():
    gen = _gen(10)
    x, delta, w = _leaf((5, 80), gen=gen), _leaf((5, 80), gen=gen), _leaf((80,), gen=gen)
    rstd = torch.rand(5, generator=gen, device=DEVICE) + 0.5
    dy = torch.randn(5, 80, generator=gen, device=DEVICE)
    torch.library.opcheck(torch.ops.minimind.rmsnorm_fwd.default, (x, w, 1e-5))
    torch.library.opcheck(torch.ops.minimind.add_rmsnorm_fwd.default, (x, delta, w, 1e-5))
    for need_dw in (True, False):
        torch.library.opcheck(torch.ops.minimind.rmsnorm_bwd.default, (dy, x.detach(), w.detach(), rstd, need_dw))
        torch.library.opcheck(
            torch.ops.minimind.add_rmsnorm_bwd.default, (dy, dy, x.detach(), w.detach(), rstd, need_dw)
        )
    torch.library.opcheck(torch.ops.minimind.add_rmsnorm_bwd.default, (None, dy, x.detach(), w.detach(), rstd, True))


def _block(impl, x, delta, w1, w2):
    h, n = impl.add_rmsnorm(x, delta, w1, 1e-5)
    return h, impl.rmsnorm(n * 1.5, w2, 1e-5)


def _compiled_matches_eager(backend):
    gen = _gen(11)
    args = (_leaf((2, 7, 80), gen=gen), _leaf((2, 7, 80), gen=gen), _leaf((80,), gen=gen), _leaf((80,), gen=gen))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: _block(K, *a), backend=backend, fullgraph=True)  # fullgraph: no graph break
    check_op(compiled, lambda *a: _block(reference, *a), args, name=f"compiled ({backend})")


def test_compiles_without_graph_breaks():
    _compiled_matches_eager("aot_eager")


@pytest.mark.gpu
def test_compiles_with_inductor():
    _compiled_matches_eager("inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_bf16(case, weight_dtype):
    lead, d = SHAPES[case]
    gen = _gen(200 + case)
    x, delta = _leaf((*lead, d), torch.bfloat16, gen=gen), _leaf((*lead, d), torch.bfloat16, gen=gen)
    w = _leaf((d,), weight_dtype, gen=gen)
    check_op(K.rmsnorm, reference.rmsnorm, (x, w, 1e-5), seed=case, name="rmsnorm bf16")
    check_op(K.add_rmsnorm, reference.add_rmsnorm, (x, delta, w, 1e-5), seed=case, name="add_rmsnorm bf16")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [512, 640, 768])
def test_model_shapes(d, dtype):
    gen = _gen(d)
    x, delta, w = _leaf((4, 4099, d), dtype, gen=gen), _leaf((4, 4099, d), dtype, gen=gen), _leaf((d,), gen=gen)
    check_op(K.add_rmsnorm, reference.add_rmsnorm, (x, delta, w, 1e-5), name=f"add_rmsnorm {dtype} {d}")
