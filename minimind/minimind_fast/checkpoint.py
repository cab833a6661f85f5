"""Checkpoints: one folder per checkpoint, written atomically, verified on load, never unpickling code.

A checkpoint folder holds
  model.safetensors       the weights under HF-Llama names (the tied lm_head.weight is stored once, as the embedding)
  config.json             {"model": MiniMindConfig fields, "args": the run's arguments, "meta": free-form}
  tokenizer.json, tokenizer_config.json
  train_state.pt          optional: optimizer, step, RNG, data position (plain tensors and containers; loaded with
                          torch.load(weights_only=True), so it cannot execute code)
  manifest.json           size and sha256 of every other file, written last: a folder without it, or whose files
                          do not match it, is torn or corrupt and is refused with a clear message

Writes go to a temporary sibling folder that is renamed into place, so a crash never leaves a half-written checkpoint
under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from minimind_fast.config import MiniMindConfig

MODEL_FILE, CONFIG_FILE, STATE_FILE, MANIFEST_FILE = (
    "model.safetensors",
    "config.json",
    "train_state.pt",
    "manifest.json",
)
TIED_KEY = "lm_head.weight"


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, torn or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors without the tied head (it is the embedding); safetensors stores no shared storage."""
    out = {k: v.detach().to("cpu").contiguous() for k, v in sd.items() if k != TIED_KEY}
    return out


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors, without the tied head."""
    return _plain(model.state_dict())


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    config: MiniMindConfig,
    tokenizer: Any = None,
    args: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (temp folder + rename), replacing any previous one at that path.
    state_dict overrides model.state_dict() (e.g. the gathered full state of a sharded model)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        sd = model_state_dict(model) if state_dict is None else _plain(state_dict)
        save_file(sd, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        payload = {"model": config.to_dict(), "args": args or {}, "meta": meta or {}}
        (tmp / CONFIG_FILE).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in files}
        with open(tmp / MANIFEST_FILE, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def verify_checkpoint(folder: str | Path, check_hashes: bool = True) -> dict[str, Any]:
    """Check the folder against its manifest; returns the manifest or raises CheckpointError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    mpath = folder / MANIFEST_FILE
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST_FILE}: it is incomplete (torn write?)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST_FILE} is unreadable ({exc})") from exc
    for name, want in manifest.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder}: {name} is missing")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(
                f"checkpoint {folder}: {name} has {size} bytes, expected {want['bytes']} (truncated?)"
            )
        if check_hashes and _sha256(path) != want["sha256"]:
            raise CheckpointError(f"checkpoint {folder}: {name} does not match its sha256 (corrupt)")
    return manifest


def load_config(folder: str | Path) -> tuple[MiniMindConfig, dict[str, Any]]:
    """(model config, full config.json payload) of a checkpoint folder."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {CONFIG_FILE}")
    payload = json.loads(path.read_text())
    return MiniMindConfig.from_dict(payload["model"]), payload


def load_model_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """model.safetensors as a state dict, with the tied head restored from the embedding."""
    sd = load_file(str(Path(folder) / MODEL_FILE))
    if TIED_KEY not in sd and "model.embed_tokens.weight" in sd:
        sd[TIED_KEY] = sd["model.embed_tokens.weight"]
    return sd


def load_model_weights(model: torch.nn.Module, folder: str | Path, strict: bool = True) -> None:
    """Load model.safetensors into model."""
    model.load_state_dict(load_model_state(folder), strict=strict)


def load_train_state(folder: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {STATE_FILE}: it cannot be resumed from")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_model(folder: str | Path, ops=None, device: str | torch.device = "cpu", verify: bool = True):
    """Build a MiniMind from a checkpoint folder: returns (model, config, payload)."""
    from minimind_fast.model import MiniMind

    if verify:
        verify_checkpoint(folder)
    config, payload = load_config(folder)
    model = MiniMind(config, ops=ops)
    load_model_weights(model, folder)
    return model.to(device), config, payload


def load_minimind_pth(model: torch.nn.Module, path: str | Path) -> None:
    """Load a MiniMind2 .pth state dict (plain tensors under HF-Llama names, fp16) with weights_only=True."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if TIED_KEY not in sd and "model.embed_tokens.weight" in sd:
        sd[TIED_KEY] = sd["model.embed_tokens.weight"]
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
