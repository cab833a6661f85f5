"""One way to load a checkpoint for inference, used by the chat, serve and eval tools.

    model, tokenizer = load_for_inference("out/full_sft", lora="out/lora_identity", device="auto", kernels="auto")

The precision rule: the weights keep the checkpoint's dtype (fp32); on CUDA generation runs under bf16 autocast with
a bf16 KV cache, on a CPU in fp32 (minimind_fast.generate and minimind_fast.engine apply it; a CPU with fast bf16 is
not used for inference yet, so answers there equal the fp32 training-time model's).

LoRA: an adapter folder is put onto the model and merged into the weights (the LoRA wrappers are removed), so a
fine-tuned model decodes at the base model's speed. Every problem the user can fix (a bad path, device, adapter or
kernels spec) raises LoadError with one line that names it.
"""

from __future__ import annotations

from pathlib import Path

import torch

import minimind_kernels as kernels
from minimind_fast.checkpoint import CheckpointError, load_model
from minimind_fast.config import ConfigError
from minimind_fast.tokenizer import Tokenizer, TokenizerError


class LoadError(RuntimeError):
    """A model that cannot be loaded as asked; the message is one line."""


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]


def pick_device(spec: str | torch.device = "auto") -> torch.device:
    """auto (cuda when available, else cpu), cpu, cuda, cuda:1 ...; LoadError for anything else or a missing GPU."""
    if isinstance(spec, torch.device):
        dev = spec
    elif spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(spec)
        except (RuntimeError, TypeError) as exc:
            msg = f"--device {spec!r} is not a device (auto, cpu, cuda, cuda:1 ...): {one_line(exc)}"
            raise LoadError(msg) from None
    if dev.type not in ("cpu", "cuda"):
        raise LoadError(f"--device {spec}: only cpu and cuda are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoadError(f"--device {spec} asked for but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LoadError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def load_for_inference(
    folder: str | Path,
    *,
    lora: str | Path | None = None,
    device: str | torch.device = "auto",
    kernels_spec: str = "auto",
    yarn: bool = False,
) -> tuple[torch.nn.Module, Tokenizer]:
    """The model in eval mode on its device (adapter merged, YaRN as asked) and the tokenizer saved with it (the
    shipped one when the checkpoint has none)."""
    path = Path(folder)
    if path.is_file():
        raise LoadError(f"--load {path} is a file; it expects a checkpoint folder (model.safetensors, config.json)")
    if not path.exists():
        raise LoadError(f"--load {path} does not exist (a checkpoint folder: model.safetensors, config.json)")
    dev = pick_device(device)
    try:
        ops = kernels.resolve(kernels_spec)
    except kernels.KernelSpecError as exc:
        raise LoadError(one_line(exc)) from None
    try:
        model, _, _ = load_model(path, ops=ops, device=dev)
        tokenizer = Tokenizer.load(path if (path / "tokenizer.json").is_file() else None)
    except (CheckpointError, ConfigError, TokenizerError) as exc:
        raise LoadError(one_line(exc)) from None
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise LoadError(f"checkpoint {path} cannot be loaded: {one_line(exc)}") from None
    if lora:
        from minimind_fast import lora as lora_mod

        try:
            lora_mod.load_adapter(model, lora)
            lora_mod.remove_lora(model, merge=True)
        except (lora_mod.AdapterError, CheckpointError, OSError, ValueError) as exc:
            raise LoadError(f"--lora: {one_line(exc)}") from None
    model.eval()
    if yarn:
        model.set_yarn(True)
    return model, tokenizer
