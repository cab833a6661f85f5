"""The tolerance rule shared by the kernel tests (DESIGN.md, "Testing kernels without a GPU").

A kernel is judged against a float64 truth (the reference op run on the inputs cast to float64), never against the
reference at the kernel's own precision: the kernel passes when its error is not worse than the error PyTorch makes at
the same dtype, up to a stated margin.

    err_ours = max |ours - truth|        err_ref = max |torch_ref - truth|
    pass  <=>  err_ours <= factor * err_ref + ulps * eps(dtype) * max(|truth|.max(), 1e-6)

`factor` (default 2) allows a different summation order; the `ulps` floor (default 4 units of the dtype's epsilon at
the largest truth value) covers the cases where the reference happens to be exact (err_ref = 0) or rounds the other
way on a handful of elements. Tests pass larger margins only with a comment saying why.

Use from a test in tests/kernels/ (pytest puts that folder on sys.path): `from _tolerance import assert_close_to_truth`.
"""

from __future__ import annotations

import torch


def truth_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    """max |value - truth| computed in float64."""
    return (value.detach().double() - truth.detach().double()).abs().max().item() if truth.numel() else 0.0


def assert_close_to_truth(
    ours: torch.Tensor,
    torch_ref: torch.Tensor,
    truth: torch.Tensor,
    factor: float = 2.0,
    ulps: float = 4.0,
    name: str = "",
) -> None:
    """Assert that `ours` is no further from `truth` than `torch_ref` is, within the margin described above.

    `ours` and `torch_ref` are computed at the same dtype (that dtype's epsilon sets the floor); `truth` is float64.
    """
    assert ours.shape == truth.shape, f"{name}: shape {tuple(ours.shape)} != truth {tuple(truth.shape)}"
    assert torch_ref.shape == truth.shape, f"{name}: reference shape {tuple(torch_ref.shape)} != {tuple(truth.shape)}"
    assert ours.dtype == torch_ref.dtype, f"{name}: dtype {ours.dtype} != reference dtype {torch_ref.dtype}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err_ours, err_ref = truth_error(ours, truth), truth_error(torch_ref, truth)
    scale = max(truth.detach().abs().max().item() if truth.numel() else 0.0, 1e-6)
    bound = factor * err_ref + ulps * torch.finfo(ours.dtype).eps * scale
    assert err_ours <= bound, (
        f"{name}: max error vs float64 truth {err_ours:.3e} exceeds {bound:.3e} "
        f"(reference error {err_ref:.3e}, factor {factor}, floor {ulps} ulp of {scale:.3e})"
    )


def check_op(ours_fn, ref_fn, args: tuple, factor: float = 2.0, ulps: float = 4.0, seed: int = 0, name: str = ""):
    """Check every output and every input gradient of `ours_fn(*args)` against `ref_fn(*args)` with the rule above.

    Tensors in `args` keep their dtype, device, strides and requires_grad for ours and the reference; the float64
    truth is `ref_fn` on float64 copies. Each output gets the same random upstream gradient (drawn with `seed`) in all
    three runs. To test a non-contiguous input, pass its base as the leaf and take the view inside the functions.
    """

    def leaves(cast):
        return tuple(
            cast(a.detach()).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args
        )

    def run(fn, inputs, upstream=None):
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if upstream is None:
            gen = torch.Generator(device=outs[0].device).manual_seed(seed)
            upstream = [torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype) for o in outs]
        wants = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
        ups = [u.to(o.dtype, copy=True) for u, o in zip(upstream, outs)]  # a backward may write into its input
        # an input the op does not use gets a zero gradient, as in autograd.grad(materialize_grads=True)
        grads = torch.autograd.grad(outs, wants, ups, allow_unused=True, materialize_grads=True) if wants else ()
        return outs, grads, upstream

    ours, ours_grads, upstream = run(ours_fn, leaves(torch.clone))
    ref, ref_grads, _ = run(ref_fn, leaves(torch.clone), upstream)
    truth, truth_grads, _ = run(ref_fn, leaves(lambda t: t.double() if t.is_floating_point() else t.clone()), upstream)
    assert len(ours) == len(ref), f"{name}: {len(ours)} outputs, the reference has {len(ref)}"
    for i, (o, r, t) in enumerate(zip(ours, ref, truth)):
        assert_close_to_truth(o, r, t, factor, ulps, name=f"{name} output {i}")
    for i, (o, r, t) in enumerate(zip(ours_grads, ref_grads, truth_grads)):
        assert o.dtype == r.dtype, f"{name}: gradient {i} dtype {o.dtype} != reference {r.dtype}"
        assert_close_to_truth(o, r, t, factor, ulps, name=f"{name} gradient {i}")
