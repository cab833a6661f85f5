"""The ops registry: spec grammar, per-op overrides, errors instead of silent fallbacks, the start-up table."""

import pytest

import minimind_kernels as kernels
from minimind_kernels import reference


def test_torch_spec_uses_reference_everywhere():
    ops = kernels.resolve("torch")
    assert set(ops.impl.values()) == {"torch"}
    assert ops.rmsnorm is reference.rmsnorm and ops.linear_cross_entropy is reference.linear_cross_entropy


def test_auto_without_cuda_is_torch_but_for_the_cpu_family(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    impl = kernels.resolve("auto").impl
    cpu_ops = {"attention", "linear_cross_entropy"}  # tests/kernels/test_cpu_ops.py
    assert {op for op, family in impl.items() if family == "cpu"} == cpu_ops
    assert {family for op, family in impl.items() if op not in cpu_ops} == {"torch"}


def test_override_grammar_and_table():
    base, over = kernels.parse_spec("triton, rope=torch ,swiglu=torch")
    assert base == "triton" and over == {"rope": "torch", "swiglu": "torch"}
    table = kernels.describe(kernels.resolve("torch,rope=torch"))
    assert table.splitlines()[0] == "kernels (torch,rope=torch):"
    assert all(op in table for op in kernels.OP_NAMES)


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("cuda", "unknown kernels base"),
        ("", "must start with"),
        ("rope=torch", "must start with"),
        ("torch,softmax=triton", "unknown op"),
        ("torch,rope=fast", "unknown implementation"),
        ("torch,attention=triton", "no triton implementation"),
    ],
)
def test_bad_specs_are_errors(spec, msg):
    with pytest.raises(kernels.KernelSpecError, match=msg):
        kernels.resolve(spec)


def test_explicit_triton_that_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setattr(kernels, "triton_interpreting", lambda: False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(kernels.KernelSpecError, match="cannot run here"):
        kernels.resolve("triton")
    with pytest.raises(kernels.KernelSpecError, match="cannot run here"):
        kernels.resolve("torch,rope=triton")
