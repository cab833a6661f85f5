"""Evaluate MiniMind checkpoints: held-out question accuracy, perplexity, C-Eval/CMMLU-style multiple choice and a
generation sample sheet. Prints tables and writes everything (item by item) to JSON.

    python tools/eval.py --load out/full_sft --heldout data/sample/eval.jsonl
    python tools/eval.py --load out/pretrain out/full_sft                     # side by side
    python tools/eval.py --load out/full_sft out/full_sft --lora none out/lora_identity --prompts "Who are you?"
    python tools/eval.py --load out/full_sft --ppl data/sample/pretrain.jsonl data/sample/sft.jsonl --max_records 500
    python tools/eval.py --load out/full_sft --mc /path/to/ceval/val --mc_score letter --heldout none
    python tools/eval.py --load out/tool_sft --heldout data/sample/eval.jsonl --tools --world data/sample/world.json

Held-out accuracy (minimind_fast/evaluate.py has the exact rules) is reported per kind in two ways, next to the chance
level 1/len(choices): "gen", the greedy reply through the chat template states the answer (answer_matches, the
matcher the RL rule reward uses too: a number must be the reply's last whole number, a word must occur as a whole
word); "choice", the answer is the choice with the highest log-likelihood as the assistant's completion.
With --tools, "gen" is the answer after tool use: each question is a user turn after the --system message (default
"You are a helpful assistant.", one of the tool-use data's system prompts) with the tools offered (the calculator,
and lookup over the --world file; minimind_fast.toolcall), run through the multi-turn loop
(minimind_fast.agent.run_agent: greedy, up to --max_turns model turns of --max_new_tokens each, default 128 there)
and its final answer judged by the same matcher; a question left with a call pending counts as unanswered. Each
item's JSON record then holds its turns, its calls (name, arguments, result) and its final reply, and the summary of
every kind the share of items where a tool was called ("tool_call_share"). Choice scoring does not use the tools.
--lora takes one adapter folder for every --load, or one per --load ('none' for the plain model).
The sample sheet (--samples N prompts: --prompts texts or file lines, else the first held-out questions plus
"Who are you?") is written as markdown next to the JSON. A missing or broken file stops with one `error: ...` line
and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/eval.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import minimind_kernels as kernels  # noqa: E402
from minimind_fast import evaluate as ev  # noqa: E402
from minimind_fast.agent import AgentError, run_agent  # noqa: E402
from minimind_fast.data import DataError  # noqa: E402
from minimind_fast.engine import Engine, SamplingParams  # noqa: E402
from minimind_fast.inference import LoadError, load_for_inference, pick_device  # noqa: E402
from minimind_fast.tokenizer import Tokenizer  # noqa: E402
from minimind_fast.toolcall import Toolbox, WorldError  # noqa: E402

IDENTITY_PROMPT = "Who are you?"


class EvalError(RuntimeError):
    """Something the user can fix (bad path, flag combination): reported as one line."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", nargs="+", default=["out/full_sft"], help="checkpoint folder(s) to evaluate")
    p.add_argument("--lora", nargs="+", default=None, help="adapter folder for every --load, or one per --load / none")
    p.add_argument("--heldout", default="data/sample/eval.jsonl", help="held-out questions JSONL ('none': skip)")
    p.add_argument("--heldout_mode", choices=("both", "generation", "choice"), default="both")
    p.add_argument("--max_items", type=int, default=0, help="evaluate only the first N held-out questions (0 = all)")
    p.add_argument("--ppl", nargs="*", default=[], help="JSONL files (pretrain or SFT format) to measure perplexity on")
    p.add_argument("--max_records", type=int, default=0, help="records per perplexity file (0 = all)")
    p.add_argument("--mc", nargs="*", default=[], help="C-Eval/CMMLU-style CSV/JSONL files or folders")
    p.add_argument("--mc_score", choices=("letter", "text", "both"), default="both", help="what each option scores")
    p.add_argument("--mc_template", choices=("chat", "raw"), default="chat", help="chat template or plain text")
    p.add_argument("--samples", type=int, default=8, help="prompts in the generation sample sheet (0 = none)")
    p.add_argument("--prompts", nargs="*", default=None, help="sample-sheet prompts, or one file with one per line")
    p.add_argument("--temperature", type=float, default=0.0, help="sample-sheet sampling temperature (0 = greedy)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="tokens per answer (per turn with --tools); 48, "
                   "128 with --tools")  # fmt: skip
    p.add_argument("--tools", action="store_true", help="answer the held-out questions with tools (see above)")
    p.add_argument("--world", default="data/sample/world.json", help="world file of the lookup tool ('none': none)")
    p.add_argument("--max_turns", type=int, default=3, help="most model turns per question with --tools")
    p.add_argument("--system", default="You are a helpful assistant.", help="system message with --tools ('': none)")
    p.add_argument("--max_seq_len", type=int, default=512, help="tokens kept per perplexity record")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--out", default=None, help="JSON output (default: eval_<names>.json next to the first --load)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--kernels", default="auto", help="ops spec: auto, torch, triton, ...")
    p.add_argument("--seed", type=int, default=0, help="seed for sampled sample-sheet answers")
    args = p.parse_args(argv)
    if args.lora is not None and len(args.lora) not in (1, len(args.load)):
        p.error(f"--lora takes 1 adapter or one per --load ({len(args.load)}), got {len(args.lora)}")
    if args.max_new_tokens is None:
        args.max_new_tokens = 128 if args.tools else 48  # a tool call alone takes some 50 tokens
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.max_turns < 1:
        p.error("--batch_size, --max_new_tokens and --max_turns must be >= 1")
    return args


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]


