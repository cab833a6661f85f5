"""Every bad setting of every stage ends before any work, the same way (train/checks.py): exactly one line
`error: --flag VALUE: why (accepted: ...)` (or `error: path:lineno: ...` for bad data) on stderr, exit status 2, no
traceback, and nothing written to --out_dir. Plus the data checks: a lone surrogate is reported at load, every RL
prompt record is checked for "answer", conversations cut before their answer are counted, and a step made only of
them takes no optimizer step.

The table runs each stage's main(argv) in-process (capsys reads stderr); a few cases run as real processes to show
the exit status and the absence of a traceback end to end.
"""

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _stage_helpers import metric_rows

from minimind_fast import checkpoint as ckpt
from minimind_fast.config import from_preset
from minimind_fast.data import DataError, RLPromptDataset, SFTDataset, parse_line
from minimind_fast.model import MiniMind
from train import checks, distill, distill_reason, dpo, grpo, lora, ppo, pretrain, sft, spo
from train.args import parse_args

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
STAGES = {
    "pretrain": pretrain,
    "sft": sft,
    "lora": lora,
    "dpo": dpo,
    "distill": distill,
    "distill_reason": distill_reason,
    "grpo": grpo,
    "ppo": ppo,
    "spo": spo,
}
DATA = {
    "pretrain": "pretrain.jsonl",
    "sft": "sft.jsonl",
    "lora": "lora_identity.jsonl",
    "dpo": "dpo.jsonl",
    "distill": "sft.jsonl",
    "distill_reason": "r1_mix.jsonl",
}

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _conv(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_start, rl_prompts):
    """The starting checkpoint and the bad inputs the table refers to by name ({name} in its flags)."""
    from tools import prepare_data

    root = tmp_path_factory.mktemp("bad")
    f = {"start": str(tiny_start), "rl": str(rl_prompts), "missing": str(root / "missing")}
    f["sample_sft"] = str(SAMPLE / "sft.jsonl")
    (root / "a_file").write_text("not a folder\n")
    f["a_file"] = str(root / "a_file")
    (root / "a_dir").mkdir()
    f["a_dir"] = str(root / "a_dir")
    (root / "garbage.pth").write_bytes(b"\x00not a pickle\xff" * 8)
    f["garbage_pth"] = str(root / "garbage.pth")
    # The tiny start's weights as MiniMind's trainers save them: a plain fp16 state dict with the tied head.
    sd = ckpt.load_model_state(tiny_start)
    torch.save({k: v.half() for k, v in sd.items()}, root / "tiny.pth")
    f["tiny_pth"] = str(root / "tiny.pth")
    (root / "no_config").mkdir()
    (root / "no_config" / "model.safetensors").write_bytes(b"x")
    f["no_config"] = str(root / "no_config")
    shutil.copytree(tiny_start, root / "torn")
    (root / "torn" / ckpt.MANIFEST_FILE).unlink()
    f["torn"] = str(root / "torn")
    # Same size as the real weights file (the manifest's size check passes), but the header is garbage.
    shutil.copytree(tiny_start, root / "broken")
    weights = root / "broken" / ckpt.MODEL_FILE
    weights.write_bytes(b"\xff" * weights.stat().st_size)
    f["broken"] = str(root / "broken")

    # A lone surrogate escape on line 2 of an SFT, a DPO and an RL prompt file (line 1 and 3 are fine).
    lone = "\\ud800"
    good = json.dumps({"conversations": _conv("What is 2 + 2?", "4."), "answer": "4"})
    bad_sft = json.dumps({"conversations": _conv("hi", "x")}).replace('"x"', f'"a{lone}b"')
    f["sur_sft"] = _jsonl(root / "sur_sft.jsonl", [good, bad_sft, good])
    pair = {"chosen": _conv("q", "yes"), "rejected": _conv("q", "no")}
    bad_pair = json.dumps(pair).replace('"yes"', f'"y{lone}"')
    f["sur_dpo"] = _jsonl(root / "sur_dpo.jsonl", [json.dumps(pair), bad_pair, json.dumps(pair)])
    bad_rl = json.dumps({"conversations": _conv("What is 1 + 1?", "2."), "answer": "2"}).replace("1 + 1", f"1{lone}")
    f["sur_rl"] = _jsonl(root / "sur_rl.jsonl", [good, bad_rl, good])
    # 300 prompt records; only the 257th has no "answer" (the old check read the first 256).
    rl = [
        json.dumps({"conversations": _conv(f"What is {i} + 1?", f"{i + 1}."), "answer": str(i + 1)}) for i in range(300)
    ]
    rl[256] = json.dumps({"conversations": _conv("What is 1 + 1?", "2.")})
    f["rl_257"] = _jsonl(root / "rl_257.jsonl", rl)

    # A token file whose sidecar matches the tokenizer but which holds an id past the vocabulary.
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"Document {i} is about rivers and towns."}) + "\n" for i in range(60)))
    prepare_data.main(["--data_path", str(text), "--out", str(root / "bad.bin"), "--workers", "1"])
    tokens = np.memmap(root / "bad.bin", dtype=np.uint16, mode="r+")
    tokens[123] = 7000
    tokens.flush()
    del tokens
    f["bad_bin"] = str(root / "bad.bin")
    return f


