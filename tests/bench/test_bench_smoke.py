"""Smoke tests of bench/ and tools/plot_bench.py on a CPU: the kernel benchmarks run and record an entry for every op,
the end-to-end benchmark counts only non-pad tokens (checked against an independent tokenization of the same
documents), the matrix survives a configuration that cannot run, and the plot tool draws the results.

CPU timings mean nothing; these tests check plumbing and bookkeeping, not speed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
OP_NAMES = (
    "rmsnorm",
    "add_rmsnorm",
    "rope",
    "qk_norm_rope",
    "swiglu",
    "linear_cross_entropy",
    "moe_experts",
    "attention",
)


def _load(name: str, path: Path):
    """Import a script by path (bench/ and tools/ are not installed packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _cpu_env() -> dict[str, str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "BENCH_SCALE": "tiny"}
    env.pop("TRITON_INTERPRET", None)  # set by tests/conftest.py; the benchmarks must not rely on it
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_kernel_benchmarks_run_and_record_every_op(tmp_path):
    raw = tmp_path / "raw.json"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "bench/",
        "--benchmark-only",
        "-q",
        "-p",
        "no:cacheprovider",
        "--bench-rounds",
        "1",
        f"--bench-record={tmp_path}",
        f"--benchmark-json={raw}",
        "-k",
        "eager or small or moe_experts or qk_norm_rope",
    ]  # every op eager; torch.compile at one preset per op
    proc = subprocess.run(cmd, cwd=ROOT, env=_cpu_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "timings on a CPU say nothing" in out

    recorded = list(tmp_path.glob("kernels_cpu_*.json"))
    assert len(recorded) == 1 and recorded[0].with_suffix(".md").exists()
    result = json.loads(recorded[0].read_text())
    assert result["kind"] == "kernels" and result["meta"]["scale"] == "tiny"
    assert result["meta"]["finished"] is True and result["meta"]["exitstatus"] == 0
    assert result["meta"]["git_commit"] and result["meta"]["torch"] == torch.__version__
    entries = result["entries"]
    for op in OP_NAMES:
        mine = [e for e in entries if e["op"] == op]
        assert any(e["impl"] == "eager" and e["status"] == "ok" and e["wall_median_ms"] > 0 for e in mine), op
        compiled = [e for e in mine if e["impl"] == "compile" and e["status"] == "ok"]
        assert compiled and all(e["rel_err_vs_eager"] <= 1e-3 for e in compiled), op
        # Without CUDA the Triton and Liger implementations are skipped, with the reason written down.
        assert all("no CUDA" in e["reason"] for e in mine if e["impl"] in ("triton", "liger")), op

    # The achieved rate is the op's minimum traffic over the measured time: rmsnorm fwd reads x and writes y once.
    e = next(e for e in entries if (e["op"], e["preset"], e["mode"], e["impl"]) == ("rmsnorm", "small", "fwd", "eager"))
    n_tokens, width = 2 * 16, 512 // 8  # tiny scale: B=2, T=16, width / 8
    assert e["shape"] == f"2x16x{width}"
    assert math.isclose(e["gbps"], 2 * n_tokens * width * 4 / (e["wall_median_ms"] * 1e-3) / 1e9, rel_tol=1e-9)

    benchmarks = json.loads(raw.read_text())["benchmarks"]
    assert {b["extra_info"]["op"] for b in benchmarks} == set(OP_NAMES)
    assert all(b["stats"]["median"] > 0 for b in benchmarks)


def test_e2e_counts_non_pad_tokens_and_plot(tmp_path, one_thread, tokenizer):
    e2e = _load("bench_e2e", ROOT / "bench" / "e2e.py")
    plot_bench = _load("plot_bench", ROOT / "tools" / "plot_bench.py")
    common = [
        "--preset",
        "tiny",
        "--kernels",
        "torch",
        "--steps",
        "3",
        "--warmup_steps",
        "1",
        "--accumulation_steps",
        "2",
        "--out_dir",
        str(tmp_path),
    ]

    packed = e2e.main([*common, "--compile", "0", "--batch_size", "2", "--max_seq_len", "32"])
    run = packed["runs"][0]
    assert run["status"] == "ok" and run["mode"] == "packed" and run["tokens_per_s"] > 0
    assert run["tokens_counted"] == 2 * 2 * 2 * 32  # measured steps x accumulation x rows x tokens: no padding
    assert run["non_pad_fraction"] == 1.0
    assert 7.0 < run["final_loss"] < 10.5  # a fresh model: about ln(6400) = 8.76
    saved = json.loads(Path(packed["paths"][0]).read_text())
    assert saved["kind"] == "e2e" and saved["runs"][0]["tokens_counted"] == run["tokens_counted"]
    assert saved["meta"]["command"].startswith("python bench/e2e.py --preset tiny")
    assert {"device", "torch", "triton", "git_commit", "date_utc"} <= set(saved["meta"])
    assert Path(packed["paths"][1]).read_text().count("| tiny | packed | torch | 0 |") == 1

    seq, rows = 128, 3
    base = e2e.main([*common, "--baseline", "minimind", "--batch_size", str(rows), "--max_seq_len", str(seq)])
    brun = base["runs"][0]
    assert brun["status"] == "ok" and brun["mode"] == "baseline-minimind" and brun["tokens_per_s"] > 0
    # Independently: the first 3 steps x 2 micro-batches x 3 rows are the first 18 documents in file order, each
    # [bos] + tokens (truncated to seq - 2) + [eos]; only those positions have labels != -100.
    texts = [json.loads(line)["text"] for line in open(ROOT / "data" / "sample" / "pretrain.jsonl") if line.strip()]
    lengths = [min(len(tokenizer.encode(t)), seq - 2) + 2 for t in texts[: 3 * 2 * rows]]
    assert brun["tokens_counted_all_steps"] == sum(lengths)
    assert brun["tokens_counted"] == sum(lengths[2 * rows :])  # the warm-up step's rows are not counted
    assert brun["non_pad_fraction"] == sum(lengths) / (3 * 2 * rows * seq) < 1.0

    # The rows the baseline trains on: labels are -100 exactly where the input is padding.
    x, y = e2e.padded_rows([[1, *tokenizer.encode(t), 2] for t in texts[:rows]], seq)
    assert [int((r != -100).sum()) for r in y] == lengths[:rows]
    assert torch.equal(y != -100, x != 0) and torch.equal(x[:, 0], torch.ones(rows, dtype=torch.long))

    # --join_docs 3: each document is three consecutive texts joined by a space, so fewer, longer rows
    joined = e2e.tokenize_documents(ROOT / "data" / "sample" / "pretrain.jsonl", e2e.Tokenizer.load(), join=3)
    assert len(joined) == -(-len(texts) // 3)
    assert joined[1] == [1, *tokenizer.encode(" ".join(texts[3:6])), 2]

    sp = e2e.speedups([brun, run])
    assert math.isclose(sp[1]["vs_baseline"], run["tokens_per_s"] / brun["tokens_per_s"])

    # A configuration that cannot run costs its own row, not the matrix.
    matrix = e2e.main(
        [
            *common,
            "--matrix",
            "--presets",
            "tiny",
            "--kernels_list",
            "no-such-kernels",
            "--compiles",
            "0",
            "--matrix_baseline",
            "0",
            "--batch_size",
            "2",
            "--max_seq_len",
            "32",
        ]
    )
    assert [r["status"] for r in matrix["runs"]] == ["unavailable"]
    assert "no-such-kernels" in matrix["runs"][0]["reason"]
    assert json.loads(Path(matrix["paths"][0]).read_text())["meta"]["finished"] is True

    png = plot_bench.main([str(tmp_path), "--out", str(tmp_path / "e2e.png")])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_the_recorded_command_names_the_environment_that_changes_the_measurement(monkeypatch):
    """A result measured with the instruction set held down (or threads pinned) must say so in its command, in a form
    that runs again as typed; unrelated variables stay out."""
    import shlex

    import bench

    for key in bench.MEASUREMENT_ENV:
        monkeypatch.delenv(key, raising=False)
    assert bench.command_line("bench/e2e.py", ["--steps", "5"]) == "python bench/e2e.py --steps 5"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HOME_UNRELATED", "x")
    line = bench.command_line("bench/default_run.py", ["--pretrain_args", "--dtype float32"])
    assert shlex.split(line) == [
        "OMP_NUM_THREADS=1",
        "ONEDNN_MAX_CPU_ISA=AVX2",
        "python",
        "bench/default_run.py",
        "--pretrain_args",
        "--dtype float32",
    ]
