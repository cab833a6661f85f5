"""The chat server under load, side by side with an older commit's server: generated tokens per second and time to
first token, with the official async openai client streaming.

    python bench/serve_load.py --against 65fc959            # this checkout's server vs the one at 65fc959
    python bench/serve_load.py --scenarios staggered32 --rounds 1 --preset tiny     # a quick look

Each tree serves the same checkpoint (random weights of --preset, with the embedding rows of tokens that print
nothing visible alone, byte fragments, whitespace and specials, set to zero so that every generated token shows at
once; saved once here with the shipped tokenizer) with
`python tools/serve.py --load CKPT --port 0 --device cpu --kernels torch --threads T`, run from that tree with its
own sources first on PYTHONPATH (a temporary `git worktree` of --against). Scenarios (all greedy, ignore_eos, so
every request generates exactly its max_tokens; prompts and answer lengths mixed and fixed by --seed):
  staggered32   32 clients, one arriving every 50 ms, prompts of 1-6 sentences, max_tokens 16-128
  together32    staggered32's 32 requests (same prompts and lengths) all at once: the same work with no arrival
                to wait for, which shows how much of staggered32's wall time is the work itself
  together8     8 clients at once, max_tokens 64
  single        1 client, max_tokens 128
Per scenario and tree: wall seconds from the first request to the last answer, generated tokens per second over
that time (completion tokens from each stream's usage), and time to first token (request sent -> first chunk with
text) p50 / p95 / max. Rounds alternate the trees (older first) so that load from other work falls on both; each
round gives a ratio per scenario. Writes <out_dir>/serve-load_<cpu|gpu>_<date>.json and .md (default out_dir
bench/results/cpu without CUDA).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

import bench  # noqa: E402

SCENARIOS = {
    "staggered32": dict(clients=32, gap_s=0.05, max_tokens=(16, 128)),
    "together32": dict(clients=32, gap_s=0.0, max_tokens=(16, 128), same_as="staggered32"),
    "together8": dict(clients=8, gap_s=0.0, max_tokens=(64, 64)),
    "single": dict(clients=1, gap_s=0.0, max_tokens=(128, 128)),
}
SENTENCES = [
    "Tell me about the weather by the sea.",
    "What do the people of the valley grow?",
    "Explain how a river finds its way down a hill.",
    "Who keeps the lighthouse on the northern cape?",
    "Describe a market day in a small town.",
    "Why do the geese fly south before the winter?",
]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", default="", help="a git revision whose server runs side by side with this one")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    p.add_argument("--rounds", type=int, default=2, help="runs of every scenario on each tree")
    p.add_argument("--preset", default="small", help="model preset of the random-weight checkpoint")
    p.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 2)), help="server torch threads")
    p.add_argument("--seed", type=int, default=0, help="prompt, length and weight seed")
    p.add_argument("--out_dir", default="", help="where the results go (default: bench/results/cpu without CUDA)")
    p.add_argument("--name", default="serve-load", help="the <what> part of the result file names")
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in args.scenarios if s not in SCENARIOS]
    if bad or not args.scenarios:
        p.error(f"--scenarios: unknown {bad}; choose from {', '.join(SCENARIOS)}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def make_checkpoint(preset: str, seed: int, out: Path) -> Path:
    from minimind_fast.checkpoint import save_checkpoint
    from minimind_fast.config import from_preset
    from minimind_fast.model import MiniMind
    from minimind_fast.tokenizer import Tokenizer

    torch.manual_seed(seed)
    cfg = from_preset(preset)
    model, tok = MiniMind(cfg), Tokenizer.load(None)
    # A random model may start with tokens a server holds back: byte fragments of a multi-byte character (until the
    # character is complete) and whitespace (an answer may still open with `<think>` after it). The first text would
    # then come many tokens in, timing that rather than the scheduler. Zeroing those tokens' (tied) embedding rows
    # gives them logit 0, far below the best of the others, so every generated token prints at once.
    silent = [i for i in range(cfg.vocab_size) if _silent(tok.decode([i], skip_special_tokens=True))]
    with torch.no_grad():
        model.model.embed_tokens.weight[silent] = 0.0
    return save_checkpoint(out / f"{preset}-random", model, cfg, tokenizer=tok)


# Config fields added after older commits, with the value that means what those commits did without the field
# (head_dim: hidden / heads). A tree that does not know a field gets a copy of the checkpoint without it.
_LATER_FIELDS = {
    "head_dim": lambda m: m["hidden_size"] // m["num_attention_heads"],
    "qk_norm": lambda m: False,
    "norm_topk_k1": lambda m: False,
}


def checkpoint_for(tree: Path, ckpt: Path, out: Path) -> Path:
    """ckpt as `tree`'s code reads it: the same weights, without config fields its MiniMindConfig lacks (each must
    hold the value that older code implied, or the two trees would serve different models)."""
    from minimind_fast.checkpoint import write_manifest

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(tree / p) for p in ("kernels", "minimind", "."))}
    probe = "import dataclasses, json, minimind_fast.config as c; "
    probe += "print(json.dumps([f.name for f in dataclasses.fields(c.MiniMindConfig)]))"
    known = set(json.loads(subprocess.run([sys.executable, "-c", probe], cwd=tree, env=env, capture_output=True,
                                          text=True, check=True).stdout))  # fmt: skip
    cfg = json.loads((ckpt / "config.json").read_text())
    drop = [k for k in cfg["model"] if k not in known]
    if not drop:
        return ckpt
    for k in drop:
        if k not in _LATER_FIELDS or cfg["model"][k] != _LATER_FIELDS[k](cfg["model"]):
            raise RuntimeError(f"{tree} cannot read config field {k}={cfg['model'][k]!r} of {ckpt}")
        del cfg["model"][k]
    copy = out / ckpt.name
    shutil.copytree(ckpt, copy)
    (copy / "config.json").write_text(json.dumps(cfg, indent=2))
    write_manifest(copy)
    return copy


def _silent(text: str) -> bool:
    return text.strip() == "" or "\ufffd" in text


def requests_for(name: str, seed: int) -> list[dict[str, Any]]:
    sc = SCENARIOS[name]
    rng = random.Random(f"{seed}-{sc.get('same_as', name)}")
    lo, hi = sc["max_tokens"]
    out = []
    for i in range(sc["clients"]):
        text = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 6)))
        out.append({"at_s": i * sc["gap_s"], "content": text, "max_tokens": rng.randint(lo, hi)})
    return out


class Server:
    """tools/serve.py of one tree in a subprocess; the port comes from its start-up line."""

    def __init__(self, tree: Path, ckpt: Path, threads: int):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(tree / p) for p in ("kernels", "minimind", "."))}
        env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, "tools/serve.py", "--load", str(ckpt), "--port", "0", "--device", "cpu"]
        cmd += ["--kernels", "torch", "--threads", str(threads), "--log_level", "warning"]
        self.proc = subprocess.Popen(cmd, cwd=tree, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.port = None
        deadline = time.time() + 120
        while self.port is None and time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
        if self.port is None:
            self.close()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        threading.Thread(target=lambda: [self.lines.append(x) for x in self.proc.stderr], daemon=True).start()
        self.base = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _one(client, model: str, req: dict[str, Any], t0: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, t0 + req["at_s"] - time.perf_counter()))
    sent = time.perf_counter()
    first = None
    usage = None
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": req["content"]}],
        max_tokens=req["max_tokens"],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return {
        "ttft_s": (first or end) - sent,
        "latency_s": end - sent,
        "completion_tokens": usage.completion_tokens if usage else None,
        "end": end,
    }


def run_scenario(base: str, model: str, reqs: list[dict[str, Any]]) -> dict[str, Any]:
    import openai

    async def go():
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=600) as c:
            t0 = time.perf_counter()
            res = await asyncio.gather(*(_one(c, model, r, t0) for r in reqs))
            return t0, res

    t0, res = asyncio.run(go())
    wall = max(r["end"] for r in res) - t0
    tokens = sum(r["completion_tokens"] or 0 for r in res)
    ttft = sorted(r["ttft_s"] for r in res)

    def pct(q: float) -> float:
        return ttft[min(len(ttft) - 1, round(q * (len(ttft) - 1)))]

    return {
        "wall_s": round(wall, 3),
        "completion_tokens": tokens,
        "expected_tokens": sum(r["max_tokens"] for r in reqs),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(pct(0.5), 3),
        "ttft_p95_s": round(pct(0.95), 3),
        "ttft_max_s": round(ttft[-1], 3),
    }


def markdown(result: dict[str, Any], json_name: str) -> str:
    meta = result["meta"]
    cpu = meta.get("cpu", {}).get("model") or meta["device"]
    lines = [
        f"# Chat server under load: {result['preset']} (random weights), {cpu}, {result['threads']} server threads",
        "",
        *bench.provenance(meta, json_name),
        f"- against: `{result['against']}` ({result.get('against_commit', '')[:12]})" if result["against"] else "",
        "",
        "| scenario | round | tree | wall s | tokens | tok/s | TTFT p50 s | TTFT p95 s | TTFT max s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['scenario']} | {r['round']} | {r['tree']} | {r['wall_s']} | {r['completion_tokens']} | "
            f"{r['tokens_per_s']} | {r['ttft_p50_s']} | {r['ttft_p95_s']} | {r['ttft_max_s']} |"
        )
    if result["ratios"]:
        lines += [
            "",
            "Ratios, this checkout over the older tree, per round (tok/s: higher is better; TTFT: lower).",
            "",
        ]
        lines += ["| scenario | tok/s ratios | median | TTFT p95 this / older |", "|---|---|---|---|"]
        for name, rs in result["ratios"].items():
            tps = [x["tokens_per_s"] for x in rs]
            p95 = ", ".join(f"{x['ttft_p95_new']} / {x['ttft_p95_old']}" for x in rs)
            lines.append(f"| {name} | {', '.join(f'{t:.2f}x' for t in tps)} | {statistics.median(tps):.2f}x | {p95} |")
    return "\n".join(x for x in lines if x is not None) + "\n"


def write(result: dict[str, Any], paths: tuple[Path, Path]) -> None:
    bench.write_result(result, paths, markdown)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    out_dir = args.out_dir or str(bench.RESULTS_DIR if torch.cuda.is_available() else bench.RESULTS_DIR / "cpu")
    paths = bench.result_paths(out_dir, args.name)
    result: dict[str, Any] = {
        "kind": "serve-load",
        "meta": {**bench.run_metadata(bench.command_line("bench/serve_load.py", argv)), "finished": False},
        "preset": args.preset,
        "threads": args.threads,
        "against": args.against or None,
        "scenarios": {s: SCENARIOS[s] for s in args.scenarios},
        "runs": [],
        "ratios": {},
    }
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        ckpt = make_checkpoint(args.preset, args.seed, work)
        trees = [(_ROOT, "this checkout")]
        if args.against:
            result["against_commit"] = stack.enter_context(bench.worktree(args.against, work / "against"))
            trees.insert(0, (work / "against", args.against))
        ckpts = {label: checkpoint_for(tree, ckpt, work / label.replace(" ", "-")) for tree, label in trees}
        for rnd in range(1, args.rounds + 1):
            for name in args.scenarios:
                reqs = requests_for(name, args.seed)
                pair = []
                for tree, label in trees:
                    server = Server(tree, ckpts[label], args.threads)
                    try:
                        run_scenario(server.base, ckpt.name, reqs[:1])  # warm-up: first-call costs
                        rec = {
                            "scenario": name,
                            "round": rnd,
                            "tree": label,
                            **run_scenario(server.base, ckpt.name, reqs),
                        }
                    finally:
                        server.close()
                    print(f"[round {rnd}] {name} {label}: {rec['tokens_per_s']} tok/s, TTFT p50 "
                          f"{rec['ttft_p50_s']} s p95 {rec['ttft_p95_s']} s", flush=True)  # fmt: skip
                    result["runs"].append(rec)
                    pair.append(rec)
                if len(pair) == 2:
                    o, n = pair
                    result["ratios"].setdefault(name, []).append({
                        "tokens_per_s": round(n["tokens_per_s"] / o["tokens_per_s"], 3),
                        "ttft_p95_new": n["ttft_p95_s"], "ttft_p95_old": o["ttft_p95_s"],
                    })  # fmt: skip
                write(result, paths)
    result["meta"]["finished"] = True
    write(result, paths)
    print(markdown(result, paths[0].name))
    print(f"written: {paths[0]}, {paths[1]}")
    return result


if __name__ == "__main__":
    main()