def base_argv(stage: str, files: dict, out: Path) -> list[str]:
    """A run of the stage that would be valid: the table's flags come after it (argparse keeps the last value)."""
    argv = ["--kernels", "torch", "--out_dir", str(out)]
    if stage == "pretrain":
        return argv + ["--preset", "tiny", "--data_path", str(SAMPLE / DATA[stage])]
    argv += ["--from_weight", files["start"]]
    argv += ["--data_path", files["rl"] if stage in checks.RL_STAGES else str(SAMPLE / DATA[stage])]
    if stage == "distill":
        argv += ["--teacher", files["start"]]
    return argv


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
NO_WANDB = pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")

# (stage, flags after the valid base run, how the one error line starts). {name} is a path from the files fixture.
CASES = [
    ("pretrain", "--batch_size -4", "error: --batch_size -4: "),
    ("pretrain", "--batch_size 0", "error: --batch_size 0: "),
    ("pretrain", "--max_steps -5", "error: --max_steps -5: "),
    ("pretrain", "--epochs 0", "error: --epochs 0: "),
    ("pretrain", "--accumulation_steps 0", "error: --accumulation_steps 0: "),
    ("pretrain", "--save_interval 0", "error: --save_interval 0: "),
    ("pretrain", "--log_interval 0", "error: --log_interval 0: "),
    ("pretrain", "--max_seq_len 0", "error: --max_seq_len 0: "),
    ("pretrain", "--max_seq_len 1", "error: --max_seq_len 1: "),
    ("pretrain", "--max_seq_len 40000", "error: --max_seq_len 40000: exceeds the rotary table"),
    (
        "pretrain",
        "--preset huge",
        "error: --preset huge: unknown preset (accepted: tiny, small, base, moe, m3, m3-moe, m3-tiny)",
    ),
    ("pretrain", "--device foo", "error: --device foo: unknown device"),
    pytest.param("pretrain", "--device cuda", "error: --device cuda: CUDA is not available", marks=NO_CUDA),
    ("pretrain", "--learning_rate nan", "error: --learning_rate nan: not a number"),
    ("pretrain", "--learning_rate inf", "error: --learning_rate inf: not a finite number"),
    ("pretrain", "--learning_rate=-1e-3", "error: --learning_rate -0.001: "),
    ("pretrain", "--weight_decay -1", "error: --weight_decay -1: "),
    ("pretrain", "--grad_clip -1", "error: --grad_clip -1: "),
    ("pretrain", "--warmup_steps -1", "error: --warmup_steps -1: "),
    ("pretrain", "--max_bad_steps 0", "error: --max_bad_steps 0: "),
    ("pretrain", "--keep_last 0", "error: --keep_last 0: "),
    ("pretrain", "--seed -1", "error: --seed -1: "),
    ("pretrain", "--dtype float16", "error: --dtype float16: "),
    ("pretrain", "--kernels fast", "error: --kernels fast: unknown kernels base"),
    ("pretrain", "--kernels torch,nope=torch", "error: --kernels torch,nope=torch: unknown op"),
    ("pretrain", "--fsdp 1", "error: --fsdp 1: FSDP2 shards over the ranks of a process group"),
    ("pretrain", "--from_resume 2", "error: --from_resume 2: "),
    ("pretrain", "--dist_timeout 0", "error: --dist_timeout 0: "),
    ("pretrain", "--use_moe 2", "error: --use_moe 2: "),
    ("pretrain", "--aux_loss_alpha -0.1", "error: --aux_loss_alpha -0.1: "),
    ("pretrain", "--out_dir {a_file}", "error: --out_dir {a_file}: is a file, not a folder"),
    ("pretrain", "--out_dir {a_file}/sub", "error: --out_dir {a_file}/sub: {a_file} is a file"),
    ("pretrain", "--save_weight a/b", "error: --save_weight a/b: not a plain folder name"),
    ("pretrain", "--data_path {a_dir}", "error: --data_path {a_dir}: is a directory"),
    ("pretrain", "--data_path {missing}", "error: --data_path {missing}: does not exist"),
    ("pretrain", "--tokenizer {missing}", "error: --tokenizer {missing}: no tokenizer.json"),
    ("pretrain", "--from_weight {garbage_pth}", "error: --from_weight {garbage_pth}: not a weights-only PyTorch"),
    ("pretrain", "--from_weight {missing}.pth", "error: --from_weight {missing}.pth: does not exist"),
    ("pretrain", "--from_weight {a_file}", "error: --from_weight {a_file}: is a file but not a .pth"),
    (
        "pretrain",
        "--from_weight {tiny_pth} --preset small",
        "error: --from_weight {tiny_pth}: model.embed_tokens.weight is [6400, 256], --preset small needs [6400, 512]",
    ),
    ("pretrain", "--from_weight {start} --preset base", "error: --from_weight {start}: model.embed_tokens.weight is"),
    ("pretrain", "--from_weight {start} --use_moe 1", "error: --from_weight {start}: has no model.layers.0.mlp.gate"),
    pytest.param("pretrain", "--wandb 1", "error: --wandb 1: the wandb package is not installed", marks=NO_WANDB),
    ("pretrain", "--data_path {bad_bin} --max_seq_len 16", "error: {bad_bin}: token 123 (counting from 0) is id 7000"),
    ("sft", "--max_seq_len 1", "error: --max_seq_len 1: "),
    ("sft", "--batch_size 0", "error: --batch_size 0: "),
    ("sft", "--max_seq_len 40000", "error: --max_seq_len 40000: exceeds the rotary table"),
    ("sft", "--from_weight none", "error: --from_weight none: sft fine-tunes a trained model"),
    ("sft", "--from_weight {missing}", "error: --from_weight {missing}: does not exist"),
    ("sft", "--from_weight {garbage_pth}", "error: --from_weight {garbage_pth}: not a weights-only PyTorch"),
    ("sft", "--from_weight {no_config}", "error: --from_weight {no_config}: a folder without config.json"),
    ("sft", "--from_weight {torn}", "error: --from_weight {torn}: not a usable checkpoint"),
    ("sft", "--from_weight {broken}", "error: --from_weight {broken}: model.safetensors is unreadable"),
    ("sft", "--max_seq_len 3", "error: --max_seq_len 3: every one of the 2282 conversations"),
    ("sft", "--batch_size 5000", "error: {sample_sft} has 2282 conversations, fewer than one optimizer step needs"),
    ("sft", "--data_path {sur_sft}", "error: {sur_sft}:2: conversations[1].content holds a lone UTF-16 surrogate"),
    ("lora", "--lora_rank 0", "error: --lora_rank 0: "),
    ("lora", "--lora_rank 1000", "error: --lora_rank 1000: above the model's width (256)"),
    ("lora", "--lora_alpha 0", "error: --lora_alpha 0: "),
    ("lora", "--lora_alpha -8", "error: --lora_alpha -8: "),
    ("lora", "--lora_targets nope", "error: --lora_targets nope: LoRA target 'nope' matches no Linear layer"),
    ("lora", "--lora_targets lm_head", "error: --lora_targets lm_head: LoRA target 'lm_head' selects lm_head, whose"),
    ("lora", "--lora_targets ,", "error: --lora_targets ,: no LoRA targets given"),
    ("lora", "--fsdp 1", "error: --fsdp 1: --fsdp is not supported for LoRA"),
    ("lora", "--epochs 0", "error: --epochs 0: "),
    ("dpo", "--beta -1", "error: --beta -1: DPO's beta"),
    ("dpo", "--beta 0", "error: --beta 0: DPO's beta"),
    ("dpo", "--beta nan", "error: --beta nan: not a number"),
    ("dpo", "--weight_decay -1", "error: --weight_decay -1: "),
    ("dpo", "--eval_fraction 1", "error: --eval_fraction 1: "),
    ("dpo", "--eval_max_pairs -1", "error: --eval_max_pairs -1: "),
    ("dpo", "--data_path {sur_dpo}", "error: {sur_dpo}:2: chosen[1].content holds a lone UTF-16 surrogate"),
    ("distill", "--alpha 1.5", "error: --alpha 1.5: "),
    ("distill", "--temperature 0", "error: --temperature 0: the softmax temperature"),
    ("distill", "--kl_chunk 0", "error: --kl_chunk 0: "),
    ("distill", "--teacher {missing}", "error: --teacher {missing}: does not exist"),
    ("distill", "--hidden_size 100", "error: --hidden_size 100: only used with --student_preset"),
    ("distill", "--student_preset tiny --hidden_size 100", "error: --hidden_size 100: no valid tiny student"),
    ("distill", "--student_preset huge", "error: --student_preset huge: unknown preset"),
    ("distill_reason", "--tag_weight 0", "error: --tag_weight 0: "),
    ("distill_reason", "--tags ,", "error: --tags ,: no tag to weight"),
    ("grpo", "--max_gen_len 0", "error: --max_gen_len 0: "),
    ("grpo", "--temperature -1", "error: --temperature -1: sampling needs a positive temperature"),
    ("grpo", "--top_p 0", "error: --top_p 0: "),
    ("grpo", "--top_p 1.5", "error: --top_p 1.5: "),
    ("grpo", "--num_generations 1", "error: --num_generations 1: "),
    ("grpo", "--num_iterations 0", "error: --num_iterations 0: "),
    ("grpo", "--epsilon 0", "error: --epsilon 0: "),
    ("grpo", "--beta -0.1", "error: --beta -0.1: a negative KL coefficient"),
    ("grpo", "--adv_eps 0", "error: --adv_eps 0: "),
    ("grpo", "--reward rule+speed", "error: --reward rule+speed: "),
    ("grpo", "--reward rule+model", "error: --reward_model_path none: --reward rule+model scores replies"),
    ("grpo", "--reward_model_path {a_dir}", "error: --reward_model_path {a_dir}: --reward rule has no 'model' kind"),
    ("grpo", "--reward_batch_size 0", "error: --reward_batch_size 0: "),
    ("grpo", "--forward_batch -1", "error: --forward_batch -1: "),
    ("grpo", "--max_seq_len 0", "error: --max_seq_len 0: "),
    ("grpo", "--max_gen_len 32760", "error: --max_gen_len 32760: prompt (66) + completion exceeds the rotary"),
    ("grpo", "--reasoning 2", "error: --reasoning 2: "),
    ("grpo", "--data_path {rl_257}", 'error: {rl_257}:257: missing field "answer"'),
    ("grpo", "--data_path {sur_rl}", "error: {sur_rl}:2: conversations[0].content holds a lone UTF-16 surrogate"),
    ("ppo", "--clip_epsilon 1.5", "error: --clip_epsilon 1.5: "),
    ("ppo", "--cliprange_value 0", "error: --cliprange_value 0: "),
    ("ppo", "--vf_coef 0", "error: --vf_coef 0: "),
    ("ppo", "--kl_coef -1", "error: --kl_coef -1: "),
    ("ppo", "--gamma 1.5", "error: --gamma 1.5: "),
    ("ppo", "--lam -0.1", "error: --lam -0.1: "),
    ("ppo", "--ppo_epochs 0", "error: --ppo_epochs 0: "),
    ("ppo", "--mini_batch_size 0", "error: --mini_batch_size 0: "),
    ("ppo", "--early_stop_kl 0", "error: --early_stop_kl 0: "),
    ("ppo", "--whiten_advantages 2", "error: --whiten_advantages 2: "),
    ("ppo", "--critic_learning_rate 0", "error: --critic_learning_rate 0: "),
    ("spo", "--adv_clip 0", "error: --adv_clip 0: "),
    ("spo", "--d_half -1", "error: --d_half -1: "),
    ("spo", "--rho_min 0", "error: --rho_min 0: "),
    ("spo", "--rho_max 1", "error: --rho_max 1: "),
    ("spo", "--rho_first 1.5", "error: --rho_first 1.5: "),
    ("spo", "--rho_min 0.9 --rho_max 0.5", "error: --rho_min 0.9: the lowest forgetting factor is above"),
    ("spo", "--reward_min 2 --reward_max 1", "error: --reward_max 1: "),
]


