"""Every Triton kernel launch compiles for Hopper (sm_90, H100 / H200) and fits its limits, checked without a GPU.

The interpreter tests beside this file check the kernels' arithmetic; only the GPU compiler sees shared memory, the
register file and code it rejects. tools/compile_check.py compiles each launch the ops and the three presets' models
make, with the tiles a GPU gets, through Triton's real NVIDIA backend (ptxas included) in a separate process (the
interpreter, on in this one, would replace the kernels at import).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "compile_check.py"


def _nvidia_backend() -> str:
    """Why Triton cannot compile for NVIDIA here ('' when it can)."""
    try:
        from triton import knobs

        tools = [knobs.nvidia.ptxas.path, knobs.nvidia.cuobjdump.path]
    except Exception as exc:  # triton missing, or a build without the NVIDIA backend's tools
        return f"Triton's NVIDIA backend is not usable here: {exc}"
    missing = [t for t in tools if not Path(t).is_file()]
    return f"missing {missing}" if missing else ""


_NO_BACKEND = _nvidia_backend()
needs_backend = pytest.mark.skipif(bool(_NO_BACKEND), reason=_NO_BACKEND or "ok")


def _run(args: list[str], tmp_path: Path, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from an earlier run's cache
    # The full check (with the MoE GEMMs' 60 autotune candidates) is about 9 CPU-minutes; a loaded 2-core machine
    # stretches that to 15 minutes of wall time.
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800
    )


def _launched_kernels_in_sources() -> set[str]:
    """Names of the @triton.jit functions in kernels/ that host code launches (`name[grid](...)`), read from the
    sources, independently of the tool."""
    names = set()
    for path in (ROOT / "kernels" / "minimind_kernels").glob("*.py"):
        text = path.read_text()
        for name in re.findall(r"@triton\.jit\s*\ndef (\w+)\(", text):
            if re.search(rf"\b{name}\[", text):
                names.add(name)
    return names


@needs_backend
def test_every_kernel_launch_compiles_for_sm90(tmp_path):
    out = tmp_path / "report.json"
    # --autotune first: the MoE GEMMs' fixed tiles only. Every one of their ~60 autotune candidates is compiled by
    # test_every_autotune_candidate_compiles_for_sm90 at the moe preset, the only place they are used.
    done = _run(["--tokens", "1024", "--autotune", "first", "--json", str(out)], tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["arch"] == 90 and report["failures"] == []
    failed = [c for c in report["cases"] if not c["ok"]]
    assert not failed, failed
    # Every op at every preset in both dtypes (the routed experts at moe only), qk_norm_rope also at MiniMind-3's
    # head shape (m3) in both dtypes, plus a model step per preset.
    assert len(report["cases"]) == 3 * 2 * 6 + 2 + 2 + 3
    assert {c["case"] for c in report["cases"]} >= {"qk_norm_rope m3 bf16", "qk_norm_rope m3 fp32"}
    compiled = {k["name"] for k in report["kernels"]}
    expected = _launched_kernels_in_sources()
    assert len(expected) >= 17, expected  # the regex found the kernels (rmsnorm, rope, QK-norm, swiglu, LCE, MoE)
    assert compiled == expected
    for k in report["kernels"]:
        assert 0 < k["registers"] <= 255, k
        assert 0 <= k["shared_bytes"] <= 227 * 1024, k
        assert k["num_warps"] in (1, 2, 4, 8, 16), k
    # The MoE grouped GEMMs stage their operand tiles through shared memory; the row-wise kernels need little.
    moe_gemm = [k for k in report["kernels"] if k["name"] == "_moe_gate_up_fwd_kernel"]
    assert moe_gemm and all(k["shared_bytes"] >= 16 * 1024 for k in moe_gemm)
    # The table names each kernel once per distinct compilation.
    assert "0 problem(s); every launch compiles and fits the card." in done.stdout


@needs_backend
def test_every_autotune_candidate_compiles_for_sm90(tmp_path):
    out = tmp_path / "report.json"
    args = ["--tokens", "1024", "--presets", "moe", "--ops", "moe_experts", "--no-models", "--json", str(out)]
    done = _run(args, tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failures"] == [] and all(c["ok"] for c in report["cases"])
    # Every autotune candidate of every autotuned MoE GEMM compiled (its fixed tiles, the first candidate, with them).
    from minimind_kernels import moe

    def tiles(constexprs: dict) -> tuple:
        return tuple(sorted((n, v) for n, v in constexprs.items() if n.startswith("BLOCK_")))

    compiled_candidates = {
        (k["name"], k["num_warps"], k["num_stages"], tiles(k["constexprs"])) for k in report["kernels"] if k["autotune"]
    }
    tuned = {name: obj for name, obj in vars(moe).items() if isinstance(obj, moe._TunedGemm)}
    assert len(tuned) == 6, sorted(tuned)
    for name, kernel in tuned.items():
        for tuner in kernel.tuners.values():
            for c in tuner.configs:
                assert (name, c.num_warps, c.num_stages, tiles(c.kwargs)) in compiled_candidates, (name, str(c))


def test_limits_are_enforced():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import compile_check as cc
    finally:
        sys.path.remove(str(ROOT / "tools"))

    def kernel(shared: int, regs: int | None, warps: int) -> cc.Kernel:
        return cc.Kernel("k", ["case"], {}, warps, 3, shared, registers=regs, stack_bytes=0, local_bytes=0)

    assert cc.limit_problems(kernel(227 * 1024, 255, 8), 90) == []  # 255 x 256 threads = 65280 registers: fits
    too_big = cc.limit_problems(kernel(227 * 1024 + 1, 64, 4), 90)
    assert len(too_big) == 1 and "shared memory" in too_big[0]
    assert cc.limit_problems(kernel(100 * 1024, 64, 4), 90) == []
    assert len(cc.limit_problems(kernel(100 * 1024, 64, 4), 86)) == 1  # 99 KB on sm_86
    regs = cc.limit_problems(kernel(0, 129, 16), 90)  # 129 x 512 threads > 64K
    assert len(regs) == 1 and "registers" in regs[0]
    assert cc.limit_problems(kernel(0, None, 4), 90) == ["cuobjdump reported no register count"]


def test_refuses_to_run_under_the_interpreter(tmp_path):
    done = _run(["--tokens", "16"], tmp_path, interpret=True)
    assert done.returncode != 0
    assert "unset TRITON_INTERPRET" in done.stderr


def test_bad_arguments_say_what_was_expected(tmp_path):
    done = _run(["--presets", "small,huge"], tmp_path)
    assert done.returncode == 2
    assert "unknown preset 'huge'" in done.stderr
