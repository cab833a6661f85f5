"""The reliability guards of the post-training stages (DPO, distillation, reasoning SFT, LoRA, GRPO, SPO, PPO): a
non-finite gradient norm skips the step and is counted, --max_bad_steps in a row stop the run naming the last good
checkpoint, --skip_bad_lines counts and goes on, a missing tracker package is a clear error."""

import json
import sys

import pytest
import torch

from minimind_fast import checkpoint as ckpt
from minimind_fast.config import from_preset
from minimind_fast.model import MiniMind
from train import distill, distill_reason, dpo, grpo, lora, ppo, spo
from train import step as train_step

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
RUN = ["--kernels", "torch", "--log_interval", "1", "--max_seq_len", "64"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer, rl_prompts):
    """A tiny starting checkpoint and a 40-line slice of each sample data file."""
    root = tmp_path_factory.mktemp("guards")
    torch.manual_seed(0)
    model = MiniMind(from_preset("tiny", **TINY))
    ckpt.save_checkpoint(root / "sft", model, model.config, tokenizer)
    for name in ("dpo", "sft", "r1_mix", "lora_identity"):
        lines = open(f"data/sample/{name}.jsonl").read().splitlines()[:40]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return {"root": root, "sft": root / "sft", "rl": rl_prompts}


# stage -> (module, its checkpoint name, flags besides RUN, gradient-norm calls per optimizer step)
STAGES = {
    "dpo": (dpo, "dpo", "--data_path {root}/dpo.jsonl --batch_size 2 --eval_fraction 0", 1),
    "distill": (distill, "full_dist", "--data_path {root}/sft.jsonl --teacher {sft} --batch_size 2", 1),
    "distill_reason": (distill_reason, "reason", "--data_path {root}/r1_mix.jsonl --batch_size 2", 1),
    "lora": (lora, "lora_identity", "--data_path {root}/lora_identity.jsonl --batch_size 2", 1),
    "grpo": (grpo, "grpo", "--data_path {rl} --batch_size 1 --num_generations 2 --max_gen_len 4", 1),
    "spo": (spo, "spo", "--data_path {rl} --batch_size 1 --accumulation_steps 1 --max_gen_len 4", 1),
    "ppo": (ppo, "ppo_actor", "--data_path {rl} --batch_size 2 --mini_batch_size 2 --ppo_epochs 1 --max_gen_len 4", 2),
}


def _argv(stage, files, out):
    flags = STAGES[stage][2].format(root=files["root"], sft=files["sft"], rl=files["rl"]).split()
    return RUN + flags + ["--from_weight", str(files["sft"]), "--out_dir", str(out)]


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_streak_of_non_finite_steps_stops_with_the_last_good_checkpoint(stage, files, tmp_path, monkeypatch):
    module, name, _, per_step = STAGES[stage]
    real, calls = train_step.clip_grad_norm, {"n": 0}

    def clip(model, max_norm):  # from optimizer step 3 on, the gradient norm is NaN (as after a NaN loss)
        norm = real(model, max_norm)
        calls["n"] += 1
        return norm * float("nan") if (calls["n"] - 1) // per_step + 1 >= 3 else norm

    monkeypatch.setattr(train_step, "clip_grad_norm", clip)
    argv = _argv(stage, files, tmp_path) + ["--max_steps", "8", "--save_interval", "2", "--max_bad_steps", "2"]
    with pytest.raises(SystemExit, match=f"2 non-finite steps in a row.*{name}_resume/step_00000002"):
        module.main(argv)
    records = [json.loads(line) for line in (tmp_path / f"{name}_metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "loss" in r or "reward" in r}
    assert by_step[2]["skipped_steps"] == 0 and by_step[3]["skipped_steps"] == 1
    assert records[-1] == {"step": 4, "skipped_steps": 2, "stopped": "non-finite"}
    good = tmp_path / f"{name}_resume" / "step_00000002"
    ckpt.verify_checkpoint(good)
    assert not (tmp_path / f"{name}_resume" / "step_00000004").exists()


@pytest.mark.parametrize("stage", ["dpo", "distill_reason", "grpo"])
def test_skip_bad_lines_counts_and_goes_on(stage, files, tmp_path, capsys):
    argv = _argv(stage, files, tmp_path)
    path = argv[argv.index("--data_path") + 1]
    bad = tmp_path / "mixed.jsonl"
    bad.write_text(open(path).read() + "{not json\n")
    argv[argv.index("--data_path") + 1] = str(bad)
    with pytest.raises(SystemExit, match=r"mixed\.jsonl:\d+"):
        STAGES[stage][0].main(argv + ["--max_steps", "1"])
    STAGES[stage][0].main(argv + ["--max_steps", "1", "--skip_bad_lines"])
    assert "skipped 1 malformed lines" in capsys.readouterr().out


def test_missing_tracker_package_is_a_clear_error(files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "swanlab", None)  # import swanlab -> ImportError, whether or not it is installed
    with pytest.raises(SystemExit, match="pip install swanlab"):
        grpo.main(_argv("grpo", files, tmp_path) + ["--swanlab"])
