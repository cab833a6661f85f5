"""Kernel benchmarks: every op x implementation x preset shape x (forward, forward+backward).

    pytest bench/ --benchmark-only --bench-record=bench/results          # on a GPU (see bench/conftest.py)
    BENCH_SCALE=tiny pytest bench/ --benchmark-only                      # smoke run anywhere

Implementations: eager (reference.py, the spec), compile (torch.compile of the same reference function, fresh
dynamo cache per benchmark so shapes never share a graph), triton (ours, kernels/<op>.py through the registry) and
liger (Liger-Kernel through the registry, where it has the op). Beside them: linear+CE at a second chunk size
(test_linear_cross_entropy_chunk), attention with each SDPA backend forced (test_attention_backend), the routed
experts through torch._grouped_mm (test_moe_experts_grouped, impl "grouped") and our Triton MoE with autotuning off
(test_moe_experts_fixed_tiles, impl "triton-fixed") and QK-norm + RoPE as three unfused Triton launches
(test_qk_norm_rope_unfused, impl "triton-unfused"). One that cannot run here (no CUDA, not importable, no such op) is
skipped with the reason; on a CPU only eager, compile, grouped and the math backend run, and their figures mean
nothing.

Shapes (full scale): B=32 rows of T=512 tokens (N=16384) at each preset's width: small D=512 F=1408 Dh=64, base D=768
F=2048 Dh=96, moe D=640 F=1728 Dh=80; 8 query and 2 key/value heads; vocab 6400; MoE E=4 K=2 (moe preset only).
qk_norm_rope runs only at MiniMind-3's shape (preset m3: Dh=96, 8 query and 4 key/value heads, eps 1e-6), the model
that has QK-norm; make_inputs builds it at any preset's head shape (tools/compile_check.py uses small/base/moe too).
Activations are bf16 on a GPU (fp32 on a CPU); norm gains are fp32 parameters as in the model under autocast.
Tiny scale (CPU smoke runs): B=2, T=16, widths and vocab divided by 8 (heads kept, FFN width by MiniMind's rule).

Every implementation gets the same inputs from one seeded factory (make_inputs) and is first checked against eager
(relative L2 error of outputs, or of all input gradients for fwd+bwd): a wrong result fails the benchmark instead of
being timed. On CUDA each benchmark records, in benchmark.extra_info: the CUDA-event median of
triton.testing.do_bench (L2 flushed between calls; the figure ratios use), the first call's time (compilation,
autotuning), the peak allocation during one call (max_memory_allocated after reset_peak_memory_stats) and the achieved
GB/s (minimum bytes: each input read once, each output written once) or TFLOP/s. pytest-benchmark's own table is the
host-clock time of call + torch.cuda.synchronize(), median over rounds after warm-up rounds.

Shape legend: B batch, T sequence, H query heads, Hkv key/value heads, Dh head_dim, D hidden, F FFN width, N = B*T,
V vocab, E experts, K experts per token.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import minimind_kernels as kernels
from minimind_fast.config import MiniMindConfig, from_preset
from minimind_kernels import reference

PRESETS = ("small", "base", "moe")
MODES = ("fwd", "fwd+bwd")
IMPLS = ("eager", "compile", "triton", "liger")
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")  # minimind_kernels.sdpa: one SDPA backend forced per run
# (op, preset) pairs: the dense ops at every preset's width, the routed experts only where the model has them.
# QK-norm + RoPE only at MiniMind-3's shape (the only model with QK-norm): preset m3, H=8, Hkv=4, Dh=96.
OWN_PRESETS = {"moe_experts": ("moe",), "qk_norm_rope": ("m3",)}
CASES = [(op, p) for op in kernels.OP_NAMES for p in OWN_PRESETS.get(op, PRESETS)]
SHAPES = {"full": (32, 512), "tiny": (2, 16)}  # (B, T)
TINY_SHRINK = 8  # tiny scale: widths and vocab / 8, so a CPU smoke run takes seconds
# A result further than this from eager (relative L2) is wrong, not fast. bf16 rounding alone stays near 1e-2.
MAX_REL_ERR = {torch.bfloat16: 5e-2, torch.float16: 5e-2, torch.float32: 1e-3}


@dataclass
class Inputs:
    """Arguments in the reference signature's order, which of them get gradients, and the minimum work of one call."""

    args: tuple
    grad_idx: tuple[int, ...]
    shape: str
    bytes_fwd: float = 0.0  # minimum bytes moved; 0 for ops counted in FLOPs
    bytes_fwdbwd: float = 0.0
    flops_fwd: float = 0.0
    flops_fwdbwd: float = 0.0


