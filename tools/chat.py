"""Talk to a MiniMind checkpoint from the terminal, with the answer streamed as it is generated.

    python tools/chat.py --load out/full_sft                                   # interactive chat
    python tools/chat.py --load out/full_sft --prompt "What is a tide?"        # one answer, then exit
    python tools/chat.py --load out/pretrain --mode pretrain --prompt "The sea"   # raw continuation
    options: --max_new_tokens 256 --temperature 0.85 --top_p 0.85 --top_k 0 --repetition_penalty 1.0
             --history N (earlier turns kept in the prompt) --device auto|cpu|cuda[:i] --kernels auto|torch|triton
             --yarn (YaRN rope scaling for long contexts) --seed S --compile (torch.compile the decode step)
             --show_prompt (print the exact prompt text before each answer)
             --lora PATH (a LoRA adapter folder from train/lora.py, merged into the loaded model)
             --stop TEXT (end the answer at this text; repeatable)

Interactive mode reads one user turn per line from stdin; `exit` or end of input quits, `/clear` forgets the
conversation. Chat mode renders the last --history turns (user + assistant pairs) plus the new line through the
ChatML template with the assistant generation prompt; pretrain mode continues [bos] + the line as plain text, without
history. After each answer a line `[N tokens in S s, R tokens/s]` reports the speed, prompt processing included.
Temperature 0 decodes greedily; with --seed S, turn i samples from a generator seeded S + i (reproducible). In chat
mode an answer that opens with `<think>` shows its reasoning after `[thinking]` and the rest after `[answer]`; the
history keeps the answer only. Generation runs through minimind_fast.engine, as the server's does. A missing or
corrupt checkpoint stops with one `error: ...` line and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/chat.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import minimind_kernels as kernels  # noqa: E402
from minimind_fast.engine import Engine, RequestError, SamplingParams  # noqa: E402
from minimind_fast.inference import LoadError, load_for_inference  # noqa: E402
from minimind_fast.tokenizer import Tokenizer  # noqa: E402


class ChatError(RuntimeError):
    """Something the user can fix (bad path, device, kernels spec): reported as one line."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint folder (model.safetensors, config.json, manifest.json)")
    p.add_argument("--mode", choices=("chat", "pretrain"), default="chat", help="chat template, or raw continuation")
    p.add_argument("--prompt", default=None, help="answer this one prompt and exit (default: interactive)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.85, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=0.85)
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--history", type=int, default=0, help="earlier turns (user + assistant pairs) kept in the prompt")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--kernels", default="auto", help="ops spec: auto, torch, triton, liger, triton,rope=torch ...")
    p.add_argument("--yarn", action="store_true", help="YaRN rope scaling (longer contexts than trained on)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: not reproducible)")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step")
    p.add_argument("--show_prompt", action="store_true", help="print the prompt text the model sees")
    p.add_argument("--lora", default=None, help="LoRA adapter folder (train/lora.py output) to apply to --load")
    p.add_argument("--stop", action="append", default=[], help="end the answer at this text (repeatable)")
    args = p.parse_args(argv)
    if args.history < 0:
        p.error("--history must be >= 0")
    if args.max_new_tokens < 1:
        p.error("--max_new_tokens must be >= 1")
    return args


def load_chat_model(args: argparse.Namespace) -> tuple[torch.nn.Module, Tokenizer]:
    """The model (eval mode, on its device, YaRN switched as asked, adapter merged) and the tokenizer saved with it
    (or the shipped one when the checkpoint has none)."""
    try:
        model, tokenizer = load_for_inference(
            args.load, lora=args.lora, device=args.device, kernels_spec=args.kernels, yarn=args.yarn
        )
    except LoadError as exc:
        raise ChatError(str(exc)) from None
    device = next(model.parameters()).device
    print(
        f"loaded {args.load}{' + adapter ' + args.lora if args.lora else ''}: {model.num_params() / 1e6:.1f}M "
        f"parameters, {device}, yarn {'on' if args.yarn else 'off'}",
        file=sys.stderr,
    )
    print(kernels.describe(model.ops), file=sys.stderr)
    return model, tokenizer