def load(folder: str, adapter: str | None, args: argparse.Namespace) -> tuple[torch.nn.Module, Tokenizer]:
    """Model (eval mode; adapter merged) and the tokenizer saved with it (or the shipped one)."""
    try:
        return load_for_inference(folder, lora=adapter, device=args.device, kernels_spec=args.kernels)
    except LoadError as exc:
        raise EvalError(str(exc)) from None


def load_toolbox(world: str) -> Toolbox:
    """The calculator, and lookup over the world file unless it is 'none'."""
    try:
        return Toolbox(None if world.lower() == "none" else world)
    except WorldError as exc:
        raise EvalError(f"--world: {exc}") from None


def heldout_with_tools(
    model: torch.nn.Module, tok: Tokenizer, items: list[ev.HeldoutItem], toolbox: Toolbox, args: argparse.Namespace
) -> list[dict]:
    """Per item {"reply", "correct", "turns", "calls", "finished", "stop_reason"}: the question as a user turn (after
    --system) with the toolbox's tools offered, through the multi-turn loop (greedy), the final reply judged by
    answer_matches."""
    engine = Engine(model, None, eos_id=tok.eos_id, max_batch=args.batch_size, max_batch_tokens=1 << 62)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0)
    was_training = model.training
    model.eval()
    system = [{"role": "system", "content": args.system}] if args.system else []
    convs = [[*system, {"role": "user", "content": it.question}] for it in items]
    results = run_agent(engine, tok, convs, toolbox.specs, toolbox, params, args.max_turns)
    model.train(was_training)
    return [
        {
            "reply": r.reply,
            "correct": ev.answer_matches(it.answer, r.reply),
            "turns": r.turns,
            "calls": [{k: c[k] for k in ("name", "arguments", "result")} for c in r.calls],
            "finished": r.finished,
            "stop_reason": r.stop_reason,
        }
        for it, r in zip(items, results)
    ]


def add_tool_share(summary: dict[str, dict], items: list[ev.HeldoutItem], gen: list[dict]) -> None:
    """summary[kind]["tool_call_share"]: the share of that kind's items (and of all) where a tool was called."""
    for kind, row in summary.items():
        idx = [k for k, it in enumerate(items) if kind in ("all", it.kind)]
        row["tool_call_share"] = sum(bool(gen[k]["calls"]) for k in idx) / len(idx)


