"""swiglu.py against reference.swiglu: output and both gradients, error vs a float64 truth within the
margin of tests/kernels/_tolerance.py.

Without CUDA the kernel runs in Triton's interpreter (fp32); tests marked `gpu` repeat the cases natively in bf16
and at the model's real shapes, and compile with Inductor.
"""

import pytest
import torch
from _tolerance import check_op

from minimind_kernels import reference
from minimind_kernels import swiglu as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (leading shape, FFN width): widths that are not multiples of the 128-column block (200, 1728 = 13.5 blocks, 96),
# a single row, a partial last block of 16 rows (33 rows), the small preset's 1408.
SHAPES = [((3, 5), 200), ((1,), 1408), ((33,), 96), ((2, 3), 1728)]


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _leaf(shape, gen, dtype=torch.float32, scale=3.0):
    # scale 3 reaches the saturated ends of the sigmoid as well as its middle
    return (torch.randn(shape, generator=gen, device=DEVICE) * scale).to(dtype).requires_grad_()


@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_swiglu_matches_reference(case):
    lead, f = SHAPES[case]
    gen = _gen(case)
    gate, up = _leaf((*lead, f), gen), _leaf((*lead, f), gen)
    check_op(K.swiglu, reference.swiglu, (gate, up), seed=case, name=f"swiglu {lead}x{f}")


def test_non_contiguous_inputs():
    gen = _gen(10)
    fused = _leaf((4, 6, 2 * 200), gen)  # gate and up as the halves of a fused projection (row stride 400)
    up_t = _leaf((200, 24), gen)  # a transposed up: copied

    def halves(impl):
        return lambda p: impl.swiglu(*p.chunk(2, dim=-1))

    def mixed(impl):
        return lambda p, u: impl.swiglu(p[..., :200].reshape(24, 200), u.t())

    check_op(halves(K), halves(reference), (fused,), name="swiglu fused halves")
    check_op(mixed(K), mixed(reference), (fused, up_t), name="swiglu transposed up")


# sigmoid(-100) overflows exp(100) to inf on the way to the correct 0; the interpreter (numpy) warns about it
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_extreme_gates_stay_finite():
    gate = torch.tensor([[-100.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 100.0]], device=DEVICE, requires_grad=True)
    up = torch.ones_like(gate, requires_grad=True)
    check_op(K.swiglu, reference.swiglu, (gate, up), name="swiglu extreme gates")


def test_torch_library_ops_pass_opcheck():
    gen = _gen(11)
    gate, up = _leaf((5, 40), gen), _leaf((5, 40), gen)
    dy = torch.randn(5, 40, generator=gen, device=DEVICE)
    torch.library.opcheck(torch.ops.minimind.swiglu_fwd.default, (gate, up))
    torch.library.opcheck(torch.ops.minimind.swiglu_bwd.default, (dy, gate.detach(), up.detach()))


def _ffn_like(impl, gate, up):
    return impl.swiglu(gate * 0.5, up) * 2.0


def _compiled_matches_eager(backend):
    gen = _gen(12)
    args = (_leaf((3, 7, 96), gen), _leaf((3, 7, 96), gen))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: _ffn_like(K, *a), backend=backend, fullgraph=True)
    check_op(compiled, lambda *a: _ffn_like(reference, *a), args, name=f"compiled ({backend})")


def test_compiles_without_graph_breaks():
    _compiled_matches_eager("aot_eager")


@pytest.mark.gpu
def test_compiles_with_inductor():
    _compiled_matches_eager("inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_bf16(case):
    lead, f = SHAPES[case]
    gen = _gen(20 + case)
    gate, up = _leaf((*lead, f), gen, torch.bfloat16), _leaf((*lead, f), gen, torch.bfloat16)
    check_op(K.swiglu, reference.swiglu, (gate, up), seed=case, name=f"swiglu bf16 {lead}x{f}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("f", [1408, 1728, 2048])
def test_model_shapes(f, dtype):
    gen = _gen(f)
    gate, up = _leaf((8, 2049, f), gen, dtype), _leaf((8, 2049, f), gen, dtype)
    check_op(K.swiglu, reference.swiglu, (gate, up), name=f"swiglu {dtype} {f}")
