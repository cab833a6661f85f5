"""bench/gpu_check.sh --dry-run on a CPU: every step of the GPU check runs at toy size and writes its files, so the
script a lent GPU runs cannot rot between the sessions that have one."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", str(out), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    summary = (out / "summary.txt").read_text()
    statuses = dict(re.findall(r"^   ([\w ]+): exit (\d+) after", summary, flags=re.M))
    assert statuses == {"env": "0", "gpu tests": "0", "e2e": "0", "kernels": "0"}, summary

    # The gpu-marked tests are found (the GPU run executes exactly these).
    collected = re.search(r"(\d+)/\d+ tests collected", (out / "gpu_tests.log").read_text())
    assert collected and int(collected.group(1)) >= 20

    # The e2e matrix measured MiniMind's loop and our path on the same preset.
    (e2e,) = out.glob("e2e-matrix_cpu_*.json")
    runs = json.loads(e2e.read_text())["runs"]
    assert {(r["mode"], r["status"]) for r in runs} == {("baseline-minimind", "ok"), ("packed", "ok")}
    assert all(r["tokens_per_s"] > 0 for r in runs)

    # One kernel entry per op asked for.
    (kern,) = out.glob("kernels_cpu_*.json")
    ops = {e["op"] for e in json.loads(kern.read_text())["entries"]}
    assert {"rmsnorm", "linear_cross_entropy", "moe_experts", "attention"} <= ops, ops
