"""Every setting of a training stage, checked before any work is done.

train/args.py parse_args calls check_args(args, stage) on the parsed flags of every stage (pretrain, sft, lora, dpo,
distill, distill_reason, ppo, grpo, spo), before a device is set up, a folder created or a model loaded. A bad setting
ends the run with exactly one line on stderr and exit status 2, and no traceback:

    error: --batch_size -4: a micro-batch needs at least one row (accepted: an integer >= 1)

The rules, in the order they are applied:
  RULES / STAGE_RULES   one rule per numeric or choice flag (range, nan/inf, unknown choice); STAGE_RULES holds a
                        stage's own meaning of a shared name (DPO's --beta is not the RL stages' --beta);
  _check_machine        --device (CUDA present? that many GPUs?), --kernels (the spec parses and can run here),
                        --fsdp (under torchrun; never for LoRA), --wandb / --swanlab (package installed);
  _check_combinations   flags that constrain each other (SPO's rho and reward range, a fresh distillation student, the
                        RL reward spec and its model folder);
  _check_files          --out_dir, --save_weight, --data_path, --world (GRPO --agent 1), --tokenizer and the model
                        files (--from_weight, --teacher: a checkpoint folder or a .pth whose tensor shapes fit the
                        model that will be built, read from safetensors headers / a memory-mapped weights-only load,
                        never whole), and the limits a model sets (--max_seq_len against its rotary table,
                        --lora_rank against its width, --lora_targets against its layers). Whether a tokenizer fits
                        the model is resume.check_tokenizer's to say.
Problems that only the data shows (a bad line, a conversation cut before its answer) are found when the data set is
loaded: report_dataset and data_error use the same one-line, exit-status-2 form (`error: path:lineno: ...`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.overrides import TorchFunctionMode

import minimind_kernels as kernels
from minimind_fast import checkpoint as ckpt
from minimind_fast.config import PRESETS, ConfigError, MiniMindConfig, from_preset

RL_STAGES = ("ppo", "grpo", "spo")
MODEL_SOURCE = "a checkpoint folder (with config.json) or a MiniMind .pth state dict"


class SettingError(SystemExit):
    """A bad setting or bad input: exit status 2 (the Unix usage-error status argparse also uses). str() is the
    message, so `pytest.raises(SystemExit, match=...)` reads it; it has already been printed to stderr."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message: str) -> NoReturn:
    """Print `message` (one line, starting with "error: ") to stderr and exit with status 2."""
    message = " ".join(message.split())  # one line, whatever the pieces held
    print(message, file=sys.stderr, flush=True)
    raise SettingError(message)


