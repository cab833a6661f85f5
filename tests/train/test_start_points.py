"""Where a stage starts: --from_weight takes a MiniMind .pth in every stage that starts from weights, and sft's default
start is the pretrain checkpoint under --out_dir.

The .pth is written here the way MiniMind's trainers write theirs: torch.save of the model's state dict (HF-Llama
names, the tied lm_head.weight included) in fp16. The reference is a checkpoint folder holding the same weights
(rounded through fp16 the same way): a short run from the .pth must log exactly what the same run from the folder
logs, and save the same model config, which the .pth only carries in its tensor shapes.
"""

import json
import re
import shutil

import pytest
import torch
from _stage_helpers import metric_rows, stage_argv, step_losses

import minimind_kernels as kernels
from minimind_fast import checkpoint as ckpt
from minimind_fast.config import from_preset
from minimind_fast.model import MiniMind
from train import distill, dpo, grpo, pretrain, sft
from train.args import parse_args
from train.models import load_base_model, load_init_weights

pytestmark = pytest.mark.usefixtures("one_thread_module")

# Keys of a metrics row that measure the machine, not the run.
_CLOCK = ("time", "per_s", "mfu", "elapsed", "sec", "_ms")


def _same_weights_two_ways(root, model):
    """(model.pth as MiniMind saves it, a checkpoint folder of the same fp16-rounded weights)."""
    sd = {k: v.detach().half() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in sd  # MiniMind's files carry the tied head too
    torch.save(sd, root / "model.pth")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return root / "model.pth", ckpt.save_checkpoint(root / "folder", model, model.config)


@pytest.fixture(scope="module")
def starts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pth")
    torch.manual_seed(0)
    return _same_weights_two_ways(root, MiniMind(from_preset("tiny")))


def _rows(out, name):
    rows = metric_rows(out, name)
    return {s: {k: v for k, v in r.items() if not any(c in k for c in _CLOCK)} for s, r in rows.items()}


def _model_config(folder):
    return ckpt.load_config(folder)[0].to_dict()


def test_sft_from_pth_is_sft_from_the_same_weights(starts, tmp_path, capsys):
    pth, folder = starts
    a, b = tmp_path / "a", tmp_path / "b"
    sft.main(stage_argv(pth, a, "--max_steps", "2"))
    assert f"note: --from_weight {pth} holds no tokenizer, using the shipped one" in capsys.readouterr().out
    sft.main(stage_argv(folder, b, "--max_steps", "2"))
    assert len(step_losses(a, "full_sft")) == 2
    assert step_losses(a, "full_sft") == step_losses(b, "full_sft")
    assert _model_config(a / "full_sft") == _model_config(b / "full_sft") == _model_config(folder)
    assert ckpt.load_config(a / "full_sft")[1]["args"]["from_weight"] == str(pth)


def test_dpo_from_pth_is_dpo_from_the_same_weights(starts, tmp_path):
    pth, folder = starts
    data = tmp_path / "dpo.jsonl"
    data.write_text("\n".join(open("data/sample/dpo.jsonl").read().splitlines()[:16]) + "\n")
    flags = ["--data_path", str(data), "--max_steps", "2", "--eval_fraction", "0.25", "--learning_rate", "1e-3"]
    dpo.main(stage_argv(pth, tmp_path / "a", *flags))
    dpo.main(stage_argv(folder, tmp_path / "b", *flags))
    a, b = _rows(tmp_path / "a", "dpo"), _rows(tmp_path / "b", "dpo")
    assert sorted(a) == [0, 1, 2] and a == b  # eval before, step 1, step 2 (with the eval after)
    # The reference (a frozen copy of the same .pth) equals the policy before the first step: loss ln 2.
    assert a[0]["eval_loss"] == pytest.approx(0.6931472, abs=1e-5)


def test_grpo_from_pth_is_grpo_from_the_same_weights(starts, tmp_path, rl_prompts):
    pth, folder = starts
    flags = ["--data_path", str(rl_prompts), "--max_steps", "2", "--num_generations", "2", "--max_gen_len", "6"]
    flags += ["--max_seq_len", "40", "--batch_size", "2", "--reward", "rule+shaping", "--kernels", "torch"]
    grpo.main(["--from_weight", str(pth), "--out_dir", str(tmp_path / "a"), *flags])
    grpo.main(["--from_weight", str(folder), "--out_dir", str(tmp_path / "b"), *flags])
    a, b = _rows(tmp_path / "a", "grpo"), _rows(tmp_path / "b", "grpo")
    assert sorted(a) == [1, 2] and a == b
    assert _model_config(tmp_path / "a" / "grpo") == _model_config(folder)


def test_distill_teacher_and_student_from_pth(starts, tmp_path):
    pth, folder = starts
    flags = ["--max_steps", "1", "--batch_size", "2"]
    distill.main(stage_argv(pth, tmp_path / "a", "--teacher", str(pth), *flags))
    distill.main(stage_argv(folder, tmp_path / "b", "--teacher", str(folder), *flags))
    a, b = _rows(tmp_path / "a", "full_dist"), _rows(tmp_path / "b", "full_dist")
    assert sorted(a) == [1] and a == b


def test_pretrain_from_pth_and_an_architecture_mismatch(starts, tmp_path):
    pth, folder = starts
    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(open("data/sample/pretrain.jsonl").read().splitlines()[:40]) + "\n")
    flags = ["--preset", "tiny", "--data_path", str(data), "--max_steps", "2", "--batch_size", "2"]
    flags += ["--max_seq_len", "32", "--kernels", "torch", "--log_interval", "1"]
    pretrain.main(["--from_weight", str(pth), "--out_dir", str(tmp_path / "a"), *flags])
    pretrain.main(["--from_weight", str(folder), "--out_dir", str(tmp_path / "b"), *flags])
    assert len(step_losses(tmp_path / "a", "pretrain")) == 2
    assert step_losses(tmp_path / "a", "pretrain") == step_losses(tmp_path / "b", "pretrain")
    with pytest.raises(SystemExit, match=r"^error: --from_weight .*model\.pth.*--preset tiny"):
        pretrain.main(["--from_weight", str(pth), "--use_moe", "1", "--out_dir", str(tmp_path / "c"), *flags])
    with pytest.raises(SystemExit, match=r"^error: --from_weight .*model\.pth holds \{'use_moe': False.*--preset"):
        load_init_weights(MiniMind(from_preset("tiny", use_moe=True)), str(pth))


