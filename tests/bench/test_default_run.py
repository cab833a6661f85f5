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


def test_seeds_give_one_run_each_and_the_report_gives_median_and_range(tmp_path, monkeypatch):
    seen = []

    def fake_run(tree, label, args, work, seed):  # the commands themselves are covered by the test above
        seen.append(seed)
        return {"tree": label, "seed": seed, "status": "ok", "wall_s": 1.0, "steps": 4, "tokens_per_s": 10.0,
                "first_loss": 6.0, "last_loss": 4.0, "heldout": {"age": seed / 100, "all": None}}  # fmt: skip

    monkeypatch.setattr(default_run, "one_run", fake_run)
    result = default_run.main(["--seeds", "5,1,30", "--out_dir", str(tmp_path)])
    assert seen == [5, 1, 30] and [r["seed"] for r in result["runs"]] == [5, 1, 30]
    spread = default_run.heldout_spread(result["runs"])
    assert spread == {"this checkout": {"runs": 3, "age": (5.0, 1.0, 30.0)}}  # kinds without a figure are left out
    md = Path(result["paths"][1]).read_text()
    assert "- this checkout (3 runs): age 5.0 [1.0, 30.0]" in md
    assert "| 2 | this checkout | 1 |" in md
    with pytest.raises(SystemExit):
        default_run.parse(["--seeds", "1,x"])
    with pytest.raises(SystemExit):
        default_run.parse(["--seeds", "1,2", "--pretrain_args", "--seed 3"])
