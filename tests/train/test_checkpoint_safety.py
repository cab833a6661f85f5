"""Checkpoints never lose a run: --from_resume refuses what it cannot continue (and writes nothing), pruning touches
only the run's own checkpoints, runs carry an identity that a resume must match, the metrics log holds each step
once, non-finite weights are refused, and a checkpoint is never trained with a tokenizer other than its own.

Real stage runs (train/pretrain.py, train/sft.py through main) on the tiny preset and small data files of their own.
"""

import hashlib
import json
import shutil

import pytest
import torch
from _stage_helpers import stage_argv, step_losses
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minimind_fast import checkpoint as ckpt
from minimind_fast.data import tokenizer_fingerprint
from minimind_fast.model import MiniMind
from minimind_fast.tokenizer import Tokenizer
from train import pretrain, sft
from train.resume import checkpoint_run

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A pretrain file of its own: 300 short lines, about 90 rows of 64 tokens."""
    path = tmp_path_factory.mktemp("data") / "pretrain.jsonl"
    lines = [
        f"Line {i}: the river town of Orrin has {i % 7} bridges, {i % 5} mills and {i % 3} inns." for i in range(300)
    ]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """The first 40 conversations of the sample SFT data."""
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    with open("data/sample/sft.jsonl") as f:
        path.write_text("".join(next(f) for _ in range(40)))
    return path


def _pretrain(data, out, *extra):
    base = ["--preset", "tiny", "--kernels", "torch", "--log_interval", "1", "--batch_size", "4", "--max_seq_len", "64"]
    return pretrain.main(base + ["--data_path", str(data), "--out_dir", str(out), *map(str, extra)])


def _refused(capsys, run) -> str:
    """Run a stage that must refuse: exit status 2 and exactly one `error:` line on stderr, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run()
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [str(exc.value)]
    return errors[0]