def show(value: Any) -> str:
    """A flag's value as the user would have typed it."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    if value == "":
        return "''"
    return str(value)


def bad(flag: str, value: Any, why: str, accepted: str) -> NoReturn:
    fail(f"error: --{flag} {show(value)}: {why} (accepted: {accepted})")


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (unpickling errors run to a page), at most 160 characters."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 160 else first[:157] + "..."


# ---------------------------------------------------------------------------------------------------------- the rules
@dataclass(frozen=True)
class Num:
    """A finite number in a range; why says what goes wrong outside it."""

    why: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def check(self, flag: str, v: float) -> None:
        if isinstance(v, float) and math.isnan(v):
            bad(flag, v, "not a number", self.accepted())
        if isinstance(v, float) and math.isinf(v):
            bad(flag, v, "not a finite number", self.accepted())
        low = self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
        high = self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)
        if low or high:
            bad(flag, v, self.why, self.accepted())

    def accepted(self) -> str:
        kind = "an integer" if self.integer else "a number"
        lo, hi = (None if b is None else str(int(b)) if self.integer else f"{b:g}" for b in (self.lo, self.hi))
        if lo is not None and hi is not None:
            return f"{kind} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {lo}"
        if hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {hi}"
        return f"a finite {kind.split()[-1]}"


def Int(lo: int, why: str, hi: int | None = None) -> Num:  # noqa: N802 (reads like a type in the tables below)
    return Num(why, lo=lo, hi=hi, integer=True)


@dataclass(frozen=True)
class OneOf:
    values: tuple
    why: str

    def check(self, flag: str, v: Any) -> None:
        if v not in self.values:
            bad(flag, v, self.why, ", ".join(show(x) for x in self.values))


SWITCH = OneOf((0, 1), "a switch is 0 or 1")
LEARNING_RATE = Num("AdamW needs a positive step size, and one above 1 overshoots on every update", 0, 1, lo_open=True)
PROBABILITY_OPEN = dict(lo=0, hi=1, lo_open=True, hi_open=True)

# One rule per numeric / choice flag, by flag name, for every stage that has the flag.
RULES: dict[str, Num | OneOf] = {
    # StageArgs (train/args.py)
    "from_resume": SWITCH,
    "accumulation_steps": Int(1, "an optimizer step needs at least one micro-batch"),
    "warmup_steps": Int(0, "a number of steps cannot be negative"),
    "weight_decay": Num("a negative decay pushes the weights away from zero", lo=0),
    "grad_clip": Num("a gradient-norm limit cannot be negative (0 turns clipping off)", lo=0),
    "max_steps": Int(0, "a number of steps cannot be negative (0 runs every epoch)"),
    "dtype": OneOf(("auto", "bfloat16", "float32"), "--dtype must be one of these (fp16 would need loss scaling)"),
    "dist_timeout": Num("ranks need some time to answer each other", lo=0, lo_open=True),
    "max_bad_steps": Int(1, "the run stops after this many non-finite steps in a row, so at least 1"),
    "log_interval": Int(1, "a log line every N optimizer steps needs N >= 1"),
    "save_interval": Int(1, "a checkpoint every N optimizer steps needs N >= 1"),
    "keep_last": Int(1, "at least the newest resume checkpoint must be kept to resume from"),
    "seed": Int(0, "seeds are unsigned 32-bit integers", hi=2**32 - 1),
    # data, batch and schedule
    "epochs": Int(1, "a run needs at least one pass over the data"),
    "batch_size": Int(1, "a micro-batch needs at least one row"),
    "learning_rate": LEARNING_RATE,
    "max_seq_len": Int(2, "a row needs two tokens for one next-token prediction"),
    # model
    "preset": OneOf(tuple(PRESETS), "unknown preset"),
    "use_moe": SWITCH,
    "aux_loss_alpha": Num("a negative balance loss rewards unbalanced experts", lo=0),
    # LoRA
    "lora_rank": Int(1, "an adapter needs rank 1 or more"),
    "lora_alpha": Num("the update is scaled by alpha / rank, so alpha must be positive", lo=0, lo_open=True),
    # DPO
    "eval_fraction": Num("a held-out fraction must leave pairs to train on", lo=0, hi=1, hi_open=True),
    "eval_max_pairs": Int(0, "a number of pairs cannot be negative"),
    # distillation
    "student_preset": OneOf(tuple(PRESETS), "unknown preset"),
    "hidden_size": Int(0, "a width cannot be negative (0 keeps the preset's)"),
    "num_hidden_layers": Int(0, "a depth cannot be negative (0 keeps the preset's)"),
    "alpha": Num("alpha weighs the cross-entropy and 1 - alpha the KL term, so it lies in [0, 1]", lo=0, hi=1),
    "kl_chunk": Int(1, "the KL is computed over chunks of at least one token"),
    "tag_weight": Num("a tag token's loss weight must be positive", lo=0, lo_open=True),
    # RL (ppo, grpo, spo)
    "reward_batch_size": Int(1, "the reward model scores at least one text per forward"),
    "reasoning": SWITCH,
    "max_gen_len": Int(1, "a completion needs at least one new token"),
    "top_p": Num("nucleus sampling keeps a probability mass in (0, 1]", lo=0, hi=1, lo_open=True),
    "forward_batch": Int(0, "a number of rows cannot be negative (0 = the whole rollout at once)"),
    "num_generations": Int(2, "advantages are relative to the group's mean, so a group needs at least 2 samples"),
    "num_iterations": Int(1, "each rollout needs at least one update"),
    "epsilon": Num("the ratio clip [1 - eps, 1 + eps] needs 0 < eps < 1", **PROBABILITY_OPEN),
    "adv_eps": Num("it keeps (r - mean) / (std + eps) finite when a group's rewards are equal", lo=0, lo_open=True),
    "critic_learning_rate": LEARNING_RATE,
    "clip_epsilon": Num("the ratio clip [1 - eps, 1 + eps] needs 0 < eps < 1", **PROBABILITY_OPEN),
    "cliprange_value": Num("the value clip needs a positive range", lo=0, lo_open=True),
    "vf_coef": Num("the critic learns only through the value loss, so its weight must be positive", lo=0, lo_open=True),
    "kl_coef": Num("a negative KL penalty rewards drifting from the reference", lo=0),
    "gamma": Num("a discount factor lies in [0, 1]", lo=0, hi=1),
    "lam": Num("GAE's lambda lies in [0, 1]", lo=0, hi=1),
    "ppo_epochs": Int(1, "each rollout needs at least one pass"),
    "mini_batch_size": Int(1, "a minibatch needs at least one row"),
    "early_stop_kl": Num("a KL threshold must be positive", lo=0, lo_open=True),
    "whiten_advantages": SWITCH,
    "adv_clip": Num("advantages are clamped to +-adv_clip, so it must be positive", lo=0, lo_open=True),
    "d_half": Num("the log-prob change that halves the tracker's memory must be positive", lo=0, lo_open=True),
    "rho_min": Num("a forgetting factor lies in (0, 1)", **PROBABILITY_OPEN),
    "rho_max": Num("a forgetting factor lies in (0, 1)", **PROBABILITY_OPEN),
    "rho_first": Num("a forgetting factor lies in (0, 1)", **PROBABILITY_OPEN),
    "reward_min": Num("a reward bound must be a finite number"),
    "reward_max": Num("a reward bound must be a finite number"),
}

_RL_RULES: dict[str, Num | OneOf] = {
    "max_seq_len": Int(1, "the prompt keeps at least its last token"),
    "temperature": Num("sampling needs a positive temperature", lo=0, lo_open=True),
    "beta": Num("a negative KL coefficient rewards drifting from the reference (0 = no KL term)", lo=0),
}
# A flag whose meaning (and so its range) depends on the stage.
STAGE_RULES: dict[str, dict[str, Num | OneOf]] = {
    "dpo": {
        "beta": Num(
            "DPO's beta scales the preference margin: 0 or less gives no or a reversed signal", lo=0, lo_open=True
        )
    },
    "distill": {"temperature": Num("the softmax temperature T must be positive", lo=0, lo_open=True)},
    **{stage: _RL_RULES for stage in RL_STAGES},
}
STAGE_RULES["grpo"] = {
    **_RL_RULES,
    "loss_type": OneOf(("grpo", "cispo"), "unknown policy loss"),
    "epsilon_high": Num(
        "CISPO clamps the importance weight at epsilon_high, above the on-policy weight 1", lo=1, lo_open=True
    ),
    "agent": SWITCH,
    "max_turns": Int(1, "a rollout needs at least one model turn to answer in"),
}

# Flags checked by the functions below rather than by a table rule (booleans need none: argparse parses them).
SPECIAL = {
    "out_dir",
    "save_weight",
    "data_path",
    "tokenizer",
    "from_weight",
    "teacher",
    "device",
    "kernels",
    "fsdp",
    "wandb",
    "swanlab",
    "reward",
    "reward_model_path",
    "lora_targets",
    "tags",
    "world",
    "rollout_backend",  # rollout.open_backend: the spec is parsed before any rollout, a bad one stops the run
}


def rule_for(stage: str, flag: str) -> Num | OneOf | None:
    return STAGE_RULES.get(stage, {}).get(flag) or RULES.get(flag)


# -------------------------------------------------------------------------------------------------------- entry point
def check_args(args: Any, stage: str) -> None:
    """Check every flag of a stage's parsed Args (None = a machine-dependent default, filled later: always valid).
    stage is the script's name (pretrain, sft, ..., spo). Returns quietly or exits with status 2 (see fail)."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        rule = rule_for(stage, f.name)
        if value is not None and rule is not None:
            rule.check(f.name, value)
    _check_machine(args, stage)
    _check_combinations(args, stage)
    _check_files(args, stage)