def test_a_moe_pth_loads_with_its_config_read_off_the_shapes(tmp_path):
    torch.manual_seed(0)
    model = MiniMind(from_preset("tiny", hidden_size=64, num_hidden_layers=2, use_moe=True))
    pth, _ = _same_weights_two_ways(tmp_path, model)
    loaded = load_base_model(str(pth), kernels.resolve("torch"), torch.device("cpu"))
    assert loaded.config.to_dict() == model.config.to_dict()
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


class _NotATensor:
    pass


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        ([1, 2], "holds a list, expected a state dict"),
        ({"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(2, 2)}, "LoRA adapter"),
        ({"model.embed_tokens.weight": _NotATensor()}, "not a weights-only state dict"),
        ({"model.embed_tokens.weight": torch.zeros(8, 4), "x": torch.zeros(1)}, r"model\.layers"),
    ],
)
def test_bad_pth_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    if content is not None:
        torch.save(content, path)
    with pytest.raises(SystemExit) as info:
        load_base_model(str(path), kernels.resolve("torch"), torch.device("cpu"))
    text = str(info.value)
    assert text.startswith(f"error: --from_weight {path}") and "\n" not in text
    assert re.search(message, text), text


def test_sft_starts_from_out_dir_pretrain_by_default(starts, tmp_path, monkeypatch):
    _, folder = starts
    run = tmp_path / "run"
    shutil.copytree(folder, run / "pretrain")
    data = tmp_path / "sft.jsonl"
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(4)]
    data.write_text("".join(json.dumps({"conversations": c}) + "\n" for c in convs))
    argv = ["--out_dir", str(run), "--data_path", str(data), "--max_steps", "1", "--batch_size", "2"]
    sft.main(argv + ["--max_seq_len", "32", "--kernels", "torch"])
    assert ckpt.load_config(run / "full_sft")[1]["args"]["from_weight"] == str(run / "pretrain")

    # Without one under --out_dir: out/pretrain (the pretrain stage's default) from the working directory, else an
    # error naming both places.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^error: --from_weight not given and no pretrain checkpoint at .*elsewhere/"):
        sft.default_start(str(tmp_path / "elsewhere"))
    shutil.copytree(folder, tmp_path / "out" / "pretrain")
    assert sft.default_start(str(tmp_path / "elsewhere")) == "out/pretrain"
    assert sft.default_start(str(run)) == str(run / "pretrain")


@pytest.mark.parametrize("stage, flag, prev", [(dpo, "from_weight", "full_sft"), (distill, "teacher", "full_sft_base")])
def test_other_stages_default_start_under_out_dir(starts, tmp_path, stage, flag, prev):
    """Every stage's default start (the previous stage's default output, out/<name>) is looked for under --out_dir
    first; an explicit flag always wins."""
    _, folder = starts
    run = tmp_path / "run"
    for name in ("full_sft", "full_sft_base"):
        shutil.copytree(folder, run / name)
    args = parse_args(stage.Args, ["--out_dir", str(run)], "")
    assert getattr(args, flag) == str(run / prev)
    args = parse_args(stage.Args, ["--out_dir", str(run), f"--{flag}", str(folder)], "")
    assert getattr(args, flag) == str(folder)