class Session:
    """One conversation: its history, the sampling settings, and how a line becomes a prompt."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, args: argparse.Namespace):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.engine = Engine(model, tokenizer, max_batch=1, compile_decode=args.compile)
        self.history: list[dict[str, str]] = []
        self.turns = 0

    def prompt_ids(self, line: str) -> list[int]:
        if self.args.mode == "pretrain":
            return [self.tokenizer.bos_id] + self.tokenizer.encode(line)
        turns = self.history[-2 * self.args.history :] if self.args.history > 0 else []
        text = self.tokenizer.apply_chat_template(turns + [{"role": "user", "content": line}], True)
        return self.tokenizer.encode(text)

    def clear(self) -> None:
        self.history.clear()

    def answer(self, line: str, out=None) -> str:
        """Generate, streaming text to `out` (stdout), then the speed line; returns the answer (specials removed,
        reasoning apart). Raises RequestError when the prompt leaves no room in the context."""
        out = sys.stdout if out is None else out
        a = self.args
        ids = self.prompt_ids(line)
        if a.show_prompt:
            print(f"[prompt] {self.tokenizer.decode(ids)!r}", file=out, flush=True)
        limit = self.model.config.max_position_embeddings
        if len(ids) >= limit:
            raise RequestError(f"prompt of {len(ids)} tokens does not fit max_position_embeddings {limit}")
        params = SamplingParams(
            max_tokens=min(a.max_new_tokens, limit - len(ids)),
            temperature=a.temperature,
            top_p=a.top_p,
            top_k=a.top_k,
            repetition_penalty=a.repetition_penalty,
            stop=tuple(a.stop),
            seed=None if a.seed is None else a.seed + self.turns,  # each turn its own, reproducible draw
            split_reasoning=a.mode == "chat",
        )
        self.turns += 1
        shown = {"reasoning": False, "content": False}

        def show(event: dict) -> None:
            if event["type"] != "delta":
                return
            if event["reasoning"]:
                if not shown["reasoning"]:
                    print("[thinking] ", end="", file=out)
                shown["reasoning"] = True
                print(event["reasoning"], end="", file=out, flush=True)
            if event["content"]:
                if shown["reasoning"] and not shown["content"]:
                    print("\n[answer] ", end="", file=out)
                shown["content"] = True
                print(event["content"], end="", file=out, flush=True)

        t0 = time.perf_counter()
        req = self.engine.submit(ids, params, sink=show)
        try:
            while not req.finished:
                self.engine.step()
        except KeyboardInterrupt:
            self.engine.cancel(req)
            self.engine.step()  # the row leaves
            raise
        seconds = time.perf_counter() - t0
        if req.status == "error":
            raise RequestError(req.error or "generation failed")
        n_tokens = req.completion_tokens
        print(file=out)
        print(f"[{n_tokens} tokens in {seconds:.2f} s, {n_tokens / max(seconds, 1e-9):.1f} tokens/s]", file=out)
        out.flush()
        text = req.content.strip()
        if a.mode == "chat":
            self.history += [{"role": "user", "content": line}, {"role": "assistant", "content": text}]
            keep = 2 * a.history
            self.history = self.history[-keep:] if keep else []
        return text


def interactive(session: Session) -> None:
    marker = "> " if sys.stdin.isatty() else ""
    while True:
        try:
            line = input(marker)
        except (EOFError, KeyboardInterrupt):
            print()
            return
        line = line.strip()
        if not line:
            continue
        if line == "exit":
            return
        if line == "/clear":
            session.clear()
            print("(history cleared)")
            continue
        try:
            session.answer(line)
        except RequestError as exc:
            print(f"error: {exc}")
        except KeyboardInterrupt:
            print("\n(interrupted)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, tokenizer = load_chat_model(args)
    except ChatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    session = Session(model, tokenizer, args)
    if args.prompt is not None:
        try:
            session.answer(args.prompt)
        except RequestError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    interactive(session)
    return 0


if __name__ == "__main__":
    sys.exit(main())