def _on_cuda(args: Any) -> bool:
    return args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())


def _check_machine(args: Any, stage: str) -> None:
    device = args.device
    if device not in ("auto", "cpu"):
        m = re.fullmatch(r"cuda(?::(\d+))?", device)
        if m is None:
            bad("device", device, "unknown device", "auto, cpu, cuda, cuda:N")
        if not torch.cuda.is_available():
            bad("device", device, "CUDA is not available on this machine", "auto, cpu")
        n = torch.cuda.device_count()
        if m.group(1) is not None and int(m.group(1)) >= n:
            bad("device", device, f"this machine has {n} CUDA device{'s' * (n != 1)}", f"cuda:0 to cuda:{n - 1}")
    try:
        kernels.resolve(args.kernels)
    except kernels.KernelSpecError as exc:
        bad(
            "kernels",
            args.kernels,
            one_line(exc),
            "torch, triton, liger or auto, plus overrides like triton,rope=torch",
        )
    if args.fsdp:
        if stage == "lora":
            bad(
                "fsdp",
                1,
                "--fsdp is not supported for LoRA (the adapters are tiny; torchrun without --fsdp runs DDP)",
                "0",
            )
        if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
            bad(
                "fsdp",
                1,
                "FSDP2 shards over the ranks of a process group, and this process was not started by torchrun",
                "0, or 1 under torchrun --nproc_per_node N",
            )
    for tracker in ("wandb", "swanlab"):
        if getattr(args, tracker) and importlib.util.find_spec(tracker) is None:
            bad(tracker, 1, f"the {tracker} package is not installed (pip install {tracker})", "0, or 1 once installed")


