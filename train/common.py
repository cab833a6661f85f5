"""Free functions shared by the stage scripts: arguments, runtime, optimizer and schedule, logging, checkpoints.

No trainer class and no callbacks: each stage keeps its loop in plain sight and calls these helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import inspect
import json
import os
import re
import shutil
import signal
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python train/x.py`: train/ is on sys.path, the checkout root is not
    sys.path.insert(0, str(REPO_ROOT))

import minimind_kernels as kernels  # noqa: E402
from minimind_fast import checkpoint as ckpt  # noqa: E402
from minimind_fast.config import MiniMindConfig, from_preset  # noqa: E402
from minimind_fast.lora import arch_of  # noqa: E402
from minimind_fast.model import MiniMind, split_expert_state, stack_expert_state, stacked_expert_names  # noqa: E402
from minimind_fast.tokenizer import Tokenizer  # noqa: E402
from train import checks, step  # noqa: E402


# ----------------------------------------------------------------------------------------------------------- arguments
def arg(default: Any, help: str) -> Any:
    """A dataclass field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0, true/false), got {v!r}")


def parse_args(cls: type, argv: list[str] | None, description: str) -> Any:
    """Build an argparse parser from an Args dataclass (one --flag per field, help from its metadata) and parse.

    Booleans accept both `--compile` and `--compile 1/0`. Unknown flags are an error with argparse's usage line.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    # A stage's own flags first, then those of the classes it extends (StageArgs last); a flag re-declared to change
    # its default stays with the class that introduced it.
    mro = [k for k in cls.__mro__ if dataclasses.is_dataclass(k)]
    depth = {name: i for i, k in enumerate(mro) for name in inspect.get_annotations(k)}
    for f in sorted(dataclasses.fields(cls), key=lambda f: depth[f.name]):
        hint = hints[f.name]
        kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=_str2bool, nargs="?", const=True, default=f.default, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=help_text)
    args = cls(**vars(parser.parse_args(argv)))
    if isinstance(args, StageArgs):  # a stage's flags: every one checked before any work (bench/ has its own Args)
        _defaults_under_out_dir(args, cls, argv)
        checks.check_args(args, Path(inspect.getfile(cls)).stem)
    return args


def _defaults_under_out_dir(args: Any, cls: type, argv: list[str] | None) -> None:
    """A stage's default start points name the previous stage's default output (out/full_sft, ...). With another
    --out_dir, the previous stage wrote there: look under --out_dir first, keeping the default when nothing is."""
    given = set(sys.argv[1:] if argv is None else argv)
    for f in dataclasses.fields(cls):
        default = f.default
        if f.name not in ("from_weight", "teacher") or not isinstance(default, str) or not default.startswith("out/"):
            continue
        if f"--{f.name}" in given or any(a.startswith(f"--{f.name}=") for a in given):
            continue
        there = Path(args.out_dir) / Path(default).relative_to("out")
        if getattr(args, f.name) == default and there.is_dir():
            setattr(args, f.name, str(there))


@dataclass
class StageArgs:
    """The flags every post-training stage shares. A stage's Args extends it with its own (data, model, batch and
    learning-rate flags, and its algorithm's) and may re-declare one here to change its default."""

    out_dir: str = arg("out", "where checkpoints, metrics and the loss curve go")
    from_resume: int = arg(0, "1: continue from the newest checkpoint in {out_dir}/{save_weight}_resume")
    force_resume: bool = arg(False, "with --from_resume: continue a checkpoint of a run with other settings")
    allow_tokenizer_change: bool = arg(False, "train a checkpoint with another tokenizer than the one saved with it")
    tokenizer: str | None = arg(None, "tokenizer folder or tokenizer.json (default: the one saved with --from_weight)")
    accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    warmup_steps: int = arg(0, "linear warmup steps before the cosine schedule")
    weight_decay: float = arg(0.01, "AdamW weight decay (matrices only)")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0 = off)")
    max_steps: int = arg(0, "stop after this many optimizer steps (0 = run all epochs)")
    device: str = arg("auto", "cuda, cpu, or auto")
    dtype: str = arg("auto", "bfloat16 or float32 (auto: bf16 autocast on CUDA and on CPUs with fast bf16, else fp32)")
    kernels: str = arg("auto", "ops spec: torch | triton | liger | auto, with overrides like 'triton,rope=torch'")
    compile: bool = arg(False, "torch.compile the trained model")
    fsdp: bool = arg(False, "shard parameters, gradients and optimizer state with FSDP2 (under torchrun)")
    dist_timeout: float = arg(600.0, "seconds a collective waits for the other ranks before the job stops (torchrun)")
    max_bad_steps: int = arg(10, "stop after this many non-finite steps in a row (each one is skipped and counted)")
    skip_bad_lines: bool = arg(False, "count and skip malformed data lines instead of stopping at the first")
    wandb: bool = arg(False, "also log to Weights & Biases (needs `pip install wandb`)")
    swanlab: bool = arg(False, "also log to SwanLab (needs `pip install swanlab`)")
    log_interval: int = arg(10, "optimizer steps between log lines")
    save_interval: int = arg(200, "optimizer steps between checkpoints")
    keep_last: int = arg(2, "resume checkpoints to keep")
    seed: int = arg(42, "seed for the data order")


