"""Checkpoints: one folder per checkpoint, written atomically, verified on load, never unpickling code.

A checkpoint folder holds
  model.safetensors       the weights under HF-Llama names (the tied lm_head.weight is stored once, as the embedding)
  config.json             {"model": MiniMindConfig fields, "args": the run's arguments, "meta": free-form,
                          "tokenizer": {"fingerprint", "vocab_size"} of the tokenizer saved with it}
  tokenizer.json, tokenizer_config.json
  train_state.pt          optional: optimizer, step, RNG, data position (plain tensors and containers; loaded with
                          torch.load(weights_only=True), so it cannot execute code)
  manifest.json           size and sha256 of every other file, written last: a folder without it, or whose files
                          do not match it, is torn or corrupt and is refused with a clear message. A full
                          verification also refuses NaN/inf weights, naming the first bad tensor.

Writing, and what a kill at any point leaves behind:
  1. the files go into a temporary sibling `.{name}.tmp-{host}-{pid}-{tag}`; the manifest is written last.
     Killed here: the old folder is untouched; the temporary one is a leftover.
  2. a new folder is renamed into place; an existing one is swapped with the temporary one in one atomic step
     (Linux renameat2 RENAME_EXCHANGE), and the old contents, now under the temporary name, are deleted.
     Killed between swap and delete: the new folder is in place; the old contents are a leftover.
  Where the exchange is not supported (other kernels or file systems) the swap is two renames: the old folder to
  `.{name}.old-{host}-{pid}-{tag}`, then the new one into place. Killed between those two renames, no folder
  has the final name: the next save or load of that name recovers it (the new folder when its copy is complete,
  else the old one).
Leftovers are deleted by the next save into the same parent folder, but only those whose writer is gone: a
process on this host that no longer exists, or this process itself when the write is not in progress. Folders
written by another host (a shared file system) are left alone: whether their writer lives cannot be told here.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minimind_fast.config import PRESETS, ConfigError, MiniMindConfig

MODEL_FILE, CONFIG_FILE, STATE_FILE, MANIFEST_FILE = (
    "model.safetensors",
    "config.json",
    "train_state.pt",
    "manifest.json",
)
TIED_KEY = "lm_head.weight"

# The writer of a temporary folder is named in it, so a later save can tell a dead writer's leftovers from a live
# one's work in progress. Host names lose their dashes: the dash separates the fields.
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "localhost"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})$")
_LEGACY_OLD = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")  # the aside folder of the first version of this file
_ACTIVE: set[str] = set()  # tags of this process's writes in progress: its own temporary folders that are not leftovers


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, torn or corrupt."""


class StateDictError(ValueError):
    """A state dict that is not a MiniMind model's (read off its names and shapes)."""


EMBED_KEY = "model.embed_tokens.weight"


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


# ----------------------------------------------------------------------------------------------- atomic folder writes
def _sibling(folder: Path, kind: str, tag: str) -> Path:
    return folder.with_name(f".{folder.name}.{kind}-{_HOST}-{os.getpid()}-{tag}")


def _writer_gone(host: str, pid: int, tag: str | None) -> bool:
    """Whether the process that made a temporary folder can no longer be writing to it."""
    if host != _HOST:
        return False
    if pid == os.getpid():
        return tag not in _ACTIVE
    if os.name == "nt":  # there os.kill(pid, 0) sends CTRL_C_EVENT instead of probing: never judge another process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _leftovers(parent: Path) -> list[tuple[Path, str, str, str | None]]:
    """(path, final name, kind, tag) of the temporary folders in parent whose writer is gone."""
    out = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return out
    for p in entries:
        m = _TEMP.match(p.name)
        if m and _writer_gone(m["host"], int(m["pid"]), m["tag"]):
            out.append((p, m["name"], m["kind"], m["tag"]))
            continue
        m = _LEGACY_OLD.match(p.name)
        if m and _writer_gone(_HOST, int(m["pid"]), None):  # these names carry no host: taken to be this one
            out.append((p, m["name"], "old", None))
    return out


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100  # from linux/fs.h and fcntl.h
_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE, glibc >= 2.28). False where this kernel,
    C library or file system cannot; then nothing has changed."""
    global _renameat2
    if _renameat2 is None:
        fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        _renameat2 = fn or False
    if not _renameat2:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def _fsync_dir(path: Path) -> None:
    """Make a rename durable across a power loss (a process kill needs no fsync); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover(folder: str | Path) -> bool:
    """If a writer was killed between the two renames of the fallback swap, no folder has the final name: put back
    the new folder when its copy is complete (it verifies), else the old one. -> whether a folder was put back."""
    folder = Path(folder)
    if folder.exists():
        return False
    olds = [x for x in _leftovers(folder.parent) if x[1] == folder.name and x[2] == "old"]
    if not olds:
        return False
    old, _, _, tag = max(olds, key=lambda x: x[0].stat().st_mtime_ns)
    new = next((x[0] for x in _leftovers(folder.parent) if x[1] == folder.name and x[2] == "tmp" and x[3] == tag), None)
    if new is not None:
        try:
            verify_checkpoint(new)
        except CheckpointError:
            new = None
    os.replace(new if new is not None else old, folder)
    _fsync_dir(folder.parent)
    return True