def _check_combinations(args: Any, stage: str) -> None:
    if stage in RL_STAGES:
        from train import rewards

        try:
            kinds = rewards.parse_reward_spec(args.reward)
        except rewards.RewardError as exc:
            bad("reward", args.reward, one_line(exc), "rule, shaping, model joined by '+', e.g. rule+shaping")
        path = args.reward_model_path
        if "model" in kinds:
            if path in ("", "none"):
                bad(
                    "reward_model_path",
                    path,
                    f"--reward {args.reward} scores replies with a reward model",
                    "a local HF sequence-classification model folder",
                )
            if not (Path(path) / "config.json").is_file():
                bad(
                    "reward_model_path",
                    path,
                    "not a folder with a config.json (a saved HF model)",
                    "a local HF sequence-classification model folder",
                )
        elif path not in ("", "none"):
            bad(
                "reward_model_path",
                path,
                f"--reward {args.reward} has no 'model' kind, so the folder would be ignored",
                "none, or add +model to --reward",
            )
        if stage == "spo":
            lo, hi = rewards.reward_range(kinds, bool(args.reasoning))
            lo = lo if args.reward_min is None else args.reward_min
            hi = hi if args.reward_max is None else args.reward_max
            if not hi > lo:
                bad(
                    "reward_max",
                    hi,
                    f"the tracker maps rewards from --reward_min {show(lo)} up to --reward_max, which must be higher",
                    f"a number > {show(lo)}",
                )
            if args.rho_min > args.rho_max:
                bad(
                    "rho_min",
                    args.rho_min,
                    f"the lowest forgetting factor is above --rho_max {show(args.rho_max)}",
                    f"a number in (0, {show(args.rho_max)}]",
                )
    if stage == "distill":
        sizes = {k: getattr(args, k) for k in ("hidden_size", "num_hidden_layers") if getattr(args, k) > 0}
        if args.student_preset is None and sizes:
            flag = next(iter(sizes))
            bad(
                flag,
                sizes[flag],
                "only used with --student_preset (a student from --from_weight keeps its shape)",
                "0 without --student_preset",
            )
        if args.student_preset is not None and sizes:
            try:
                from_preset(args.student_preset, **sizes)
            except ConfigError as exc:
                flag = next(iter(sizes))
                bad(
                    flag,
                    sizes[flag],
                    f"no valid {args.student_preset} student: {one_line(exc)}",
                    f"a {flag} that fits the preset's heads",
                )
    if stage == "distill_reason" and not [t for t in args.tags.split(",") if t]:
        bad("tags", args.tags, "no tag to weight", "comma-separated tag strings, e.g. <think>,</think>")


