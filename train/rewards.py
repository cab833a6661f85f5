"""Pluggable rewards for the RL stages (PPO, GRPO, SPO), chosen with --reward as a '+'-joined list of kinds.

    rule      verifiable reward on records that carry an "answer" (data/sample/rlaif.jsonl does):
              1.0 when the reply states the answer, else 0.0, judged by minimind_fast.evaluate.answer_matches, the
              matcher held-out evaluation uses too: a numeric answer must be the LAST whole number in the reply (so a
              reply that lists several numbers is judged by its conclusion); any other answer must appear as a whole
              word, case-insensitively. When think/answer format is asked for (--reasoning 1, or the prompt
              itself mentions <think>), the answer is read from the last <answer>...</answer> block and a reply that
              is exactly `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>` (one blank line allowed between the
              blocks) earns FORMAT_BONUS = 0.5 more. Range [0, 1], or [0, 1.5] with format.
    shaping   MiniMind's rule shaping, with its constants:
              +0.5 if 20 <= len(reply.strip()) <= 800 characters, else -0.5;
              if the reply contains </think>: +1.0 if 20 <= len(thinking.strip()) <= 300 characters (the text before
              the first </think>) else -0.5, and +0.25 if </think> occurs exactly once else -0.25;
              minus a trigram repetition penalty on the answer part (the text after the first </think>, or the whole
              reply): tokens = regex \\w+|[^\\w\\s] of the lowercased text, trigrams of consecutive tokens,
              penalty = min(0.5, (n_trigrams - n_distinct) / n_trigrams), 0 with fewer than 3 tokens.
              Range [-1.75, 1.75].
    model     a local Hugging Face sequence-classification model (--reward_model_path, loaded with
              AutoTokenizer + AutoModelForSequenceClassification, local_files_only): the prompt's messages plus the
              reply as the assistant turn, rendered with the reward tokenizer's chat template (ChatML when it has
              none), scored in batches of --reward_batch_size, one logit per text, clamped to [-3, 3] as MiniMind
              clamps InternLM2-1.8B-Reward. A path that does not load is an error before training starts.

The kinds add up: `--reward rule+shaping` is the sum of both. Each part is also returned separately for logging.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from minimind_fast.data import DataError, prompt_messages
from minimind_fast.evaluate import answer_matches
from minimind_fast.tokenizer import render_chatml

REWARD_KINDS = ("rule", "shaping", "model")
FORMAT_BONUS = 0.5
MODEL_SCORE_CLAMP = 3.0

# Shaping constants (MiniMind's rule shaping).
LEN_WINDOW, LEN_REWARD = (20, 800), 0.5
THINK_WINDOW, THINK_REWARD, THINK_PENALTY = (20, 300), 1.0, -0.5
ONE_THINK_CLOSE = 0.25
REPETITION_CAP = 0.5

_THINK_FORMAT = re.compile(r"^<think>\n.*?\n</think>\n\n?<answer>\n.*?\n</answer>$", re.S)
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.S)
_WORDS = re.compile(r"\w+|[^\w\s]")


class RewardError(ValueError):
    """A reward that cannot be computed (bad spec, missing answer field, unusable reward model)."""


# ------------------------------------------------------------------------------------------------------- rule reward
def wants_format(prompt_text: str, reasoning: bool) -> bool:
    return reasoning or "<think>" in prompt_text


def format_ok(reply: str) -> bool:
    return _THINK_FORMAT.match(reply.strip()) is not None


def answer_part(reply: str, use_tags: bool) -> str:
    """What the correctness check reads: the last <answer> block when tags are in use and present, else the reply."""
    if use_tags:
        blocks = _ANSWER_BLOCK.findall(reply)
        if blocks:
            return blocks[-1]
    return reply


def rule_reward(prompt_text: str, reply: str, record: dict, reasoning: bool = False) -> float:
    if "answer" not in record or not isinstance(record["answer"], (str, int, float)):
        raise RewardError(
            'the rule reward needs an "answer" field (a string) in every record; this one has none: '
            f"{str(record)[:120]}"
        )
    tags = wants_format(prompt_text, reasoning)
    r = 1.0 if answer_matches(str(record["answer"]), answer_part(reply, tags)) else 0.0
    if tags and format_ok(reply):
        r += FORMAT_BONUS
    return r


# ---------------------------------------------------------------------------------------------------------- shaping
def repetition_penalty(text: str) -> float:
    """Share of repeated word trigrams, capped at REPETITION_CAP (MiniMind: min(cap, dup * cap * 2 / n))."""
    toks = _WORDS.findall(text.lower())
    grams = [tuple(toks[i : i + 3]) for i in range(len(toks) - 2)]
    if not grams:
        return 0.0
    return min(REPETITION_CAP, (len(grams) - len(set(grams))) * REPETITION_CAP * 2 / len(grams))


def shaping_reward(reply: str) -> float:
    r = LEN_REWARD if LEN_WINDOW[0] <= len(reply.strip()) <= LEN_WINDOW[1] else -LEN_REWARD
    answer = reply
    if "</think>" in reply:
        thinking, answer = reply.split("</think>", 1)
        r += THINK_REWARD if THINK_WINDOW[0] <= len(thinking.strip()) <= THINK_WINDOW[1] else THINK_PENALTY
        r += ONE_THINK_CLOSE if reply.count("</think>") == 1 else -ONE_THINK_CLOSE
        answer = answer.strip()
    return r - repetition_penalty(answer)


# ----------------------------------------------------------------------------------------------------- reward model
class RewardModel:
    """A local HF sequence-classification model as a scorer: messages + reply -> one clamped score per text."""

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str = "cpu",
        batch_size: int = 16,
        max_length: int = 2048,
        clamp: float = MODEL_SCORE_CLAMP,
        dtype: torch.dtype | None = None,
    ):
        path = Path(path)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise RewardError(f"--reward_model_path {path}: not a folder with a config.json (a saved HF model)")
        try:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as exc:
            raise RewardError("the model reward needs `pip install transformers`") from exc
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            kw = {"torch_dtype": dtype} if dtype is not None else {}
            self.model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True, **kw)
        except (OSError, ValueError, KeyError) as exc:
            raise RewardError(
                f"--reward_model_path {path}: cannot load a sequence-classification model ({exc})"
            ) from exc
        if self.model.config.num_labels != 1:
            raise RewardError(
                f"--reward_model_path {path}: a reward model outputs one score (num_labels=1), this one has "
                f"{self.model.config.num_labels}"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        # Sequence-classification heads read the last non-pad position: right padding and a known pad id.
        self.tokenizer.padding_side = "right"
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.batch_size, self.max_length, self.clamp = torch.device(device), batch_size, max_length, clamp

    def render(self, messages: Sequence[dict], reply: str) -> str:
        chat = [*messages, {"role": "assistant", "content": reply}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(chat, tokenize=False)
        return render_chatml(chat)

    @torch.no_grad()
    def score(self, conversations: Sequence[Sequence[dict]], replies: Sequence[str]) -> torch.Tensor:
        texts = [self.render(m, r) for m, r in zip(conversations, replies)]
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
            ).to(self.device)
            out.append(self.model(**enc).logits[:, 0].float())
        return torch.cat(out).clamp(-self.clamp, self.clamp).cpu()


# -------------------------------------------------------------------------------------------------------- combining
def parse_reward_spec(spec: str) -> list[str]:
    kinds = [k.strip() for k in spec.split("+") if k.strip()]
    bad = [k for k in kinds if k not in REWARD_KINDS]
    if not kinds or bad:
        raise RewardError(f"--reward {spec!r}: use one or more of {', '.join(REWARD_KINDS)} joined by '+'")
    if len(set(kinds)) != len(kinds):
        raise RewardError(f"--reward {spec!r} names a kind twice")
    return kinds


def reward_range(kinds: Sequence[str], reasoning: bool = False) -> tuple[float, float]:
    """The (lowest, highest) total reward the chosen kinds can give (SPO maps rewards into [0, 1] with it)."""
    spans = {
        "rule": (0.0, 1.0 + (FORMAT_BONUS if reasoning else 0.0)),
        "shaping": (
            -LEN_REWARD + THINK_PENALTY - ONE_THINK_CLOSE - REPETITION_CAP,
            LEN_REWARD + THINK_REWARD + ONE_THINK_CLOSE,
        ),
        "model": (-MODEL_SCORE_CLAMP, MODEL_SCORE_CLAMP),
    }
    return sum(spans[k][0] for k in kinds), sum(spans[k][1] for k in kinds)


class Rewards:
    """The reward of each (prompt, reply, record) row: the sum of the chosen kinds, and each kind separately."""

    def __init__(self, kinds: Sequence[str], reward_model: RewardModel | None = None, reasoning: bool = False):
        if "model" in kinds and reward_model is None:
            raise RewardError("the model reward needs --reward_model_path")
        self.kinds, self.reward_model, self.reasoning = list(kinds), reward_model, reasoning

    def __call__(
        self, prompts: Sequence[str], replies: Sequence[str], records: Sequence[dict]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        if "rule" in self.kinds:
            parts["rule"] = torch.tensor(
                [rule_reward(p, r, rec, self.reasoning) for p, r, rec in zip(prompts, replies, records)]
            )
        if "shaping" in self.kinds:
            parts["shaping"] = torch.tensor([shaping_reward(r) for r in replies])
        if "model" in self.kinds:
            conversations = [_messages(rec) for rec in records]
            parts["model"] = self.reward_model.score(conversations, replies)
        total = torch.stack([p.float() for p in parts.values()]).sum(dim=0)
        return total, parts


def _messages(record: dict) -> list[dict]:
    try:
        return prompt_messages(record, "record")
    except DataError as exc:
        raise RewardError(str(exc)) from exc


def build_rewards(
    spec: str,
    reward_model_path: str | None = None,
    device: torch.device | str = "cpu",
    reasoning: bool = False,
    batch_size: int = 16,
    **model_kw: Any,
) -> Rewards:
    """--reward and friends -> a Rewards callable; every problem is a SystemExit before any model is trained."""
    try:
        kinds = parse_reward_spec(spec)
        rm = None
        if "model" in kinds:
            if not reward_model_path or reward_model_path == "none":
                raise RewardError(f"--reward {spec} needs --reward_model_path (a local HF reward model folder)")
            rm = RewardModel(reward_model_path, device=device, batch_size=batch_size, **model_kw)
        return Rewards(kinds, rm, reasoning)
    except RewardError as exc:
        from train import checks  # one line on stderr, exit status 2, like every bad setting

        checks.fail(f"error: {exc}")
