"""--dtype auto on a CPU is fp32 (bf16 autocast trained faster but learned less); where the start-up probe finds bf16
matmuls fast, the start-up line says so and names --dtype bfloat16; --dtype float32 / bfloat16 choose."""

import time

import pytest
import torch

from train import pretrain, runtime

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["--preset", "tiny", "--max_seq_len", "32", "--batch_size", "2", "--max_steps", "1", "--kernels", "torch"]


@pytest.mark.parametrize(
    ("speedup", "dtype", "amp"),
    [(4.0, "auto", None), (1.2, "auto", None), (0.02, "auto", None), (4.0, "float32", None),
     (0.02, "bfloat16", torch.bfloat16)],
)  # fmt: skip
def test_the_probe_decides_auto_and_flags_override_it(speedup, dtype, amp, monkeypatch):
    monkeypatch.setattr(runtime, "_CPU_BF16_SPEEDUP", speedup)
    rt = runtime.setup_runtime("cpu", dtype)
    assert rt.amp_dtype == amp
    assert (f"{speedup:.2g}x" in rt.precision_note) == (dtype == "auto" and speedup >= runtime.CPU_BF16_MIN_SPEEDUP)


def test_the_start_up_line_says_what_was_chosen_and_why(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runtime, "_CPU_BF16_SPEEDUP", 3.0)
    pretrain.main(RUN + ["--out_dir", str(tmp_path)])
    want = "on cpu (fp32, bf16 matmul 3x fp32 on this CPU: --dtype bfloat16 trains faster but learns less)"
    assert want in capsys.readouterr().out


@pytest.mark.parametrize("flags", [None, {"avx2", "avx512f", "avx512_bf16"}])
def test_the_probe_measures_this_cpu(flags, monkeypatch):
    """Where the flags allow fast bf16 (or are unknown), the probe times both dtypes; its direction must agree with a
    direct, longer measurement (bf16 either clearly faster or clearly slower on real CPUs)."""
    monkeypatch.setattr(runtime, "_CPU_BF16_SPEEDUP", None)
    monkeypatch.setattr(runtime, "x86_cpu_flags", lambda: flags)
    first = runtime.cpu_bf16_speedup()
    assert 0 < first < 100 and runtime.cpu_bf16_speedup() == first  # measured once per process
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


def test_an_x86_cpu_without_bf16_instructions_is_not_timed(monkeypatch):
    monkeypatch.setattr(runtime, "_CPU_BF16_SPEEDUP", None)
    monkeypatch.setattr(runtime, "x86_cpu_flags", lambda: {"sse2", "avx2", "fma", "avx512f"})
    monkeypatch.setattr(runtime.torch, "randn", None)  # the probe would fail if it tried to time matmuls
    assert runtime.cpu_bf16_speedup() == 0.0
    monkeypatch.undo()
    flags = runtime.x86_cpu_flags()
    assert flags is None or "sse2" in flags  # this machine's /proc/cpuinfo parses (every x86-64 CPU has SSE2)
