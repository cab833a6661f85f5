"""pytest settings for the kernel benchmarks (bench_kernels.py).

    pytest bench/ --benchmark-only                                   # CUDA: full shapes; CPU: tiny shapes, 2 rounds
    pytest bench/ --benchmark-only --bench-record=bench/results      # also write kernels_<gpu>_<date>.json and .md
    pytest bench/ --benchmark-only -k "rmsnorm and small"            # a subset
    BENCH_SCALE=tiny pytest bench/ --benchmark-only                  # tiny shapes anywhere (smoke test)

Options: --bench-scale auto|tiny|full (env BENCH_SCALE; auto = full on CUDA, tiny on CPU), --bench-rounds N (timed
rounds per benchmark), --bench-record DIR, --bench-interpret (no CUDA: run our Triton kernels in Triton's
interpreter to check that they plug in and agree with eager; nothing about speed). A CPU run says so in its header
and summary: its figures mean nothing.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # the repository root, for kernels/ and bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402


@dataclass
class Settings:
    scale: str  # "tiny" or "full"
    device: torch.device
    dtype: torch.dtype
    rounds: int
    warmup_rounds: int
    compile_backend: str
    record_dir: Path | None
    interpret: bool = False  # run our Triton kernels in Triton's interpreter on a CPU (plumbing checks only)

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Recorder:
    """Collects one entry per (op, preset, mode, impl): measured, skipped (with the reason) or failed."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def add(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        _write_record(exitstatus=None)  # after every entry, so a run killed at a time limit keeps what it measured


_STATE: dict[str, Any] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("minimind kernel benchmarks")
    group.addoption(
        "--bench-scale",
        choices=("auto", "tiny", "full"),
        default=os.environ.get("BENCH_SCALE", "auto"),
        help="shapes: full (the presets' real shapes, 16k tokens) or tiny (32 tokens); auto = full on CUDA only",
    )
    group.addoption(
        "--bench-rounds", type=int, default=None, help="timed rounds per benchmark (default 2 tiny, 30 full)"
    )
    group.addoption(
        "--bench-interpret",
        action="store_true",
        help="without CUDA, still run our Triton implementations, in Triton's interpreter (checks that they plug in "
        "and match eager at tiny scale; their times mean nothing)",
    )
    group.addoption(
        "--bench-record",
        default=None,
        metavar="DIR",
        help="write kernels_<gpu>_<yyyymmdd>.json and .md (all entries, ratios) into DIR at the end",
    )


def pytest_configure(config: pytest.Config) -> None:
    cuda = torch.cuda.is_available()
    scale = config.getoption("--bench-scale", default="auto") or "auto"
    if scale == "auto":
        scale = "full" if cuda else "tiny"
    rounds = config.getoption("--bench-rounds", default=None) or (30 if scale == "full" else 2)
    record = config.getoption("--bench-record", default=None)
    settings = Settings(
        scale=scale,
        device=torch.device("cuda" if cuda else "cpu"),
        # bf16 is what training runs in on a GPU; the CPU runs are smoke runs of the reference ops, in fp32.
        dtype=torch.bfloat16 if cuda else torch.float32,
        rounds=rounds,
        warmup_rounds=3 if scale == "full" else 1,
        # Inductor on a CPU generates and compiles C++ for every shape (seconds each), for figures that mean nothing;
        # aot_eager still runs dynamo's capture and AOT autograd, which is what can break.
        compile_backend="inductor" if cuda else "aot_eager",
        record_dir=Path(record) if record else None,
        interpret=bool(config.getoption("--bench-interpret", default=False)) and not cuda,
    )
    if settings.interpret:
        # Read when a kernel module is imported (lazily, at the first benchmark that resolves it), so set it now.
        os.environ["TRITON_INTERPRET"] = "1"
    if settings.record_dir is not None:
        why = bench.refuse_cpu_results(settings.record_dir)
        if why:
            raise pytest.UsageError(why)
    _STATE["settings"] = settings
    _STATE["recorder"] = Recorder()
    _STATE["argv"] = list(config.invocation_params.args)
    if cuda:
        _STATE["matmul_peak"] = bench.measure_bf16_matmul_peak()


@pytest.fixture(scope="session")
def bench_settings() -> Settings:
    return _STATE["settings"]


@pytest.fixture(scope="session")
def bench_recorder() -> Recorder:
    return _STATE["recorder"]


def pytest_report_header(config: pytest.Config) -> list[str]:
    s: Settings = _STATE["settings"]
    lines = [
        f"minimind bench: {bench.device_name()}, scale {s.scale}, {str(s.dtype).replace('torch.', '')}, "
        f"{s.rounds} rounds, compile backend {s.compile_backend}"
    ]
    peak = _STATE.get("matmul_peak")
    if peak:
        lines.append(f"measured bf16 matmul peak: {peak['tflops']} TFLOP/s ({peak['n']}^3)")
    if s.interpret:
        lines.append("Triton kernels run in Triton's interpreter: a check that they plug in, not a timing")
    if not s.on_cuda:
        lines.append(bench.CPU_WARNING)
    return lines


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["minimind"] = {**bench.versions(), "device": bench.device_name(), "peak": _STATE.get("matmul_peak")}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    s: Settings | None = _STATE.get("settings")
    if s is None:
        return
    rec: Recorder = _STATE["recorder"]
    ok = sum(e["status"] == "ok" for e in rec.entries)
    skipped = [e for e in rec.entries if e["status"] == "skipped"]
    terminalreporter.section("minimind kernel benchmarks")
    terminalreporter.write_line(f"{ok} measured, {len(skipped)} skipped (reasons below), device {bench.device_name()}")
    for reason in sorted({f"{e['impl']}: {e['reason']}" for e in skipped}):
        terminalreporter.write_line(f"  skipped {reason}")
    if _STATE.get("written"):
        terminalreporter.write_line(f"recorded: {', '.join(str(p) for p in _STATE['written'])}")
    if not s.on_cuda:
        terminalreporter.write_line(bench.CPU_WARNING)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _write_record(exitstatus=int(exitstatus))