def clean_leftovers(parent: str | Path) -> list[Path]:
    """Delete the temporary folders in parent whose writer is gone (see the module docstring), after recovering any
    final folder that a kill between the fallback's two renames left missing. -> the folders deleted."""
    parent = Path(parent)
    for _, name, kind, _ in _leftovers(parent):
        if kind == "old":
            recover(parent / name)
    gone = []
    for p, _, _, _ in _leftovers(parent):
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p)
    return gone


def new_temp_folder(folder: str | Path) -> tuple[Path, str]:
    """A fresh temporary sibling of folder to write into, and its tag (pass both to publish). The tag counts as a
    write in progress until publish or discard."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover(folder)
    clean_leftovers(folder.parent)
    while True:
        tag = secrets.token_hex(4)
        tmp = _sibling(folder, "tmp", tag)
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        _ACTIVE.add(tag)
        return tmp, tag


def discard(tmp: Path, tag: str) -> None:
    """Drop an unfinished temporary folder (the write failed with an exception)."""
    shutil.rmtree(tmp, ignore_errors=True)
    _ACTIVE.discard(tag)


def publish(tmp: Path, folder: str | Path, tag: str) -> Path:
    """Put the complete folder tmp under the name folder, replacing what is there (see the module docstring for
    what every kill point leaves)."""
    folder = Path(folder)
    try:
        if not folder.exists():
            os.replace(tmp, folder)
        elif _exchange(tmp, folder):
            shutil.rmtree(tmp)  # the old contents, now under the temporary name
        else:
            old = _sibling(folder, "old", tag)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        _fsync_dir(folder.parent)
    finally:
        _ACTIVE.discard(tag)
    return folder


def write_manifest(folder: Path) -> dict[str, Any]:
    """manifest.json (size and sha256 of every file in folder), written last and synced to disk."""
    files = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_FILE)
    manifest = {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in files}
    with open(folder / MANIFEST_FILE, "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    return manifest


# ---------------------------------------------------------------------------------------------------- save and verify
def tokenizer_record(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer: the fingerprint of its id -> token table (minimind_fast.data) and its size."""
    from minimind_fast.data import tokenizer_fingerprint

    return {"fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": tokenizer.vocab_size}


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
    """Write a checkpoint folder atomically (temp folder + swap), replacing any previous one at that path.
    state_dict overrides model.state_dict() (e.g. the gathered full state of a sharded model)."""
    tmp, tag = new_temp_folder(folder)
    try:
        sd = model_state_dict(model) if state_dict is None else _plain(state_dict)
        save_file(sd, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        payload = {"model": config.to_dict(), "args": args or {}, "meta": meta or {}}
        if tokenizer is not None:
            payload["tokenizer"] = tokenizer_record(tokenizer)
            tokenizer.save(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        write_manifest(tmp)
    except BaseException:
        discard(tmp, tag)
        raise
    return publish(tmp, folder, tag)


def first_nonfinite(path: str | Path) -> tuple[str, int, int] | None:
    """(name, non-finite count, size) of the first floating-point tensor in a safetensors file holding NaN or inf,
    in the file's order; None when all are finite."""
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if t.is_floating_point():
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    return name, bad, t.numel()
    return None


def verify_checkpoint(
    folder: str | Path, check_hashes: bool = True, check_finite: bool | None = None
) -> dict[str, Any]:
    """Check the folder against its manifest and, with check_finite (default: as check_hashes), that its weights
    are finite; returns the manifest or raises CheckpointError. A folder missing because its writer was killed
    mid-swap is recovered first (see recover)."""
    folder = Path(folder)
    if not folder.is_dir():
        try:
            recover(folder)
        except OSError:
            pass
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
    if check_hashes if check_finite is None else check_finite:
        for name in sorted(n for n in manifest if n.endswith(".safetensors")):
            bad = first_nonfinite(folder / name)
            if bad is not None:
                raise CheckpointError(
                    f"checkpoint {folder}: {name} holds non-finite weights (first: {bad[0]}, {bad[1]} of {bad[2]} "
                    "values NaN/inf)"
                )
    return manifest


def load_config(folder: str | Path) -> tuple[MiniMindConfig, dict[str, Any]]:
    """(model config, full config.json payload) of a checkpoint folder."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {CONFIG_FILE}")
    payload = json.loads(path.read_text())
    return MiniMindConfig.from_dict(payload["model"]), payload


def saved_tokenizer(folder: str | Path) -> dict[str, Any] | None:
    """The tokenizer record ({"fingerprint", "vocab_size"}) of the tokenizer a checkpoint folder was saved with:
    from config.json, or computed from its tokenizer.json for folders written before it was recorded; None when the
    folder holds no tokenizer."""
    folder = Path(folder)
    try:
        rec = json.loads((folder / CONFIG_FILE).read_text()).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        rec = None
    if isinstance(rec, dict) and "fingerprint" in rec:
        return rec
    if not (folder / "tokenizer.json").is_file():
        return None
    from minimind_fast.tokenizer import Tokenizer

    return tokenizer_record(Tokenizer.load(folder))


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


# ------------------------------------------------------------------------------------- MiniMind .pth state dicts
def clean_state_keys(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A state dict's keys without DDP ("module.") and torch.compile ("_orig_mod.") prefixes; every value a tensor."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        k = k.replace("._orig_mod.", ".")
        if not isinstance(v, torch.Tensor):
            raise StateDictError(f"entry {k!r} is a {type(v).__name__}, not a tensor: this is not a state dict")
        out[k] = v
    return out


def infer_config(
    sd: dict[str, torch.Tensor],
    num_attention_heads: int | None = None,
    num_experts_per_tok: int | None = None,
    **overrides: Any,
) -> MiniMindConfig:
    """A MiniMind state dict's config, read off its tensor shapes.

    MiniMind2 (no q_norm): query heads cannot be read off the shapes (default 8, every MiniMind2 model), nor top-k
    (default 2). MiniMind-3 (self_attn.q_norm.weight present): head_dim is the q_norm length, so the query heads are
    read off q_proj; its other fields are MiniMind-3's (eps 1e-6, QK-norm; MoE top-1 by default, no shared expert,
    the batch-level balance loss, the single weight renormalised)."""
    if EMBED_KEY not in sd:
        if any("lora_A" in k or "lora_B" in k for k in sd):
            raise StateDictError("this is a LoRA adapter, not a full model: merge it with a base model first")
        raise StateDictError(f"no {EMBED_KEY}: not a MiniMind state dict (first keys: {list(sd)[:3]})")
    vocab, hidden = sd[EMBED_KEY].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k)))
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    k = sd["model.layers.0.self_attn.k_proj.weight"]
    q_norm = sd.get("model.layers.0.self_attn.q_norm.weight")
    if q_norm is not None:  # MiniMind-3
        head_dim = q_norm.shape[0]
        if q.shape[0] % head_dim or k.shape[0] % head_dim:
            raise StateDictError(
                f"q_proj/k_proj rows {q.shape[0]}/{k.shape[0]} are not multiples of head_dim {head_dim}"
            )
        heads = q.shape[0] // head_dim
        if num_attention_heads not in (None, heads):
            raise StateDictError(f"q_proj holds {heads} heads of {head_dim}, not {num_attention_heads}")
        sizes = ("hidden_size", "num_hidden_layers")
        fields: dict[str, Any] = {f: v for f, v in PRESETS["m3"].items() if f not in sizes}
        fields.update(head_dim=head_dim, num_attention_heads=heads)
        top_k = num_experts_per_tok or 1
    else:
        heads = num_attention_heads or 8
        if q.shape[0] != hidden or hidden % heads:
            raise StateDictError(
                f"q_proj has {q.shape[0]} rows for hidden size {hidden}: MiniMind needs heads * head_dim == hidden "
                f"with {heads} heads (--num_attention_heads)"
            )
        head_dim = hidden // heads
        fields = {"num_attention_heads": heads}
        top_k = num_experts_per_tok or 2
    fields.update(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_key_value_heads=k.shape[0] // head_dim,
    )
    if "model.layers.0.mlp.gate.weight" in sd:
        fields.update(
            use_moe=True,
            n_routed_experts=sd["model.layers.0.mlp.gate.weight"].shape[0],
            n_shared_experts=sum(1 for key in sd if re.match(r"model\.layers\.0\.mlp\.shared_experts\.\d+\.up_", key)),
            intermediate_size=sd["model.layers.0.mlp.experts.0.gate_proj.weight"].shape[0],
            num_experts_per_tok=top_k,
        )
    else:
        fields["intermediate_size"] = sd["model.layers.0.mlp.gate_proj.weight"].shape[0]
    try:
        return MiniMindConfig(**{**fields, **overrides})
    except ConfigError as exc:
        raise StateDictError(f"the inferred config is not valid: {exc}") from exc
