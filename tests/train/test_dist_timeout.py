"""A hung rank ends a torchrun job: the other rank's collective times out after --dist_timeout seconds, says so in
one line, and torchrun stops the job, instead of every rank waiting forever."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # field 4 of /proc/PID/stat is the parent pid
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the worker processes")
def test_sigstopped_rank_ends_the_job_with_a_message(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0"]
    cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", str(REPO / "train" / "pretrain.py")]
    cmd += ["--preset", "tiny", "--max_seq_len", "32", "--batch_size", "2", "--kernels", "torch", "--log_interval", "1"]
    cmd += ["--max_steps", "100000", "--save_interval", "100000", "--dist_timeout", "5", "--out_dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = None
    try:
        metrics = tmp_path / "pretrain_metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # both ranks are stepping
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        workers = sorted(_children(proc.pid))
        assert len(workers) == 2, workers
        stopped = workers[-1]
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=180)
        waited = time.monotonic() - t0
    finally:
        if stopped is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "no answer from another rank within --dist_timeout 5 s" in err, err[-3000:]
    # 5 s of timeout plus torchrun's stop of the group (it waits for the stopped rank, then kills it).
    print(f"job ended {waited:.1f} s after the SIGSTOP")
    assert waited < 120, waited