def sample_prompts(args: argparse.Namespace, items: list[ev.HeldoutItem] | None) -> list[tuple[str, str]]:
    """(prompt, expected answer or '') for the sample sheet."""
    if args.prompts:
        if len(args.prompts) == 1 and Path(args.prompts[0]).is_file():
            lines = Path(args.prompts[0]).read_text().splitlines()
            return [(ln.strip(), "") for ln in lines if ln.strip()][: args.samples or None]
        return [(p, "") for p in args.prompts]
    if args.samples <= 0:
        return []
    chosen = [(it.question, it.answer) for it in (items or [])[: max(args.samples - 1, 0)]]
    return chosen + [(IDENTITY_PROMPT, "")]


def evaluate_one(
    args: argparse.Namespace, folder: str, adapter: str | None, items, sheet_path: Path | None, toolbox=None
) -> dict:
    model, tok = load(folder, adapter, args)
    res: dict = {"load": folder, "lora": adapter, "params": model.num_params()}
    name = Path(folder).name + (f"+{Path(adapter).name}" if adapter else "")
    t0 = time.perf_counter()
    if items is not None:
        gen = choice = None
        if args.heldout_mode in ("both", "generation"):
            if toolbox is not None:
                gen = heldout_with_tools(model, tok, items, toolbox, args)
            else:
                gen = ev.heldout_generation(model, tok, items, args.max_new_tokens, args.batch_size)
        if args.heldout_mode in ("both", "choice"):
            choice = ev.heldout_choice(model, tok, items, args.batch_size)
        rows = []
        for k, it in enumerate(items):
            row = {"question": it.question, "answer": it.answer, "kind": it.kind}
            if gen is not None:
                row.update(reply=gen[k]["reply"], gen_correct=gen[k]["correct"])
                if toolbox is not None:
                    row.update({key: gen[k][key] for key in ("turns", "calls", "finished", "stop_reason")})
            if choice is not None and choice[k] is not None:
                row.update(choice_pred=choice[k]["pred"], choice_correct=choice[k]["correct"])
            rows.append(row)
        summary = ev.summarize_heldout(items, gen, choice)
        if toolbox is not None and gen is not None:
            add_tool_share(summary, items, gen)
        res["heldout"] = {"path": args.heldout, "summary": summary, "items": rows}
    res["perplexity"] = []
    for path in args.ppl:
        res["perplexity"].append(
            ev.perplexity(model, tok, path, args.max_seq_len, args.batch_size, args.max_records or None)
        )
    res["mc"] = []
    for path in args.mc:
        mc_items = ev.read_mc(path)
        for score in ("letter", "text") if args.mc_score == "both" else (args.mc_score,):
            r = ev.mc_accuracy(model, tok, mc_items, score, args.mc_template, args.batch_size)
            res["mc"].append({"path": path, **r})
    prompts = sample_prompts(args, items)
    if prompts and sheet_path is not None:
        sampling = (
            {} if args.temperature == 0 else {"greedy": False, "temperature": args.temperature, "seed": args.seed}
        )
        rows = ev.sample_sheet(model, tok, [p for p, _ in prompts], args.max_new_tokens, args.batch_size, **sampling)
        for r, (_, expected) in zip(rows, prompts):
            r["expected"] = expected
        ev.write_sample_sheet(sheet_path, f"Samples: {name}", rows)
        res["samples"] = {"path": str(sheet_path), "rows": rows}
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:5.1f}"


def format_heldout(results: list[dict], labels: list[str]) -> str:
    """Kinds down, models across: n, chance, then gen / choice accuracy (%) per model."""
    have = [r for r in results if "heldout" in r]
    if not have:
        return ""
    summary0 = have[0]["heldout"]["summary"]
    head = f"{'kind':<12}{'n':>5}{'chance':>8}" + "".join(f" | {lab[:22]:^22}" for lab in labels)
    sub = " " * 25 + "".join(f" | {'gen':>10} {'choice':>11}" for _ in labels)
    lines = ["held-out accuracy (%)", head, sub, "-" * len(head)]
    for kind, row in summary0.items():
        cells = ""
        for r in results:
            s = r["heldout"]["summary"][kind]
            cells += f" | {_pct(s.get('generation_acc')):>10} {_pct(s.get('choice_acc')):>11}"
        lines.append(f"{kind:<12}{row['n']:>5}{_pct(row['chance']):>8}{cells}")
    return "\n".join(lines)


