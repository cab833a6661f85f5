"""What a stage trains and reads: the tokenizer, the model config, its start weights (a checkpoint folder or a
MiniMind .pth), frozen reference/teacher copies, and the data set."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import minimind_kernels as kernels
from minimind_fast import checkpoint as ckpt
from minimind_fast.config import MiniMindConfig, from_preset
from minimind_fast.lora import arch_of
from minimind_fast.model import MiniMind
from minimind_fast.tokenizer import Tokenizer
from train import checks

if TYPE_CHECKING:
    from train.args import RunArgs
    from train.runtime import Runtime


# ---------------------------------------------------------------------------------- tokenizer, config and start weights
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


# ------------------------------------------------------------------------------------ post-training start points (SFT+)
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


def open_dataset(cls: type, args: RunArgs, tokenizer: Tokenizer, rt: Runtime) -> Any:
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
