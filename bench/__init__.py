"""Benchmarks of the kernels (bench_kernels.py, run by `pytest bench/ --benchmark-only`) and of whole training steps
(e2e.py), and the helpers both share: what a result file records about the run (card, versions, commit, command),
how it is named (bench/results/<what>_<gpu>_<yyyymmdd>.json), and the card's measured bf16 matmul peak.

Being a package also puts the repository root on sys.path when pytest collects bench/, so `pytest bench/` works from a
checkout without an install.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

CPU_WARNING = (
    "CPU run: timings on a CPU say nothing about kernel or training speed on a GPU; this run only checks that the "
    "benchmarks work. Do not commit its output as a result."
)

# Card families recognised in torch.cuda.get_device_name(), most specific first, for result file names.
_CARD_SLUGS = ("H200", "H100", "GH200", "B200", "A100", "A10G", "L40S", "L4", "4090", "3090", "V100", "T4")


def git_commit() -> str:
    """The commit measured: $BENCH_GIT_COMMIT when set (a copy of the tree without .git, e.g. on a lent GPU machine),
    else `git rev-parse HEAD` of the repository, else "unknown"."""
    if os.environ.get("BENCH_GIT_COMMIT"):
        return os.environ["BENCH_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_dirty() -> bool | None:
    """True when tracked files differ from the commit (the numbers then belong to uncommitted code); None if unknown."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return bool(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo's "model name" on Linux, else platform.processor(), else "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and the instruction sets that decide CPU bf16 speed (x86 flags; none elsewhere)."""
    from train.runtime import x86_cpu_flags

    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"model": cpu_model(), "flags": sorted((x86_cpu_flags() or set()) & set(wanted)), "cores": os.cpu_count()}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({cpu_model()})"


def gpu_slug() -> str:
    """Short card name for file names: 'h100', 'h200', ...; 'cpu' without CUDA."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    for slug in _CARD_SLUGS:
        if slug.lower() in name.lower():
            return slug.lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
    }


def run_metadata(command: str) -> dict[str, Any]:
    """What every result file records: the card, versions, the exact command, the commit and the date (UTC)."""
    meta: dict[str, Any] = {
        "device": device_name(),
        "gpu": gpu_slug(),
        "cuda_available": torch.cuda.is_available(),
        **versions(),
        "command": command,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host_cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["gpu_multiprocessors"] = props.multi_processor_count
    else:
        meta["cpu"] = cpu_info()
    return meta


def provenance(meta: dict[str, Any], json_name: str) -> list[str]:
    """The two markdown lines every result table starts with: its raw file and command, and the commit measured."""
    return [
        f"- raw data: `{json_name}`; command: `{meta['command']}`",
        f"- commit `{meta['git_commit']}`" + (" (uncommitted changes)" if meta.get("git_dirty") else ""),
    ]


def command_line(script: str, argv: list[str] | None) -> str:
    """The command as a user would type it again."""
    import shlex

    args = sys.argv[1:] if argv is None else argv
    env = [f"{k}={os.environ[k]}" for k in MEASUREMENT_ENV if k in os.environ]
    return shlex.join([*env, "python", script, *args])


# Environment variables that change what a measurement measures (threads, the instruction set torch, oneDNN and MKL
# may use, MKL's thread and reproducibility modes, the CUDA cards seen): named in the recorded command when set.
MEASUREMENT_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "MKL_DYNAMIC",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "CUDA_VISIBLE_DEVICES",
)


def result_paths(out_dir: str | Path, what: str) -> tuple[Path, Path]:
    """(json, md) paths <out_dir>/<what>_<gpu>_<yyyymmdd>.{json,md}; -2, -3, ... is added to <what> rather than
    overwrite an earlier result of the same day."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    what = re.sub(r"[^A-Za-z0-9.-]+", "-", what).strip("-")
    stem, n = f"{what}_{gpu_slug()}_{stamp}", 1
    while (out / f"{stem}.json").exists() or (out / f"{stem}.md").exists():
        n += 1
        stem = f"{what}-{n}_{gpu_slug()}_{stamp}"
    return out / f"{stem}.json", out / f"{stem}.md"


def refuse_cpu_results(out_dir: str | Path) -> str | None:
    """Why a CPU run may not write into bench/results/ (None when it may write there)."""
    if torch.cuda.is_available():
        return None
    if Path(out_dir).resolve() == RESULTS_DIR.resolve():
        return f"not writing CPU figures into {RESULTS_DIR} (results there come from GPU runs); pass another folder"
    return None


def measure_bf16_matmul_peak(n: int = 8192, reps: int = 20) -> dict[str, Any] | None:
    """The card's achievable dense bf16 rate: an n x n x n matmul on random data (zeros run faster and would flatter
    the card), timed with CUDA events after warm-up; the median of `reps`. None without CUDA."""
    if not torch.cuda.is_available():
        return None
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=gen)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b, out=c)
    torch.cuda.synchronize()
    times_ms = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b, out=c)
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    times_ms.sort()
    median_s = times_ms[len(times_ms) // 2] / 1e3
    del a, b, c
    torch.cuda.empty_cache()
    return {"n": n, "reps": reps, "median_ms": round(median_s * 1e3, 4), "tflops": round(2 * n**3 / median_s / 1e12, 1)}


@contextlib.contextmanager
def worktree(rev: str, path: str | Path):
    """A temporary detached `git worktree` of rev at path, removed on exit; yields rev's full commit hash."""
    git = ["git", "-C", str(REPO_ROOT)]
    subprocess.run([*git, "worktree", "add", "--detach", str(path), rev], check=True, capture_output=True)
    try:
        yield subprocess.run([*git, "rev-parse", rev], capture_output=True, text=True, check=True).stdout.strip()
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(path)], capture_output=True)


def write_result(result: dict[str, Any], paths: tuple[Path, Path], markdown) -> None:
    """The raw result as JSON and its markdown summary (markdown(result, json_name)) beside it."""
    import json

    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result, paths[0].name))
