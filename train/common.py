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
import math
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
from minimind_fast.model import MiniMind  # noqa: E402
from minimind_fast.tokenizer import Tokenizer  # noqa: E402


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
    return cls(**vars(parser.parse_args(argv)))


@dataclass
class StageArgs:
    """The flags every post-training stage shares. A stage's Args extends it with its own (data, model, batch and
    learning-rate flags, and its algorithm's) and may re-declare one here to change its default."""

    out_dir: str = arg("out", "where checkpoints, metrics and the loss curve go")
    from_resume: int = arg(0, "1: continue from the newest checkpoint in {out_dir}/{save_weight}_resume")
    tokenizer: str | None = arg(None, "tokenizer folder or tokenizer.json (default: the one saved with --from_weight)")
    accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    warmup_steps: int = arg(0, "linear warmup steps before the cosine schedule")
    weight_decay: float = arg(0.01, "AdamW weight decay (matrices only)")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0 = off)")
    max_steps: int = arg(0, "stop after this many optimizer steps (0 = run all epochs)")
    device: str = arg("auto", "cuda, cpu, or auto")
    dtype: str = arg("auto", "bfloat16 or float32 (auto: bf16 autocast on CUDA, fp32 on CPU)")
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


def setup_runtime(device: str = "auto", dtype: str = "auto", seed: int = 42, dist_timeout: float = 600.0) -> Runtime:
    """Pick the device and precision: bf16 autocast on CUDA (fp16 is not offered: no loss scaling here), fp32 on CPU.

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
        raise SystemExit("error: --device cuda asked for but CUDA is not available")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise SystemExit(f"error: --dtype must be auto, bfloat16 or float32, got {dtype!r}")
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
    return Runtime(device=dev, amp_dtype=amp, rank=rank, world_size=world, local_rank=local_rank)


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


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (0 = measure only); returns the norm before clipping as a plain tensor, also
    when FSDP2 gradients are sharded DTensors."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


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
    if optimizer is None:
        return get_model_state_dict(model, options=opts), None
    if not with_model:
        return None, get_optimizer_state_dict(model, optimizer, options=opts)
    return get_state_dict(model, optimizer, options=opts)


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_sd, optim_sd) -> None:
    """Inverse of full_state: load full state dicts into a plain or sharded model and its optimizer (model_sd None:
    the optimizer only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict, set_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    if model_sd is None:
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_sd, options=opts)
        return
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)


def resolve_kernels(spec: str, rt: Runtime) -> kernels.Ops:
    try:
        ops = kernels.resolve(spec)
    except kernels.KernelSpecError as exc:
        raise SystemExit(f"error: {exc}") from exc
    if rt.is_main:
        print(kernels.describe(ops))
    return ops


def load_tokenizer(path: str | None) -> Tokenizer:
    try:
        return Tokenizer.load(path)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc


def build_config(preset: str, tokenizer: Tokenizer, **overrides: Any) -> MiniMindConfig:
    cfg = from_preset(preset, **overrides)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise SystemExit(
            f"error: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab is {cfg.vocab_size}"
        )
    return cfg


def load_init_weights(model: MiniMind, from_weight: str) -> None:
    """--from_weight: a checkpoint folder (or a MiniMind2 .pth file) to start from; 'none' starts from scratch."""
    if from_weight in ("", "none"):
        return
    path = Path(from_weight)
    if path.suffix == ".pth":
        ckpt.load_minimind_pth(model, path)
        return
    try:
        ckpt.verify_checkpoint(path)
        cfg, _ = ckpt.load_config(path)
    except ckpt.CheckpointError as exc:
        raise SystemExit(f"error: --from_weight: {exc}") from exc
    if _arch(cfg) != _arch(model.config):
        raise SystemExit(f"error: --from_weight {path} holds a different architecture than the one configured")
    ckpt.load_model_weights(model, path)


def _arch(cfg: MiniMindConfig) -> dict[str, Any]:
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "use_moe",
        "n_routed_experts",
        "n_shared_experts",
    )
    return {k: getattr(cfg, k) for k in keys}


