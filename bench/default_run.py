"""The README's main command timed as a user runs it: `python train/pretrain.py` with every default, in a fresh process.

    python bench/default_run.py                                # one default run of this checkout
    python bench/default_run.py --against 868c4f1 --pairs 2    # side by side with an older commit, alternating
    python bench/default_run.py --quality                      # + the default SFT and the held-out evaluation
    python bench/default_run.py --quality --seeds 42,1,2,3     # run-to-run spread: one run (pair) per seed

A run is `python train/pretrain.py --out_dir <tmp>` (plus --pretrain_args, for short checks), and with --quality
then `python train/sft.py --out_dir <tmp>` and `python tools/eval.py --load <tmp>/full_sft --heldout
data/sample/eval.jsonl --samples 0`. --seeds S1,S2,...: one run (or pair) per seed, `--seed S` given to pretrain and
SFT, and the report adds each tree's median and range per held-out kind: on the tiny model these figures move a lot
from seed to seed, and a single run says little about a change. --against REV runs the same commands from a
temporary `git worktree` of REV, its own sources first on PYTHONPATH, with the same Python; the runs alternate (REV,
this checkout) so that load from other work on the machine falls on both, and each pair gives a ratio. The sample
data's sha256 is recorded for both trees (a ratio between different data means nothing, and the report says so).

Per run: wall seconds (start-up, tokenization and saving included: what a user waits), optimizer steps, tokens per
second over the training steps (from the run's metrics file: each log record's rate weighted by its steps), the
first and last logged loss, and with --quality the held-out accuracy per kind (greedy generation). Writes
<out_dir>/default-run_<cpu|gpu>_<date>.json and .md; the default out_dir is bench/results/cpu on a machine without
CUDA (CPU figures stay apart from the GPU results in bench/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

import bench  # noqa: E402

DATA = "data/sample/pretrain.jsonl"
HELDOUT = "data/sample/eval.jsonl"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", default="", help="a git revision to run side by side with this checkout")
    p.add_argument("--pairs", type=int, default=1, help="runs of each tree (alternating when --against is given)")
    p.add_argument("--seeds", default="", help="comma-separated seeds, one run (pair) each; replaces --pairs")
    p.add_argument("--quality", action="store_true", help="also run the default SFT and the held-out evaluation")
    p.add_argument("--pretrain_args", default="", help="extra train/pretrain.py flags, e.g. '--max_steps 50'")
    p.add_argument("--out_dir", default="", help="where the results go (default: bench/results/cpu without CUDA)")
    p.add_argument("--name", default="default-run", help="the <what> part of the result file names")
    p.add_argument("--timeout_s", type=float, default=3600.0, help="wall-clock limit of one command")
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error(f"--pairs must be >= 1, got {args.pairs}")
    try:
        args.seed_list = [int(x) for x in args.seeds.split(",")] if args.seeds.strip() else [None] * args.pairs
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if "--seed" in shlex.split(args.pretrain_args) and args.seeds.strip():
        p.error("--seeds sets --seed itself; leave it out of --pretrain_args")
    return args


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def training_rate(metrics_path: Path) -> tuple[float | None, int, list[float]]:
    """-> (tokens/s over the logged windows, last logged step, [first loss, last loss]) from a metrics JSONL."""
    recs = []
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            r = json.loads(line) if line.strip() else {}
            if "tokens_per_s" in r and "step" in r:
                recs.append(r)
    if not recs:
        return None, 0, []
    prev, steps, seconds_per_token = 0, 0, 0.0  # rate = sum(window steps) / sum(window steps / window rate)
    for r in recs:
        d = r["step"] - prev
        prev = r["step"]
        steps += d
        seconds_per_token += d / r["tokens_per_s"]
    return steps / seconds_per_token, recs[-1]["step"], [recs[0]["loss"], recs[-1]["loss"]]


def run_cmd(cmd: list[str], cwd: Path, timeout_s: float, log: Path) -> tuple[int, float]:
    """Run one command with the tree's sources first on PYTHONPATH; output to `log`. -> (exit status, wall s)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(cwd / p) for p in ("kernels", "minimind", "."))}
    env.pop("BENCH_GIT_COMMIT", None)
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t