def _id(case) -> str:
    stage, flags, _ = case.values if hasattr(case, "values") else case
    return f"{stage}{flags.replace('{', '').replace('}', '')}".replace(" ", "_")


@pytest.mark.parametrize("stage, flags, start", CASES, ids=[_id(c) for c in CASES])
def test_a_bad_setting_is_one_error_line_exit_2_and_writes_nothing(stage, flags, start, files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    argv = base_argv(stage, files, out) + [a.format(**files) for a in flags.split()]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        STAGES[stage].main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.splitlines() == [str(exc.value)], err  # exactly one line, the message
    assert str(exc.value).startswith(start.format(**files)), str(exc.value)
    if start.startswith("error: --"):
        assert str(exc.value).endswith(")") and "(accepted: " in str(exc.value)  # a flag's error says what is accepted
    assert "Traceback" not in err
    assert list(out.iterdir()) == []


def test_at_least_60_bad_invocations_over_every_stage():
    stages = [c.values[0] if hasattr(c, "values") else c[0] for c in CASES]
    assert len(CASES) >= 60 and set(stages) == set(STAGES)


@pytest.mark.parametrize(
    "stage, flags, start",
    [
        ("pretrain", "--batch_size -4", "error: --batch_size -4: "),
        ("grpo", "--top_p 0", "error: --top_p 0: "),
        ("pretrain", "--data_path {bad_bin} --max_seq_len 16", "error: {bad_bin}: token 123 "),
    ],
)
def test_as_a_process_the_exit_status_is_2_without_traceback(stage, flags, start, files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    argv = base_argv(stage, files, out) + [a.format(**files) for a in flags.split()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train" / f"{stage}.py"), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(start.format(**files)), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert list(out.iterdir()) == []


def test_argparse_type_errors_name_the_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--batch_size", "abc"])
    assert exc.value.code == 2
    assert "argument --batch_size: invalid int value: 'abc'" in capsys.readouterr().err


def test_every_numeric_choice_and_path_flag_of_every_stage_has_a_rule():
    for stage, module in STAGES.items():
        hints = {f.name: f.type for f in dataclasses.fields(module.Args)}
        for name, hint in hints.items():
            if "bool" in str(hint):
                continue  # argparse parses booleans (1/0, true/false) and refuses anything else
            assert checks.rule_for(stage, name) is not None or name in checks.SPECIAL, f"{stage} --{name}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_the_valid_base_run_of_every_stage_passes_the_checks(stage, files, tmp_path):
    args = parse_args(STAGES[stage].Args, base_argv(stage, files, tmp_path / "out"), "")
    assert args.out_dir == str(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides", [{}, {"use_moe": True}], ids=["dense", "moe"])
def test_the_expected_checkpoint_shapes_are_the_models_own(overrides):
    model = MiniMind(from_preset("tiny", **overrides))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != ckpt.TIED_KEY}
    assert checks.expected_shapes(model.config) == want


# ------------------------------------------------------------------------------------------------------------ data
def test_a_lone_surrogate_is_a_data_error_and_a_pair_is_not():
    with pytest.raises(DataError, match=r"^f\.jsonl:7: text holds a lone UTF-16 surrogate"):
        parse_line(b'{"text": "ok \\ud800 then"}', "f.jsonl", 7)
    with pytest.raises(DataError, match=r"^f\.jsonl:1: a key of meta holds a lone"):
        parse_line(b'{"meta": {"\\udfff": 1}}', "f.jsonl", 1)
    assert parse_line(b'{"text": "\\ud83d\\ude00 and \\\\ud800"}', "f.jsonl", 1)["text"] == "\U0001f600 and \\ud800"


def test_every_rl_record_is_checked_for_its_answer(files, tokenizer):
    with pytest.raises(DataError, match=r'rl_257\.jsonl:257: missing field "answer" \(why\)$'):
        RLPromptDataset(files["rl_257"], tokenizer, 64, require={"answer": "why"})
    data = RLPromptDataset(files["rl_257"], tokenizer, 64, skip_bad_lines=True, require={"answer": "why"})
    assert len(data) == 299 and data.bad_lines == 1
    assert len(RLPromptDataset(files["rl_257"], tokenizer, 64)) == 300  # nothing required: every record is a prompt


def test_the_label_less_count_is_exact_on_the_sample_sft_data(tokenizer):
    data = SFTDataset(SAMPLE / "sft.jsonl", tokenizer, 64)
    empty = [i for i in range(len(data)) if (data[i]["labels"] == -100).all()]
    assert 0 < len(empty) < len(data)
    assert data.label_less == len(empty)
    assert data.label_probe.first == data.index.where(empty[0])
    assert SFTDataset(SAMPLE / "sft.jsonl", tokenizer, 64, validate=False).label_less is None


def test_label_less_conversations_are_counted_and_their_steps_are_skipped(files, tmp_path, capsys, tokenizer):
    long_q = " ".join(f"word{i}" for i in range(40))  # cut before the answer at --max_seq_len 32
    convs = [_conv(long_q, "A."), _conv("hi", "Hello there."), _conv(long_q, "B."), _conv("yo", "Hey.")]
    path = tmp_path / "mixed.jsonl"
    _jsonl(path, [json.dumps({"conversations": c}) for c in convs])
    data = SFTDataset(path, tokenizer, 32)
    assert [bool((data[i]["labels"] != -100).any()) for i in range(4)] == [False, True, False, True]  # premise

    out = tmp_path / "out"
    flags = ["--data_path", str(path), "--max_seq_len", "32", "--batch_size", "1", "--max_steps", "4"]
    flags += ["--group_by_length", "0", "--save_interval", "4", "--log_interval", "1", "--learning_rate", "1e-3"]
    sft.main(base_argv("sft", files, out) + flags)
    printed = capsys.readouterr().out
    where = f"{path}:1"
    line = f"warning: 2 of 4 conversations in {path} keep no answer token at --max_seq_len 32 (first: {where})"
    assert line in printed
    # One epoch of 4 single-conversation steps: the two label-less ones log a zero gradient and take no step.
    rows = metric_rows(out, "full_sft")
    assert sorted(r["grad_norm"] == 0.0 for r in rows.values()) == [False, False, True, True]
    state = ckpt.load_train_state(out / "full_sft_resume" / "step_00000004")
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {2.0}