def make_inputs(
    op: str,
    preset: str,
    scale: str,
    device: torch.device,
    dtype: torch.dtype,
    requires_grad: bool,
    seed: int = 0,
    batch: tuple[int, int] | None = None,
) -> Inputs:
    """The shared input factory: identical tensors for every implementation of (op, preset, scale).
    `batch` = (B, T) replaces the scale's batch shape (tools/compile_check.py)."""
    cfg: MiniMindConfig = from_preset(preset)
    if scale == "tiny":
        cfg = from_preset(preset, hidden_size=cfg.hidden_size // TINY_SHRINK, vocab_size=cfg.vocab_size // TINY_SHRINK)
    b, t = batch or SHAPES[scale]
    n, d, f, dh, v = b * t, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.vocab_size
    h, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    g = torch.Generator(device="cpu").manual_seed(seed)
    es = torch.tensor([], dtype=dtype).element_size()

    def act(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    def gain(dim: int) -> torch.Tensor:  # norm gains are fp32 parameters, near 1
        return (1.0 + 0.1 * torch.randn(dim, generator=g)).to(device)

    if op == "rmsnorm":
        inp = Inputs((act(b, t, d), gain(d), cfg.rms_norm_eps), (0, 1), f"{b}x{t}x{d}")
        inp.bytes_fwd, inp.bytes_fwdbwd = 2 * n * d * es, 5 * n * d * es  # fwd x->y; bwd x,dy->dx
    elif op == "add_rmsnorm":
        inp = Inputs((act(b, t, d), act(b, t, d), gain(d), cfg.rms_norm_eps), (0, 1, 2), f"{b}x{t}x{d}")
        inp.bytes_fwd, inp.bytes_fwdbwd = 4 * n * d * es, 8 * n * d * es  # fwd x,delta->h,y; bwd h,dh,dy->dx
    elif op == "rope":
        from minimind_fast.model import rope_tables

        cos, sin = rope_tables(cfg)
        q, k = act(b, t, h, dh), act(b, t, hkv, dh)
        inp = Inputs(
            (q, k, cos[:t].to(device), sin[:t].to(device)), (0, 1), f"q {b}x{t}x{h}x{dh}, k {b}x{t}x{hkv}x{dh}"
        )
        qk = (q.numel() + k.numel()) * es
        inp.bytes_fwd, inp.bytes_fwdbwd = 2 * qk + 2 * t * dh * 2, 4 * qk + 2 * t * dh * 4
    elif op == "qk_norm_rope":
        from minimind_fast.model import rope_tables

        cos, sin = rope_tables(cfg)
        q, k = act(b, t, h, dh), act(b, t, hkv, dh)
        args = (q, k, gain(dh), gain(dh), cfg.rms_norm_eps, cos[:t].to(device), sin[:t].to(device))
        inp = Inputs(args, (0, 1, 2, 3), f"q {b}x{t}x{h}x{dh}, k {b}x{t}x{hkv}x{dh}")
        qk = (q.numel() + k.numel()) * es
        # fwd q,k -> outputs; bwd q,k,dq_out,dk_out -> dq,dk (it re-reads the inputs; the gains are negligible)
        inp.bytes_fwd, inp.bytes_fwdbwd = 2 * qk + 2 * t * dh * 2, 5 * qk + 2 * t * dh * 4
    elif op == "swiglu":
        inp = Inputs((act(n, f), act(n, f)), (0, 1), f"{n}x{f}")
        inp.bytes_fwd, inp.bytes_fwdbwd = 3 * n * f * es, 8 * n * f * es  # fwd g,u->o; bwd g,u,do->dg,du
    elif op == "linear_cross_entropy":
        labels = torch.randint(0, v, (b, t), generator=g)
        labels[:, -1] = -100  # as in the model: the last position of each row predicts nothing
        w = act(v, d, std=0.02)
        inp = Inputs((act(n, d), w, labels.reshape(-1).to(device)), (0, 1), f"{n}x{d}x{v}")
        inp.flops_fwd, inp.flops_fwdbwd = 2 * n * d * v, 6 * n * d * v  # logits; + dh and dW
    elif op == "moe_experts":
        e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        scores = torch.randn(n, e, generator=g).softmax(-1)
        top_w, top_i = scores.topk(k, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        inp = Inputs(
            (
                act(n, d),
                top_i.to(device),
                top_w.to(device=device, dtype=dtype),
                act(e, f, d, std=0.02),
                act(e, f, d, std=0.02),
                act(e, d, f, std=0.02),
            ),
            (0, 2, 3, 4, 5),
            f"{n}x{d}x{f} E{e} K{k}",
        )
        inp.flops_fwd, inp.flops_fwdbwd = 6 * n * k * d * f, 18 * n * k * d * f  # 3 GEMMs per pick; bwd twice fwd
    elif op == "attention":
        inp = Inputs(
            (act(b, h, t, dh), act(b, hkv, t, dh), act(b, hkv, t, dh)),
            (0, 1, 2),
            f"q {b}x{h}x{t}x{dh}, kv {b}x{hkv}x{t}x{dh} causal",
        )
        # Causal: half of the 2 GEMMs of T x T x Dh per head; backward 2.5x forward (FlashAttention-2 paper's count).
        inp.flops_fwd = 2 * b * h * t * t * dh
        inp.flops_fwdbwd = 3.5 * inp.flops_fwd
    else:
        raise ValueError(f"no inputs for op {op!r}")
    if requires_grad:
        args = list(inp.args)
        for i in inp.grad_idx:
            args[i] = args[i].detach().requires_grad_(True)
        inp.args = tuple(args)
    return inp


def implementation(op: str, impl: str, settings: Any) -> tuple[Callable | None, str]:
    """(callable, '') or (None, why it cannot run here)."""
    ref = getattr(reference, op)
    if impl == "eager":
        return ref, ""
    if impl == "compile":
        torch._dynamo.reset()  # each benchmark compiles its own graph: no recompile limit, no shape sharing
        return torch.compile(ref, backend=settings.compile_backend, dynamic=False), ""
    if impl == "grouped":  # torch._grouped_mm: bf16 on an sm_90 / sm_100 GPU, or a CPU (see moe_grouped.cannot_run)
        from minimind_kernels.moe_grouped import cannot_run

        why = cannot_run(settings.device, settings.dtype)
        if why:
            return None, why
    elif impl in SDPA_BACKENDS:  # attention with one SDPA backend forced: only math has CPU kernels
        if not (settings.on_cuda or impl == "math"):
            return None, "no CUDA (only the math backend runs on a CPU)"
    elif not (settings.on_cuda or (settings.interpret and impl == "triton")):
        return None, "no CUDA (Triton kernels would run in the interpreter, whose timings mean nothing)"
    try:
        ops = kernels.resolve(f"torch,{op}={impl}")
    except kernels.KernelSpecError as exc:
        return None, str(exc)
    return getattr(ops, op), ""


def _as_tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def clone_inputs(inp: Inputs) -> Inputs:
    """The same values in new tensors (grad inputs again leaves that require grad when the originals do)."""
    args = tuple(
        a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in inp.args
    )
    return Inputs(args, inp.grad_idx, inp.shape)


def make_call(fn: Callable, inp: Inputs, mode: str, like: tuple) -> Callable[[], tuple]:
    """A zero-argument call of one forward (fwd) or forward plus backward to every grad input (fwd+bwd).

    Backward uses torch.autograd.grad rather than .backward() so that no .grad accumulates between calls. The output
    gradients are drawn once, seeded, shaped like `like` (the reference's outputs), so every implementation gets the
    same ones and the implementation's first call is the first thing to touch its inputs (Liger rewrites some of its
    inputs in place: later calls see rotated or overwritten values, which changes nothing in their cost)."""
    if mode == "fwd":
        return lambda: _as_tuple(fn(*inp.args))
    leaves = [inp.args[i] for i in inp.grad_idx]
    g = torch.Generator(device="cpu").manual_seed(1)
    grads = [torch.randn(o.shape, generator=g).to(device=o.device, dtype=o.dtype) for o in like]

    def call() -> tuple:
        return torch.autograd.grad(_as_tuple(fn(*inp.args)), leaves, grads)

    return call


def rel_err(got: tuple, want: tuple) -> float:
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        a64, b64 = a.detach().double(), b.detach().double()
        if not torch.isfinite(a64).all():
            return float("inf")
        worst = max(worst, ((a64 - b64).norm() / b64.norm().clamp_min(1e-30)).item())
    return worst


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _entry(s: Any, op: str, preset: str, mode: str, impl: str) -> dict[str, Any]:
    return {
        "op": op,
        "preset": preset,
        "mode": mode,
        "impl": impl,
        "scale": s.scale,
        "dtype": str(s.dtype).replace("torch.", ""),
        "device": str(s.device),
    }


def _bench(benchmark, s, recorder, entry: dict[str, Any], fn: Callable | None, why: str) -> None:
    """Measure fn into entry and record it; a missing implementation is recorded as skipped, a failure as failed."""
    if fn is None:
        recorder.add({**entry, "status": "skipped", "reason": why})
        pytest.skip(f"{entry['impl']}: {why}")
    try:
        _measure(benchmark, s, entry, entry["op"], entry["preset"], entry["mode"], entry["impl"], fn)
    except Exception as exc:
        recorder.add({**entry, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:500]})
        raise
    recorder.add(entry)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op, preset", CASES)
def test_op(benchmark, bench_settings, bench_recorder, op: str, preset: str, mode: str, impl: str) -> None:
    fn, why = implementation(op, impl, bench_settings)
    _bench(benchmark, bench_settings, bench_recorder, _entry(bench_settings, op, preset, mode, impl), fn, why)


def _bench_triton_with(benchmark, s, recorder, entry: dict[str, Any], module: str, name: str, value: Any) -> None:
    """Our Triton entry["op"] measured with the setting minimind_kernels.<module>.<name> = value (restored afterwards),
    for entries that compare one kernel setting against the default one test_op measures. The module is imported
    only once the kernel can run here (it needs triton)."""
    fn, why = implementation(entry["op"], "triton", s)
    if fn is None:
        _bench(benchmark, s, recorder, entry, fn, why)  # records the skip and skips
    module = importlib.import_module(f"minimind_kernels.{module}")
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        _bench(benchmark, s, recorder, entry, fn, why)
    finally:
        setattr(module, name, before)


LCE_CHUNKS = (4096,)  # linear+CE rows per chunk measured beside chunk_rows' rule (1,024 at the small preset's shape)


@pytest.mark.parametrize("rows", LCE_CHUNKS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", PRESETS)
def test_linear_cross_entropy_chunk(benchmark, bench_settings, bench_recorder, preset: str, mode: str, rows: int):
    """Our Triton linear+CE with `rows` rows per chunk instead of the rule's (linear_ce.CHUNK_ROWS), so the GPU check
    compares chunk sizes in one run; recorded as impl "triton-chunk<rows>"."""
    entry = _entry(bench_settings, "linear_cross_entropy", preset, mode, f"triton-chunk{rows}")
    _bench_triton_with(benchmark, bench_settings, bench_recorder, entry, "linear_ce", "CHUNK_ROWS", rows)


@pytest.mark.parametrize("backend", SDPA_BACKENDS)
@pytest.mark.parametrize("mode", ["fwd+bwd"])  # what training runs; the GPU check's time box has no room for fwd
@pytest.mark.parametrize("preset", PRESETS)
def test_attention_backend(benchmark, bench_settings, bench_recorder, preset: str, mode: str, backend: str):
    """Attention with one SDPA backend forced (`--kernels ...,attention=<backend>`), beside test_op's eager entry
    (SDPA's own choice), so that the default backend follows a measurement; recorded as impl "sdpa-<backend>".
    Without CUDA only math runs (a check that the path works; its time means nothing); a backend that rejects the
    inputs (GQA, dtype, head size) is recorded as failed with PyTorch's reason."""
    fn, why = implementation("attention", backend, bench_settings)
    entry = _entry(bench_settings, "attention", preset, mode, f"sdpa-{backend}")
    _bench(benchmark, bench_settings, bench_recorder, entry, fn, why)


@pytest.mark.parametrize("mode", MODES)
def test_moe_experts_grouped(benchmark, bench_settings, bench_recorder, mode: str):
    """The routed experts through torch._grouped_mm (minimind_kernels/moe_grouped.py; the grouped GEMM torchtitan's MoE
    calls), beside test_op's eager, compile and triton entries; recorded as impl "grouped". Skipped with the reason
    where _grouped_mm has no grouped kernel (CUDA: bf16 on sm_90 / sm_100 only)."""
    op, preset = "moe_experts", "moe"
    fn, why = implementation(op, "grouped", bench_settings)
    _bench(benchmark, bench_settings, bench_recorder, _entry(bench_settings, op, preset, mode, "grouped"), fn, why)


@pytest.mark.parametrize("mode", MODES)
def test_moe_experts_fixed_tiles(benchmark, bench_settings, bench_recorder, mode: str):
    """Our Triton MoE with autotuning off (moe.AUTOTUNE = False: each grouped GEMM's first candidate, the fixed tiles),
    recorded as impl "triton-fixed", beside test_op's "triton" (autotuned; its first_call_s includes the tuning)."""
    entry = _entry(bench_settings, "moe_experts", "moe", mode, "triton-fixed")
    _bench_triton_with(benchmark, bench_settings, bench_recorder, entry, "moe", "AUTOTUNE", False)


@pytest.mark.parametrize("mode", MODES)
def test_qk_norm_rope_unfused(benchmark, bench_settings, bench_recorder, mode: str):
    """QK-norm + RoPE as a model without the fused op would run it on our Triton kernels: rmsnorm on q, rmsnorm on k,
    then rope (three launches forward), recorded as impl "triton-unfused" beside test_op's fused "triton"."""
    op, preset = "qk_norm_rope", "m3"
    parts, why = implementation("rope", "triton", bench_settings)  # the same runnability rule as the fused entry
    fn = None
    if parts is not None:
        ops = kernels.resolve("triton")

        def fn(q, k, q_weight, k_weight, eps, cos, sin):
            return ops.rope(ops.rmsnorm(q, q_weight, eps), ops.rmsnorm(k, k_weight, eps), cos, sin)

    entry = _entry(bench_settings, op, preset, mode, "triton-unfused")
    _bench(benchmark, bench_settings, bench_recorder, entry, fn, why)


def _measure(benchmark, s, entry: dict[str, Any], op: str, preset: str, mode: str, impl: str, fn: Callable) -> None:
    inp = make_inputs(op, preset, s.scale, s.device, s.dtype, requires_grad=mode == "fwd+bwd")
    entry["shape"] = inp.shape
    if impl == "compile":
        entry["compile_backend"] = s.compile_backend

    ref = getattr(reference, op)
    ref_inp = clone_inputs(inp)  # the truth is computed before the implementation touches (maybe rewrites) inputs
    with torch.no_grad():
        like = _as_tuple(ref(*ref_inp.args))
    want = make_call(ref, ref_inp, mode, like)() if mode == "fwd+bwd" else like
    del ref_inp

    t0 = time.perf_counter()
    call = make_call(fn, inp, mode, like)
    got = call()
    _sync(s.device)
    entry["first_call_s"] = round(time.perf_counter() - t0, 4)  # compilation / autotuning / first launch
    if impl != "eager":
        err = rel_err(got, want)
        entry["rel_err_vs_eager"] = err
        assert err <= MAX_REL_ERR[s.dtype], f"{impl} {op} {mode}: relative error {err:.3g} against eager"
    del got, want, like

    if s.on_cuda:
        import triton.testing

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = call()
        torch.cuda.synchronize()
        entry["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        entry["extra_mem_bytes"] = entry["peak_mem_bytes"] - before
        del out
        entry["gpu_median_ms"] = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")

    def timed() -> None:
        call()
        _sync(s.device)  # the timed call ends when the device is done, not when the launches return

    benchmark.pedantic(timed, rounds=s.rounds, warmup_rounds=s.warmup_rounds, iterations=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:
        entry.update(wall_median_ms=stats.median * 1e3, wall_min_ms=stats.min * 1e3, rounds=stats.rounds)
    t_ms = entry.get("gpu_median_ms") or entry.get("wall_median_ms")
    if t_ms:
        nbytes = inp.bytes_fwd if mode == "fwd" else inp.bytes_fwdbwd
        flops = inp.flops_fwd if mode == "fwd" else inp.flops_fwdbwd
        if nbytes:
            entry["gbps"] = nbytes / (t_ms * 1e-3) / 1e9
        if flops:
            entry["tflops"] = flops / (t_ms * 1e-3) / 1e12
    entry["status"] = "ok"
    benchmark.extra_info.update(entry)
