"""train/distill_reason.py end to end on CPU: the tag-weighted loss against a full-logit computation whose tag
positions come from character offsets, learning, checkpoints, exact resume."""

import json
import re
import shutil

import pytest
import torch

from minimind_fast import checkpoint as ckpt
from minimind_fast.config import from_preset
from minimind_fast.model import MiniMind
from train import distill_reason
from train.step import epoch_order

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
RUN = ["--kernels", "torch", "--log_interval", "1", "--max_seq_len", "128", "--batch_size", "8"]
TAG_RE = re.compile(r"</?think>|</?answer>")


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def start(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("reason")
    torch.manual_seed(0)
    model = MiniMind(from_preset("tiny", **TINY))
    ckpt.save_checkpoint(root / "sft", model, model.config, tokenizer)
    lines = open("data/sample/r1_mix.jsonl").read().splitlines()[:96]
    (root / "r1.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _args(start, out):
    return RUN + ["--from_weight", str(start / "sft"), "--data_path", str(start / "r1.jsonl"), "--out_dir", str(out)]


def _records(out):
    return [json.loads(line) for line in (out / "reason_metrics.jsonl").read_text().splitlines()]


def _hand_loss(start, tokenizer, rows):
    """(tag-weighted loss, tagged token count) of the conversations `rows`: sum of weight x NLL over the trained
    tokens / their count, with the tag positions located by character offsets, from full fp64 logits."""
    model, _, _ = ckpt.load_model(start / "sft")
    model.double()
    convs = [json.loads(line)["conversations"] for line in (start / "r1.jsonl").read_text().splitlines()]
    total, count, tagged = 0.0, 0, 0
    for i in rows:
        text = tokenizer.apply_chat_template(convs[i])
        enc = tokenizer.hf.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids[:128], enc.offsets[:128]
        # Trained tokens: after the assistant header, up to the end of the conversation (one assistant turn here).
        start_char = text.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
        tags = [m.span() for m in TAG_RE.finditer(text)]
        with torch.no_grad():
            logp = model(torch.tensor([ids]), return_logits=True).logits[0].log_softmax(-1)
        for t in range(1, len(ids)):
            if offsets[t][0] < start_char:
                continue
            w = 10.0 if any(a <= offsets[t][0] and offsets[t][1] <= b for a, b in tags) else 1.0
            total += -w * logp[t - 1, ids[t]].item()
            count += 1
            tagged += w > 1
    return total / count, tagged


def test_distill_reason_first_step_loss_matches_char_located_tags(start, tokenizer):
    out = start / "one"
    distill_reason.main(_args(start, out) + ["--max_steps", "1"])
    rec = _records(out)[0]
    loss, tagged = _hand_loss(start, tokenizer, epoch_order(96, 42, 0)[:8].tolist())
    assert tagged > 8 * 4 * 2  # at least four tags of two or more tokens per conversation
    assert rec["loss"] == pytest.approx(loss, abs=2e-4)


def test_distill_reason_two_ranks_log_the_mean_of_their_own_losses(start, tokenizer, torchrun):
    out = start / "ranks"
    torchrun("distill_reason.py", _args(start, out) + ["--batch_size", "3", "--max_steps", "2"])
    records = _records(out)
    assert [r["step"] for r in records] == [1, 2]
    # Step 1: rank r trains on conversations order[3r : 3r + 3], each rank's loss normalised by its own label count.
    order = epoch_order(96, 42, 0).tolist()
    per_rank = [_hand_loss(start, tokenizer, order[3 * r : 3 * r + 3])[0] for r in (0, 1)]
    assert abs(per_rank[0] - per_rank[1]) > 1e-2  # the two shards really differ
    assert records[0]["loss"] == pytest.approx(sum(per_rank) / 2, abs=2e-4)
    _, cfg, _ = ckpt.load_model(out / "reason")
    assert cfg.hidden_size == 64
    assert ckpt.load_train_state(out / "reason_resume" / "step_00000002")["world_size"] == 2


def test_distill_reason_learns_and_reloads(start):
    out = start / "learn"
    distill_reason.main(_args(start, out) + ["--learning_rate", "5e-3"])
    recs = [r for r in _records(out) if "loss" in r]
    assert len(recs) == 12
    assert sum(r["loss"] for r in recs[-3:]) < 0.75 * sum(r["loss"] for r in recs[:3]), [r["loss"] for r in recs]
    assert all(0.1 < r["tag_token_fraction"] < 0.5 for r in recs)
    _, cfg, payload = ckpt.load_model(out / "reason")
    assert cfg.hidden_size == 64 and payload["args"]["tag_weight"] == 10.0


def test_distill_reason_resume_reproduces_the_uninterrupted_run_exactly(start):
    args = ["--learning_rate", "1e-3", "--max_steps", "6", "--save_interval", "3", "--keep_last", "3"]
    full, cut = start / "full", start / "cut"
    distill_reason.main(_args(start, full) + args)
    shutil.copytree(full / "reason_resume" / "step_00000003", cut / "reason_resume" / "step_00000003")
    distill_reason.main(_args(start, cut) + args + ["--from_resume", "1"])
    want = {r["step"]: r["loss"] for r in _records(full)}
    got = {r["step"]: r["loss"] for r in _records(cut)}
    assert sorted(got) == [4, 5, 6] and all(got[s] == want[s] for s in got)
    a, b = ckpt.load_model_state(full / "reason"), ckpt.load_model_state(cut / "reason")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distill_reason_warns_when_no_tag_is_found(start, capsys):
    distill_reason.main(_args(start, start / "none") + ["--max_steps", "1", "--tags", "<reflect>"])
    assert "no tag occurrence found" in capsys.readouterr().out