def resolve_auto(args: Any, on_cuda: bool, auto: dict[str, tuple[Any, Any]]) -> Any:
    """Fill the machine-dependent defaults (flags left at None) from auto: {name: (CPU value, CUDA value)}."""
    for name, (cpu, cuda) in auto.items():
        if getattr(args, name) is None:
            setattr(args, name, cuda if on_cuda else cpu)
    return args


# ------------------------------------------------------------------------------------------------------------ runtime
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


def cpu_bf16_speedup() -> float:
    """How much faster a bf16 matmul runs than an fp32 one on this CPU (measured once per process, ~50 ms): CPUs
    with AVX512-BF16 or AMX multiply bf16 several times faster than fp32; without them bf16 is emulated and far slower
    (measured on an AVX2-only EPYC: 1.6 vs 68 GFLOP/s on 1024x512x1408)."""
    global _CPU_BF16_SPEEDUP
    if _CPU_BF16_SPEEDUP is None:
        a, b = torch.randn(128, 256), torch.randn(256, 256)
        best = {}
        for dt in (torch.float32, torch.bfloat16):
            x, y = a.to(dt), b.to(dt)
            x @ y  # warm-up (oneDNN picks its kernel)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                x @ y
                times.append(time.perf_counter() - t)
            best[dt] = min(times)
        _CPU_BF16_SPEEDUP = best[torch.float32] / max(best[torch.bfloat16], 1e-9)
    return _CPU_BF16_SPEEDUP


_CPU_BF16_SPEEDUP: float | None = None
CPU_BF16_MIN_SPEEDUP = 1.5  # --dtype auto takes bf16 autocast on a CPU whose bf16 matmul is at least this much faster


def setup_runtime(device: str = "auto", dtype: str = "auto", seed: int = 42, dist_timeout: float = 600.0) -> Runtime:
    """Pick the device and precision: bf16 autocast on CUDA (fp16 is not offered: no loss scaling here); on a CPU,
    bf16 autocast where the CPU multiplies bf16 at least CPU_BF16_MIN_SPEEDUP times faster than fp32
    (cpu_bf16_speedup, one probe at start-up, one process only: ranks must agree), else fp32.
    --dtype float32 / bfloat16 overrides the choice.

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
    note = ""
    if dtype == "auto" and dev.type == "cpu" and world == 1:
        speedup = cpu_bf16_speedup()
        dtype = "bfloat16" if speedup >= CPU_BF16_MIN_SPEEDUP else "float32"
        note = f"bf16 matmul {speedup:.2g}x fp32 on this CPU"
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


def load_tokenizer(path: str | None) -> Tokenizer:
    try:
        return Tokenizer.load(path)
    except ValueError as exc:
        checks.fail(f"error: {exc}")


def build_config(preset: str, tokenizer: Tokenizer, **overrides: Any) -> MiniMindConfig:
    cfg = from_preset(preset, **overrides)
    if tokenizer.vocab_size > cfg.vocab_size:
        checks.fail(f"error: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab is {cfg.vocab_size}")
    return cfg


def is_pth(from_weight: str) -> bool:
    """Whether --from_weight names a MiniMind .pth state dict rather than a checkpoint folder."""
    return Path(from_weight).suffix == ".pth"


def read_pth(path: str | Path) -> tuple[MiniMindConfig, dict[str, torch.Tensor]]:
    """A MiniMind .pth (the plain state dict MiniMind's trainers torch.save, HF-Llama names, fp16) -> (its config read
    off the tensor shapes, the fp32 state dict with the tied head). Read with weights_only=True: no code can run.

    The shape -> config rule is checkpoint.infer_config (also behind `tools/export.py import-pth`): vocab, hidden size,
    layers, KV heads, FFN width and experts from the shapes; 8 query heads and top-2 routing, as in every MiniMind2
    model; the other fields MiniMind2's defaults. DDP ("module.") and torch.compile ("_orig_mod.") prefixes go."""
    where = f"--from_weight {path}"
    if not Path(path).is_file():
        checks.fail(f"error: {where} does not exist (expected a MiniMind .pth state dict or a checkpoint folder)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling fails in many types, all meaning "not a plain state dict"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        checks.fail(f"error: {where}: not a weights-only state dict ({first})")
    if not isinstance(raw, dict):
        checks.fail(f"error: {where}: holds a {type(raw).__name__}, expected a state dict (name -> tensor)")
    try:
        sd = ckpt.clean_state_keys(raw)
        cfg = ckpt.infer_config(sd)
    except ckpt.StateDictError as exc:
        checks.fail(f"error: {where}: {exc}")
    except (KeyError, ValueError) as exc:  # a tensor the shapes are read from is missing
        checks.fail(f"error: {where}: not a MiniMind state dict ({exc!r} missing; expected model.layers.N.* tensors)")
    sd = {k: v.float() for k, v in sd.items()}
    sd.setdefault(ckpt.TIED_KEY, sd["model.embed_tokens.weight"])
    return cfg, sd


def _load_pth_state(model: MiniMind, sd: dict[str, torch.Tensor], path: str | Path) -> None:
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # a size mismatch; the message is one line per tensor
        first = str(exc).strip().splitlines()[-1].strip()
        checks.fail(f"error: --from_weight {path}: its tensors do not fit the model ({first})")
    if missing or unexpected:
        checks.fail(
            f"error: --from_weight {path}: not a MiniMind2 state dict (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; expected exactly the model's parameter names)"
        )


def load_init_weights(model: MiniMind, from_weight: str) -> None:
    """--from_weight: a checkpoint folder (or a MiniMind2 .pth file) to start from; 'none' starts from scratch."""
    if from_weight in ("", "none"):
        return
    path = Path(from_weight)
    if is_pth(from_weight):
        cfg, sd = read_pth(path)
        if arch_of(cfg) != arch_of(model.config):
            here = {k: v for k, v in arch_of(model.config).items() if arch_of(cfg)[k] != v}
            there = {k: arch_of(cfg)[k] for k in here}
            checks.fail(
                f"error: --from_weight {path} holds {there}, the configured model has {here} "
                "(choose the matching --preset / --use_moe)"
            )
        _load_pth_state(model, sd, path)
        return
    try:
        ckpt.verify_checkpoint(path)
        cfg, _ = ckpt.load_config(path)
    except ckpt.CheckpointError as exc:
        checks.fail(f"error: --from_weight: {exc}")
    if arch_of(cfg) != arch_of(model.config):
        checks.fail(f"error: --from_weight {path} holds a different architecture than the one configured")
    ckpt.load_model_weights(model, path)


# -------------------------------------------------------------------------------------------------------- throughput
# Dense bf16 tensor-core peaks (vendor datasheets) used for the trainer's MFU line; bench/ measures the real peak.
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "4090": 165e12, "3090": 71e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16.items() if k in name), None)


