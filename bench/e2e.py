"""End-to-end training throughput: full optimizer steps of the real model, as the trainer runs them.

    python bench/e2e.py --preset small --kernels triton --compile 1 --steps 30
    python bench/e2e.py --preset small --baseline minimind                 # the reference MiniMind trainer's way
    python bench/e2e.py --matrix                                           # presets x kernels x compile + baselines
    python bench/e2e.py --matrix --presets small,moe --steps 12 --warmup_steps 2 --budget_s 540 --out_dir $OUT
    python bench/e2e.py --cpu_compare --batch_size 8 --accumulation_steps 1 --steps 5 --warmup_steps 1   # on a CPU

A step is the trainer's own train.step.train_step, as train/pretrain.py runs it: `accumulation_steps` micro-batches
of `batch_size` rows of `max_seq_len` tokens under the trainer's autocast, loss (+ MoE aux loss) / accumulation,
backward, grad-norm clip, fused AdamW (train.step.build_optimizer) with MiniMind's cosine schedule (train.step.lr_at)
and the device-side non-finite skip, no host sync inside the measured steps. Rows are packed:
random token ids (3..vocab-1), or with --data a pretrain JSONL tokenized as [bos] + tokens + [eos] per document,
concatenated and cut into rows, so no position is padding.

--baseline minimind reproduces the reference MiniMind trainer at the same model size: eager (no compile), torch
kernels with MiniMind2's own MoE loop and repeated-K/V attention (bench/minimind_baseline.py), its loop (no skip
guard), plain torch.optim.AdamW over all
parameters, every document of --data (default data/sample/pretrain.jsonl) its own row, [bos] + tokens + [eos]
truncated to max_seq_len and padded with 0, labels -100 on padding, rows in file order; batch 32, accumulation 8,
max_seq_len 340 (MiniMind2's pretraining defaults), fp32 master weights with bf16 autocast. How much of its batch is
padding depends on the documents' lengths: non_pad_fraction in the results says how much of the work was useful.

Measured: tokens/s counts only tokens whose label is not -100 (non-pad tokens; every token of a packed row) over the
steps after --warmup_steps; MFU = tokens/s * FLOPs per token (train.metrics.flops_per_token: 6 * N_active + 12 * layers
* hidden * max_seq_len) / the card's bf16 matmul peak, measured here on an 8192^3 matmul (not the datasheet); peak
memory (torch.cuda.max_memory_allocated); time_to_first_step_s from main() entry to the end of the first optimizer step
(model build, data, compilation) and first_step_s, the first step alone. --matrix runs each configuration in a fresh
subprocess (an OOM or crash costs that row only) and writes after each one, so a run cut short keeps what it measured.

--cpu_compare (a CPU): --repeats pairs of runs, each in a fresh process, alternating the MiniMind baseline and our
default CPU path (kernels, compile and precision as train/pretrain.py picks them on a CPU) on the same documents
(--data, default the shipped sample; --join_docs K makes each run of K consecutive texts one document, for rows that
padding does not fill), at --preset (small: MiniMind2-small); per pair the non-pad tokens/s ratio and
the step-time ratio (both sides compute the same rows x tokens, so this one is the step's own speed and the rest is
packing), written to bench/results/cpu/cpu-compare-<preset>_cpu_<date>.{json,md} with the CPU's model and flags.

Writes <out_dir>/<what>_<gpu>_<yyyymmdd>.json (raw) and .md (table) with the card, torch/triton versions, the exact
command and the git commit ($BENCH_GIT_COMMIT overrides `git rev-parse HEAD`, for copies without .git). A CPU run
prints a warning (its figures mean nothing) and does not write into bench/results/.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # `python bench/e2e.py` from a checkout
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

import bench  # noqa: E402
import minimind_kernels as kernels  # noqa: E402
from bench import minimind_baseline  # noqa: E402
from minimind_fast.config import MiniMindConfig, from_preset  # noqa: E402
from minimind_fast.model import MiniMind  # noqa: E402
from minimind_fast.tokenizer import Tokenizer  # noqa: E402
from train import step  # noqa: E402
from train.args import arg, parse_args  # noqa: E402
from train.metrics import flops_per_token  # noqa: E402
from train.models import build_config  # noqa: E402
from train.runtime import cpu_bf16_speedup, cpu_compile_default, setup_runtime  # noqa: E402

DEFAULT_DATA = _ROOT / "data" / "sample" / "pretrain.jsonl"
IGNORE = -100


@dataclass
class Args:
    preset: str = arg("small", "model preset: tiny, small, base, moe, m3, m3-moe, m3-tiny")
    kernels: str = arg("auto", "ops spec: torch | triton | liger | auto (+ overrides like 'triton,rope=torch')")
    compile: bool = arg(False, "torch.compile the model")
    steps: int = arg(30, "optimizer steps, warm-up included")
    warmup_steps: int = arg(5, "first steps left out of the rate (compilation, autotuning, allocator warm-up)")
    batch_size: int = arg(32, "rows per micro-batch (MiniMind2 pretraining: 32)")
    accumulation_steps: int = arg(8, "micro-batches per optimizer step (MiniMind2 pretraining: 8)")
    max_seq_len: int = arg(340, "tokens per row (MiniMind2 pretraining: 340)")
    learning_rate: float = arg(5e-4, "peak learning rate of the cosine schedule")
    grad_clip: float = arg(1.0, "gradient-norm clip")
    data: str = arg(
        "",
        "pretrain JSONL to take real rows from (default: random packed rows; the baseline reads "
        "data/sample/pretrain.jsonl)",
    )
    baseline: str = arg("", "'minimind': the reference MiniMind trainer's way (eager, torch kernels, padded rows)")
    matrix: bool = arg(False, "run presets x kernels x compile (+ a baseline per preset) in fresh subprocesses")
    presets: str = arg("small,base,moe", "--matrix: presets")
    kernels_list: str = arg("torch,triton,liger", "--matrix: kernel specs")
    compiles: str = arg("0,1", "--matrix: compile settings")
    matrix_baseline: bool = arg(True, "--matrix: also run --baseline minimind for each preset")
    cpu_compare: bool = arg(
        False, "on a CPU: MiniMind's trainer (--baseline minimind) against our default CPU path, same documents"
    )
    repeats: int = arg(3, "--cpu_compare: pairs of runs (baseline, ours), alternating, each in a fresh process")
    timeout_s: float = arg(900.0, "--matrix: wall-clock limit of one configuration")
    budget_s: float = arg(0.0, "--matrix: start no configuration after this many seconds (0: no limit)")
    peak_tflops: float = arg(0.0, "bf16 matmul peak for MFU, TFLOP/s (0: measure it on this card)")
    out_dir: str = arg(str(bench.RESULTS_DIR), "where the JSON and markdown results go")
    name: str = arg("", "the <what> part of the result file names (default from the configuration)")
    json_out: str = arg("", "write this run's record to this file only (used by --matrix for its subprocesses)")
    device: str = arg("auto", "cuda, cpu or auto")
    dtype: str = arg("auto", "bfloat16 or float32 (auto: as the trainer, train/runtime.py setup_runtime)")
    seed: int = arg(42, "seed for initialisation and random rows")
    join_docs: int = arg(1, "with --data: each run of this many consecutive texts is one document (longer documents)")


# ------------------------------------------------------------------------------------------------------------ batches
def tokenize_documents(path: str | Path, tok: Tokenizer, join: int = 1) -> list[list[int]]:
    """[bos] + tokens + [eos] for every {"text": ...} line of a pretrain JSONL (empty lines skipped); with join > 1,
    each run of `join` consecutive texts (space-separated) is one document."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(str(json.loads(line)["text"]))
    if not texts:
        raise SystemExit(f"error: {path} holds no documents")
    if join < 1:
        raise SystemExit(f"error: --join_docs must be >= 1, got {join}")
    texts = [" ".join(texts[i : i + join]) for i in range(0, len(texts), join)]
    return [[tok.bos_id, *ids, tok.eos_id] for ids in tok.encode_batch(texts)]


