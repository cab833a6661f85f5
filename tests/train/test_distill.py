"""train/distill.py end to end on CPU: a wider, deeper tiny teacher and a smaller student (architectures from their
checkpoint configs), the logged loss against a full-logit computation, learning, checkpoints, exact resume."""

import json
import shutil

import pytest
import torch

from minimind import checkpoint as ckpt
from minimind.config import from_preset
from minimind.data import SFTDataset, collate_sft
from minimind.model import MiniMind
from train import common, distill

TEACHER = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
STUDENT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
RUN = ["--kernels", "torch", "--log_interval", "1", "--max_seq_len", "96", "--batch_size", "8", "--kl_chunk", "100"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def start(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    teacher = MiniMind(from_preset("tiny", **TEACHER))
    with torch.no_grad():  # a larger tied head makes the teacher's distributions peaked: something to learn
        teacher.model.embed_tokens.weight.mul_(10.0)
    ckpt.save_checkpoint(root / "teacher", teacher, teacher.config, tokenizer)
    student = MiniMind(from_preset("tiny", **STUDENT))
    ckpt.save_checkpoint(root / "student", student, student.config, tokenizer)
    lines = open("data/sample/sft.jsonl").read().splitlines()[:160]
    (root / "sft.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _args(start, out):
    return RUN + [
        "--teacher",
        str(start / "teacher"),
        "--from_weight",
        str(start / "student"),
        "--data_path",
        str(start / "sft.jsonl"),
        "--out_dir",
        str(out),
    ]


def _records(out):
    return [json.loads(line) for line in (out / "full_dist_metrics.jsonl").read_text().splitlines()]


def test_distill_first_step_loss_matches_full_logits(start, tokenizer):
    out = start / "one"
    distill.main(_args(start, out) + ["--max_steps", "1", "--alpha", "0.3", "--temperature", "2.0"])
    rec = _records(out)[0]
    # The first batch, rebuilt the way the stage draws it, and the loss from full fp64 logits of both models.
    data = SFTDataset(start / "sft.jsonl", tokenizer, 96)
    batch = collate_sft([data[int(i)] for i in common.epoch_order(len(data), 42, 0)[:8]])
    ids, labels = batch["input_ids"], batch["labels"]
    student, _, _ = ckpt.load_model(start / "student")
    teacher, _, _ = ckpt.load_model(start / "teacher")
    with torch.no_grad():
        s = student.double()(ids, return_logits=True).logits[:, :-1]
        t = teacher.double()(ids, return_logits=True).logits[:, :-1]
    tgt = labels[:, 1:]
    keep = tgt != -100
    ce = -s.log_softmax(-1)[keep].gather(1, tgt[keep][:, None]).mean()
    p_t = (t[keep] / 2.0).softmax(-1)
    kl = (p_t * (p_t.log() - (s[keep] / 2.0).log_softmax(-1))).sum(-1).mean()
    assert rec["ce"] == pytest.approx(ce.item(), abs=2e-5)
    assert rec["kl"] == pytest.approx(kl.item(), abs=2e-5)
    assert rec["loss"] == pytest.approx(0.3 * ce.item() + 0.7 * 4.0 * kl.item(), abs=5e-5)


def test_distill_student_learns_the_teacher_and_reloads(start):
    out = start / "learn"
    distill.main(_args(start, out) + ["--learning_rate", "5e-3", "--epochs", "1"])
    kls = [r["kl"] for r in _records(out) if "kl" in r]
    assert len(kls) == 20  # 160 conversations / 8
    assert sum(kls[-3:]) / 3 < 0.85 * sum(kls[:3]) / 3, kls
    model, cfg, payload = ckpt.load_model(out / "full_dist")
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (64, 2)  # the student's architecture, not the teacher's
    assert payload["args"]["teacher"] == str(start / "teacher")


def test_distill_fresh_student_preset_with_size_overrides(start):
    out = start / "fresh"
    args = _args(start, out) + ["--student_preset", "tiny", "--hidden_size", "32", "--num_hidden_layers", "1"]
    distill.main(args + ["--max_steps", "2"])
    _, cfg, _ = ckpt.load_model(out / "full_dist")
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (32, 1)


def test_distill_resume_reproduces_the_uninterrupted_run_exactly(start):
    args = ["--learning_rate", "1e-3", "--max_steps", "6", "--save_interval", "3", "--keep_last", "3"]
    full, cut = start / "full", start / "cut"
    distill.main(_args(start, full) + args)
    shutil.copytree(full / "full_dist_resume" / "step_00000003", cut / "full_dist_resume" / "step_00000003")
    distill.main(_args(start, cut) + args + ["--from_resume", "1"])
    want = {r["step"]: (r["loss"], r["ce"], r["kl"]) for r in _records(full)}
    got = {r["step"]: (r["loss"], r["ce"], r["kl"]) for r in _records(cut)}
    assert sorted(got) == [4, 5, 6] and all(got[s] == want[s] for s in got)
    a, b = ckpt.load_model_state(full / "full_dist"), ckpt.load_model_state(cut / "full_dist")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distill_refuses_a_teacher_with_another_vocabulary(start, tokenizer):
    other = MiniMind(from_preset("tiny", vocab_size=6464, **STUDENT))
    ckpt.save_checkpoint(start / "other", other, other.config, tokenizer)
    args = _args(start, start / "bad")
    args[args.index("--teacher") + 1] = str(start / "other")
    with pytest.raises(SystemExit, match="vocab 6400 != teacher vocab 6464"):
        distill.main(args)