def _snapshot(root):
    """Every path under root with its mtime and the sha256 of each file: equal snapshots = nothing written."""
    snap = {}
    for p in sorted(root.rglob("*")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        snap[str(p.relative_to(root))] = (p.stat().st_mtime_ns, digest)
    return snap


def _instance(folder) -> str:
    return checkpoint_run(folder)["instance"]


def _metric_steps(out_dir, name="pretrain") -> list[int]:
    return [json.loads(line)["step"] for line in (out_dir / f"{name}_metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- 1. nothing to resume from
def test_resume_with_every_checkpoint_unreadable_refuses_naming_each_and_writes_nothing(texts, tmp_path, capsys):
    out = tmp_path / "out"
    _pretrain(texts, out, "--max_steps", 4, "--save_interval", 2)
    rdir = out / "pretrain_resume"
    weights = rdir / "step_00000002" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    (rdir / "step_00000004" / "manifest.json").unlink()
    before = _snapshot(out)
    msg = _refused(capsys, lambda: _pretrain(texts, out, "--max_steps", 6, "--from_resume", 1))
    assert msg.startswith(f"error: --from_resume 1: no checkpoint under {rdir} can continue this run: ")
    assert "step_00000004: has no manifest.json: it is incomplete (torn write?)" in msg
    assert "step_00000002: model.safetensors does not match its sha256 (corrupt)" in msg
    assert _snapshot(out) == before  # the model folder, the checkpoints and the metrics are untouched

    empty = tmp_path / "empty"
    msg = _refused(capsys, lambda: _pretrain(texts, empty, "--max_steps", 2, "--from_resume", 1))
    assert f"no resume checkpoint under {empty / 'pretrain_resume'} (the folder does not exist" in msg
    assert not empty.exists()


# ------------------------------------------------------------------------------ 2, 3. runs sharing one resume folder
def test_a_fresh_run_keeps_another_runs_checkpoints_and_each_run_resumes_its_own(texts, tmp_path, capsys):
    out, rdir = tmp_path / "out", tmp_path / "out" / "pretrain_resume"
    run_a = ["--max_seq_len", 32, "--max_steps", 6, "--save_interval", 2, "--keep_last", 2]
    _pretrain(texts, out, *run_a)
    a = _instance(rdir / "step_00000006")
    assert sorted(p.name for p in rdir.iterdir()) == ["step_00000004", "step_00000006"]

    # Run B's settings differ (64-token rows): its resume refuses A's checkpoints, naming both values.
    run_b = ["--max_seq_len", 64, "--save_interval", 1, "--keep_last", 2]
    msg = _refused(capsys, lambda: _pretrain(texts, out, *run_b, "--max_steps", 6, "--from_resume", 1))
    assert "step_00000006: a run with other settings (max_seq_len: checkpoint 32, this run 64)" in msg
    assert "step_00000004: a run with other settings (max_seq_len: checkpoint 32, this run 64)" in msg
    assert "--force_resume 1" in msg

    # A fresh B: its pruning (keep 2) deletes only its own, and its step 4 does not overwrite A's step_00000004.
    _pretrain(texts, out, *run_b, "--max_steps", 4)
    assert "holds 2 checkpoint(s) of earlier runs (step_00000004, step_00000006)" in capsys.readouterr().out
    b = _instance(out / "pretrain")
    assert b != a
    assert {p.name: _instance(p) for p in rdir.iterdir()} == {
        "step_00000004": a,
        "step_00000006": a,
        "step_00000003": b,
        f"step_00000004-{b[:8]}": b,
    }
    for p in rdir.iterdir():
        ckpt.verify_checkpoint(p)

    # B resumes from its own newest, not from A's higher step 6, and logs each step once.
    _pretrain(texts, out, *run_b, "--max_steps", 6, "--from_resume", 1)
    assert f"resumed run {b} from {rdir / f'step_00000004-{b[:8]}'} at step 4" in capsys.readouterr().out
    assert _metric_steps(out) == [1, 2, 3, 4, 5, 6]
    assert {p.name: _instance(p) for p in rdir.iterdir()} == {
        "step_00000004": a,
        "step_00000006": a,
        "step_00000005": b,
        f"step_00000006-{b[:8]}": b,
    }

    # And A, with its own settings, still continues from its own step 6.
    _pretrain(texts, out, *run_a, "--from_resume", 1)
    assert f"resumed run {a} from {rdir / 'step_00000006'} at step 6" in capsys.readouterr().out


def test_a_resume_with_other_data_batch_or_seed_is_refused_unless_forced(texts, tmp_path, capsys):
    out = tmp_path / "out"
    _pretrain(texts, out, "--max_steps", 2, "--save_interval", 2)
    other = tmp_path / "other.jsonl"
    other.write_text(texts.read_text() + json.dumps({"text": "One more line."}) + "\n")
    changed = ["--data_path", other, "--batch_size", 2, "--seed", 7, "--max_steps", 2, "--from_resume", 1]
    msg = _refused(capsys, lambda: _pretrain(texts, out, *changed))
    size, other_size = texts.stat().st_size, other.stat().st_size
    assert f"data: checkpoint {texts} ({size} bytes, sha256 " in msg
    assert f"this run {other} ({other_size} bytes, sha256 " in msg
    assert "rows_per_step: checkpoint 4 (batch 4 x accum 1 x 1 rank), this run 2 (batch 2 x accum 1 x 1 rank)" in msg
    assert "seed: checkpoint 42, this run 7" in msg

    _pretrain(texts, out, *changed, "--force_resume", 1)
    printed = capsys.readouterr().out
    assert f"warning: --from_resume: continuing step_00000002, whose run differs: data: checkpoint {texts}" in printed
    run = _instance(out / "pretrain_resume" / "step_00000002")
    assert f"resumed run {run} from {out / 'pretrain_resume' / 'step_00000002'} at step 4" in printed  # 8 rows / 2


# ---------------------------------------------------------------------------------------------------- 6. the metrics
def test_after_a_resume_the_metrics_log_holds_each_step_once(texts, tmp_path):
    out = tmp_path / "out"
    args = ["--max_steps", 6, "--save_interval", 3, "--keep_last", 5]
    _pretrain(texts, out, *args)
    want = step_losses(out, "pretrain")
    # Killed after logging step 6 but before its checkpoint, in the middle of a line.
    shutil.rmtree(out / "pretrain_resume" / "step_00000006")
    with open(out / "pretrain_metrics.jsonl", "a") as f:
        f.write('{"step": 7, "epoch": 0, "lo')
    _pretrain(texts, out, *args, "--from_resume", 1)
    assert _metric_steps(out) == [1, 2, 3, 4, 5, 6]
    assert step_losses(out, "pretrain") == want  # steps 4-6 replayed bit-identically, logged once


# ------------------------------------------------------------------------------------------------ 7. non-finite weights
def _rewrite(folder, weight: str | None = None, moment: bool = False) -> str | None:
    """Write folder again with one weight element NaN, or one optimizer moment inf; -> the optimizer entry changed."""
    cfg, payload = ckpt.load_config(folder)
    model = MiniMind(cfg)
    ckpt.load_model_weights(model, folder)
    state = ckpt.load_train_state(folder)
    if weight is not None:
        with torch.no_grad():
            model.get_parameter(weight).view(-1)[7] = float("nan")
    name = None
    if moment:
        name = sorted(state["optimizer"]["state"])[3]
        state["optimizer"]["state"][name]["exp_avg"].view(-1)[0] = float("inf")
    tok = Tokenizer.load(folder)
    ckpt.save_checkpoint(folder, model, cfg, tok, payload["args"], train_state=state, meta=payload["meta"])
    return name


def test_nonfinite_weights_or_optimizer_state_are_refused_at_resume_and_as_from_weight(texts, chats, tmp_path, capsys):
    out = tmp_path / "out"
    _pretrain(texts, out, "--max_steps", 2, "--save_interval", 1)
    rdir = out / "pretrain_resume"
    _rewrite(rdir / "step_00000002", weight="model.layers.1.mlp.up_proj.weight")
    moment = _rewrite(rdir / "step_00000001", moment=True)
    msg = _refused(capsys, lambda: _pretrain(texts, out, "--max_steps", 4, "--from_resume", 1))
    assert "step_00000002: model.safetensors holds non-finite weights (first: model.layers.1.mlp.up_proj.weight" in msg
    assert f"step_00000001: train_state.pt holds non-finite optimizer state (first: state.{moment}.exp_avg)" in msg

    with pytest.raises(SystemExit, match=r"--from_weight: .*step_00000002: model.safetensors holds non-finite weights"):
        sft.main(stage_argv(rdir / "step_00000002", tmp_path / "sft", "--data_path", str(chats), "--max_steps", "1"))
    assert not (tmp_path / "sft" / "full_sft_metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------------------ 8. tokenizers
@pytest.fixture(scope="module")
def swapped(tmp_path_factory, tokenizer):
    """The shipped tokenizer with two ordinary tokens' ids swapped: same size, same text, other ids."""
    spec = json.loads(tokenizer.hf.to_str())
    vocab = spec["model"]["vocab"]
    a, b = (next(t for t, i in vocab.items() if i == n) for n in (1000, 1001))
    vocab[a], vocab[b] = 1001, 1000
    folder = tmp_path_factory.mktemp("swapped")
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return folder


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A 500-token byte-level BPE trained on the sample SFT text, with MiniMind's three special tokens at 0-2."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    with open("data/sample/sft.jsonl") as f:
        hf.train_from_iterator((line for _, line in zip(range(400), f)), trainer)
    folder = tmp_path_factory.mktemp("small_vocab")
    hf.save(str(folder / "tokenizer.json"))
    assert Tokenizer.load(folder).vocab_size == 500
    return folder


def test_sft_refuses_a_tokenizer_other_than_its_checkpoints(tiny_start, chats, swapped, small_vocab, tmp_path, capsys):
    shipped = tokenizer_fingerprint(Tokenizer.load(tiny_start))[:16]
    out = tmp_path / "out"
    run = stage_argv(tiny_start, out, "--data_path", str(chats), "--max_steps", "1")
    msg = _refused(capsys, lambda: sft.main(run + ["--tokenizer", str(swapped)]))
    other = tokenizer_fingerprint(Tokenizer.load(swapped))[:16]
    assert msg.startswith(f"error: --tokenizer {swapped}: it is not the tokenizer {tiny_start} was trained with")
    assert f"that one: fingerprint {shipped}, 6400 tokens; this one: fingerprint {other}, 6400 tokens" in msg
    assert "--allow_tokenizer_change 1" in msg

    msg = _refused(capsys, lambda: sft.main(run + ["--tokenizer", str(small_vocab)]))
    assert f"this one: fingerprint {tokenizer_fingerprint(Tokenizer.load(small_vocab))[:16]}, 500 tokens" in msg
    assert "it has 500 tokens, the model's embedding 6400 rows" in msg
    assert not out.exists()

    sft.main(run + ["--tokenizer", str(swapped), "--allow_tokenizer_change", "1"])
    assert f"warning: --tokenizer {swapped}: it is not the tokenizer" in capsys.readouterr().out
    assert ckpt.saved_tokenizer(out / "full_sft")["fingerprint"][:16] == other


def test_a_resume_with_another_tokenizer_is_refused_unless_allowed(texts, swapped, tmp_path, capsys):
    out = tmp_path / "out"
    _pretrain(texts, out, "--max_steps", 1, "--save_interval", 1)
    step1 = out / "pretrain_resume" / "step_00000001"
    msg = _refused(capsys, lambda: _pretrain(texts, out, "--max_steps", 1, "--from_resume", 1, "--tokenizer", swapped))
    was = ckpt.saved_tokenizer(step1)["fingerprint"][:16]
    now = tokenizer_fingerprint(Tokenizer.load(swapped))[:16]
    assert f"step_00000001: a run with other settings (tokenizer: checkpoint fingerprint {was}, this run" in msg
    assert f"this run fingerprint {now})" in msg
    assert "--allow_tokenizer_change 1 continues with another tokenizer" in msg
    _pretrain(texts, out, "--max_steps", 1, "--from_resume", 1, "--tokenizer", swapped, "--allow_tokenizer_change", 1)
    assert f"resumed run {_instance(step1)} from {step1} at step 1" in capsys.readouterr().out