def one_run(tree: Path, label: str, args: argparse.Namespace, work: Path, seed: int | None) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    log = out / "log.txt"
    seed_args = [] if seed is None else ["--seed", str(seed)]
    cmd = [sys.executable, "train/pretrain.py", "--out_dir", str(out), *shlex.split(args.pretrain_args), *seed_args]
    rc, wall = run_cmd(cmd, tree, args.timeout_s, log)
    rate, steps, losses = training_rate(out / "pretrain_metrics.jsonl")
    rec: dict[str, Any] = {
        "tree": label,
        "seed": seed,
        "command": shlex.join(["python", "train/pretrain.py", *shlex.split(args.pretrain_args), *seed_args]),
        "status": "ok" if rc == 0 else f"exit {rc}",
        "wall_s": round(wall, 1),
        "steps": steps,
        "tokens_per_s": round(rate, 1) if rate else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }
    if rc == 0 and args.quality:
        rc, sft_wall = run_cmd(
            [sys.executable, "train/sft.py", "--out_dir", str(out), *seed_args], tree, args.timeout_s, log
        )
        rec["sft_wall_s"] = round(sft_wall, 1)
        evaluation = out / "eval.json"
        if rc == 0:
            cmd = [sys.executable, "tools/eval.py", "--load", str(out / "full_sft"), "--heldout", HELDOUT]
            rc, _ = run_cmd([*cmd, "--samples", "0", "--out", str(evaluation)], tree, args.timeout_s, log)
        if rc == 0 and evaluation.is_file():
            summary = json.loads(evaluation.read_text())["models"][0]["heldout"]["summary"]
            rec["heldout"] = {kind: row.get("generation_acc") for kind, row in summary.items()}
        else:
            rec["status"] = f"quality step failed (exit {rc})"
    if rec["status"] != "ok":
        rec["log_tail"] = log.read_text()[-2000:]
    return rec


def markdown(result: dict[str, Any], json_name: str) -> str:
    m = result["meta"]
    lines = [
        f"# The default `python train/pretrain.py`, timed: {m['device']}",
        "",
        *bench.provenance(m, json_name),
        f"- torch {m['torch']}, {m['host_cpus']} CPUs, date {m['date_utc']}; sample data sha256 "
        + ", ".join(f"{k}: `{(v or 'missing')[:12]}`" for k, v in result["data_sha256"].items()),
    ]
    if result.get("against"):
        lines[3] += f", against `{result['against']}` (`{result['against_commit']}`)"
    if len(set(result["data_sha256"].values())) > 1:
        lines.append("- **the two trees ship different sample data: their ratio compares different jobs**")
    if not m.get("finished"):
        lines.append("- **incomplete**: written before the last run ended")
    kinds = sorted({k for r in result["runs"] for k in r.get("heldout", {})})
    head = "| run | tree | seed | wall s | steps | tokens/s | first loss | last loss |"
    head += "".join(f" {k} % |" for k in kinds)
    lines += ["", head + " status |", "|---" * (9 + len(kinds)) + "|"]
    for i, r in enumerate(result["runs"]):
        ho = r.get("heldout", {})
        cells = "".join(f" {format(100 * ho[k], '.1f') if ho.get(k) is not None else ''} |" for k in kinds)
        seed = r.get("seed")
        lines.append(
            f"| {i + 1} | {r['tree']} | {'default' if seed is None else seed} | {r['wall_s']} | {r['steps']} | "
            f"{r['tokens_per_s'] or ''} | "
            f"{r['first_loss'] if r['first_loss'] is not None else ''} | "
            f"{r['last_loss'] if r['last_loss'] is not None else ''} |{cells} {r['status']} |"
        )
    spread = heldout_spread(result["runs"])
    if spread:
        lines += ["", "Held-out accuracy over the runs of each tree, median [min, max] in %:", ""]
        for tree, per_kind in spread.items():
            lines.append(
                f"- {tree} ({per_kind['runs']} runs): "
                + "; ".join(f"{k} {v[0]:.1f} [{v[1]:.1f}, {v[2]:.1f}]" for k, v in per_kind.items() if k != "runs")
            )
    if result.get("pairs"):
        lines.append("")
        for key, what in (("tokens_per_s", "training tokens/s"), ("wall_s", "wall time (old / new)")):
            vals = [p[key] for p in result["pairs"] if p.get(key)]
            if vals:
                lines.append(
                    f"This checkout over `{result['against']}`, {what}, pair by pair: "
                    + ", ".join(f"{v:.2f}x" for v in vals)
                    + f"; median {statistics.median(vals):.2f}x."
                )
    return "\n".join(lines) + "\n"


