"""Tests for kernels/minimind_kernels/linear_ce.py, the fused linear + cross-entropy.

Without CUDA these run in Triton's interpreter (fp32 and one bf16 case; small odd shapes: a single row, N not a
multiple of the chunk, V not a multiple of the vocab block, chunks with every label ignored). Every check compares the
kernel and the PyTorch reference at the same dtype against an fp64 truth, and asks that the kernel's error not exceed
the reference's own by more than the shared margin (tests/kernels/_tolerance.py). The `gpu` tests repeat at the
model's shapes natively in fp32 and bf16 and check peak memory.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_close_to_truth

pytest.importorskip("triton")

import minimind_kernels.linear_ce as lce  # noqa: E402
from minimind_kernels import reference  # noqa: E402

IGNORE = -100


def _gen(tag: str, device: str = "cpu") -> torch.Generator:
    # A fresh stream per case, reproducible from the case's name.
    return torch.Generator(device).manual_seed(zlib.crc32(tag.encode()))


def _inputs(n: int, d: int, v: int, tag: str, *, ignore_frac: float = 0.25, weighted: bool = False, device="cpu"):
    """fp64 hidden/weight (exactly representable in bf16, so every dtype sees the same values), labels with about
    ignore_frac of them ignored, optional token weights in [0, 2)."""
    g = _gen(tag, device)
    hidden = torch.randn(n, d, generator=g, device=device, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, device=device, dtype=torch.float64) * (2.0 / d**0.5)
    hidden, weight = hidden.bfloat16().double(), weight.bfloat16().double()
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    labels[torch.rand(n, generator=g, device=device) < ignore_frac] = IGNORE
    token_weight = 2 * torch.rand(n, generator=g, device=device, dtype=torch.float64) if weighted else None
    return hidden, weight, labels, token_weight


def _grad_out(reduction: str, n: int, tag: str, device="cpu") -> torch.Tensor:
    g = _gen(tag + "/grad", device)
    if reduction == "none":
        return torch.randn(n, generator=g, device=device, dtype=torch.float64)
    return 0.5 + torch.rand((), generator=g, device=device, dtype=torch.float64)  # a scalar that is not 1


def _fp64_truth(hidden, weight, labels, ignore_index, token_weight, reduction):
    """The reference's formula kept in float64 end to end: reference.linear_cross_entropy casts the logits to fp32
    (its dtype rule), so run on fp64 inputs it would be no truth for the fp32 runs."""
    assert hidden.dtype == weight.dtype == torch.float64
    loss = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=ignore_index, reduction="none")
    if token_weight is not None:
        loss = loss * token_weight
    if reduction == "none":
        return loss
    count = (labels != ignore_index).sum().clamp(min=1)
    return loss.sum() if reduction == "sum" else loss.sum() / count


def _run(fn, hidden, weight, labels, token_weight, reduction, grad_out, dtype):
    """loss, d hidden, d weight of fn at `dtype`, on leaf copies of the fp64 inputs."""
    h = hidden.to(dtype, copy=True).requires_grad_()
    w = weight.to(dtype, copy=True).requires_grad_()
    tw = token_weight.to(dtype) if token_weight is not None else None
    loss = fn(h, w, labels, IGNORE, tw, reduction)
    loss.backward(grad_out.to(loss.dtype))
    return loss.detach(), h.grad, w.grad


def _check_against_reference(n, d, v, reduction, tag, *, weighted=False, ignore_frac=0.25, labels_fn=None):
    hidden, weight, labels, tw = _inputs(n, d, v, tag, weighted=weighted, ignore_frac=ignore_frac)
    if labels_fn is not None:
        labels = labels_fn(labels)
    g = _grad_out(reduction, n, tag)
    truth = _run(_fp64_truth, hidden, weight, labels, tw, reduction, g, torch.float64)
    ref = _run(reference.linear_cross_entropy, hidden, weight, labels, tw, reduction, g, torch.float32)
    ours = _run(lce.linear_cross_entropy, hidden, weight, labels, tw, reduction, g, torch.float32)
    for name, o, r, t in zip(("loss", "d_hidden", "d_weight"), ours, ref, truth):
        assert_close_to_truth(o, r, t, name=f"{tag} {name}")
    return ours, truth


@pytest.fixture
def small_blocks(monkeypatch):
    """Vocab blocks of 256 columns, so that V in {300, 1000} spans several blocks with a partial last one and the
    online log-sum-exp runs across blocks; chunks of at least 8 rows (not 256), so that a few dozen tokens make
    several chunks and the last one partial."""
    monkeypatch.setattr(lce, "_MAX_BLOCK_V", 256)
    monkeypatch.setattr(lce, "_MIN_CHUNK_ROWS", 8)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(small_blocks, reduction, weighted):
    n, d, v = 37, 80, 1000
    assert v % 256 and n % lce.chunk_rows(n, v, d), "want a partial vocab block and a partial last chunk"
    _check_against_reference(n, d, v, reduction, f"main/{reduction}/{weighted}", weighted=weighted)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_in_interpreter(small_blocks, reduction):
    """bf16 logits and dlogits buffers; on the CPU the dW chunk products are rounded to bf16 before the fp32 sum (the
    fallback of _accumulate_grads), which must still meet the rule."""
    n, d, v = 37, 80, 1000
    tag = f"bf16/{reduction}"
    hidden, weight, labels, tw = _inputs(n, d, v, tag, weighted=True)
    g = _grad_out(reduction, n, tag)
    truth = _run(_fp64_truth, hidden, weight, labels, tw, reduction, g, torch.float64)
    ref = _run(reference.linear_cross_entropy, hidden, weight, labels, tw, reduction, g, torch.bfloat16)
    ours = _run(lce.linear_cross_entropy, hidden, weight, labels, tw, reduction, g, torch.bfloat16)
    for name, o, r, t in zip(("loss", "d_hidden", "d_weight"), ours, ref, truth):
        assert o.dtype == r.dtype
        assert_close_to_truth(o, r, t, name=f"{tag} {name}")


@pytest.mark.parametrize(
    "n,d,v,reduction",
    [
        (1, 96, 300, "mean"),
        (1, 80, 1000, "none"),
        (7, 96, 300, "sum"),
        (7, 80, 1000, "none"),
        (37, 96, 6400, "mean"),
        (300, 80, 1000, "none"),
    ],
)
def test_shapes(n, d, v, reduction):
    # Default blocks and chunks here: V=6400 spans 4 vocab blocks of 2048 (the last one partial), V in {300, 1000}
    # fits in one; N=300 makes a chunk of 256 rows and a partial one of 44.
    _check_against_reference(n, d, v, reduction, f"shapes/{n}/{d}/{v}/{reduction}", weighted=n > 1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunk_entirely_ignored(small_blocks, reduction):
    n, d, v = 37, 80, 300
    c = lce.chunk_rows(n, v, d)
    assert 2 * c < n

    def ignore_second_chunk(labels):
        labels = labels.clone()
        labels[c : 2 * c] = IGNORE
        return labels

    ours, _ = _check_against_reference(
        n, d, v, reduction, f"ignored-chunk/{reduction}", weighted=True, labels_fn=ignore_second_chunk
    )
    assert (ours[1][c : 2 * c] == 0).all(), "ignored tokens must get no hidden gradient"
    if reduction == "none":
        assert (ours[0][c : 2 * c] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_label_ignored(reduction):
    n, d, v = 7, 80, 300
    hidden, weight, labels, tw = _inputs(n, d, v, f"all-ignored/{reduction}", ignore_frac=1.0, weighted=True)
    assert (labels == IGNORE).all()
    g = _grad_out(reduction, n, f"all-ignored/{reduction}")
    ref = _run(reference.linear_cross_entropy, hidden, weight, labels, tw, reduction, g, torch.float32)
    ours = _run(lce.linear_cross_entropy, hidden, weight, labels, tw, reduction, g, torch.float32)
    for o, r in zip(ours, ref):
        assert torch.isfinite(o).all()
        assert (o == 0).all() and (r == 0).all()  # mean: 0 / max(count, 1), as in the reference, never NaN


def test_large_logits_are_stable(small_blocks):
    # Logits in the hundreds: a softmax without the running max would overflow exp() in fp32.
    n, d, v = 7, 96, 1000
    hidden, weight, labels, _ = _inputs(n, d, v, "large", ignore_frac=0.0)
    hidden = hidden * 40
    g = _grad_out("mean", n, "large")
    truth = _run(_fp64_truth, hidden, weight, labels, None, "mean", g, torch.float64)
    ref = _run(reference.linear_cross_entropy, hidden, weight, labels, None, "mean", g, torch.float32)
    ours = _run(lce.linear_cross_entropy, hidden, weight, labels, None, "mean", g, torch.float32)
    assert truth[0].item() > 50
    for name, o, r, t in zip(("loss", "d_hidden", "d_weight"), ours, ref, truth):
        assert_close_to_truth(o, r, t, name=f"large {name}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_only_one_input_needs_grad(reduction, frozen):
    n, d, v = 7, 80, 300
    tag = f"frozen/{frozen}/{reduction}"
    hidden, weight, labels, tw = _inputs(n, d, v, tag, weighted=True)
    g = _grad_out(reduction, n, tag)
    grads = {}
    for name, fn in (("ref", reference.linear_cross_entropy), ("ours", lce.linear_cross_entropy)):
        h = hidden.float().requires_grad_(frozen != "hidden")
        w = weight.float().requires_grad_(frozen != "weight")
        fn(h, w, labels, IGNORE, tw.float(), reduction).backward(g.float())
        assert (h.grad is None) == (frozen == "hidden") and (w.grad is None) == (frozen == "weight")
        grads[name] = w.grad if frozen == "hidden" else h.grad
    torch.testing.assert_close(grads["ours"], grads["ref"], rtol=1e-5, atol=1e-6)


def test_no_grad_forward_matches():
    n, d, v = 7, 80, 300
    hidden, weight, labels, tw = _inputs(n, d, v, "nograd", weighted=True)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    for reduction in ("mean", "none"):
        with torch.no_grad():
            ours = lce.linear_cross_entropy(h, w, labels, IGNORE, tw.float(), reduction)
        ref = reference.linear_cross_entropy(h.detach(), w.detach(), labels, IGNORE, tw.float(), reduction)
        assert not ours.requires_grad
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_bad_reduction_raises():
    h, w = torch.randn(2, 8), torch.randn(5, 8)
    with pytest.raises(ValueError):
        lce.linear_cross_entropy(h, w, torch.tensor([1, 2]), reduction="avg")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(reduction):
    """Schema, fake tensors, autograd registration and AOT dispatch (eager vs compiled outputs and gradients)."""
    n, d, v = 7, 80, 300
    hidden, weight, labels, tw = _inputs(n, d, v, f"opcheck/{reduction}", weighted=True)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    args = (h, w, labels, tw.float(), IGNORE, reduction, True, True)
    torch.library.opcheck(torch.ops.minimind.linear_ce_fwd, args)
    if reduction == "none":
        z = h.detach() @ w.detach().t()
        row_max = z.max(dim=-1).values
        lse_parts = torch.stack((row_max, torch.logsumexp(z - row_max[:, None], dim=-1)), dim=-1)
        bwd_args = (h.detach(), w.detach(), labels, None, lse_parts, torch.randn(n), IGNORE, True, True)
        torch.library.opcheck(torch.ops.minimind.linear_ce_bwd, bwd_args)


def test_compile_fullgraph():
    """torch.compile traces through the op without graph breaks (aot_eager: no C++ toolchain needed)."""
    n, d, v = 7, 80, 300
    hidden, weight, labels, tw = _inputs(n, d, v, "compile", weighted=True)
    g = _grad_out("none", n, "compile")
    fn = torch.compile(lce.linear_cross_entropy, backend="aot_eager", fullgraph=True)
    ours = _run(fn, hidden, weight, labels, tw, "none", g, torch.float32)
    ref = _run(reference.linear_cross_entropy, hidden, weight, labels, tw, "none", g, torch.float32)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# On a GPU: the model's shapes (small preset: D=512, V=6400), natively in fp32 and bf16.

N_GPU, D_GPU, V_GPU = 16384, 512, 6400


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_real_shapes(dtype, reduction):
    tag = f"gpu/{dtype}/{reduction}"
    hidden, weight, labels, tw = _inputs(N_GPU, D_GPU, V_GPU, tag, weighted=True, device="cuda")
    g = _grad_out(reduction, N_GPU, tag, device="cuda")
    truth = _run(_fp64_truth, hidden, weight, labels, tw, reduction, g, torch.float64)
    ref = _run(reference.linear_cross_entropy, hidden, weight, labels, tw, reduction, g, dtype)
    ours = _run(lce.linear_cross_entropy, hidden, weight, labels, tw, reduction, g, dtype)
    for name, o, r, t in zip(("loss", "d_hidden", "d_weight"), ours, ref, truth):
        assert_close_to_truth(o, r, t, name=f"{tag} {name}")


def _peak_fwd_bwd(fn, h, w, labels, tw) -> int:
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn(h, w, labels, IGNORE, tw, "mean").backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_peak_memory_quarter_of_reference(dtype):
    hidden, weight, labels, tw = _inputs(N_GPU, D_GPU, V_GPU, f"gpu-mem/{dtype}", weighted=True, device="cuda")
    h, w, tw = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), tw.to(dtype)
    del hidden, weight
    ours = _peak_fwd_bwd(lce.linear_cross_entropy, h, w, labels, tw)
    ref = _peak_fwd_bwd(reference.linear_cross_entropy, h, w, labels, tw)
    assert ours * 4 <= ref, f"peak memory {ours / 2**20:.0f} MiB vs reference {ref / 2**20:.0f} MiB"
