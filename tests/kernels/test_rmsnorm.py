"""rmsnorm.py (rmsnorm, add_rmsnorm) against kernels.reference: outputs and every gradient, error vs a float64
truth within the margin of tests/kernels/_tolerance.py.

Without CUDA the kernels run in Triton's interpreter (fp32); tests marked `gpu` repeat them natively in bf16 and at
the model's real shapes, and compile with Inductor.
"""

import os
import subprocess
import sys

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


# ---- the norm output in autocast's dtype (AUTOCAST_OUTPUT) ---------------------------------------------------------
# Under autocast the kernels store y in bf16: it must be the reference's fp32 y after the cast the next linear makes,
# with the residual sum h, dx (and dw) still in x's (the weight's) dtype, and dy arriving in bf16 in the backward.

AUTOCAST = torch.bfloat16


def _under_autocast(fn):
    def run(*args):
        with torch.autocast(DEVICE, dtype=AUTOCAST):
            return fn(*args)

    return run


def _cast_norms(fn, norm_outputs):
    """fn, then autocast's cast of the outputs at `norm_outputs` (what the next linear reads); the float64 truth of
    check_op stays uncast."""

    def run(*args):
        out = fn(*args)
        outs = list(out) if isinstance(out, tuple) else [out]
        for i in norm_outputs:
            outs[i] = outs[i] if outs[i].dtype == torch.float64 else outs[i].to(AUTOCAST)
        return tuple(outs) if isinstance(out, tuple) else outs[0]

    return run


def _bf16_ulps(a, b):
    """Elementwise distance between two bf16 tensors in units in the last place: their bit patterns read as integers
    ordered like the values (IEEE 754 sign-magnitude mapped onto two's complement)."""

    def ordered(t):
        i = t.view(torch.int16).int()
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("case", [0, 2, 3])
def test_autocast_output_is_the_reference_after_the_cast(case):
    lead, d = SHAPES[case]
    gen = _gen(300 + case)
    x, w = _leaf((*lead, d), gen=gen), _leaf((d,), gen=gen)
    delta = _leaf((*lead, d), AUTOCAST, gen=gen)  # under autocast the branch output comes from a linear, in bf16

    with torch.autocast(DEVICE, dtype=AUTOCAST):
        y = K.rmsnorm(x, w, 1e-5)
        h, n = K.add_rmsnorm(x, delta, w, 1e-5)
    h_ref, n_ref = reference.add_rmsnorm(x, delta, w, 1e-5)
    assert y.dtype == n.dtype == AUTOCAST and h.dtype == torch.float32
    assert torch.equal(h, h_ref)
    # One bf16 ulp at most: the fp32 y matches the reference to a few fp32 ulps (rstd), which can move the bf16
    # rounding by one step; and Triton's interpreter converts fp32 to bf16 by truncation, the GPU to nearest even.
    assert _bf16_ulps(y, reference.rmsnorm(x, w, 1e-5).to(AUTOCAST)).max() <= 1
    assert _bf16_ulps(n, n_ref.to(AUTOCAST)).max() <= 1

    # forward and backward against the float64 truth: dy in bf16, dh in fp32; check_op also asserts that dx is fp32,
    # ddelta bf16 and dw fp32, the dtypes of the reference's gradients
    check_op(_under_autocast(K.rmsnorm), _cast_norms(reference.rmsnorm, [0]), (x, w, 1e-5), seed=case,
             name=f"rmsnorm autocast {lead}x{d}")  # fmt: skip
    check_op(_under_autocast(K.add_rmsnorm), _cast_norms(reference.add_rmsnorm, [1]), (x, delta, w, 1e-5),
             seed=case, name=f"add_rmsnorm autocast {lead}x{d}")  # fmt: skip


def test_autocast_output_switch(monkeypatch):
    gen = _gen(310)
    x, delta, w = _leaf((3, 80), gen=gen), _leaf((3, 80), gen=gen), _leaf((80,), gen=gen)
    monkeypatch.setattr(K, "AUTOCAST_OUTPUT", False)
    with torch.autocast(DEVICE, dtype=AUTOCAST):
        y = K.rmsnorm(x, w, 1e-5)
        h, n = K.add_rmsnorm(x, delta, w, 1e-5)
    assert y.dtype == h.dtype == n.dtype == torch.float32  # off: x's dtype, as in reference.py
    torch.testing.assert_close(y, reference.rmsnorm(x, w, 1e-5))
    monkeypatch.setattr(K, "AUTOCAST_OUTPUT", True)
    assert K.rmsnorm(x, w, 1e-5).dtype == torch.float32  # on, but autocast is not
    with torch.autocast(DEVICE, dtype=AUTOCAST):
        assert K.rmsnorm(x.detach().to(AUTOCAST), w, 1e-5).dtype == AUTOCAST  # already autocast's dtype


@pytest.mark.parametrize("value, expected", [("0", False), ("1", True), (None, True)])
def test_autocast_output_environment_variable(value, expected):
    env = {k: v for k, v in os.environ.items() if k != "MINIMIND_NORM_AUTOCAST_OUT"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # this run's imports, installed or not
    if value is not None:
        env["MINIMIND_NORM_AUTOCAST_OUT"] = value
    code = "from minimind_kernels import rmsnorm; print(rmsnorm.AUTOCAST_OUTPUT)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)


def test_autocast_output_ops_pass_opcheck():
    gen = _gen(320)
    x, delta, w = _leaf((5, 80), gen=gen), _leaf((5, 80), AUTOCAST, gen=gen), _leaf((80,), gen=gen)
    torch.library.opcheck(torch.ops.minimind.rmsnorm_fwd.default, (x, w, 1e-5, AUTOCAST))
    torch.library.opcheck(torch.ops.minimind.add_rmsnorm_fwd.default, (x, delta, w, 1e-5, AUTOCAST))


def _autocast_block(impl, x, delta, w1, w2):
    h, n = impl.add_rmsnorm(x, delta, w1, 1e-5)
    return h, n, impl.rmsnorm(h * 1.5, w2, 1e-5)


def test_autocast_output_compiles_without_graph_breaks():
    gen = _gen(330)
    args = (_leaf((2, 7, 80), gen=gen), _leaf((2, 7, 80), AUTOCAST, gen=gen), _leaf((80,), gen=gen),
            _leaf((80,), gen=gen))  # fmt: skip
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: _autocast_block(K, *a), backend="aot_eager", fullgraph=True)
    with torch.autocast(DEVICE, dtype=AUTOCAST):
        h, n, y = compiled(*args)
    assert h.dtype == torch.float32 and n.dtype == y.dtype == AUTOCAST  # the fake kernels give the same dtypes
    ref = _cast_norms(lambda *a: _autocast_block(reference, *a), [1, 2])
    check_op(_under_autocast(compiled), ref, args, name="compiled autocast (aot_eager)")


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