# ---------------------------------------------------------------------------------------------- optimizer + schedule
def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm gains are not decayed). Fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    on_cuda = any(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=on_cuda or None)


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int = 0) -> float:
    """MiniMind's schedule: lr * (0.1 + 0.45 * (1 + cos(pi * t / T))), cosine from lr down to 0.1 * lr,
    after an optional linear warmup over warmup_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t, T = step - warmup_steps, max(total_steps - warmup_steps, 1)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(t, T) / T)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch), so resume replays it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


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


def open_trackers(wandb: bool, swanlab: bool, project: str, name: str, config: dict[str, Any]) -> list:
    """Start the experiment trackers asked for (--wandb / --swanlab). A tracker that is not installed is an error
    before any compute, with the install command; the local JSONL metrics and loss PNG are always written."""
    trackers = []
    if wandb:
        try:
            import wandb as wb
        except ImportError as exc:
            raise SystemExit("error: --wandb needs the wandb package: pip install wandb") from exc
        trackers.append(wb.init(project=project, name=name, config=config))
    if swanlab:
        try:
            import swanlab as sl
        except ImportError as exc:
            raise SystemExit("error: --swanlab needs the swanlab package: pip install swanlab") from exc
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
_STEP_DIR = re.compile(r"^step_(\d+)$")


def resume_dir(out_dir: str | Path, save_weight: str) -> Path:
    return Path(out_dir) / f"{save_weight}_resume"


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
    ({out_dir}/{save_weight}_resume/step_N), keeping the last keep_last resume folders. model_sd: the full state dict
    when the model is sharded (see full_state); by default model.state_dict()."""
    args_d = dataclasses.asdict(args)
    meta = {"step": step}
    ckpt.save_checkpoint(
        Path(out_dir) / save_weight, model, model.config, tokenizer, args_d, meta=meta, state_dict=model_sd
    )
    rdir = resume_dir(out_dir, save_weight)
    folder = ckpt.save_checkpoint(
        rdir / f"step_{step:08d}",
        model,
        model.config,
        tokenizer,
        args_d,
        train_state=state,
        meta=meta,
        state_dict=model_sd,
    )
    prune_resume(rdir, keep_last)
    return folder