def flops_per_token(cfg: MiniMindConfig, n_active_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N_active + 12 * layers * hidden * seq_len (PaLM, Chowdhery et al. 2022, app. B)."""
    return 6 * n_active_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


# ------------------------------------------------------------------------------------------------------------ logging
class MetricsLog:
    """Appends one JSON object per line (the file survives a crash up to its last line) and forwards each record to
    the optional trackers from open_trackers."""

    def __init__(self, path: Path, enabled: bool = True, append: bool = False, trackers: list | None = None):
        self.path, self.enabled, self.trackers = path, enabled, trackers or []
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not append and path.exists():
                path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            for t in self.trackers:
                t.log(record, step=record.get("step"))

    def close(self) -> None:
        for t in self.trackers:
            t.finish()


def trim_metrics(path: Path, step: int) -> int:
    """Drop the records of steps after `step` from a metrics file (a resumed run logs those steps again, so each
    step appears once) and any line a kill cut short; rewritten atomically. -> the number of lines dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
            continue
        kept.append(line + "\n")
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped


def open_trackers(wandb: bool, swanlab: bool, project: str, name: str, config: dict[str, Any]) -> list:
    """Start the experiment trackers asked for (--wandb / --swanlab). A tracker that is not installed is an error
    before any compute, with the install command; the local JSONL metrics and loss PNG are always written."""
    trackers = []
    if wandb:
        try:
            import wandb as wb
        except ImportError:
            checks.fail("error: --wandb needs the wandb package: pip install wandb")
        trackers.append(wb.init(project=project, name=name, config=config))
    if swanlab:
        try:
            import swanlab as sl
        except ImportError:
            checks.fail("error: --swanlab needs the swanlab package: pip install swanlab")
        sl.init(project=project, experiment_name=name, config=config)
        trackers.append(sl)
    return trackers


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str) -> Path | None:
    """Draw loss against step from a metrics JSONL file into a PNG (nothing if there are no loss records)."""
    records = [json.loads(line) for line in open(metrics_path)] if metrics_path.exists() else []
    points = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


# ------------------------------------------------------------------------------------------------ checkpoints/resume
# A resume folder holds the step_N folders of one run or more (step_N-<run> when step_N already holds another run's
# checkpoint: one run never overwrites another's). Each records its run: an instance id, drawn when a run starts
# fresh and kept across its resumes, which decides what pruning may delete; and the run's identity (run_identity),
# which decides what --from_resume may continue.
_STEP_DIR = re.compile(r"^step_(\d+)(?:-[0-9a-f]{8})?$")
# Config fields that do not change what the weights are (training knobs, inference-time switches).
_NOT_IDENTITY = ("dropout", "aux_loss_alpha", "seq_aux", "inference_rope_scaling", "rope_scaling")
_WHOLE_FILE, _MIB, _BLOCK = 4 << 20, 1 << 20, 64 << 10