def format_tool_use(results: list[dict], labels: list[str]) -> str:
    """With --tools: kinds down, models across, the share (%) of items where a tool was called."""
    have = [r for r in results if "tool_call_share" in r.get("heldout", {}).get("summary", {}).get("all", {})]
    if not have:
        return ""
    head = f"{'kind':<12}{'n':>5}" + "".join(f" | {lab[:22]:^22}" for lab in labels)
    lines = ["held-out items where a tool was called (%)", head, "-" * len(head)]
    for kind, row in have[0]["heldout"]["summary"].items():
        cells = "".join(f" | {_pct(r['heldout']['summary'][kind]['tool_call_share']):>22}" for r in results)
        lines.append(f"{kind:<12}{row['n']:>5}{cells}")
    return "\n".join(lines)


def format_other(results: list[dict], labels: list[str]) -> str:
    lines = []
    for r, lab in zip(results, labels):
        for p in r["perplexity"]:
            lines.append(
                f"{lab}: perplexity {p['ppl']:.3f} (nll {p['nll']:.4f} nats/token, {p['tokens']:,} {p['format']} "
                f"tokens) on {p['path']}"
            )
        for m in r["mc"]:
            subj = ", ".join(f"{s} {_pct(v['acc']).strip()}" for s, v in m["subjects"].items())
            lines.append(
                f"{lab}: {m['path']} ({m['score']}, {m['template']}): {_pct(m['all']['acc']).strip()}% of "
                f"{m['all']['n']} (chance {_pct(m['all']['chance']).strip()}%)" + (f"; {subj}" if subj else "")
            )
        if "samples" in r:
            lines.append(f"{lab}: sample sheet {r['samples']['path']}")
            for row in r["samples"]["rows"]:
                if row["prompt"] == IDENTITY_PROMPT:
                    lines.append(f"{lab}: {IDENTITY_PROMPT!r} -> {row['reply']!r}")
    return "\n".join(lines)


def model_labels(folders: Sequence[str], adapters: Sequence[str | None]) -> list[str]:
    """Short names for the table: the folder name (+ adapter name), with the parent folder when names repeat."""

    def name(path: str, depth: int) -> str:
        return "/".join(Path(path).parts[-depth:])

    for depth in (1, 2, 3):
        labels = [name(f, depth) + (f"+{name(a, depth)}" if a else "") for f, a in zip(folders, adapters)]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{lab}" for i, lab in enumerate(labels)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    adapters = [None] * len(args.load)
    if args.lora is not None:
        given = args.lora * len(args.load) if len(args.lora) == 1 else args.lora
        adapters = [None if a.lower() == "none" else a for a in given]
    labels = model_labels(args.load, adapters)
    stem = "_vs_".join(lab.replace("/", "-") for lab in labels)
    out = Path(args.out) if args.out else Path(args.load[0]).parent / f"eval_{stem}.json"
    try:
        try:  # the device and the kernels spec are checked before any file is read
            pick_device(args.device)
            kernels.resolve(args.kernels)
        except (LoadError, kernels.KernelSpecError) as exc:
            raise EvalError(str(exc)) from None
        toolbox = load_toolbox(args.world) if args.tools else None
        items = None
        if args.heldout and args.heldout.lower() != "none":
            items = ev.read_heldout(args.heldout)
            if args.max_items:
                items = items[: args.max_items]
        results = []
        for i, (folder, adapter) in enumerate(zip(args.load, adapters)):
            sheet = out.with_name(f"{out.stem}_samples_{labels[i].replace('/', '-')}.md")
            results.append(evaluate_one(args, folder, adapter, items, sheet, toolbox))
    except (EvalError, DataError, FileNotFoundError, AgentError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    for text in (format_heldout(results, labels), format_tool_use(results, labels), format_other(results, labels)):
        if text:
            print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "models": results}, indent=2, ensure_ascii=False) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
