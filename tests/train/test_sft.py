"""train/sft.py end to end on CPU: the assistant-span loss by hand, learning, exact resume, errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minimind_fast import checkpoint as ckpt
from minimind_fast.config import from_preset
from minimind_fast.data import SFTDataset, collate_sft
from minimind_fast.model import MiniMind
from train import sft
from train.step import epoch_order, iterate_batches

SFT_DATA = "data/sample/sft.jsonl"


from _stage_helpers import hand_ce, stage_argv, step_losses  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_loss_is_cross_entropy_on_assistant_tokens_only(tokenizer):
    torch.manual_seed(1)
    model = MiniMind(from_preset("tiny")).eval()
    data = SFTDataset(SFT_DATA, tokenizer, 256)  # long enough for the first conversation's whole reply
    rows = [data[i] for i in (0, 1, 2)]
    batch = collate_sft(rows)
    assert len({len(r["input_ids"]) for r in rows}) > 1  # the batch really is padded
    loss, aux = sft.sft_loss(model, batch)
    assert aux is None
    assert abs(loss.item() - hand_ce(model, batch)) < 1e-5
    # The labelled tokens are exactly each assistant reply plus its turn end.
    record = json.loads(open(SFT_DATA).readline())
    reply = next(m["content"] for m in record["conversations"] if m["role"] == "assistant")
    labelled = [int(t) for t in rows[0]["labels"] if t != -100]
    assert tokenizer.decode(labelled) == reply + "<|im_end|>\n"
    # Right padding does not change any row's per-token loss (no attention mask needed under the causal mask).
    alone = model(rows[0]["input_ids"][None], labels=rows[0]["labels"][None], loss_reduction="none").loss[0]
    padded = model(batch["input_ids"], labels=batch["labels"], loss_reduction="none").loss[0, : len(alone)]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_first_logged_loss_is_the_hand_computed_loss_and_training_learns(tiny_start, tmp_path, tokenizer):
    out = tmp_path / "out"
    res = sft.main(
        stage_argv(tiny_start, out, "--max_steps", "25", "--learning_rate", "3e-3", "--group_by_length", "0")
    )
    losses = step_losses(out, "full_sft")
    assert len(losses) == 25 and res["steps"] == 25
    model, _, _ = ckpt.load_model(tiny_start)
    data = SFTDataset(SFT_DATA, tokenizer, 64)
    _, first = next(iterate_batches(data, collate_sft, 4, 42, 0))
    assert abs(losses[1] - hand_ce(model, first)) < 1e-4
    early, late = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (23, 24, 25)) / 3
    assert late < early - 1.5, (early, late)
    trained, cfg, payload = ckpt.load_model(out / "full_sft")
    assert cfg.hidden_size == 256 and payload["args"]["from_weight"] == str(tiny_start)
    assert not torch.equal(trained.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert (out / "full_sft_loss.png").stat().st_size > 1000


def test_length_grouped_order_batches_similar_lengths(tokenizer):
    lengths = np.array([len(line) for line in open(SFT_DATA, "rb")])
    n, bs = len(lengths), 16
    order = sft.length_grouped_order(lengths, bs, seed=42, epoch=0, group=8)
    assert sorted(order.tolist()) == list(range(n))  # a permutation
    assert not torch.equal(order, sft.length_grouped_order(lengths, bs, seed=42, epoch=1, group=8))
    # Independent construction of the same batches (as sets): sorted groups of the epoch permutation, cut into batches.
    perm = epoch_order(n, 42, 0).tolist()
    want = []
    for g in range(0, n, 8 * bs):
        part = sorted(perm[g : g + 8 * bs], key=lambda i: -lengths[i])
        want += [frozenset(part[b : b + bs]) for b in range(0, len(part), bs)]
    got = [frozenset(order[b : b + bs].tolist()) for b in range(0, n - n % bs, bs)]
    assert set(got) <= set(want)
    data = SFTDataset(SFT_DATA, tokenizer, 256)

    def pad_fraction(o):
        real = padded = 0
        for b in range(0, 40 * bs, bs):
            rows = [len(data[int(i)]["input_ids"]) for i in o[b : b + bs]]
            real, padded = real + sum(rows), padded + max(rows) * len(rows)
        return 1 - real / padded

    assert pad_fraction(order) < 0.25 < 0.45 < pad_fraction(epoch_order(n, 42, 0))


def test_resume_reproduces_the_uninterrupted_run_exactly(tiny_start, tmp_path):
    args = stage_argv(
        tiny_start, tmp_path / "x", "--max_steps", "6", "--save_interval", "3", "--accumulation_steps", "2"
    )
    full = tmp_path / "full"
    sft.main(args + ["--out_dir", str(full)])
    cut = tmp_path / "cut"
    shutil.copytree(full / "full_sft_resume" / "step_00000003", cut / "full_sft_resume" / "step_00000003")
    sft.main(args + ["--out_dir", str(cut), "--from_resume", "1"])
    want, got = step_losses(full, "full_sft"), step_losses(cut, "full_sft")
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in got] == [want[s] for s in got]  # bit-identical on CPU
    a, _, _ = ckpt.load_model(full / "full_sft")
    b, _, _ = ckpt.load_model(cut / "full_sft")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_bad_inputs_fail_with_a_clear_message(tiny_start, tmp_path):
    bad = tmp_path / "bad.jsonl"
    ok = '{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    bad.write_text(ok * 3 + '{"conversations": [{"role": "user", "content": "no reply"}]}\n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl:4: .*no assistant message"):
        sft.main(stage_argv(tiny_start, tmp_path / "o", "--data_path", str(bad)))
    few = tmp_path / "few.jsonl"
    few.write_text(ok * 3)
    with pytest.raises(SystemExit, match="fewer than one optimizer step"):
        sft.main(stage_argv(tiny_start, tmp_path / "o", "--data_path", str(few)))
    with pytest.raises(SystemExit, match="--from_weight"):
        sft.main(stage_argv(tmp_path / "missing", tmp_path / "o"))


def test_two_ranks_under_torchrun_average_their_own_token_means(tiny_start, tmp_path, tokenizer):
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0"]
    cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", str(repo / "train" / "sft.py")]
    cmd += stage_argv(tiny_start, tmp_path, "--batch_size", "2", "--max_steps", "2", "--group_by_length", "0")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x 2 ranks" in proc.stdout
    # Step 1: rank r trains on conversations order[2r : 2r + 2]; the logged loss is the mean of the two ranks' losses.
    model, _, _ = ckpt.load_model(tiny_start)
    data = SFTDataset(SFT_DATA, tokenizer, 64)
    order = epoch_order(len(data), 42, 0)
    per_rank = [hand_ce(model, collate_sft([data[int(i)] for i in order[2 * r : 2 * r + 2]])) for r in (0, 1)]
    assert abs(step_losses(tmp_path, "full_sft")[1] - sum(per_rank) / 2) < 1e-4
    ckpt.load_model(tmp_path / "full_sft")
