"""bench/default_run.py: the README's main command, timed, side by side with another commit."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from bench import default_run

ROOT = Path(__file__).resolve().parents[2]


def test_training_rate_weights_each_log_window_by_its_steps(tmp_path):
    path = tmp_path / "m.jsonl"
    records = [
        {"step": 10, "loss": 6.0, "tokens_per_s": 1000.0},
        {"step": 12, "stopped": "non-finite"},  # no rate: not a log window
        {"step": 40, "loss": 4.0, "tokens_per_s": 3000.0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rate, steps, losses = default_run.training_rate(path)
    # 10 steps at 1000 tok/s and 30 at 3000 tok/s: 40 steps' tokens over 10/1000 + 30/3000 step-seconds per token
    assert rate == pytest.approx(40 / (10 / 1000 + 30 / 3000)) and rate == pytest.approx(2000.0)
    assert steps == 40 and losses == [6.0, 4.0]
    assert default_run.training_rate(tmp_path / "missing.jsonl") == (None, 0, [])


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="--against needs a git checkout")
def test_side_by_side_with_a_commit_runs_both_trees_and_writes_the_ratio(tmp_path):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    flags = "--max_steps 4 --log_interval 2 --save_interval 100 --batch_size 2 --max_seq_len 64"
    result = default_run.main(["--against", "HEAD", "--pretrain_args", flags, "--out_dir", str(tmp_path)])
    old, new = result["runs"]
    assert (old["tree"], new["tree"]) == ("HEAD", "this checkout")
    assert [r["status"] for r in result["runs"]] == ["ok", "ok"], result["runs"]
    assert old["steps"] == new["steps"] == 4 and old["tokens_per_s"] > 0 and new["tokens_per_s"] > 0
    assert result["against_commit"] == head.stdout.strip()
    assert len(set(result["data_sha256"].values())) == 1  # the same sample data in both trees
    (pair,) = result["pairs"]
    assert pair["tokens_per_s"] == pytest.approx(new["tokens_per_s"] / old["tokens_per_s"])
    md = Path(result["paths"][1]).read_text()
    assert f"pair by pair: {pair['tokens_per_s']:.2f}x" in md
    worktrees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert "default-run-" not in worktrees  # the temporary worktree is gone
    meta = result["meta"]
    if not torch.cuda.is_available():  # the CPU named as /proc/cpuinfo names it, not "cpu (unknown)"
        cpuinfo = Path("/proc/cpuinfo")
        lines = cpuinfo.read_text().splitlines()
        models = [ln.partition(":")[2].strip() for ln in lines if ln.startswith("model name")]
        if models:
            assert meta["device"] == f"cpu ({models[0]})" and meta["cpu"]["model"] == models[0]
            assert f"timed: cpu ({models[0]})" in md