def _write_record(exitstatus: int | None) -> None:
    """(Re)write the --bench-record files; exitstatus None while the session is still running."""
    s: Settings | None = _STATE.get("settings")
    if s is None or s.record_dir is None:
        return
    if "meta" not in _STATE:
        meta = bench.run_metadata(" ".join(["pytest", *_STATE["argv"]]))
        meta.update(
            scale=s.scale,
            dtype=str(s.dtype).replace("torch.", ""),
            rounds=s.rounds,
            compile_backend=s.compile_backend,
            interpreter=s.interpret,
            matmul_peak=_STATE.get("matmul_peak"),
        )
        _STATE["meta"] = meta
        _STATE["written"] = bench.result_paths(s.record_dir, "kernels")
    meta = {**_STATE["meta"], "exitstatus": exitstatus, "finished": exitstatus is not None}
    entries = _STATE["recorder"].entries
    json_path, md_path = _STATE["written"]
    json_path.write_text(json.dumps({"kind": "kernels", "meta": meta, "entries": entries}, indent=1) + "\n")
    md_path.write_text(kernels_markdown(meta, entries, json_path.name))


def _time_ms(e: dict[str, Any]) -> float | None:
    """The figure ratios are taken from: CUDA-event median (L2 flushed) on a GPU, host-clock median elsewhere."""
    return e.get("gpu_median_ms") or e.get("wall_median_ms")


def kernels_markdown(meta: dict[str, Any], entries: list[dict[str, Any]], json_name: str) -> str:
    """A table per op: each implementation's median time, its speed-up over eager and over torch.compile, achieved
    rate, extra memory and error against eager."""
    lines = [
        f"# Kernel benchmarks: {meta['device']}",
        "",
        *bench.provenance(meta, json_name),
        f"- torch {meta['torch']}, triton {meta['triton']}, liger-kernel {meta['liger_kernel']}, CUDA {meta['cuda']}",
        f"- scale {meta['scale']}, dtype {meta['dtype']}, compile backend {meta['compile_backend']}, date "
        f"{meta['date_utc']}",
    ]
    if meta.get("matmul_peak"):
        lines.append(f"- measured bf16 matmul peak: {meta['matmul_peak']['tflops']} TFLOP/s")
    if not meta.get("finished"):
        lines.append("- **incomplete**: written before the session ended (the run was cut short or is still going)")
    if not meta.get("cuda_available"):
        lines += ["", f"**{bench.CPU_WARNING}**"]
    lines += [
        "",
        "time: CUDA-event median with the L2 cache flushed between calls (host-clock median around call + synchronize "
        "on a CPU). x eager / x compile: speed-up over the eager reference / torch.compile(reference) on the same "
        "inputs (>1 is faster). rate: achieved GB/s (memory-bound ops, minimum bytes) or TFLOP/s. extra mem: peak "
        "allocation above the inputs during one call. err: relative L2 error of outputs (fwd) or gradients (fwd+bwd) "
        "against eager.",
    ]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault((e["op"], e["preset"], e["mode"]), []).append(e)
    for op in dict.fromkeys(e["op"] for e in entries):
        lines += [
            "",
            f"## {op}",
            "",
            "| preset | mode | shape | impl | time ms | x eager | x compile | rate | extra mem MiB | err | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (g_op, preset, mode), group in groups.items():
            if g_op != op:
                continue
            base = {e["impl"]: _time_ms(e) for e in group if e["status"] == "ok"}
            for e in group:
                t = _time_ms(e) if e["status"] == "ok" else None
                vs_eager = f"{base['eager'] / t:.2f}" if t and base.get("eager") else ""
                vs_comp = f"{base['compile'] / t:.2f}" if t and base.get("compile") else ""
                rate = ""
                if e.get("gbps"):
                    rate = f"{e['gbps']:.3g} GB/s"
                elif e.get("tflops"):
                    rate = f"{e['tflops']:.3g} TFLOP/s"
                mem = f"{e['extra_mem_bytes'] / 2**20:.1f}" if e.get("extra_mem_bytes") is not None else ""
                err = f"{e['rel_err_vs_eager']:.1e}" if e.get("rel_err_vs_eager") is not None else ""
                note = e["status"] if e["status"] != "ok" else ""
                if e.get("reason"):
                    note = f"{note}: {e['reason']}"
                lines.append(
                    f"| {preset} | {mode} | {e.get('shape', '')} | {e['impl']} | {f'{t:.4f}' if t else ''} | "
                    f"{vs_eager} | {vs_comp} | {rate} | {mem} | {err} | {note.replace('|', '/')} |"
                )
    return "\n".join(lines) + "\n"
