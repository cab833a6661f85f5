"""train/distill.py end to end on CPU: a wider, deeper tiny teacher and a smaller student (architectures from their
checkpoint configs), the logged loss against a full-logit computation, learning, checkpoints, exact resume."""

import json
import shutil

import pytest
import torch

from minimind_fast import checkpoint as ckpt
from minimind_fast.config import from_preset
from minimind_fast.data import SFTDataset, collate_sft
from minimind_fast.model import MiniMind
from train import distill
from train.step import epoch_order

TEACHER = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
STUDENT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
RUN = ["--kernels", "torch", "--log_interval", "1", "--max_seq_len", "96", "--batch_size", "8", "--kl_chunk", "100"]


pytestmark = pytest.mark.usefixtures("one_thread_module")


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


def _hand_ce_kl(start, tokenizer, rows, temperature):
    """(CE, KL at the temperature) over the trained tokens of the conversations `rows`, from full fp64 logits of both
    models."""
    data = SFTDataset(start / "sft.jsonl", tokenizer, 96)
    batch = collate_sft([data[i] for i in rows])
    ids, labels = batch["input_ids"], batch["labels"]
    student, _, _ = ckpt.load_model(start / "student")
    teacher, _, _ = ckpt.load_model(start / "teacher")
    with torch.no_grad():
        s = student.double()(ids, return_logits=True).logits[:, :-1]
        t = teacher.double()(ids, return_logits=True).logits[:, :-1]
    tgt = labels[:, 1:]
    keep = tgt != -100
    ce = -s.log_softmax(-1)[keep].gather(1, tgt[keep][:, None]).mean()
    p_t = (t[keep] / temperature).softmax(-1)
    kl = (p_t * (p_t.log() - (s[keep] / temperature).log_softmax(-1))).sum(-1).mean()
    return ce.item(), kl.item()


def test_distill_first_step_loss_matches_full_logits(start, tokenizer):
    out = start / "one"
    distill.main(_args(start, out) + ["--max_steps", "1", "--alpha", "0.3", "--temperature", "2.0"])
    rec = _records(out)[0]
    # The first batch, rebuilt the way the stage draws it.
    ce, kl = _hand_ce_kl(start, tokenizer, epoch_order(160, 42, 0)[:8].tolist(), 2.0)
    assert rec["ce"] == pytest.approx(ce, abs=2e-5)
    assert rec["kl"] == pytest.approx(kl, abs=2e-5)
    assert rec["loss"] == pytest.approx(0.3 * ce + 0.7 * 4.0 * kl, abs=5e-5)


def test_distill_two_ranks_log_the_mean_of_their_own_losses(start, tokenizer, torchrun):
    out = start / "ranks"
    torchrun("distill.py", _args(start, out) + ["--batch_size", "3", "--max_steps", "2", "--alpha", "0.3"])
    rec = _records(out)[0]
    # Step 1: rank r distils conversations order[3r : 3r + 3]; each logged term is the mean of the ranks' own means.
    order = epoch_order(160, 42, 0).tolist()
    per_rank = [_hand_ce_kl(start, tokenizer, order[3 * r : 3 * r + 3], 1.5) for r in (0, 1)]
    assert abs(per_rank[0][0] - per_rank[1][0]) > 1e-3 and abs(per_rank[0][1] - per_rank[1][1]) > 1e-3
    ce, kl = (per_rank[0][0] + per_rank[1][0]) / 2, (per_rank[0][1] + per_rank[1][1]) / 2
    # fp32 training forwards against fp64 logits; CE and KL are both about 8 here.
    assert rec["ce"] == pytest.approx(ce, rel=1e-5)
    assert rec["kl"] == pytest.approx(kl, rel=1e-5)
    assert rec["loss"] == pytest.approx(0.3 * ce + 0.7 * 1.5**2 * kl, rel=1e-5)
    assert [r["step"] for r in _records(out)] == [1, 2]
    # The student's gradient, averaged over the ranks, includes the KL's path into the tied head (read outside the
    # forward): the step-1 gradient norm from full fp32 logits.
    data = SFTDataset(start / "sft.jsonl", tokenizer, 96)
    student, _, _ = ckpt.load_model(start / "student")
    teacher, _, _ = ckpt.load_model(start / "teacher")
    rank_losses = []
    for r in (0, 1):
        batch = collate_sft([data[i] for i in order[3 * r : 3 * r + 3]])
        keep = batch["labels"][:, 1:] != -100
        s = student(batch["input_ids"], return_logits=True).logits[:, :-1][keep]
        with torch.no_grad():
            t = teacher(batch["input_ids"], return_logits=True).logits[:, :-1][keep]
        ce = torch.nn.functional.cross_entropy(s, batch["labels"][:, 1:][keep])
        kl = torch.nn.functional.kl_div(
            (s / 1.5).log_softmax(-1), (t / 1.5).log_softmax(-1), reduction="batchmean", log_target=True
        )
        rank_losses.append(0.3 * ce + 0.7 * 1.5**2 * kl)
    ((rank_losses[0] + rank_losses[1]) / 2).backward()
    norm = torch.cat([p.grad.double().flatten() for p in student.parameters() if p.grad is not None]).norm().item()
    # Logged rounded to 4 decimals, and summed in another order (chunked logits) than this full-logits reference.
    assert rec["grad_norm"] == pytest.approx(norm, rel=3e-4)
    model, cfg, _ = ckpt.load_model(out / "full_dist")
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (64, 2)
    assert ckpt.load_train_state(out / "full_dist_resume" / "step_00000002")["rows_seen"] == 12


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
