"""Tool-use scripts, and a tiny real model taught to play them: the test oracle of the multi-turn loop.

A Script is a prompt (messages + the tools offered) and what should follow it, written from the chat format's
definition: the model's turns (each ending with the turn-end token) and, between them, the observation text the
template adds after a turn-end token (the "\\n" that closes the assistant turn, the tool turn of <tool_response>
blocks, the next `<|im_start|>assistant\\n`). teach() trains a small MiniMind on the scripts (loss on the model's
turns only) until greedy decoding reproduces every turn with a clear margin, so the loop under test runs a real model
that really calls tools. Used by tests/minimind/test_agent.py, tests/train/test_agent_rl.py, tests/tools/test_eval.py
(imported as tests.minimind._agent_script).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minimind_fast.config import from_preset
from minimind_fast.model import MiniMind
from minimind_fast.tokenizer import Tokenizer

# A short calculator spec (no descriptions): a shorter prompt to learn from. The toolbox runs calls by name.
SHORT_CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}


def call_text(name: str, arguments: dict) -> str:
    """A tool-call block as MiniMind's format writes it."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments, ensure_ascii=False)}}}\n</tool_call>'


def observation_text(results: list[str]) -> str:
    """What follows a model turn's `<|im_end|>`: the end of its line, one user turn of <tool_response> blocks, the
    next generation prompt (MiniMind2's template, enable_thinking unset)."""
    blocks = "".join(f"\n<tool_response>\n{r}\n</tool_response>" for r in results)
    return f"\n<|im_start|>user{blocks}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class Script:
    messages: tuple  # the prompt conversation (dicts)
    tools: tuple | None  # the function specs offered
    turns: tuple  # the model's turns (text, without the turn-end token)
    observations: tuple  # observation_text(...) after each turn but the last

    def parts(self, tok: Tokenizer) -> list[tuple[str, list[int]]]:
        """[("prompt", ids), ("model", ids), ("observation", ids), ("model", ids), ...], each encoded on its own."""
        prompt = tok.apply_chat_template(list(self.messages), tools=self.tools, add_generation_prompt=True)
        out = [("prompt", tok.encode(prompt))]
        for k, turn in enumerate(self.turns):
            out.append(("model", tok.encode(turn) + [tok.eos_id]))
            if k < len(self.observations):
                out.append(("observation", tok.encode(self.observations[k])))
        return out

    def ids(self, tok: Tokenizer) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, completion ids, model mask) of the whole script."""
        parts = self.parts(tok)
        completion = [t for _, ids in parts[1:] for t in ids]
        mask = [int(kind == "model") for kind, ids in parts[1:] for _ in ids]
        return parts[0][1], completion, mask


def user(text: str) -> tuple:
    return ({"role": "user", "content": text},)


CALC = Script(
    user("What is 37 + 48?"),
    None,  # set per use: the tools offered must be the ones the model learned with
    (call_text("calculator", {"expression": "37 + 48"}), "37 + 48 = 85."),
    (observation_text(['{"result": 85}']),),
)


def with_tools(script: Script, tools: list[dict] | None, messages: tuple | None = None) -> Script:
    return Script(messages or script.messages, None if tools is None else tuple(tools), script.turns,
                  script.observations)  # fmt: skip


def _as_key(scripts: tuple[Script, ...]) -> str:
    # insertion order kept (no sort_keys): the key is rebuilt into the very prompts the tests render
    return json.dumps([[list(s.messages), s.tools, s.turns, s.observations] for s in scripts])


@functools.lru_cache(maxsize=8)
def _teach(key: str, seed: int, max_steps: int) -> dict[str, torch.Tensor]:
    scripts = [Script(tuple(m), None if t is None else tuple(t), tuple(u), tuple(o)) for m, t, u, o in json.loads(key)]
    tok = Tokenizer.load()
    rows = []
    for s in scripts:
        prompt, completion, mask = s.ids(tok)
        ids = prompt + completion
        # position t predicts ids[t + 1]: the targets are the model's tokens
        scored = [0] * len(prompt) + mask
        targets = [ids[t + 1] if t + 1 < len(ids) and scored[t + 1] else -100 for t in range(len(ids))]
        rows.append((ids, targets))
    width = max(len(ids) for ids, _ in rows)
    x = torch.zeros((len(rows), width), dtype=torch.long)
    y = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, targets) in enumerate(rows):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(ids)] = torch.tensor(targets)
    sel = y != -100
    torch.manual_seed(seed)
    model = MiniMind(tiny_config())
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(max_steps):
        # The head only on the scored positions: the vocab projection of the whole prompt would dominate the cost.
        logits = F.linear(model(x, return_hidden=True, return_logits=False).hidden[sel], model.lm_head.weight)
        top2 = logits.detach().topk(2, dim=-1)
        if (top2.indices[:, 0] == y[sel]).all() and (top2.values[:, 0] - top2.values[:, 1]).min() > 3.0:
            return {k: v.detach().clone() for k, v in model.state_dict().items()}  # the weights just checked
        loss = F.cross_entropy(logits, y[sel])
        opt.zero_grad()
        loss.backward()
        opt.step()
    raise AssertionError(f"the scripts were not learned within {max_steps} steps")


def tiny_config():
    return from_preset("tiny", hidden_size=64, num_hidden_layers=1, num_attention_heads=4)


def teach(scripts: list[Script], seed: int = 0, max_steps: int = 400) -> MiniMind:
    """A fresh tiny model (eval mode) whose greedy decoding plays every script: each model-turn token is the argmax
    after the script's text so far, by a logit margin above 3 (so KV-cached decoding picks it too)."""
    model = MiniMind(tiny_config())
    model.load_state_dict(_teach(_as_key(tuple(scripts)), seed, max_steps))
    return model.eval()