# -------------------------------------------------------------------------------------------------------------- files
def _check_files(args: Any, stage: str) -> None:
    _check_out_dir(args)
    _check_data_path(args)
    if getattr(args, "agent", 0) and args.world.lower() != "none":  # GRPO's agentic mode reads its lookup world
        from minimind_fast.toolcall import WorldError, load_world

        try:
            load_world(args.world)
        except WorldError as exc:
            bad("world", args.world, one_line(exc), 'a world JSON file ({"world": ..., "people": [...]}), or none')
    if args.tokenizer is not None:  # that it fits the model is resume.check_tokenizer's to say
        from minimind_fast.tokenizer import Tokenizer, TokenizerError

        try:
            Tokenizer.load(args.tokenizer)
        except (TokenizerError, OSError) as exc:
            bad("tokenizer", args.tokenizer, one_line(exc), "a folder holding tokenizer.json, or the file itself")

    model_cfg = None  # the config of the model this stage trains, when the checks can know it
    if stage == "pretrain":
        try:
            want = from_preset(_effective(args, "preset"), **({"use_moe": True} if args.use_moe else {}))
        except ConfigError as exc:
            bad("use_moe", args.use_moe, one_line(exc), "0, or 1 on a preset whose width fits experts")
        if args.from_weight not in ("", "none"):
            what = f"--preset {_effective(args, 'preset')}" + (" --use_moe 1" if args.use_moe else "")
            _model_source("from_weight", args.from_weight, want, what)
        model_cfg = want
    elif stage == "distill" and args.student_preset is not None:
        sizes = {k: getattr(args, k) for k in ("hidden_size", "num_hidden_layers") if getattr(args, k) > 0}
        model_cfg = from_preset(args.student_preset, **sizes)
    elif args.from_weight is not None:  # None: the stage picks its default start itself (e.g. sft's)
        if args.from_weight in ("", "none"):
            bad("from_weight", args.from_weight, f"{stage} fine-tunes a trained model", MODEL_SOURCE)
        model_cfg = _model_source("from_weight", args.from_weight)
    if stage == "distill":
        teacher = _model_source("teacher", args.teacher)
        if model_cfg is not None and teacher.vocab_size != model_cfg.vocab_size:
            bad(
                "teacher",
                args.teacher,
                f"student vocab {model_cfg.vocab_size} != teacher vocab "
                f"{teacher.vocab_size}: distillation compares the two distributions token by token",
                "a teacher with the student's tokenizer",
            )
    if model_cfg is not None:
        _check_model_limits(args, stage, model_cfg)


def _effective(args: Any, name: str) -> Any:
    """A flag's value, or the machine-dependent default the stage's _AUTO table will give it."""
    value = getattr(args, name)
    if value is not None:
        return value
    auto = getattr(sys.modules.get(type(args).__module__), "_AUTO", {})
    cpu, cuda = auto[name]
    return cuda if _on_cuda(args) else cpu


def _check_out_dir(args: Any) -> None:
    accepted = "a folder path (created if missing)"
    out = args.out_dir
    if not out:
        bad("out_dir", out, "empty", accepted)
    p = Path(out).absolute()
    if p.exists() and not p.is_dir():
        bad("out_dir", out, "is a file, not a folder", accepted)
    ancestor = next(a for a in [p, *p.parents] if a.exists())
    if not ancestor.is_dir():
        bad("out_dir", out, f"{ancestor} is a file, so the folder cannot be created under it", accepted)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        bad("out_dir", out, f"{ancestor} is not writable", accepted)
    name = args.save_weight
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        bad("save_weight", name, "not a plain folder name", "a name like full_sft (no path separators)")
    target = Path(out) / name
    if target.exists() and not target.is_dir():
        bad("save_weight", name, f"{target} is a file, where the checkpoint folder goes", "a name not taken by a file")


def _check_data_path(args: Any) -> None:
    path = Path(args.data_path)
    accepted = "a JSONL file" + (" or a .bin token file from tools/prepare_data.py" if hasattr(args, "preset") else "")
    if not path.exists():
        bad("data_path", args.data_path, "does not exist", accepted)
    if path.is_dir():
        bad("data_path", args.data_path, "is a directory", accepted)
    if not os.access(path, os.R_OK):
        bad("data_path", args.data_path, "is not readable", accepted)


