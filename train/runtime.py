"""Where and how a run computes: device and precision (Runtime, setup_runtime), the process group under torchrun and
its collectives, data-parallel wrapping (DDP, FSDP2) and full state dicts, and the kernel ops."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

import minimind_kernels as kernels
from minimind_fast.model import split_expert_state, stack_expert_state, stacked_expert_names
from train import checks

if TYPE_CHECKING:
    from train.args import StageArgs


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None = full fp32
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    precision_note: str = ""  # why this precision was chosen (the CPU bf16 probe), for the start-up line

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def x86_cpu_flags() -> set[str] | None:
    """The instruction-set flags of an x86 CPU under Linux (/proc/cpuinfo); None elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo names of bf16 dot-product instructions


def cpu_bf16_speedup() -> float:
    """How much faster a bf16 matmul runs than an fp32 one on this CPU, found once per process. An x86 CPU without
    bf16 dot-product instructions (avx512_bf16 or amx_bf16) converts bf16 to fp32 and is never faster: 0.0 without
    measuring (on an AVX2-only EPYC bf16 ran 1.4-1.8 vs 22-39 GFLOP/s on 1024x256x768 to 2720x512x1408). Elsewhere a
    256x512x512 matmul in each dtype is timed on one thread, the two dtypes alternating, and the best time of each is
    compared: the question is what the core's instructions do, and a machine busy with other work must not change the
    answer. Measured on a 2-core AMX Xeon with another process multiplying matrices on both cores: timed on both
    threads, all of one dtype then the other (best of 5 and 3), the ratio read 0.8-38.8 in 10 fresh processes, 6 of
    them under 1.5 (4.3-4.9 idle); this way, best of 20: 4.2-5.4 in 10 processes, 4.1-4.9 in 10 more beside two such
    loads (4.3-4.8 idle), ~50 ms. Where bf16 is emulated (under half fp32's speed after two timed pairs) it stops
    there: 22 slow bf16 matmuls would cost over a second. Setting the thread count, even back to the same number, is
    not free of effects: torch.set_num_threads also turns off MKL's own per-call thread choice (as MKL_DYNAMIC=FALSE
    does), which moves a run's rounding (the default tiny run ended step 200 at loss 2.2357 instead of 2.6600: another
    trajectory, as another seed gives). bf16 steps ran as fast either way (4 alternating pairs); fp32 steps were 1-5%
    slower (3 pairs), but an x86 CPU that runs fp32 is not timed (above), and other CPUs' torch builds have no MKL."""
    global _CPU_BF16_SPEEDUP
    if _CPU_BF16_SPEEDUP is None:
        flags = x86_cpu_flags()
        if flags is not None and not flags & X86_BF16_FLAGS:
            _CPU_BF16_SPEEDUP = 0.0
            return _CPU_BF16_SPEEDUP
        a, b = torch.randn(256, 512), torch.randn(512, 512)
        pairs = {dt: (a.to(dt), b.to(dt)) for dt in (torch.float32, torch.bfloat16)}
        best = dict.fromkeys(pairs, float("inf"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for rep in range(22):
                for dt, (x, y) in pairs.items():
                    t = time.perf_counter()
                    x @ y
                    if rep >= 2:  # the first two of each warm up (oneDNN's kernel choice, caches)
                        best[dt] = min(best[dt], time.perf_counter() - t)
                if rep >= 3 and best[torch.bfloat16] > 2 * best[torch.float32]:
                    break
        finally:
            torch.set_num_threads(threads)
        _CPU_BF16_SPEEDUP = best[torch.float32] / max(best[torch.bfloat16], 1e-9)
    return _CPU_BF16_SPEEDUP


_CPU_BF16_SPEEDUP: float | None = None
CPU_BF16_MIN_SPEEDUP = 1.5  # --dtype auto on a CPU picks bf16 autocast where the probe measures at least this
# Quality: over 8 paired seeds of the default pretrain + SFT on an AMX Xeon, bf16 answered more held-out person facts
# than fp32 in 6 pairs (median 13.5 vs 10.6%) and ended lower in loss in 5 (bench/results/cpu/
# default-run-bf16-auto-seeds_cpu_20261206.md and -seeds-2_...); an earlier single pair on an avx512_bf16 EPYC that
# ended at 1.21 (bf16) vs 0.95 (fp32) is a gap of the size seeds make (last loss 0.72-1.24 over the 16 runs above).


# --compile left unset on a CPU: compile where it pays back its first step. Measured on a 2-core AMX Xeon (bf16
# autocast, cold inductor cache; bench/results/cpu/e2e-cpu-compile_cpu_20261207.md, README "Useful flags"): the
# compiled first step costs 27-30 s and later steps are 1.14x at tiny (hidden 256) and at small (hidden 512). A small
# run repays it after ~550 steps; the 2-minute tiny default run would gain about what it pays. MoE models stay eager
# (the reference expert loop's data-dependent shapes).
CPU_COMPILE_MIN_HIDDEN = 512


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would use, or None when there is none (it cannot compile then)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:
        return None


def cpu_compile_default(hidden_size: int, use_moe: bool, world_size: int) -> bool:
    """Whether a CPU run compiles when --compile is not given (see CPU_COMPILE_MIN_HIDDEN)."""
    return world_size == 1 and not use_moe and hidden_size >= CPU_COMPILE_MIN_HIDDEN and cxx_compiler() is not None


def keep_cpu_allocations() -> bool:
    """Tell glibc's malloc to keep freed memory instead of giving it back to the kernel at once (mallopt: blocks up to
    32 MiB come from the heap, not a fresh mmap; the heap is trimmed only above 1 GiB free). A training step on a CPU
    allocates and frees the same large activations and logits every step; each fresh mmap is zero-filled page by page
    on first touch. Measured on the tiny preset, 2 cores, 4 x 256 tokens, alternating processes: 8,350-8,610 ->
    9,630-10,040 tokens/s in bf16, 6,600-6,790 -> 7,030 in fp32. The heap then stays at its peak size until the
    process ends. -> True where applied (Linux with glibc); elsewhere nothing changes."""
    global _CPU_ALLOC_KEPT
    if _CPU_ALLOC_KEPT is None:
        _CPU_ALLOC_KEPT = False
        if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
            except OSError:
                return False
            m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
            _CPU_ALLOC_KEPT = bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(
                libc.mallopt(m_trim_threshold, 1 << 30)
            )
    return _CPU_ALLOC_KEPT


_CPU_ALLOC_KEPT: bool | None = None


def flush_cpu_denormals() -> bool:
    """Compute with fp32 denormals (|x| < 1.18e-38) as zero: torch.set_flush_denormal (x86 FTZ + DAZ), set on this
    thread before the first parallel op so that the intra-op threads, which copy their creator's floating-point
    state, have it too. In training, denormals come from exponentials of very negative numbers (attention and
    softmax probabilities, their gradients) and from optimizer moments decaying toward zero, more of them as the
    model sharpens; x86 computes on them at a small fraction of its normal rate (bf16 instructions flush them
    already). Measured with the tiny preset's default run, 2-core AMX Xeon, steps 10-300: without the flush the rate
    fell from ~10,000 to ~6,000 tokens/s by step 200 with the cpu family's ops (~8,700 -> ~7,700 with the reference
    ops); with it, 9,500-12,000 throughout (9,000-9,600 with the reference ops). GPUs flush the same way in their
    fast paths. -> True where supported (x86 with SSE3)."""
    return torch.set_flush_denormal(True)


def setup_runtime(
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 42,
    dist_timeout: float = 600.0,
    tune_cpu: bool = True,
) -> Runtime:
    """Pick the device and precision: bf16 autocast on CUDA (fp16 is not offered: no loss scaling here); on a CPU
    bf16 autocast where a start-up probe finds bf16 matmuls at least CPU_BF16_MIN_SPEEDUP times faster than fp32, fp32
    elsewhere (the start-up line gives the probe's figure). --dtype float32 / bfloat16 overrides the choice. A CPU
    run also flushes denormals to zero (flush_cpu_denormals) and keeps freed memory in the process
    (keep_cpu_allocations); tune_cpu=False leaves both as the process found them, for bench/e2e.py's MiniMind
    baseline.

    Under torchrun (WORLD_SIZE > 1) it also joins the process group: NCCL on CUDA (one GPU per LOCAL_RANK), gloo on
    CPU. Every rank seeds identically, so models start equal before DDP/FSDP broadcast anything. A collective that
    waits more than dist_timeout seconds for another rank (one hung or died) ends this rank with a one-line error
    instead of blocking the job forever (see _exit_on_dist_timeout)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        checks.fail("error: --device cuda asked for but CUDA is not available")
    if dev.type == "cpu" and tune_cpu:  # before the probe's matmuls start the intra-op threads
        flush_cpu_denormals()
        keep_cpu_allocations()
    note = ""
    if dtype == "auto" and dev.type == "cpu" and world == 1:
        speedup = cpu_bf16_speedup()
        fast = speedup >= CPU_BF16_MIN_SPEEDUP
        dtype = "bfloat16" if fast else "float32"
        if fast:
            note = f"bf16 matmul {speedup:.2g}x fp32 on this CPU; --dtype float32 to opt out"
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    if dtype not in ("bfloat16", "float32"):
        checks.fail(f"error: --dtype must be auto, bfloat16 or float32, got {dtype!r}")
    amp = torch.bfloat16 if dtype == "bfloat16" else None
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=dist_timeout)
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
        sys.excepthook = functools.partial(_exit_on_dist_timeout, rank, dist_timeout, sys.excepthook)
    torch.manual_seed(seed)
    return Runtime(dev, amp, rank=rank, world_size=world, local_rank=local_rank, precision_note=note)


def _exit_on_dist_timeout(rank: int, seconds: float, default_hook, kind, exc, tb) -> None:
    """sys.excepthook under torchrun: a collective that timed out (gloo and NCCL both raise a RuntimeError saying so)
    becomes one line naming the rank and the flag; anything else keeps its traceback. The process still exits 1, so
    torchrun stops the other ranks."""
    text = str(exc).lower()
    if isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text):
        print(
            f"error: rank {rank}: no answer from another rank within --dist_timeout {seconds:g} s (a rank hung or "
            "died); stopping the job. Resume from the last checkpoint with --from_resume 1",
            file=sys.stderr,
            flush=True,
        )
        return
    default_hook(kind, exc, tb)


def shutdown(rt: Runtime) -> None:
    """Leave the process group cleanly (no-op for a single process)."""
    if rt.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(rt: Runtime) -> None:
    if rt.world_size > 1:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging: each rank's loss covers an equal share of the global batch)."""
    if rt.world_size > 1:
        value = value.to(rt.device, copy=True)
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= rt.world_size
    return value


def all_reduce_sum(value: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Sum of a tensor over ranks (counts and sums whose ratio is a mean over the global batch)."""
    if rt.world_size > 1:
        value = value.to(rt.device, copy=True)
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_cat(value: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Every rank's tensor (the same shape on each) concatenated along dim 0 in rank order."""
    if rt.world_size == 1:
        return value
    value = value.to(rt.device).contiguous()
    parts = [torch.empty_like(value) for _ in range(rt.world_size)]
    dist.all_gather(parts, value)
    return torch.cat(parts)


def wrap_model(model: torch.nn.Module, rt: Runtime, fsdp: bool = False) -> torch.nn.Module:
    """Data parallelism applied from outside the model: DDP, or FSDP2 (`fully_shard` per transformer block, then the
    root) with bf16 parameters in compute and fp32 gradient reduction when autocast is bf16. Returns the module to
    call; the optimizer and checkpoints keep using `model` (FSDP2 shards it in place). model is a MiniMind or any
    module holding one (PPO's critic). Only trainable models are wrapped: frozen ones run as they are on each rank."""
    if rt.world_size == 1 and not fsdp:
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from minimind_fast.model import Block

        mp = MixedPrecisionPolicy(param_dtype=rt.amp_dtype, reduce_dtype=torch.float32) if rt.amp_dtype else None
        kw = {"mp_policy": mp} if mp is not None else {}
        for block in [m for m in model.modules() if isinstance(m, Block)]:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[rt.device.index] if rt.is_cuda else None)


def any_rank(flag: bool, rt: Runtime) -> bool:
    """True on every rank if it is true on any (so all ranks stop, or save, at the same step)."""
    if rt.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def no_sync(wrapped: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on non-final micro-steps of an accumulation (DDP's no_sync; FSDP2's
    set_requires_gradient_sync)."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        return _FsdpNoSync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Hold an FSDP2 model's full parameters on every rank for a stretch of forwards whose number may differ between
    ranks: sampling stops when a rank's own rows are done, and a sharded forward is a collective that every rank
    must join. Gathers once on entry (all ranks together), frees on exit. No-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in sharded:
            m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP2's defaults: blocks yes, root no
            m.reshard()


class _FsdpNoSync:
    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.module.set_requires_gradient_sync(True)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, rt: Runtime, with_model: bool = True):
    """(model state dict, optimizer state dict) as full, unsharded CPU tensors on every rank, whether the model is
    plain, DDP-wrapped or FSDP2-sharded: what checkpoints store, so a run can resume on another world size.
    with_model=False gathers the optimizer state only (model state None): for LoRA, whose writer saves the adapters
    itself. Optimizer state is keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        get_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=rt.world_size > 1)
    # DCP maps every state-dict key back to a parameter by attribute path, which MoE banks' per-expert names are not:
    # gather under the parameters' own names, then rename as model.state_dict() would.
    with stacked_expert_names(model):
        if optimizer is None:
            model_sd, optim_sd = get_model_state_dict(model, options=opts), None
        elif not with_model:
            model_sd, optim_sd = None, get_optimizer_state_dict(model, optimizer, options=opts)
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    return (None if model_sd is None else split_expert_state(model_sd)), optim_sd


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_sd, optim_sd) -> None:
    """Inverse of full_state: load full state dicts into a plain or sharded model and its optimizer (model_sd None:
    the optimizer only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict, set_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    if model_sd is None:
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_sd, options=opts)
        return
    with stacked_expert_names(model):  # see full_state
        sd = stack_expert_state(model_sd)
        set_state_dict(model, optimizer, model_state_dict=sd, optim_state_dict=optim_sd, options=opts)


def resolve_kernels(spec: str, rt: Runtime) -> kernels.Ops:
    try:
        ops = kernels.resolve(spec)
    except kernels.KernelSpecError as exc:
        checks.fail(f"error: {exc}")
    if rt.is_main:
        print(kernels.describe(ops))
    return ops


def describe_runtime(rt: Runtime, args: StageArgs) -> str:
    """'cpu x 2 ranks (fp32, FSDP2)': where and how the run computes, for the start-up line."""
    ranks = f" x {rt.world_size} ranks" if rt.world_size > 1 else ""
    how = ["bf16 autocast" if rt.amp_dtype else "fp32"] + [rt.precision_note] * bool(rt.precision_note)
    compiled = "compiled" + (" (the first step compiles: ~0.5 min on a CPU; --compile 0 for eager)" * (not rt.is_cuda))
    how += [compiled] * bool(args.compile) + ["FSDP2"] * bool(args.fsdp)
    return f"{rt.device}{ranks} ({', '.join(how)})"
