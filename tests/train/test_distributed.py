"""Real multi-process runs through torchrun (gloo on CPU): DDP and FSDP2 reproduce a single-process run with the same
global batch, and a checkpoint written by 2 ranks resumes on 1."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train import pretrain

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--preset", "tiny", "--max_seq_len", "64", "--kernels", "torch", "--log_interval", "1", "--max_steps", "4"]
COMMON += ["--accumulation_steps", "2", "--save_interval", "2", "--keep_last", "3"]
# Losses are means over the same tokens, reduced in a different order across ranks: equal to float32 rounding.
TOL = 2e-5


def _losses(out_dir):
    lines = (Path(out_dir) / "pretrain_metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _torchrun(args, out_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0"]
    cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", str(REPO / "train" / "pretrain.py")]
    proc = subprocess.run(
        cmd + args + ["--out_dir", str(out_dir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    pretrain.main(COMMON + ["--batch_size", "4", "--out_dir", str(out)])
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(single, tmp_path, mode):
    extra = ["--fsdp", "1"] if mode == "fsdp" else []
    proc = _torchrun(COMMON + ["--batch_size", "2"] + extra, tmp_path)
    assert "x 2 ranks" in proc.stdout
    want, got = _losses(single), _losses(tmp_path)
    assert len(got) == len(want) == 4
    assert got == pytest.approx(want, abs=TOL)
    assert got[-1] < got[0]
    if mode == "fsdp":
        # Written by 2 ranks (gathered full state), resumed by one process with the same global batch.
        cut = tmp_path / "resumed"
        step2 = tmp_path / "pretrain_resume" / "step_00000002"
        shutil.copytree(step2, cut / "pretrain_resume" / step2.name)
        pretrain.main(COMMON + ["--batch_size", "4", "--out_dir", str(cut), "--from_resume", "1"])
        assert _losses(cut) == pytest.approx(want[2:], abs=TOL)
