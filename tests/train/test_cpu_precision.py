"""--dtype auto on a CPU is bf16 autocast where the start-up probe finds bf16 matmuls at least CPU_BF16_MIN_SPEEDUP
times faster than fp32, else fp32; the start-up line gives the probe's figure and names --dtype float32;
--dtype float32 / bfloat16 choose. A CPU run keeps freed memory in the process (keep_cpu_allocations) and computes
with denormals flushed to zero (flush_cpu_denormals)."""

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train import pretrain, runtime

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
RUN = ["--preset", "tiny", "--max_seq_len", "32", "--batch_size", "2", "--max_steps", "1", "--kernels", "torch"]
_FLAGS = runtime.x86_cpu_flags()
needs_bf16_instructions = pytest.mark.skipif(
    not _FLAGS or not _FLAGS & runtime.X86_BF16_FLAGS,
    reason="this CPU has no bf16 instructions: the probe does not time it",
)


def _script(code: str, *argv: str, **env: str) -> list[str]:
    """Run code in a fresh Python process importing this checkout (extra environment variables as keywords);
    -> the words it printed."""
    paths = os.pathsep.join(str(p) for p in (REPO, REPO / "kernels", REPO / "minimind"))
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv],
        env={**os.environ, "PYTHONPATH": paths, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


@pytest.mark.parametrize(
    ("speedup", "dtype", "amp"),
    [(4.0, "auto", torch.bfloat16), (1.5, "auto", torch.bfloat16), (1.2, "auto", None), (0.02, "auto", None),
     (0.0, "auto", None), (4.0, "float32", None), (0.02, "bfloat16", torch.bfloat16)],
)  # fmt: skip
def test_the_probe_decides_auto_and_flags_override_it(speedup, dtype, amp, monkeypatch):
    monkeypatch.setattr(runtime, "_CPU_BF16_SPEEDUP", speedup)
    rt = runtime.setup_runtime("cpu", dtype)
    assert rt.amp_dtype == amp
    assert (f"{speedup:.2g}x" in rt.precision_note) == (dtype == "auto" and speedup >= runtime.CPU_BF16_MIN_SPEEDUP)


def test_the_start_up_line_says_what_was_chosen_and_why(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runtime, "_CPU_BF16_SPEEDUP", 3.0)
    pretrain.main(RUN + ["--out_dir", str(tmp_path)])
    want = "on cpu (bf16 autocast, bf16 matmul 3x fp32 on this CPU; --dtype float32 to opt out)"
    assert want in capsys.readouterr().out
    monkeypatch.setattr(runtime, "_CPU_BF16_SPEEDUP", 1.1)
    pretrain.main(RUN + ["--out_dir", str(tmp_path / "slow")])
    assert "on cpu (fp32);" in capsys.readouterr().out


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


_LOAD = """
import sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(1024, 1024)
print("busy", flush=True)
end = time.time() + 60
while time.time() < end:
    a @ a
"""


@needs_bf16_instructions
def test_the_probe_reads_the_same_on_a_busy_machine(monkeypatch):
    """Other work on the machine (a test run beside the training run, say) must not flip the choice: with another
    process multiplying matrices on every core, the probe still finds bf16 fast where the CPU has bf16 instructions.
    Timed on all threads, one dtype after the other (as it was before), it read under 1.5 in 6 of 10 processes under
    such a load on a 2-core AMX Xeon, and 4.3-4.9 idle."""
    torch.set_num_threads(threads := 2)  # as a training run has them (this module's fixture restores one after)
    load = subprocess.Popen([sys.executable, "-c", _LOAD, str(os.cpu_count() or 1)], stdout=subprocess.PIPE, text=True)
    try:
        assert load.stdout.readline().strip() == "busy"
        readings = []
        for _ in range(8):
            monkeypatch.setattr(runtime, "_CPU_BF16_SPEEDUP", None)
            readings.append(runtime.cpu_bf16_speedup())
        assert load.poll() is None  # the load ran throughout
    finally:
        load.kill()
        load.wait()
    assert min(readings) >= runtime.CPU_BF16_MIN_SPEEDUP, readings
    assert torch.get_num_threads() == threads  # the probe times on one thread and gives the others back


_EMULATED = """
import time
from train import runtime
t = time.perf_counter()
print(runtime.cpu_bf16_speedup(), time.perf_counter() - t)
"""


@needs_bf16_instructions  # held to AVX2 by ONEDNN_MAX_CPU_ISA only where the CPU has more
def test_the_probe_finds_emulated_bf16_slow():
    """A CPU whose bf16 matmuls are emulated (here: this CPU with oneDNN held to AVX2, so bf16 goes through fp32
    conversion, as on CPUs other than x86 without bf16 arithmetic) is timed and reads slow, so auto picks fp32."""
    speedup, seconds = (float(v) for v in _script(_EMULATED, ONEDNN_MAX_CPU_ISA="AVX2")[-2:])
    assert speedup < 0.5, speedup  # measured 0.02-0.03 (with all 20 pairs, ~1.3 s; it stops after two: ~0.25 s)
    assert seconds < 5, seconds


_FAULTS = """
import ctypes, resource, sys
import torch
from train.runtime import setup_runtime
if sys.argv[1] == "cpu":
    setup_runtime("cpu", "float32")
else:  # glibc's documented start values, held fixed (by default they adapt to the history of frees)
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(-3, 128 * 1024) and libc.mallopt(-1, 128 * 1024)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD

def step():  # a step of the tiny preset allocates and frees several [1024, 6400] fp32 buffers (logits, gradients)
    a, b, c = torch.ones(1024, 6400), torch.ones(1024, 6400), torch.ones(1024, 6400)
    del a, b, c

for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)
def test_a_cpu_run_keeps_freed_memory_instead_of_faulting_it_in_again():
    """Two fresh processes run the same allocate-and-free pattern; counted are the page faults per repetition once
    warm. With glibc's start values a freed 26 MB block goes back to the kernel and the next step faults it in again
    (its default thresholds adapt, so whether a training step hits this varies; the tiny preset's step measured
    +14-17% tokens/s with the memory kept); after setup_runtime on a CPU the memory stays in the process."""

    default, kept = (float(_script(_FAULTS, mode)[-1]) for mode in ("plain", "cpu"))
    # Measured: 19,203 and 0 faults per repetition run alone; once, inside the full suite on this machine, the kept
    # process still faulted 2,560 (10 MB; cause not found), so the bar is a large reduction, not zero.
    assert default > 5000 and kept < default / 4, (default, kept)
    assert runtime.keep_cpu_allocations() is True


_DENORMALS = """
import sys
import torch
torch.set_num_threads(2)
from train.runtime import setup_runtime
setup_runtime("cpu", sys.argv[2], tune_cpu=sys.argv[1] == "cpu")  # auto: the probe runs too
x = torch.full((1 << 22,), 1e-39)  # a denormal fp32 (the smallest normal is 1.18e-38)
y = x * 3.0  # 4M elements: split over both intra-op threads
print(int((y == 0).sum()), y.numel())
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="FTZ/DAZ are x86 switches")
@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_a_cpu_run_computes_with_denormals_flushed_on_every_thread(dtype):
    """Two fresh processes multiply a tensor of denormals with both intra-op threads: after setup_runtime on a CPU
    every product is zero (the flush reached the threads started later); with tune_cpu=False (the MiniMind baseline)
    none is."""

    def zeros(mode: str) -> tuple[int, ...]:
        return tuple(int(v) for v in _script(_DENORMALS, mode, dtype)[-2:])

    assert zeros("cpu") == (1 << 22, 1 << 22)
    assert zeros("plain") == (0, 1 << 22)
