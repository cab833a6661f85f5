"""A stage's command line: the flags every stage shares (StageArgs), what the run helpers read of a stage's Args
(RunArgs), the Args dataclass -> argparse bridge (arg, parse_args) and the machine-dependent defaults (resolve_auto)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from train import checks

_A = TypeVar("_A")
_S = TypeVar("_S", bound="StageArgs")


def arg(default: Any, help: str) -> Any:
    """A dataclass field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0, true/false), got {v!r}")


def parse_args(cls: type[_A], argv: list[str] | None, description: str) -> _A:
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


def _defaults_under_out_dir(args: StageArgs, cls: type, argv: list[str] | None) -> None:
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


class RunArgs(Protocol):
    """A stage's Args as the run, checkpoint and data helpers read them (train/resume.py, common.py, and
    models.open_dataset): StageArgs fields, and flags that every stage's Args declares with its own default."""

    @property
    def out_dir(self) -> str: ...
    @property
    def from_resume(self) -> int: ...
    @property
    def tokenizer(self) -> str | None: ...
    @property
    def keep_last(self) -> int: ...
    @property
    def max_bad_steps(self) -> int: ...
    @property
    def skip_bad_lines(self) -> bool: ...
    @property
    def wandb(self) -> bool: ...
    @property
    def swanlab(self) -> bool: ...
    # declared by each stage
    @property
    def save_weight(self) -> str: ...
    @property
    def data_path(self) -> str: ...
    @property
    def max_seq_len(self) -> int | None: ...


def resolve_auto(args: _S, on_cuda: bool, auto: dict[str, tuple[Any, Any]]) -> _S:
    """Fill the machine-dependent defaults (flags left at None) from auto: {name: (CPU value, CUDA value)}."""
    for name, (cpu, cuda) in auto.items():
        if getattr(args, name) is None:
            setattr(args, name, cuda if on_cuda else cpu)
    return args