def resume_dir(out_dir: str | Path, save_weight: str) -> Path:
    return Path(out_dir) / f"{save_weight}_resume"


def stage_name(args: Any) -> str:
    """The stage a run's Args belong to: the script that defines them (train/sft.py -> sft), also as __main__."""
    return Path(inspect.getfile(type(args))).stem


def data_fingerprint(path: str | Path | None) -> dict[str, Any] | None:
    """{"bytes", "sha256"} of a data file, cheap at any size: up to 4 MiB the whole file is hashed, above that its
    first and last MiB and 16 evenly spaced 64 KiB blocks (about 3 MiB read for 1.6 GB of text). Unlike a path or an
    mtime it survives a copy, a move or a touch. None when there is no such file."""
    import hashlib

    if path is None or not Path(path).is_file():
        return None
    size = Path(path).stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _WHOLE_FILE:
            h.update(f.read())
        else:
            spans = [(0, _MIB), (size - _MIB, _MIB)] + [(i * (size - _BLOCK) // 15, _BLOCK) for i in range(16)]
            for offset, n in spans:
                f.seek(offset)
                h.update(f.read(n))
    return {"bytes": size, "sha256": h.hexdigest()}


def run_identity(args: Any, config: MiniMindConfig, tokenizer: Tokenizer, rows_per_step: int) -> dict[str, Any]:
    """What a run's checkpoints must share with the run that continues them: the stage, the model architecture,
    the tokenizer, the data, the batch geometry (rows per optimizer step over all ranks, and max_seq_len) and the
    seed. The number of ranks is not part of it (the same global batch may be split another way), nor the schedule's
    length or the learning rate (changing them is how a run is extended or a diverging one tamed). JSON-normalised,
    so it compares equal to the copy read back from a checkpoint."""
    identity = {
        "stage": stage_name(args),
        "model": {k: v for k, v in config.to_dict().items() if k not in _NOT_IDENTITY},
        "tokenizer": ckpt.tokenizer_record(tokenizer)["fingerprint"],
        "data": data_fingerprint(getattr(args, "data_path", None)),
        "rows_per_step": rows_per_step,
        "max_seq_len": getattr(args, "max_seq_len", None),
        "seed": getattr(args, "seed", None),
    }
    return json.loads(json.dumps(identity, default=str))


def _run_record(args: Any, identity: dict[str, Any], instance: str, rt: Runtime) -> dict[str, Any]:
    """The record each checkpoint of a run carries (in train_state.pt, and in config.json's meta): its instance,
    identity, and in words where the identity came from (data path, batch split), for messages."""
    split = f"batch {getattr(args, 'batch_size', '?')} x accum {getattr(args, 'accumulation_steps', '?')}"
    split += f" x {rt.world_size} rank{'s' * (rt.world_size > 1)}"
    data_path = str(getattr(args, "data_path", ""))
    return {"instance": instance, "identity": identity, "data_path": data_path, "split": split}


def _new_instance(rt: Runtime) -> str:
    """A fresh run's instance id, the same on every rank (rank 0 draws it)."""
    import secrets

    box = [secrets.token_hex(6)]
    if rt.world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def checkpoint_run(folder: Path) -> dict[str, Any] | None:
    """The run record of a resume checkpoint (config.json's or adapter_config.json's meta, else train_state.pt,
    memory-mapped so that a large optimizer state is not read); None when it records none or cannot be read."""
    for name in (ckpt.CONFIG_FILE, "adapter_config.json"):
        try:
            run = json.loads((folder / name).read_text()).get("meta", {}).get("run")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(run, dict) and "instance" in run:
            return run
    try:
        state = torch.load(folder / ckpt.STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, torn or not a train state: no run is known
        return None
    run = state.get("run") if isinstance(state, dict) else None
    return run if isinstance(run, dict) and "instance" in run else None


def _instance_of(folder: Path) -> str | None:
    return (checkpoint_run(folder) or {}).get("instance")


def _written(folder: Path) -> tuple[int, int]:
    """Sort key of a step folder: when it was written (its manifest's mtime), then its step."""
    try:
        t = (folder / ckpt.MANIFEST_FILE).stat().st_mtime_ns
    except OSError:
        t = 0
    return t, int(_STEP_DIR.match(folder.name)[1])


def step_dirs(rdir: Path) -> list[Path]:
    """The step folders of a resume folder, oldest written first."""
    if not rdir.is_dir():
        return []
    return sorted((p for p in rdir.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=_written)


def step_folder(rdir: Path, step: int, run: dict[str, Any] | None) -> Path:
    """Where run writes its checkpoint of step `step`: step_N, unless step_N holds another run's checkpoint (or one
    whose run cannot be read), which is never overwritten: then step_N-<first 8 characters of the instance>."""
    plain = rdir / f"step_{step:08d}"
    if run is None or not plain.exists() or _instance_of(plain) == run["instance"]:
        return plain
    return rdir / f"step_{step:08d}-{run['instance'][:8]}"


def save_resume(
    out_dir: str | Path,
    save_weight: str,
    step: int,
    model: MiniMind,
    tokenizer: Tokenizer,
    args: Any,
    state: dict[str, Any],
    keep_last: int = 2,
    model_sd: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model (as {out_dir}/{save_weight}) and a resumable copy with the training state
    ({out_dir}/{save_weight}_resume/step_N), keeping the last keep_last resume folders of this run (state["run"]).
    model_sd: the full state dict when the model is sharded (see full_state); by default model.state_dict()."""
    args_d = dataclasses.asdict(args)
    meta = {"step": step, "run": state.get("run")}
    ckpt.save_checkpoint(
        Path(out_dir) / save_weight, model, model.config, tokenizer, args_d, meta=meta, state_dict=model_sd
    )
    rdir = resume_dir(out_dir, save_weight)
    folder = ckpt.save_checkpoint(
        step_folder(rdir, step, state.get("run")),
        model,
        model.config,
        tokenizer,
        args_d,
        train_state=state,
        meta=meta,
        state_dict=model_sd,
    )
    prune_resume(rdir, keep_last, folder)
    return folder


def prune_resume(rdir: Path, keep_last: int, current: Path) -> list[Path]:
    """Delete the oldest checkpoints of the run of `current` (the folder just written) so that keep_last of them
    remain (keep_last <= 0 keeps all). Never `current`, never another run's, never one whose run cannot be read.
    -> the folders deleted."""
    instance = _instance_of(Path(current))
    if keep_last <= 0 or instance is None:
        return []
    mine = [p for p in step_dirs(rdir) if p.name != Path(current).name and _instance_of(p) == instance]
    old = mine[: max(len(mine) - (keep_last - 1), 0)]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


def latest_resume(out_dir: str | Path, save_weight: str, instance: str | None = None) -> Path | None:
    """The newest complete resume folder (of run `instance` when given); torn or corrupt ones are reported and
    passed over."""
    for p in reversed(step_dirs(resume_dir(out_dir, save_weight))):
        if instance is not None and _instance_of(p) != instance:
            continue
        try:
            ckpt.verify_checkpoint(p)
            return p
        except ckpt.CheckpointError as exc:
            print(f"warning: skipping resume checkpoint: {exc}")
    return None


def save_step(
    args: Any,
    rt: Runtime,
    step: int,
    rows_per_step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer: Tokenizer,
    extra: dict[str, Any] | None = None,
    write: Any = None,
) -> None:
    """The checkpoint after optimizer step `step`, called by every rank (gathering a sharded state is collective;
    rank 0 writes, the others wait). The train state records the data position in rows (rows_seen), the world
    size, so a run may resume on another number of ranks, and the run (see restore_resume). extra: more train-state
    entries (SPO's tracker, PPO's critic). write(step, state) -> folder: a stage's own writer instead of save_resume
    (LoRA's adapter folders; it gets no gathered model state; it names its folder with step_folder and prunes with
    prune_resume)."""
    run = getattr(args, "_run", None)
    if run is None:  # a caller that did not go through restore_resume: a run of its own, from here on
        identity = run_identity(args, model.config, tokenizer, rows_per_step)
        run = args._run = _run_record(args, identity, _new_instance(rt), rt)
    model_sd, optim_sd = full_state(model, optimizer, rt, with_model=write is None)
    state = {
        "step": step,
        "rows_seen": step * rows_per_step,
        "world_size": rt.world_size,
        "optimizer": optim_sd,
        "rng": rng_state(),
        "run": run,
        **(extra or {}),
    }
    if rt.is_main:
        if write is None:
            save_resume(args.out_dir, args.save_weight, step, model, tokenizer, args, state, args.keep_last, model_sd)
        else:
            write(step, state)
    barrier(rt)


def _first_nonfinite(obj: Any, where: str = "") -> str | None:
    """The path of the first floating-point tensor holding NaN or inf in nested dicts and lists, else None."""
    if isinstance(obj, torch.Tensor):
        return where if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        bad = _first_nonfinite(v, f"{where}.{k}" if where else str(k))
        if bad is not None:
            return bad
    return None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """model.hidden_size-style keys; the data fingerprint stays whole (it reads as one thing)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "data":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _show(key: str, value: Any, run: dict[str, Any]) -> str:
    if value is None:
        return "none"
    if key == "tokenizer":
        return f"fingerprint {value[:16]}"
    if key == "data":
        return f"{run.get('data_path', '?')} ({value['bytes']} bytes, sha256 {value['sha256'][:12]})"
    if key == "rows_per_step":
        return f"{value} ({run.get('split', '?')})"
    return str(value)


def identity_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The fields where two run identities differ (flattened names, sorted)."""
    a, b = _flat(saved), _flat(now)
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _describe(keys: list[str], saved: dict[str, Any], now: dict[str, Any]) -> str:
    """'max_seq_len: checkpoint 128, this run 64; ...' for the differing fields of two run records."""
    a, b = _flat(saved["identity"]), _flat(now["identity"])
    return "; ".join(f"{k}: checkpoint {_show(k, a.get(k), saved)}, this run {_show(k, b.get(k), now)}" for k in keys)


def _why(exc: ckpt.CheckpointError, folder: Path) -> str:
    """A CheckpointError's message without the folder's path (the caller names the folder)."""
    text = str(exc)
    for prefix in (f"checkpoint {folder}: ", f"checkpoint {folder} "):
        text = text.replace(prefix, "")
    return text


def check_tokenizer(args: Any, tokenizer: Tokenizer, config: MiniMindConfig, start: str | None) -> None:
    """The tokenizer a stage trains with must be the one the checkpoint it starts from (--from_weight) was trained
    with, and must fit its embedding: with another, every token id means another token and training goes on silently
    on scrambled text. The checkpoint's tokenizer is known from its folder (recorded fingerprint, or its saved
    tokenizer.json); a .pth carries none, so there only the vocabulary size is compared. --allow_tokenizer_change 1
    turns the refusal into a warning."""
    if start in (None, "", "none"):
        return
    mine = ckpt.tokenizer_record(tokenizer)
    problems = []
    saved = ckpt.saved_tokenizer(start) if Path(start).is_dir() else None
    if saved is not None and saved["fingerprint"] != mine["fingerprint"]:
        problems.append(
            f"it is not the tokenizer {start} was trained with (that one: fingerprint {saved['fingerprint'][:16]}, "
            f"{saved['vocab_size']} tokens; this one: fingerprint {mine['fingerprint'][:16]}, {mine['vocab_size']} "
            "tokens)"
        )
    if mine["vocab_size"] != config.vocab_size:
        problems.append(f"it has {mine['vocab_size']} tokens, the model's embedding {config.vocab_size} rows")
    if not problems:
        return
    what = f"--tokenizer {args.tokenizer}" if args.tokenizer else f"--tokenizer (default: {tokenizer.source})"
    if getattr(args, "allow_tokenizer_change", False):
        print(f"warning: {what}: {'; '.join(problems)}; training with it as --allow_tokenizer_change 1 asks")
        return
    checks.fail(
        f"error: {what}: {'; '.join(problems)} (expected the tokenizer saved with the checkpoint: omit --tokenizer "
        f"or pass --tokenizer {start}; --allow_tokenizer_change 1 trains with this one anyway)"
    )


def _pick_resume(rdir: Path, now: dict[str, Any], args: Any, rt: Runtime) -> tuple[Path, dict[str, Any], dict]:
    """The checkpoint --from_resume continues -> (folder, its run record, its train state): the most recently
    written one that is intact (manifest, hashes, finite weights and optimizer state) and belongs to a run with this
    run's identity (other fields allowed by --force_resume, another tokenizer by --allow_tokenizer_change). None
    qualifies: refused, naming every step folder found and what is wrong with it."""
    found = step_dirs(rdir)
    if not found:
        why = "the folder does not exist" if not rdir.is_dir() else "it holds no step_N folders"
        checks.fail(
            f"error: --from_resume 1: no resume checkpoint under {rdir} ({why}; expected the step_N folders of an "
            f"earlier run with --out_dir {args.out_dir} --save_weight {args.save_weight}, or drop --from_resume to "
            "start fresh)"
        )
    force, allow_tok = getattr(args, "force_resume", False), getattr(args, "allow_tokenizer_change", False)
    problems, hints = [], set()
    for p in reversed(found):
        try:
            ckpt.verify_checkpoint(p)
        except ckpt.CheckpointError as exc:
            problems.append(f"{p.name}: {_why(exc, p)}")
            continue
        saved = checkpoint_run(p)
        if saved is None and not force:
            problems.append(f"{p.name}: records no run (written by an older version)")
            hints.add("--force_resume 1 continues another run's checkpoint")
            continue
        diffs = identity_diff(saved["identity"], now["identity"]) if saved is not None else []
        blocking = [k for k in diffs if not (allow_tok if k == "tokenizer" else force)]
        if blocking:
            problems.append(f"{p.name}: a run with other settings ({_describe(blocking, saved, now)})")
            if "tokenizer" in blocking:
                hints.add("--allow_tokenizer_change 1 continues with another tokenizer")
            if blocking != ["tokenizer"]:
                hints.add("--force_resume 1 continues another run's checkpoint")
            continue
        try:
            state = ckpt.load_train_state(p)
        except Exception as exc:  # verified bytes that still do not load: not a train state of ours
            problems.append(f"{p.name}: {ckpt.STATE_FILE} does not load ({str(exc).strip().splitlines()[0]})")
            continue
        bad = _first_nonfinite(state.get("optimizer"))
        if bad is not None:
            problems.append(f"{p.name}: {ckpt.STATE_FILE} holds non-finite optimizer state (first: {bad})")
            continue
        if rt.is_main:
            for msg in problems:
                print(f"warning: --from_resume: passing over {msg}")
            if saved is None or diffs:
                what = "records no run" if saved is None else f"differs: {_describe(diffs, saved, now)}"
                print(f"warning: --from_resume: continuing {p.name}, whose run {what}")
        return p, saved or {}, state
    hint = "; ".join(sorted(hints) + ["drop --from_resume to start fresh"])
    checks.fail(
        f"error: --from_resume 1: no checkpoint under {rdir} can continue this run: {'; '.join(problems)} ({hint})"
    )


def restore_resume(
    args: Any,
    rt: Runtime,
    rows_per_step: int,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    tokenizer: Tokenizer,
    config: MiniMindConfig | None = None,
    start: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """The run's identity, checked before any step: -> (step to continue from, train state with "folder" added),
    (0, {}) for a fresh run. Called by every stage (with or without --from_resume), on every rank.

    First the tokenizer is checked against the checkpoint the model starts from (check_tokenizer; start: that
    checkpoint, default --from_weight; "none" for a model built from scratch). A fresh run draws a new instance id and
    leaves other runs' checkpoints in the resume folder alone. --from_resume 1 continues the checkpoint _pick_resume
    chooses, or refuses with exit status 2 (nothing written). The model and optimizer are loaded from full state dicts
    (so into a sharded model too; model None: the caller loads them from state["folder"], and passes config, the
    model's config) and the RNG is restored. The step is the rows seen divided by this run's rows per step: on
    another number of ranks the position is rounded down, replaying at most one step's rows."""
    cfg = config if config is not None else model.config
    check_tokenizer(args, tokenizer, cfg, getattr(args, "from_weight", None) if start is None else start)
    identity = run_identity(args, cfg, tokenizer, rows_per_step)
    rdir = resume_dir(args.out_dir, args.save_weight)
    if not args.from_resume:
        args._run = _run_record(args, identity, _new_instance(rt), rt)
        others = step_dirs(rdir)
        if others and rt.is_main:
            print(
                f"note: {rdir} holds {len(others)} checkpoint(s) of earlier runs ({', '.join(p.name for p in others)});"
                f" this fresh run ({args._run['instance']}) keeps them and prunes only its own"
            )
        return 0, {}
    now = _run_record(args, identity, "", rt)
    folder, saved, state = _pick_resume(rdir, now, args, rt)
    now["instance"] = saved.get("instance") or _new_instance(rt)
    args._run = now
    if model is not None:
        load_full_state(model, optimizer, ckpt.load_model_state(folder), state["optimizer"])
    set_rng_state(state["rng"])
    start_step = int(state["rows_seen"]) // rows_per_step if "rows_seen" in state else int(state["step"])
    if rt.is_main:
        was = state.get("world_size", 1)
        moved = f" (saved by {was} ranks, now {rt.world_size})" if was != rt.world_size else ""
        print(f"resumed run {now['instance']} from {folder} at step {start_step}{moved}")
    return start_step, {**state, "folder": folder}


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class StopFlag:
    """SIGTERM/SIGINT set a flag instead of killing the process, so the loop can save and exit cleanly.
    A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nsignal {signal.Signals(signum).name}: saving a checkpoint and stopping after this step", flush=True)

    def __enter__(self) -> StopFlag:
        if hasattr(signal, "SIGTERM") and _in_main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def start_run(args: Any, rt: Runtime, start_step: int, summary: str) -> tuple[MetricsLog, step.NonFiniteGuard]:
    """Print the run's start-up summary (rank 0) and open its metrics, {out_dir}/{save_weight}_metrics.jsonl (written
    by rank 0 only; when resuming at step S, the records of steps after S, which the run is about to log again, are
    dropped first) with the trackers asked for (--wandb / --swanlab), and its NonFiniteGuard."""
    if rt.is_main:
        print(summary)
    flags = {k: v for k, v in vars(args).items() if not k.startswith("_")}  # not the run record restore_resume adds
    trackers = open_trackers(args.wandb, args.swanlab, "minimind", args.save_weight, flags) if rt.is_main else []
    path = Path(args.out_dir) / f"{args.save_weight}_metrics.jsonl"
    if rt.is_main and start_step > 0:
        trim_metrics(path, start_step)
    metrics = MetricsLog(path, enabled=rt.is_main, append=start_step > 0, trackers=trackers)

    def last_good() -> Path | None:  # the newest checkpoint of this run: its weights are from before a streak
        run = getattr(args, "_run", None) or {}
        return latest_resume(args.out_dir, args.save_weight, instance=run.get("instance"))

    return metrics, step.NonFiniteGuard(args.max_bad_steps, metrics, rt.is_main, last_good)


def progress(start: int, total: int, desc: str, rt: Runtime) -> tqdm:
    """The progress bar over optimizer steps (rank 0 only)."""
    return tqdm(range(start, total), initial=start, total=total, desc=desc, dynamic_ncols=True, disable=not rt.is_main)


def finish(args: Any, rt: Runtime, metrics: MetricsLog, title: str, last_loss: float | None = None) -> bool:
    """End of a run: close the metrics and trackers and leave the process group; rank 0 draws the loss curve
    ({save_weight}_loss.png) and says where the model went. -> whether this is rank 0."""
    metrics.close()
    shutdown(rt)
    if not rt.is_main:
        return False
    png = plot_loss_curve(metrics.path, Path(args.out_dir) / f"{args.save_weight}_loss.png", title)
    loss = f"loss {last_loss:.4f}; " if last_loss is not None else ""
    print(f"done: {loss}model in {Path(args.out_dir) / args.save_weight}" + (f"; loss curve {png}" if png else ""))
    return True


def describe_runtime(rt: Runtime, args: Any) -> str:
    """'cpu x 2 ranks (fp32, FSDP2)': where and how the run computes, for the start-up line."""
    ranks = f" x {rt.world_size} ranks" if rt.world_size > 1 else ""
    how = ["bf16 autocast" if rt.amp_dtype else "fp32"] + [rt.precision_note] * bool(rt.precision_note)
    how += ["compiled"] * bool(args.compile) + ["FSDP2"] * bool(args.fsdp)
    return f"{rt.device}{ranks} ({', '.join(how)})"


class Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return dt


# ------------------------------------------------------------------------------------------ models and batches (SFT+)
def load_base_model(from_weight: str, ops: kernels.Ops, device: torch.device, **overrides: Any) -> MiniMind:
    """Build the model a post-training stage starts from: config and weights from a checkpoint folder, or from a
    MiniMind .pth state dict with the config read off its tensor shapes (read_pth).

    overrides change config fields that do not alter the weights (e.g. dropout, aux_loss_alpha)."""
    if from_weight in ("", "none"):
        checks.fail(
            "error: this stage needs --from_weight (a checkpoint folder, e.g. out/pretrain, or a MiniMind .pth)"
        )
    sd = None
    if is_pth(from_weight):
        cfg, sd = read_pth(from_weight)
    else:
        try:
            ckpt.verify_checkpoint(from_weight)
            cfg, _ = ckpt.load_config(from_weight)
        except ckpt.CheckpointError as exc:
            checks.fail(f"error: --from_weight: {exc}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = MiniMind(cfg, ops=ops)
    if sd is None:
        ckpt.load_model_weights(model, from_weight)
    else:
        _load_pth_state(model, sd, from_weight)
    return model.to(device)


# The weights that only ever enter autocast matmuls: stored in bf16 they give bit-identical results at a third of the
# memory. Embedding (the residual stream's dtype and the tied head), norms and the MoE router stay fp32, as in the
# trained model, so a frozen copy computes exactly what the same weights compute under autocast.
_MATMUL_WEIGHTS = ("_proj.weight", "w_gate", "w_up", "w_down")


def frozen_model(folder: str, ops: kernels.Ops, rt: Runtime) -> MiniMind:
    """A model that is only read (DPO's and the RL stages' reference, distillation's teacher): eval mode, no
    gradients, its matmul weights stored in the compute dtype (bf16 under autocast; see _MATMUL_WEIGHTS), so a copy
    of the trained model's starting point computes exactly what that model computes. Every rank holds its own
    copy, not wrapped for data parallelism: it has no gradients to average."""
    model = load_base_model(folder, ops, rt.device)
    model.eval().requires_grad_(False)
    if rt.amp_dtype is not None:
        for name, p in model.named_parameters():
            if name.endswith(_MATMUL_WEIGHTS):
                p.data = p.data.to(rt.amp_dtype)
    return model


def stage_tokenizer(path: str | None, from_weight: str) -> Tokenizer:
    """--tokenizer, else the tokenizer saved with the starting checkpoint, else the shipped one. A tokenizer keeps
    its own chat template, so the checkpoints a stage writes carry the template it trained with."""
    if path is None and (Path(from_weight) / "tokenizer.json").is_file():
        path = from_weight
    if path is None and is_pth(from_weight) and os.environ.get("RANK", "0") == "0":
        # A .pth holds weights only; MiniMind's releases were trained with MiniMind's tokenizer, not ours.
        print(
            f"note: --from_weight {from_weight} holds no tokenizer, using the shipped one; give --tokenizer DIR "
            "for the one those weights were trained with (e.g. MiniMind's model/ folder)"
        )
    return load_tokenizer(path)


def open_dataset(cls: type, args: Any, tokenizer: Tokenizer, rt: Runtime) -> Any:
    """cls(--data_path, tokenizer, --max_seq_len) with --skip_bad_lines; a DataError or a missing file ends the run
    with its message (exit status 2, see train/checks.py), and skipped lines and conversations cut before their
    answer are reported (rank 0)."""
    from minimind_fast.data import DataError

    try:
        data = cls(args.data_path, tokenizer, args.max_seq_len, skip_bad_lines=args.skip_bad_lines)
    except (DataError, FileNotFoundError) as exc:
        checks.data_error(exc)
    if data.bad_lines and rt.is_main:
        print(
            f"warning: skipped {data.bad_lines} malformed lines in {args.data_path}; first: {data.bad_line_reasons[0]}"
        )
    checks.report_dataset(data, args, rt.is_main)
    return data