def _check_model_limits(args: Any, stage: str, cfg: MiniMindConfig) -> None:
    positions = cfg.max_position_embeddings
    seq = args.max_seq_len
    if seq is not None and seq > positions:
        bad(
            "max_seq_len",
            seq,
            f"exceeds the rotary table ({positions} positions); YaRN scaling is an inference-time "
            "switch, not for training",
            f"an integer in [{RULES['max_seq_len'].lo:g}, {positions}]",
        )
    if stage in RL_STAGES and args.max_gen_len is not None and seq + args.max_gen_len > positions:
        bad(
            "max_gen_len",
            args.max_gen_len,
            f"prompt ({seq}) + completion exceeds the rotary table ({positions} positions)",
            f"an integer in [1, {positions - seq}]",
        )
    if stage == "lora":
        from minimind_fast import lora

        try:  # the adapters' own selection rule, run on the model's layer names
            lora.select_targets(_skeleton(cfg.to_json()), args.lora_targets)
        except lora.AdapterError as exc:
            bad(
                "lora_targets",
                args.lora_targets,
                one_line(exc),
                "square, all-linear, or layer names like q_proj,v_proj",
            )
    if stage == "lora" and args.lora_rank > cfg.hidden_size:
        bad(
            "lora_rank",
            args.lora_rank,
            f"above the model's width ({cfg.hidden_size}): B @ A cannot have a higher rank than the layer",
            f"an integer in [1, {cfg.hidden_size}]",
        )


# ------------------------------------------------------------------------------------------------------- model files
def _model_source(flag: str, value: str, want: MiniMindConfig | None = None, what: str = "") -> MiniMindConfig:
    """Check a --from_weight / --teacher: a checkpoint folder or a .pth whose tensors fit `want` (the configured
    model, `what` in words), or, without want, the model the file describes. -> the config of the model."""
    p = Path(value)
    if not p.exists():
        bad(flag, value, "does not exist", MODEL_SOURCE)
    if p.is_dir():
        cfg = _folder_config(flag, value)
        shapes = _safetensors_shapes(flag, value)
    elif p.suffix == ".pth":
        shapes, cfg = _pth_shapes(flag, value, want)
    else:
        bad(flag, value, "is a file but not a .pth state dict", MODEL_SOURCE)
    target = want or cfg
    what = what or ("its config.json" if p.is_dir() else "the config read off its shapes")
    _compare_shapes(flag, value, shapes, expected_shapes(target), what)
    return target


def _folder_config(flag: str, value: str) -> MiniMindConfig:
    if not (Path(value) / ckpt.CONFIG_FILE).is_file():
        bad(flag, value, f"a folder without {ckpt.CONFIG_FILE}, so not a checkpoint", MODEL_SOURCE)
    try:
        ckpt.verify_checkpoint(value, check_hashes=False)  # sizes only here; loading verifies the hashes
        cfg, _ = ckpt.load_config(value)
    except (ckpt.CheckpointError, ConfigError, ValueError, KeyError, TypeError) as exc:
        bad(flag, value, f"not a usable checkpoint: {one_line(exc)}", MODEL_SOURCE)
    return cfg


