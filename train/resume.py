"""Checkpoints and resume: where a run's resume checkpoints go and which ones pruning may delete, the run identity
that --from_resume must match, saving a step and restoring a run, the RNG state, and the tokenizer check."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from minimind_fast import checkpoint as ckpt
from minimind_fast.config import MiniMindConfig
from minimind_fast.model import MiniMind
from minimind_fast.tokenizer import Tokenizer
from train import checks
from train.runtime import Runtime, barrier, full_state, load_full_state

if TYPE_CHECKING:
    from train.args import RunArgs


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


def stage_name(args: RunArgs) -> str:
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


def run_identity(args: RunArgs, config: MiniMindConfig, tokenizer: Tokenizer, rows_per_step: int) -> dict[str, Any]:
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


def _run_record(args: RunArgs, identity: dict[str, Any], instance: str, rt: Runtime) -> dict[str, Any]:
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
    args: RunArgs,
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
    args: RunArgs,
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


def check_tokenizer(args: RunArgs, tokenizer: Tokenizer, config: MiniMindConfig, start: str | None) -> None:
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


def _pick_resume(rdir: Path, now: dict[str, Any], args: RunArgs, rt: Runtime) -> tuple[Path, dict[str, Any], dict]:
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
    args: RunArgs,
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