def packed_rows(docs: list[list[int]], seq_len: int) -> torch.Tensor:
    """Documents back to back, cut into rows of exactly seq_len tokens (the tail that fills no row is dropped)."""
    stream = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    n_rows = stream.numel() // seq_len
    if n_rows == 0:
        raise SystemExit(f"error: the data holds {stream.numel()} tokens, fewer than one row of {seq_len}")
    return stream[: n_rows * seq_len].view(n_rows, seq_len)


def padded_rows(docs: list[list[int]], seq_len: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniMind's pretraining samples: one document per row, [bos] + tokens + [eos] with the tokens truncated to
    seq_len - 2, padded with pad_id; labels are the ids with -100 where the id is padding (the model shifts them)."""
    x = torch.full((len(docs), seq_len), pad_id, dtype=torch.long)
    for i, d in enumerate(docs):
        row = d[:-1][: seq_len - 1] + [d[-1]]  # keep bos + up to seq_len - 2 tokens, then eos
        x[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    labels = x.clone()
    labels[x == pad_id] = IGNORE
    return x, labels


def batches(args: Args, cfg: MiniMindConfig, tok: Tokenizer | None) -> tuple[Iterator[tuple], str]:
    """An endless iterator of CPU micro-batches (input_ids, labels, counted tokens) and a description of the data."""
    b, t = args.batch_size, args.max_seq_len
    joined = f", texts joined {args.join_docs} at a time" if args.join_docs > 1 else ""
    if args.baseline:
        docs = tokenize_documents(args.data or DEFAULT_DATA, tok, args.join_docs)
        x_all, y_all = padded_rows(docs, t, tok.pad_id)
        source = f"{args.data or DEFAULT_DATA.relative_to(_ROOT)} ({len(docs)} documents{joined}, one per padded row)"
    elif args.data:
        x_all = packed_rows(tokenize_documents(args.data, tok, args.join_docs), t)
        y_all = x_all
        source = f"{args.data} (packed into {x_all.shape[0]} rows{joined})"
    else:
        x_all = y_all = None
        source = "random token ids, packed rows"

    def gen() -> Iterator[tuple]:
        g = torch.Generator().manual_seed(args.seed)
        i = 0
        while True:
            if x_all is None:
                x = torch.randint(3, cfg.vocab_size, (b, t), generator=g)
                yield x, x, b * t
                continue
            idx = torch.arange(i, i + b) % x_all.shape[0]  # file order, wrapping around
            i += b
            x, y = x_all[idx], y_all[idx]
            yield x, y, int((y != IGNORE).sum())

    return gen(), source


# ------------------------------------------------------------------------------------------------------------ one run
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(args: Args, command: str) -> dict[str, Any]:
    """Train args.steps optimizer steps and return the run's record."""
    t_enter = time.perf_counter()
    if args.baseline and args.baseline != "minimind":
        raise SystemExit(f"error: --baseline must be 'minimind' or empty, got {args.baseline!r}")
    if args.baseline and (args.compile or args.kernels not in ("auto", "torch")):
        raise SystemExit("error: --baseline minimind runs eager with torch kernels; leave out --kernels/--compile")
    if not 1 <= args.warmup_steps < args.steps:  # the first step (compilation) is never part of the rate
        raise SystemExit(f"error: need 1 <= --warmup_steps ({args.warmup_steps}) < --steps ({args.steps})")
    on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    # MiniMind's trainer autocasts only on CUDA (nullcontext on a CPU): its CPU baseline runs fp32, with the allocator
    # and the floating-point state as the process finds them
    dtype = "float32" if args.baseline and on_cpu else args.dtype
    rt = setup_runtime(args.device, dtype, args.seed, tune_cpu=not args.baseline)
    spec = "minimind" if args.baseline else args.kernels
    # KernelSpecError when it cannot run here: main() records it as unavailable
    ops = minimind_baseline.ops() if args.baseline else kernels.resolve(spec)
    print(kernels.describe(ops))

    tok = Tokenizer.load() if (args.baseline or args.data) else None
    cfg = build_config(args.preset, tok) if tok is not None else from_preset(args.preset)
    model = MiniMind(cfg, ops=ops).to(rt.device)
    model.train()
    if args.baseline:
        # MiniMind's trainer: optim.AdamW(model.parameters(), lr) with PyTorch's defaults (weight decay 0.01 on every
        # parameter, no fused kernel); its GradScaler is disabled for bf16, so it is left out.
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    else:
        optimizer = step.build_optimizer(model, args.learning_rate)
    train_model = torch.compile(model) if args.compile else model
    # the trainer's step; the guard never reads (no log steps here), so it needs no metrics file
    guard = step.NonFiniteGuard(max_bad_steps=1 << 30, metrics=None, is_main=False, last_good=lambda: None)
    stepper = step.Stepper(model, model, optimizer, rt, guard, args.accumulation_steps, args.grad_clip)
    data, source = batches(args, cfg, tok)
    n_active = model.num_active_params()
    flops_tok = flops_per_token(cfg, n_active, args.max_seq_len)
    peak = args.peak_tflops or None
    if peak is None and rt.is_cuda:
        peak = bench.measure_bf16_matmul_peak()["tflops"]
    mode = "baseline-minimind" if args.baseline else "packed"
    print(
        f"e2e {mode}: preset {args.preset} ({model.num_params():,} params, {n_active:,} active), kernels {spec}, "
        f"compile {int(args.compile)}, {'bf16 autocast' if rt.amp_dtype else 'fp32'} on {bench.device_name()}; "
        f"{args.steps} steps ({args.warmup_steps} warm-up) of {args.batch_size} x {args.accumulation_steps} rows of "
        f"{args.max_seq_len}; data: {source}"
    )
    if rt.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    setup_s = time.perf_counter() - t_enter

    counted = [0, 0]  # [all steps, measured steps]

    def micro_batches(i: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(args.accumulation_steps):
            x, y, n_counted = next(data)
            counted[0] += n_counted
            if i >= args.warmup_steps:
                counted[1] += n_counted
            yield x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        out = train_model(batch[0], labels=batch[1])
        return out.loss if out.aux_loss is None else out.loss + out.aux_loss

    t_measure = first_step_s = time_to_first = None
    loss = None
    for i in range(args.steps):
        t_step = time.perf_counter()
        step.set_lr(optimizer, step.lr_at(i, args.steps, args.learning_rate))
        if args.baseline:  # MiniMind's loop: clip, step, zero_grad; nothing skipped
            for x, y in micro_batches(i):
                with rt.autocast():
                    loss = loss_fn((x, y))
                (loss / args.accumulation_steps).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            loss, _ = step.train_step(stepper, micro_batches(i), loss_fn)
        if i == 0:
            _sync(rt.device)
            now = time.perf_counter()
            first_step_s, time_to_first = now - t_step, now - t_enter
        if i + 1 == args.warmup_steps:
            _sync(rt.device)
            t_measure = time.perf_counter()
    _sync(rt.device)
    measured_s = time.perf_counter() - t_measure
    measured_steps = args.steps - args.warmup_steps
    final_loss = float(loss.detach().float().item())

    positions = args.steps * args.accumulation_steps * args.batch_size * args.max_seq_len
    tokens_per_s = counted[1] / measured_s if measured_s > 0 else 0.0
    record: dict[str, Any] = {
        "status": "ok",
        "mode": mode,
        "preset": args.preset,
        "kernels": spec,
        "kernels_impl": dict(ops.impl),
        "compile": bool(args.compile),
        "data": source,
        "batch_size": args.batch_size,
        "accumulation_steps": args.accumulation_steps,
        "max_seq_len": args.max_seq_len,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "measured_steps": measured_steps,
        "params": model.num_params(),
        "active_params": n_active,
        "flops_per_token": flops_tok,
        "tokens_counted": counted[1],
        "tokens_counted_all_steps": counted[0],
        "positions_all_steps": positions,
        "non_pad_fraction": counted[0] / positions,
        "measured_s": measured_s,
        "tokens_per_s": tokens_per_s,
        "step_s": measured_s / measured_steps,
        "peak_tflops": peak,
        "mfu": tokens_per_s * flops_tok / (peak * 1e12) if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if rt.is_cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if rt.is_cuda else None,
        "setup_s": setup_s,
        "first_step_s": first_step_s,
        "time_to_first_step_s": time_to_first,
        "final_loss": final_loss,
        "precision": "bf16 autocast, fp32 weights" if rt.amp_dtype else "fp32",
        "device": bench.device_name(),
        "command": command,
    }
    if not math.isfinite(final_loss):
        record["status"] = "failed"
        record["reason"] = f"loss is {final_loss}"
    return record


# ------------------------------------------------------------------------------------------------------------- matrix
def matrix_configs(args: Args) -> list[dict[str, Any]]:
    """Configurations in the order that matters most when --budget_s runs out, each across all presets: the
    baseline, eager torch, compiled triton, compiled torch, eager triton, then the rest (liger) as listed."""
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    specs = [k.strip() for k in args.kernels_list.split(",") if k.strip()]
    compiles = [c.strip() in ("1", "true") for c in args.compiles.split(",") if c.strip()]
    combos = [(k, c) for k in specs for c in compiles]
    first = [("torch", False), ("triton", True), ("torch", True), ("triton", False)]
    rank = {kc: first.index(kc) if kc in first else len(first) + i for i, kc in enumerate(combos)}
    combos = sorted(combos, key=rank.__getitem__)
    configs = []
    if args.matrix_baseline:
        configs += [{"preset": p, "baseline": "minimind", "kernels": "torch", "compile": False} for p in presets]
    for k, c in combos:
        configs += [{"preset": p, "baseline": "", "kernels": k, "compile": c} for p in presets]
    return configs


def child_argv(args: Args, config: dict[str, Any], json_out: str, peak: float | None) -> list[str]:
    argv = [
        "--preset",
        config["preset"],
        "--steps",
        str(args.steps),
        "--warmup_steps",
        str(args.warmup_steps),
        "--batch_size",
        str(args.batch_size),
        "--accumulation_steps",
        str(args.accumulation_steps),
        "--max_seq_len",
        str(args.max_seq_len),
        "--learning_rate",
        str(args.learning_rate),
        "--grad_clip",
        str(args.grad_clip),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--seed",
        str(args.seed),
        "--json_out",
        json_out,
    ]
    if config["baseline"]:
        argv += ["--baseline", config["baseline"], "--kernels", "torch"]
    else:
        argv += ["--kernels", config["kernels"], "--compile", str(int(config["compile"]))]
    if config.get("data", args.data):
        argv += ["--data", config.get("data", args.data), "--join_docs", str(args.join_docs)]
    if peak:
        argv += ["--peak_tflops", str(peak)]
    return argv


def _failure(config: dict[str, Any], status: str, reason: str, wall_s: float) -> dict[str, Any]:
    mode = "baseline-minimind" if config["baseline"] else "packed"
    return {
        "status": status,
        "mode": mode,
        "preset": config["preset"],
        "kernels": config["kernels"],
        "compile": config["compile"],
        "reason": reason,
        "wall_s": wall_s,
    }


def run_child(args: Args, config: dict[str, Any], peak: float | None, timeout_s: float) -> dict[str, Any]:
    """One configuration in a fresh subprocess (an OOM or crash costs that run only) -> its record."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *child_argv(args, config, str(out), peak)]
        t_run = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                cwd=_ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            wall = time.perf_counter() - t_run
            tail = (proc.stdout + proc.stderr)[-3000:]
            if out.exists():
                record = json.loads(out.read_text())
                record["wall_s"] = wall
                if proc.returncode != 0 and record.get("status") == "ok":
                    record.update(status="failed", reason=f"exit code {proc.returncode}: {tail[-500:]}")
            else:
                oom = "out of memory" in tail.lower()
                record = _failure(config, "oom" if oom else "failed", f"exit code {proc.returncode}: {tail}", wall)
        except subprocess.TimeoutExpired:
            wall = time.perf_counter() - t_run
            record = _failure(config, "timeout", f"killed after {wall:.0f} s", wall)
    record["command"] = "python bench/e2e.py " + " ".join(child_argv(args, config, "<tmp>", peak))
    return record


def run_matrix(args: Args, command: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    peak_info = {"tflops": args.peak_tflops, "given": True} if args.peak_tflops else bench.measure_bf16_matmul_peak()
    peak = peak_info["tflops"] if peak_info else None
    paths = _result_paths(args, "e2e-matrix")
    result = {
        "kind": "e2e",
        "meta": {**bench.run_metadata(command), "matmul_peak": peak_info, "finished": False},
        "runs": [],
        "paths": [str(p) for p in paths] if paths else [],
    }
    configs = matrix_configs(args)
    for i, config in enumerate(configs):
        label = _label(config)
        elapsed = time.perf_counter() - t0
        left = args.budget_s - elapsed if args.budget_s else float("inf")
        if left <= 0:
            result["runs"].append(_failure(config, "skipped", f"out of --budget_s {args.budget_s:g}", 0.0))
            print(f"[{i + 1}/{len(configs)}] {label}: skipped (out of time budget)", flush=True)
            continue
        print(f"[{i + 1}/{len(configs)}] {label} ...", flush=True)
        record = run_child(args, config, peak, min(args.timeout_s, left))
        result["runs"].append(record)
        print(f"    {_one_line(record)} ({record.get('wall_s', 0):.0f} s)", flush=True)
        if record["status"] not in ("ok", "unavailable"):
            print("    " + record.get("reason", "")[-1500:].replace("\n", "\n    "), flush=True)
        _write(result, paths)
    result["meta"]["finished"] = True
    _write(result, paths)
    return result


# -------------------------------------------------------------------------------------------------------- cpu compare
def run_cpu_compare(args: Args, command: str) -> dict[str, Any]:
    """--cpu_compare: see the module docstring. Pairs alternate (baseline, ours) so that load from other work on the
    machine falls on both; the ratio of each pair is recorded, and the median and spread over the pairs."""
    if torch.cuda.is_available() and args.device != "cpu":
        raise SystemExit("error: --cpu_compare measures the CPU path: pass --device cpu on a machine with a GPU")
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats must be >= 1, got {args.repeats}")
    data = args.data or str(DEFAULT_DATA.relative_to(_ROOT))
    cfg = from_preset(args.preset)
    # our defaults on a CPU, as `python train/pretrain.py --preset P` takes them (one process)
    compiled = cpu_compile_default(cfg.hidden_size, cfg.use_moe, world_size=1)
    ours = {"preset": args.preset, "baseline": "", "kernels": "auto", "compile": compiled, "data": data}
    base = {"preset": args.preset, "baseline": "minimind", "kernels": "torch", "compile": False, "data": data}
    out_dir = args.out_dir if args.out_dir != str(bench.RESULTS_DIR) else str(bench.RESULTS_DIR / "cpu")
    paths = bench.result_paths(out_dir, args.name or f"cpu-compare-{args.preset}")
    result: dict[str, Any] = {
        "kind": "e2e-cpu-compare",
        "meta": {
            **bench.run_metadata(command),
            "cpu": bench.cpu_info(),
            "threads": torch.get_num_threads(),
            "cpu_bf16_speedup": cpu_bf16_speedup(),
            "finished": False,
        },
        "runs": [],
        "pairs": [],
        "pairs_per_position": [],
        "paths": [str(p) for p in paths],
    }
    for r in range(args.repeats):
        pair = []
        for config in (base, ours):
            label = f"[pair {r + 1}/{args.repeats}] {_label(config)}"
            print(f"{label} ...", flush=True)
            record = run_child(args, config, None, args.timeout_s)
            result["runs"].append(record)
            pair.append(record)
            print(f"    {_one_line(record)} ({record.get('wall_s', 0):.0f} s)", flush=True)
            if record["status"] != "ok":
                print("    " + record.get("reason", "")[-1500:].replace("\n", "\n    "), flush=True)
        if all(p["status"] == "ok" for p in pair):
            result["pairs"].append(pair[1]["tokens_per_s"] / pair[0]["tokens_per_s"])
            # the same rows x tokens per step on both sides: the step's own speed, padding or not
            result["pairs_per_position"].append(pair[0]["step_s"] / pair[1]["step_s"])
        _write_compare(result, paths)
    if result["pairs"]:
        per_pos = result["pairs_per_position"]
        result["summary"] = {
            "ratio_median": statistics.median(result["pairs"]),
            "ratio_min": min(result["pairs"]),
            "ratio_max": max(result["pairs"]),
            "per_position_median": statistics.median(per_pos),
            "per_position_min": min(per_pos),
            "per_position_max": max(per_pos),
        }
    result["meta"]["finished"] = True
    _write_compare(result, paths)
    return result


def compare_markdown(result: dict[str, Any], json_name: str) -> str:
    m, runs = result["meta"], result["runs"]
    ok = [r for r in runs if r["status"] == "ok"]
    lines = [
        f"# CPU side by side: MiniMind's trainer and ours, {m['cpu']['model']}",
        "",
        *bench.provenance(m, json_name),
        f"- torch {m['torch']}, {m['threads']} threads, CPU flags {', '.join(m['cpu']['flags']) or 'none listed'}, "
        + (
            f"bf16 matmul {m['cpu_bf16_speedup']:.2f}x fp32 here"
            if m["cpu_bf16_speedup"]
            else "no bf16 dot-product instructions (bf16 not used)"
        )
        + f", date {m['date_utc']}",
    ]
    if ok:
        r0 = ok[0]
        lines.append(
            f"- per step: {r0['batch_size']} rows x {r0['accumulation_steps']} micro-batches x {r0['max_seq_len']} "
            f"tokens; {r0['steps']} steps, the first {r0['warmup_steps']} not timed; data: {r0['data']}"
        )
    if not m.get("finished"):
        lines.append("- **incomplete**: written before the last pair ended")
    lines += [
        "",
        "Pairs run one after the other, each run in a fresh process: the MiniMind baseline (eager, fp32 on a CPU as "
        "MiniMind's trainer runs there, its MoE loop and repeated-K/V attention, plain AdamW, one padded document "
        "per row) and our default CPU path (kernels, compile and precision as `train/pretrain.py` picks them on a "
        "CPU; packed rows, fused AdamW). tokens/s counts non-pad tokens; both sides compute the same rows x tokens "
        "per step, so the step-time ratio is the speed of the step itself and the rest of the tokens/s ratio is what "
        "packing saves over padding.",
        "",
        "| run | mode | kernels | compile | precision | tokens/s | non-pad | step s | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs):
        good = r["status"] == "ok"
        lines.append(
            f"| {i // 2 + 1} | {r['mode']} | {r['kernels']} | {int(bool(r['compile']))} | {r.get('precision', '')} "
            f"| {format(r['tokens_per_s'], ',.0f') if good else ''} "
            f"| {format(r['non_pad_fraction'], '.2f') if good else ''} | {format(r['step_s'], '.2f') if good else ''} "
            f"| {'ok' if good else (r['status'] + ': ' + str(r.get('reason', ''))[:120]).replace('|', '/')} |"
        )
    lines.append("")
    if result["pairs"]:
        each = ", ".join(f"{x:.2f}x" for x in result["pairs"])
        lines.append(f"Ours over MiniMind's trainer, pair by pair: {each} (non-pad tokens/s).")
        each = ", ".join(f"{x:.2f}x" for x in result["pairs_per_position"])
        lines.append(f"Step time, MiniMind's over ours, pair by pair: {each} (every position computed, pad or not).")
    if result.get("summary"):
        sm = result["summary"]
        lines.append(
            f"Median {sm['ratio_median']:.2f}x in non-pad tokens/s (spread {sm['ratio_min']:.2f}x to "
            f"{sm['ratio_max']:.2f}x); {sm['per_position_median']:.2f}x in step time (spread "
            f"{sm['per_position_min']:.2f}x to {sm['per_position_max']:.2f}x)."
        )
    return "\n".join(lines) + "\n"


def _write_compare(result: dict[str, Any], paths: tuple[Path, Path]) -> None:
    json_path, md_path = paths
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(compare_markdown(result, json_path.name))


# ------------------------------------------------------------------------------------------------------------ reports
def _label(r: dict[str, Any]) -> str:
    if r.get("baseline") or r.get("mode") == "baseline-minimind":
        return f"{r['preset']} baseline-minimind"
    return f"{r['preset']} {r['kernels']} compile={int(bool(r['compile']))}"


def _one_line(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {str(r.get('reason', ''))[:200]}"
    mfu = f", MFU {r['mfu'] * 100:.1f}%" if r.get("mfu") else ""
    mem = f", peak {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") else ""
    return f"{r['tokens_per_s']:,.0f} tok/s{mfu}{mem}, first step {r['first_step_s']:.1f} s"


def speedups(runs: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """For each measured run (by index): tokens/s over the same preset's baseline and over its eager torch run."""
    ok = [r for r in runs if r["status"] == "ok"]
    base = {r["preset"]: r["tokens_per_s"] for r in ok if r["mode"] == "baseline-minimind"}
    eager = {
        r["preset"]: r["tokens_per_s"]
        for r in ok
        if r["mode"] == "packed" and r["kernels"] == "torch" and not r["compile"]
    }
    out = {}
    for i, r in enumerate(runs):
        if r["status"] != "ok":
            continue
        s = {}
        if base.get(r["preset"]):
            s["vs_baseline"] = r["tokens_per_s"] / base[r["preset"]]
        if eager.get(r["preset"]):
            s["vs_torch_eager"] = r["tokens_per_s"] / eager[r["preset"]]
        out[i] = s
    return out


def table(runs: list[dict[str, Any]]) -> list[str]:
    sp = speedups(runs)
    head = (
        "| preset | mode | kernels | compile | tokens/s | x baseline | x torch eager | MFU | peak mem GiB | "
        "first step s | non-pad | status |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    preset_order = {p: j for j, p in enumerate(dict.fromkeys(r["preset"] for r in runs))}
    rows = sorted(enumerate(runs), key=lambda ir: (preset_order[ir[1]["preset"]], ir[0]))  # by preset, run order
    for i, r in rows:
        ok = r["status"] == "ok"
        s = sp.get(i, {})

        def f(key: str, fmt: str, scale: float = 1.0, r=r, ok=ok) -> str:
            v = r.get(key) if ok else None
            return format(v * scale, fmt) if v is not None else ""

        status = "ok" if ok else f"{r['status']}: {str(r.get('reason', ''))[:120]}"
        lines.append(
            f"| {r['preset']} | {r['mode']} | {r['kernels']} | {int(bool(r['compile']))} | {f('tokens_per_s', ',.0f')} "
            f"| {format(s['vs_baseline'], '.2f') if 'vs_baseline' in s else ''} "
            f"| {format(s['vs_torch_eager'], '.2f') if 'vs_torch_eager' in s else ''} "
            f"| {f('mfu', '.1f', 100)}{'%' if ok and r.get('mfu') else ''} | {f('peak_mem_gib', '.2f')} "
            f"| {f('first_step_s', '.1f')} | {f('non_pad_fraction', '.2f')} "
            f"| {status.replace('|', '/').replace(chr(10), ' ')} |"
        )
    return lines


def markdown(result: dict[str, Any], json_name: str) -> str:
    m = result["meta"]
    runs = result["runs"]
    lines = [
        f"# End-to-end training throughput: {m['device']}",
        "",
        *bench.provenance(m, json_name),
        f"- torch {m['torch']}, triton {m['triton']}, liger-kernel {m['liger_kernel']}, CUDA {m['cuda']}, "
        f"date {m['date_utc']}",
    ]
    if m.get("matmul_peak"):
        lines.append(f"- measured bf16 matmul peak (MFU denominator): {m['matmul_peak']['tflops']} TFLOP/s")
    if runs:
        r0 = runs[0]
        if "batch_size" in r0:
            lines.append(
                f"- per step: {r0['batch_size']} rows x {r0['accumulation_steps']} micro-batches x "
                f"{r0['max_seq_len']} tokens; {r0['steps']} steps, the first {r0['warmup_steps']} not timed"
            )
    if m.get("finished") is False:
        lines.append("- **incomplete**: written before the matrix ended (the run was cut short or is still going)")
    if not m.get("cuda_available"):
        lines += ["", f"**{bench.CPU_WARNING}**"]
    lines += [
        "",
        "tokens/s counts non-pad tokens only (labels != -100). x baseline: over the reference MiniMind trainer's way "
        "(eager, torch ops, one padded document per row) at the same preset; x torch eager: over our packed path "
        "with torch ops and no compile. non-pad: fraction of the positions computed that were real tokens. first step "
        "s: the first optimizer step alone (compilation, autotuning).",
        "",
        *table(runs),
    ]
    return "\n".join(lines) + "\n"


def _result_paths(args: Args, what: str) -> tuple[Path, Path] | None:
    why = bench.refuse_cpu_results(args.out_dir)
    if why:
        print(f"note: {why}")
        return None
    return bench.result_paths(args.out_dir, args.name or what)


def _write(result: dict[str, Any], paths: tuple[Path, Path] | None) -> None:
    if paths is None:
        return
    json_path, md_path = paths
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown(result, json_path.name))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one configuration, or --matrix. Returns {"kind": "e2e", "meta": ..., "runs": [...], "paths": [...]}."""
    args = parse_args(Args, argv, __doc__.split("\n\n")[0])
    command = bench.command_line("bench/e2e.py", argv)
    if args.cpu_compare:
        result = run_cpu_compare(args, command)  # written after every pair
        for line in compare_markdown(result, Path(result["paths"][0]).name).splitlines()[-4:]:
            print(line)
        print(f"written: {', '.join(result['paths'])}")
        return result
    if not torch.cuda.is_available():
        print(f"warning: {bench.CPU_WARNING}")
    if args.matrix:
        result = run_matrix(args, command)  # written after every configuration
    else:
        try:
            record = run_one(args, command)
        except kernels.KernelSpecError as exc:
            record = {
                "status": "unavailable",
                "mode": "packed",
                "preset": args.preset,
                "kernels": args.kernels,
                "compile": bool(args.compile),
                "reason": str(exc),
                "command": command,
            }
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(record, indent=1) + "\n")
            print(_one_line(record))
            return {"kind": "e2e", "runs": [record], "paths": [args.json_out]}
        peak = {"tflops": record["peak_tflops"]} if record.get("peak_tflops") else None
        result = {"kind": "e2e", "meta": {**bench.run_metadata(command), "matmul_peak": peak}, "runs": [record]}
        what = (
            f"baseline-minimind-{args.preset}"
            if args.baseline
            else (f"e2e-{args.preset}-{args.kernels.replace(',', '+').replace('=', '-')}-c{int(args.compile)}")
        )
        paths = _result_paths(args, what)
        _write(result, paths)
        result["paths"] = [str(p) for p in paths] if paths else []
    print()
    print("\n".join(table(result["runs"])))
    if result["paths"]:
        print(f"written: {', '.join(result['paths'])}")
    if not torch.cuda.is_available():
        print(f"warning: {bench.CPU_WARNING}")
    return result


if __name__ == "__main__":
    main()