def _safetensors_shapes(flag: str, value: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    path = Path(value) / ckpt.MODEL_FILE
    if not path.is_file():
        bad(flag, value, f"the checkpoint has no {ckpt.MODEL_FILE}", MODEL_SOURCE)
    try:  # the header alone: no tensor is read
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        bad(flag, value, f"{ckpt.MODEL_FILE} is unreadable ({one_line(exc)})", MODEL_SOURCE)


def _pth_shapes(
    flag: str, value: str, want: MiniMindConfig | None
) -> tuple[dict[str, tuple[int, ...]], MiniMindConfig]:
    """Shapes of a .pth state dict, loaded weights-only (no code runs) and memory-mapped (no tensor data is read),
    and its config: want, or the one read off its shapes."""
    if Path(value).stat().st_size == 0:
        bad(flag, value, "is an empty file", MODEL_SOURCE)
    try:
        try:
            sd = torch.load(value, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files from torch.save(_use_new_zipfile_serialization=False) cannot be mapped
            sd = torch.load(value, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling fails in many types, all meaning "not a plain state dict"
        # torch's weights-only message is a page of advice; the reason is the line after "WeightsUnpickler error:".
        why = re.search(r"WeightsUnpickler error:\s*([^\n]+?\.?)(?:\s+Please|\n|$)", str(exc))
        bad(
            flag,
            value,
            f"not a weights-only PyTorch state dict ({why.group(1) if why else one_line(exc)})",
            MODEL_SOURCE,
        )
    try:  # DDP ("module.") and torch.compile ("_orig_mod.") prefixes dropped, as when the .pth is loaded
        if not isinstance(sd, dict):
            raise ckpt.StateDictError("not a dict")
        sd = ckpt.clean_state_keys(sd)
    except ckpt.StateDictError:
        bad(flag, value, f"holds a {type(sd).__name__}, not a state dict of tensors", MODEL_SOURCE)
    if want is not None:
        return {k: tuple(v.shape) for k, v in sd.items()}, want
    try:
        cfg = ckpt.infer_config(sd)
    except (ckpt.StateDictError, KeyError, ValueError) as exc:
        bad(flag, value, f"does not describe a MiniMind model: {one_line(exc)}", MODEL_SOURCE)
    return {k: tuple(v.shape) for k, v in sd.items()}, cfg


class _NoInit(TorchFunctionMode):
    """Skips the in-place init calls of modules being built: only their shapes are wanted, and on the meta device
    normal_ goes through torch's Python references, whose first use imports torch._dynamo (seconds)."""

    SKIPPED = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_", "fill_")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.SKIPPED:
            return kwargs.get("tensor", args[0] if args else None)
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=8)
def _skeleton(cfg_json: str) -> torch.nn.Module:
    """A MiniMind's modules on the meta device (no memory, no init), under the same names: the decoder and the head.
    MiniMind's own __init__ is not used: its rotary tables are built with ops that are slow on meta, and they are
    non-persistent buffers that no checkpoint holds."""
    from minimind_fast.model import MiniMindModel

    cfg = MiniMindConfig.from_dict(json.loads(cfg_json))
    with torch.device("meta"), _NoInit():
        root = torch.nn.Module()
        root.model = MiniMindModel(cfg, kernels.resolve("torch"))
        root.lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    return root


def expected_shapes(cfg: MiniMindConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor a checkpoint of this config holds (the tied head is stored as the embedding)."""
    sd = _skeleton(cfg.to_json()).state_dict()
    return {k: tuple(v.shape) for k, v in sd.items() if k != ckpt.TIED_KEY}


def _compare_shapes(
    flag: str, value: str, got: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]], what: str
) -> None:
    got = {k: v for k, v in got.items() if k != ckpt.TIED_KEY}
    for k, shape in want.items():
        if k not in got:
            bad(flag, value, f"has no {k}, which {what} needs", f"weights of the model {what} describes")
        if got[k] != shape:
            bad(
                flag,
                value,
                f"{k} is {list(got[k])}, {what} needs {list(shape)}",
                f"weights of the model {what} describes",
            )
    extra = sorted(set(got) - set(want))
    if extra:
        bad(flag, value, f"holds {extra[0]}, which {what} does not have", f"weights of the model {what} describes")


# --------------------------------------------------------------------------------------------------------------- data
def data_error(exc: BaseException) -> NoReturn:
    """A data set that cannot be used (DataError: `path:lineno: why`): the same one-line exit as a bad setting."""
    fail(f"error: {exc}")


def report_dataset(data: Any, args: Any, is_main: bool) -> None:
    """After a data set is loaded: conversations cut to --max_seq_len before their first answer token train nothing.
    All of them is an error (nothing would be learnt); some of them, one warning line with the count."""
    probe = getattr(data, "label_probe", None)
    if probe is None or probe.count == 0:
        return
    from minimind_fast.data import DPODataset

    n, total = probe.count, len(data)
    what = "pairs" if isinstance(data, DPODataset) else "conversations"
    if n == total:
        bad(
            "max_seq_len",
            args.max_seq_len,
            f"every one of the {total} {what} in {args.data_path} is cut before its "
            f"first answer token, so nothing would be trained (the shortest needs {probe.fewest} tokens before it)",
            f"an integer >= {probe.fewest + 1}",
        )
    if is_main:
        print(
            f"warning: {n} of {total} {what} in {args.data_path} keep no answer token at --max_seq_len "
            f"{args.max_seq_len} (first: {probe.first}); they train nothing and a step made only of them is skipped"
        )