def prune_resume(rdir: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last step_N folders of a resume folder (keep_last <= 0 keeps all)."""
    old = sorted(p for p in rdir.iterdir() if _STEP_DIR.match(p.name))[:-keep_last] if keep_last > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)


def latest_resume(out_dir: str | Path, save_weight: str) -> Path | None:
    """The newest complete resume folder; torn or corrupt ones are reported and passed over."""
    rdir = resume_dir(out_dir, save_weight)
    if not rdir.is_dir():
        return None
    for p in sorted((p for p in rdir.iterdir() if _STEP_DIR.match(p.name)), reverse=True):
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
    rank 0 writes, the others wait). The train state records the data position in rows (rows_seen) and the world
    size, so a run may resume on another number of ranks. extra: more train-state entries (SPO's tracker, PPO's
    critic). write(step, state): a stage's own writer instead of save_resume (LoRA's adapter folders; it gets no
    gathered model state)."""
    model_sd, optim_sd = full_state(model, optimizer, rt, with_model=write is None)
    state = {
        "step": step,
        "rows_seen": step * rows_per_step,
        "world_size": rt.world_size,
        "optimizer": optim_sd,
        "rng": rng_state(),
        **(extra or {}),
    }
    if rt.is_main:
        if write is None:
            save_resume(args.out_dir, args.save_weight, step, model, tokenizer, args, state, args.keep_last, model_sd)
        else:
            write(step, state)
    barrier(rt)


def restore_resume(
    args: Any,
    rt: Runtime,
    rows_per_step: int,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[int, dict[str, Any]]:
    """--from_resume 1: load the newest complete resume checkpoint -> (step to continue from, its train state with
    "folder" added); (0, {}) when starting fresh. The model and optimizer are loaded from full state dicts (so into
    a sharded model too; model None: the caller loads them from state["folder"]) and the RNG is restored. The step
    is the rows seen divided by this run's rows per step: on another number of ranks the position is rounded down,
    replaying at most one step's rows."""
    if not args.from_resume:
        return 0, {}
    folder = latest_resume(args.out_dir, args.save_weight)
    if folder is None:
        if rt.is_main:
            print(f"no resume checkpoint under {resume_dir(args.out_dir, args.save_weight)}: starting fresh")
        return 0, {}
    state = ckpt.load_train_state(folder)
    if model is not None:
        load_full_state(model, optimizer, ckpt.load_model_state(folder), state["optimizer"])
    set_rng_state(state["rng"])
    start = int(state["rows_seen"]) // rows_per_step if "rows_seen" in state else int(state["step"])
    if rt.is_main:
        was = state.get("world_size", 1)
        moved = f" (saved by {was} ranks, now {rt.world_size})" if was != rt.world_size else ""
        print(f"resumed from {folder} at step {start}{moved}")
    return start, {**state, "folder": folder}


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


class NonFiniteGuard:
    """Decides whether an optimizer step may be taken: a NaN/inf gradient norm skips it (weights and optimizer state
    stay as they were) and is counted; max_bad_steps in a row stop the run, naming the last checkpoint written (it
    holds the weights from before the streak). The norm is the all-reduced one, so every rank decides alike."""

    def __init__(self, args: Any, rt: Runtime, metrics: MetricsLog):
        self.args, self.rt, self.metrics = args, rt, metrics
        self.skipped, self.streak = 0, 0

    def ok(self, grad_norm: torch.Tensor, step: int) -> bool:
        if bool(torch.isfinite(grad_norm).all()):
            self.streak = 0
            return True
        self.skipped, self.streak = self.skipped + 1, self.streak + 1
        if self.rt.is_main:
            tqdm.write(f"step {step}: non-finite loss or gradient, step skipped ({self.skipped} so far)")
        if self.streak >= self.args.max_bad_steps:
            self.metrics.write({"step": step, "skipped_steps": self.skipped, "stopped": "non-finite"})
            last = latest_resume(self.args.out_dir, self.args.save_weight)
            raise SystemExit(
                f"error: {self.streak} non-finite steps in a row; stopping. Last good checkpoint: "
                f"{last if last is not None else 'none written yet'}"
            )
        return False


def start_run(args: Any, rt: Runtime, start_step: int, summary: str) -> tuple[MetricsLog, NonFiniteGuard]:
    """Print the run's start-up summary (rank 0) and open its metrics, {out_dir}/{save_weight}_metrics.jsonl (written
    by rank 0 only, appended to when resuming) with the trackers asked for (--wandb / --swanlab), and its
    NonFiniteGuard."""
    if rt.is_main:
        print(summary)
    trackers = open_trackers(args.wandb, args.swanlab, "minimind", args.save_weight, vars(args)) if rt.is_main else []
    path = Path(args.out_dir) / f"{args.save_weight}_metrics.jsonl"
    metrics = MetricsLog(path, enabled=rt.is_main, append=start_step > 0, trackers=trackers)
    return metrics, NonFiniteGuard(args, rt, metrics)


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
    how = ["bf16 autocast" if rt.amp_dtype else "fp32"]
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
    """Build the model a post-training stage starts from: config and weights from a checkpoint folder.

    overrides change config fields that do not alter the weights (e.g. dropout, aux_loss_alpha)."""
    if from_weight in ("", "none"):
        raise SystemExit("error: this stage needs --from_weight (a checkpoint folder, e.g. out/pretrain)")
    try:
        ckpt.verify_checkpoint(from_weight)
        cfg, _ = ckpt.load_config(from_weight)
    except ckpt.CheckpointError as exc:
        raise SystemExit(f"error: --from_weight: {exc}") from exc
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = MiniMind(cfg, ops=ops)
    ckpt.load_model_weights(model, from_weight)
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
    """--tokenizer, else the tokenizer saved with the starting checkpoint, else the shipped one."""
    if path is None and (Path(from_weight) / "tokenizer.json").is_file():
        path = from_weight
    return load_tokenizer(path)


def open_dataset(cls: type, args: Any, tokenizer: Tokenizer, rt: Runtime) -> Any:
    """cls(--data_path, tokenizer, --max_seq_len) with --skip_bad_lines; a DataError or a missing file ends the run
    with its message, and skipped lines are reported (rank 0)."""
    from minimind_fast.data import DataError

    try:
        data = cls(args.data_path, tokenizer, args.max_seq_len, skip_bad_lines=args.skip_bad_lines)
    except (DataError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    if data.bad_lines and rt.is_main:
        print(
            f"warning: skipped {data.bad_lines} malformed lines in {args.data_path}; first: {data.bad_line_reasons[0]}"
        )
    return data


def plan_steps(n_rows: int, rows_per_step: int, args: Any, rt: Runtime, what: str) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) for n_rows rows of which one step reads rows_per_step (over all
    ranks); --max_steps caps the total. Too few rows for one step is an error that says what to lower."""
    steps_per_epoch = n_rows // rows_per_step
    if steps_per_epoch == 0:
        raise SystemExit(
            f"error: {args.data_path} has {n_rows} {what}, fewer than one optimizer step needs ({rows_per_step} over "
            f"{rt.world_size} rank{'s' * (rt.world_size > 1)}); lower --batch_size"
        )
    total = steps_per_epoch * args.epochs
    return steps_per_epoch, min(total, args.max_steps) if args.max_steps else total


def batch_index(within: int, micro: int, args: Any, rt: Runtime) -> int:
    """Which batch_size-row slice of the epoch order this rank reads at micro-batch `micro` of step `within` (of the
    epoch). Rank r takes the r-th slice of each micro-batch, so the ranks together read exactly the rows that one
    process with a world_size times larger batch would."""
    return (within * args.accumulation_steps + micro) * rt.world_size + rt.rank


def rank_rows(order: torch.Tensor, within: int, micro: int, args: Any, rt: Runtime) -> list[int]:
    """The data indices of this rank's micro-batch (see batch_index)."""
    b = batch_index(within, micro, args, rt)
    return order[b * args.batch_size : (b + 1) * args.batch_size].tolist()


def iterate_batches(dataset: Any, collate: Any, batch_size: int, seed: int, epoch: int, start_batch: int = 0) -> Any:
    """Yield (batch_index, collated batch) for one epoch in the (seed, epoch) order, from start_batch on.

    The last partial batch is dropped so every optimizer step sees the same number of sequences."""
    order = epoch_order(len(dataset), seed, epoch)
    for b in range(start_batch, len(dataset) // batch_size):
        idx = order[b * batch_size : (b + 1) * batch_size]
        yield b, collate([dataset[int(i)] for i in idx])
