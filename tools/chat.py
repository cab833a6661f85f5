"""Talk to a MiniMind checkpoint from the terminal, with the answer streamed as it is generated.

    python tools/chat.py --load out/full_sft                                   # interactive chat
    python tools/chat.py --load out/full_sft --prompt "What is a tide?"        # one answer, then exit
    python tools/chat.py --load out/pretrain --mode pretrain --prompt "The sea"   # raw continuation
    python tools/chat.py --load out/agent --tools --prompt "What is 37 + 48?"    # the model may call the tools
    options: --max_new_tokens 256 --temperature 0.85 --top_p 0.85 --top_k 0 --repetition_penalty 1.0
             --history N (earlier exchanges kept in the prompt) --device auto|cpu|cuda[:i] --kernels auto|torch|triton
             --yarn (YaRN rope scaling for long contexts) --seed S --compile (torch.compile the decode step)
             --show_prompt (print the exact prompt text before each answer)
             --lora PATH (a LoRA adapter folder from train/lora.py, merged into the loaded model)
             --stop TEXT (end the answer at this text; repeatable)
             --enable_thinking true|false (the template's thinking switch; default: the template's own choice)
             --tools (offer the project's tools) --world data/sample/world.json (what lookup reads; "" = calculator
             only) --max_tool_turns 4

Interactive mode reads one user turn per line from stdin; `exit` or end of input quits, `/clear` forgets the
conversation. Chat mode renders the last --history exchanges (a user line and everything answered to it: tool
calls, tool results, the final answer) plus the new line through the ChatML template with the assistant generation
prompt; pretrain mode continues [bos] + the line as plain text, without history. After each generation a line
`[N tokens in S s, R tokens/s]` reports the speed, prompt processing included. Temperature 0 decodes greedily; with
--seed S, generation i samples from a generator seeded S + i (reproducible; a tool step is a generation). In chat
mode an answer that opens with `<think>` shows its reasoning after `[thinking]` and the rest after `[answer]`; the
history keeps the answer only.

With --tools the prompt offers minimind_fast.toolcall's tools (calculator, and lookup over --world), and the model
may answer with `<tool_call>` blocks: each is shown as `[tool call] NAME ARGUMENTS_JSON` (the block's text is not
printed), run by toolcall.Toolbox, its result shown as `[tool result] RESULT` and sent back as a tool message, and the
model goes on from there; after --max_tool_turns rounds of calls the calls are shown but no longer run (a line says
so) and the exchange ends. A block that is not a usable call to an offered tool is printed as the text it is.
Generation runs through minimind_fast.engine, as the server's does. A missing or corrupt checkpoint, or an unreadable
--world, stops with one `error: ...` line and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python tools/chat.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import minimind_kernels as kernels  # noqa: E402
from minimind_fast.engine import Engine, RequestError, SamplingParams  # noqa: E402
from minimind_fast.inference import LoadError, load_for_inference  # noqa: E402
from minimind_fast.textstream import AnswerStream, opens_thought, tool_block_parser  # noqa: E402
from minimind_fast.tokenizer import Tokenizer  # noqa: E402
from minimind_fast.toolcall import Toolbox, ToolCall, WorldError, tool_message  # noqa: E402

DEFAULT_WORLD = Path(__file__).resolve().parents[1] / "data" / "sample" / "world.json"


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
    p.add_argument(
        "--enable_thinking",
        choices=("true", "false"),
        default=None,
        help="the chat template's thinking switch (default: not given, the template's own choice)",
    )
    p.add_argument("--tools", action="store_true", help="offer the project's tools and run the calls the model makes")
    p.add_argument(
        "--world", default=str(DEFAULT_WORLD), help='world file the lookup tool reads ("" = calculator only)'
    )
    p.add_argument("--max_tool_turns", type=int, default=4, help="rounds of tool calls run per user line")
    args = p.parse_args(argv)
    if args.history < 0:
        p.error("--history must be >= 0")
    if args.max_new_tokens < 1:
        p.error("--max_new_tokens must be >= 1")
    if args.max_tool_turns < 1:
        p.error("--max_tool_turns must be >= 1")
    if args.tools and args.mode != "chat":
        p.error("--tools needs --mode chat")
    args.enable_thinking = None if args.enable_thinking is None else args.enable_thinking == "true"
    return args


def load_toolbox(args: argparse.Namespace) -> Toolbox | None:
    """The tools offered with --tools (lookup only with a --world), or None."""
    if not args.tools:
        return None
    try:
        return Toolbox(args.world or None)
    except WorldError as exc:
        raise ChatError(f"--world {exc}") from None


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

    def __init__(
        self, model: torch.nn.Module, tokenizer: Tokenizer, args: argparse.Namespace, toolbox: Toolbox | None = None
    ):
        self.model, self.tokenizer, self.args, self.toolbox = model, tokenizer, args, toolbox
        self.engine = Engine(model, tokenizer, max_batch=1, compile_decode=args.compile)
        self.history: list[list[dict[str, Any]]] = []  # exchanges: a user line and everything answered to it
        self.turns = 0
        names = [spec["function"]["name"] for spec in toolbox.specs] if toolbox is not None else []
        self.parse_call = tool_block_parser(names) if names else None

    def prompt_text(self, messages: list[dict[str, Any]]) -> str:
        """The chat prompt for the last --history exchanges plus `messages` (the exchange under way)."""
        earlier = self.history[-self.args.history :] if self.args.history > 0 else []
        conversation = [m for exchange in earlier for m in exchange] + messages
        tools = self.toolbox.specs if self.toolbox is not None else None
        return self.tokenizer.apply_chat_template(
            conversation, True, tools=tools, enable_thinking=self.args.enable_thinking
        )

    def clear(self) -> None:
        self.history.clear()

    def answer(self, line: str, out=None) -> str:
        """Answer one user line: generate (streaming text to `out`, stdout by default), and with tools run the calls
        the model makes and generate again, up to --max_tool_turns rounds. Returns the final answer (specials
        removed, reasoning apart). Raises RequestError when a prompt leaves no room in the context."""
        out = sys.stdout if out is None else out
        if self.args.mode == "pretrain":
            return self._generate([self.tokenizer.bos_id] + self.tokenizer.encode(line), False, out)[0]
        exchange: list[dict[str, Any]] = [{"role": "user", "content": line}]
        rounds = 0
        while True:
            text = self.prompt_text(exchange)
            content, calls = self._generate(self.tokenizer.encode(text), opens_thought(text), out)
            if not calls:
                break
            if rounds == self.args.max_tool_turns:
                print(f"[tool calls not run: --max_tool_turns {self.args.max_tool_turns} used up]", file=out)
                calls = []
                break
            rounds += 1
            wire = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
            exchange.append({"role": "assistant", "content": content, "tool_calls": wire})
            for call in calls:
                result = self.toolbox.run(call)
                print(f"[tool result] {result}", file=out, flush=True)
                exchange.append(tool_message(call, result))
        exchange.append({"role": "assistant", "content": content})
        keep = self.args.history
        self.history = (self.history + [exchange])[-keep:] if keep else []
        return content

    def _generate(self, ids: list[int], think_opened: bool, out) -> tuple[str, list[ToolCall]]:
        """One generation from `ids`, shown as it streams; (its content, stripped; the tool calls in it)."""
        a = self.args
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
            seed=None if a.seed is None else a.seed + self.turns,  # each generation its own, reproducible draw
            split_reasoning=a.mode == "chat" and not think_opened,
        )
        self.turns += 1
        split = AnswerStream(think_opened, self.parse_call)
        shown = {"reasoning": False, "content": False, "line_open": False}
        content: list[str] = []
        calls: list[ToolCall] = []

        def show(pieces: tuple[str, str, list[ToolCall]]) -> None:
            reasoning, text, new_calls = pieces
            if reasoning:
                if not shown["reasoning"]:
                    print("[thinking] ", end="", file=out)
                shown["reasoning"] = shown["line_open"] = True
                print(reasoning, end="", file=out, flush=True)
            if text:
                if shown["reasoning"] and not shown["content"]:
                    print("\n[answer] ", end="", file=out)
                shown["content"] = shown["line_open"] = True
                content.append(text)
                print(text, end="", file=out, flush=True)
            for call in new_calls:
                if shown["line_open"]:
                    print(file=out)
                shown["line_open"] = False
                print(f"[tool call] {call.name} {json.dumps(call.arguments, ensure_ascii=False)}", file=out, flush=True)
                calls.append(call)

        def sink(event: dict) -> None:
            if event["type"] == "delta":
                show(split.push(event["reasoning"], event["content"]))
            elif event["type"] == "done":
                show(split.flush())

        t0 = time.perf_counter()
        req = self.engine.submit(ids, params, sink=sink)
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
        if shown["line_open"] or not calls:
            print(file=out)
        print(f"[{n_tokens} tokens in {seconds:.2f} s, {n_tokens / max(seconds, 1e-9):.1f} tokens/s]", file=out)
        out.flush()
        return "".join(content).strip(), calls


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
        toolbox = load_toolbox(args)
        model, tokenizer = load_chat_model(args)
    except ChatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    session = Session(model, tokenizer, args, toolbox)
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
