"""--dtype auto on a CPU: bf16 autocast only where the start-up probe finds bf16 matmuls fast enough, said in the
start-up line; --dtype float32 / bfloat16 override the probe."""


import time

import pytest
import torch

from train import common, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["--preset", "tiny", "--max_seq_len", "32", "--batch_size", "2", "--max_steps", "1", "--kernels", "torch"]


@pytest.mark.parametrize(
    ("speedup", "dtype", "amp"),
    [(4.0, "auto", torch.bfloat16), (1.2, "auto", None), (0.02, "auto", None), (4.0, "float32", None),
     (0.02, "bfloat16", torch.bfloat16)],
)  # fmt: skip
def test_the_probe_decides_auto_and_flags_override_it(speedup, dtype, amp, monkeypatch):
    monkeypatch.setattr(common, "_CPU_BF16_SPEEDUP", speedup)
    rt = common.setup_runtime("cpu", dtype)
    assert rt.amp_dtype == amp
    assert (f"{speedup:.2g}x" in rt.precision_note) == (dtype == "auto")


def test_the_start_up_line_says_what_was_chosen_and_why(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common, "_CPU_BF16_SPEEDUP", 3.0)
    pretrain.main(RUN + ["--out_dir", str(tmp_path)])
    assert "on cpu (bf16 autocast, bf16 matmul 3x fp32 on this CPU)" in capsys.readouterr().out


def test_the_probe_measures_this_cpu(monkeypatch):
    monkeypatch.setattr(common, "_CPU_BF16_SPEEDUP", None)
    first = common.cpu_bf16_speedup()
    assert 0 < first < 100 and common.cpu_bf16_speedup() == first  # measured once per process
    # Same direction as a direct, longer measurement (bf16 either clearly faster or clearly slower on real CPUs).
    a, b = torch.randn(256, 512), torch.randn(512, 512)
    def rate(dt):
        x, y = a.to(dt), b.to(dt)
        x @ y
        t = time.perf_counter()
        for _ in range(5):
            x @ y
        return 5 / (time.perf_counter() - t)

    direct = rate(torch.bfloat16) / rate(torch.float32)
    if not 0.7 < direct < 1.4:  # a CPU where the two are close decides nothing here
        assert (first >= 1) == (direct >= 1)