def heldout_spread(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """-> {tree: {"runs": n, kind: (median, min, max) in %}} over the tree's runs that have held-out figures, for
    trees with at least two such runs."""
    out: dict[str, dict[str, Any]] = {}
    for tree in dict.fromkeys(r["tree"] for r in runs):
        scored = [r["heldout"] for r in runs if r["tree"] == tree and r.get("heldout")]
        if len(scored) < 2:
            continue
        per_kind: dict[str, Any] = {"runs": len(scored)}
        for kind in sorted({k for h in scored for k in h}):
            vals = [100 * h[kind] for h in scored if h.get(kind) is not None]
            if vals:
                per_kind[kind] = (statistics.median(vals), min(vals), max(vals))
        out[tree] = per_kind
    return out


def write(result: dict[str, Any], paths: tuple[Path, Path]) -> None:
    bench.write_result(result, paths, markdown)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    out_dir = args.out_dir or str(bench.RESULTS_DIR if torch.cuda.is_available() else bench.RESULTS_DIR / "cpu")
    paths = bench.result_paths(out_dir, args.name)
    result: dict[str, Any] = {
        "kind": "default-run",
        "meta": {**bench.run_metadata(bench.command_line("bench/default_run.py", argv)), "finished": False},
        "against": args.against or None,
        "runs": [],
        "pairs": [],
        "data_sha256": {"this checkout": sha256(_ROOT / DATA)},
        "paths": [str(p) for p in paths],
    }
    with tempfile.TemporaryDirectory(prefix="default-run-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        trees = [(_ROOT, "this checkout")]
        if args.against:
            old = work / "against"
            result["against_commit"] = stack.enter_context(bench.worktree(args.against, old))
            result["data_sha256"][args.against] = sha256(old / DATA)
            trees.insert(0, (old, args.against))
        for i, seed in enumerate(args.seed_list):
            pair = []
            for tree, label in trees:
                what = args.pretrain_args + ("" if seed is None else f" --seed {seed}")
                print(f"[{i + 1}/{len(args.seed_list)}] {label}: python train/pretrain.py {what}", flush=True)
                rec = one_run(tree, label, args, work, seed)
                print(f"    {rec['status']}: {rec['wall_s']} s, {rec['steps']} steps, {rec['tokens_per_s']} tok/s, "
                      f"loss {rec['last_loss']}" + (f", held-out {rec['heldout']}" if "heldout" in rec else ""),
                      flush=True)  # fmt: skip
                result["runs"].append(rec)
                pair.append(rec)
            if len(pair) == 2 and all(r["status"] == "ok" for r in pair):
                old_r, new_r = pair
                ratio = {"wall_s": old_r["wall_s"] / new_r["wall_s"]}
                if old_r["tokens_per_s"] and new_r["tokens_per_s"]:
                    ratio["tokens_per_s"] = new_r["tokens_per_s"] / old_r["tokens_per_s"]
                result["pairs"].append(ratio)
            write(result, paths)
    result["meta"]["finished"] = True
    write(result, paths)
    print(markdown(result, paths[0].name))
    print(f"written: {paths[0]}, {paths[1]}")
    return result


if __name__ == "__main__":
    main()
