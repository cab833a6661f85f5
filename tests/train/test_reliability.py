"""Reliability of the pretraining loop: SIGKILL + resume is exact, SIGTERM saves and exits, non-finite steps are
skipped and counted (and a streak stops the run with its last checkpoint intact), bad input fails before compute."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minimind_fast import checkpoint as ckpt
from minimind_fast.model import MiniMind
from train import pretrain

REPO = Path(__file__).resolve().parents[2]
# --dtype float32: a subprocess on a CPU with fast bf16 would otherwise pick bf16 autocast (in-process runs are
# pinned to fp32 by the suite)
SMALL = ["--preset", "tiny", "--max_seq_len", "64", "--batch_size", "4", "--kernels", "torch", "--log_interval", "1"]
SMALL += ["--dtype", "float32"]


def _last_losses(out_dir):
    """step -> loss, the last record of each step winning (a killed run may have logged steps it never saved)."""
    lines = (Path(out_dir) / "pretrain_metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _spawn(args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "train" / "pretrain.py")] + args
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, "the run ended before the point it was to be interrupted at"
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


def test_sigkill_then_resume_matches_the_uninterrupted_run_exactly(tmp_path, one_thread):
    # 2 rows of 32 tokens: the kill lands between checkpoints all the same, at a fifth of the cost. One thread here as
    # in the spawned run: on an Intel Xeon (AMX) the fp32 step with 1 and with 2 threads differs by ~1e-6 (its
    # matmuls agree bit for bit; which op differs is not known), so a run resumed under another thread count than it
    # was saved with drifts (this failed at 82f7454 too there; on the AMD EPYC machines the two agreed)
    args = SMALL + ["--max_steps", "16", "--save_interval", "4", "--keep_last", "2", "--batch_size", "2"]
    args += ["--max_seq_len", "32"]
    pretrain.main(args + ["--out_dir", str(tmp_path / "full")])
    killed = tmp_path / "killed"
    proc = _spawn(args + ["--out_dir", str(killed)])
    _wait_for(killed / "pretrain_resume" / "step_00000008" / "manifest.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    pretrain.main(args + ["--out_dir", str(killed), "--from_resume", "1"])
    want, got = _last_losses(tmp_path / "full"), _last_losses(killed)
    assert sorted(got) == list(range(1, 17))
    assert got == want  # bit-identical on CPU, every step including those after the kill


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = _spawn(SMALL + ["--max_steps", "100000", "--save_interval", "5", "--out_dir", str(tmp_path)])
    _wait_for(tmp_path / "pretrain_resume" / "step_00000005" / "manifest.json", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    assert "saving a checkpoint and stopping" in out
    last = max(_last_losses(tmp_path))
    assert (tmp_path / "pretrain_resume" / f"step_{last:08d}").is_dir()  # saved at the step it stopped on
    ckpt.verify_checkpoint(tmp_path / "pretrain")


def _poison_forward(monkeypatch, bad_calls):
    """Make the model's loss NaN on the given forward calls (1-based), as a corrupt batch would."""
    real, calls = MiniMind.forward, {"n": 0}

    def forward(self, *a, **kw):
        out = real(self, *a, **kw)
        calls["n"] += 1
        if out.loss is not None and calls["n"] in bad_calls:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MiniMind, "forward", forward)


def test_a_nan_batch_is_skipped_and_counted(tmp_path, monkeypatch):
    _poison_forward(monkeypatch, bad_calls={3})
    pretrain.main(SMALL + ["--max_steps", "6", "--out_dir", str(tmp_path)])
    records = [json.loads(x) for x in (tmp_path / "pretrain_metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    model, _, _ = ckpt.load_model(tmp_path / "pretrain")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_streak_of_nan_steps_stops_with_the_last_good_checkpoint_intact(tmp_path, monkeypatch):
    _poison_forward(monkeypatch, bad_calls=set(range(5, 100)))
    args = SMALL + ["--max_steps", "20", "--save_interval", "2", "--max_bad_steps", "3", "--out_dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="3 non-finite steps in a row.*step_00000006"):
        pretrain.main(args)
    good = tmp_path / "pretrain_resume" / "step_00000006"
    ckpt.verify_checkpoint(good)
    model, _, _ = ckpt.load_model(good)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_bad_lines_counts_and_goes_on(tmp_path, capsys):
    lines = ['{"text": "The town of Orrin lies by a river and has many bridges."}'] * 40 + ["{not json", '{"x": 1}']
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(lines) + "\n")
    pretrain.main(
        SMALL + ["--data_path", str(data), "--skip_bad_lines", "--max_steps", "1", "--out_dir", str(tmp_path)]
    )
    assert "skipped 2 malformed lines" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--max_seq_len", "40000"], "exceeds the rotary table"),
        (["--from_weight", "no/such/checkpoint"], "does not exist"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--dtype", "float16"], "--dtype must be"),
        (["--preset", "huge"], "unknown preset"),
    ],
)
def test_bad_settings_fail_before_any_compute(tmp_path, extra, msg):
    if extra[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises((SystemExit, ValueError), match=msg):
        pretrain.main(SMALL + extra + ["--out_dir", str(tmp_path)])
    assert not (tmp_path / "pretrain_metrics.jsonl").exists()


def test_missing_tracker_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError, whether or not it is installed
    with pytest.raises(SystemExit, match="pip install wandb"):
        pretrain.main(SMALL + ["--wandb", "--out_dir", str(tmp_path)])
