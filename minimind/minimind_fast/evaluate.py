"""Evaluation: perplexity, held-out question accuracy (generation and choice scoring), multiple-choice benchmarks in
C-Eval/CMMLU style, and generation sample sheets. Batched throughout; tools/eval.py is the command line around it.

    from minimind_fast import evaluate as ev
    ev.perplexity(model, tok, "data/sample/pretrain.jsonl")              # {"ppl", "nll", "tokens", ...}
    items = ev.read_heldout("data/sample/eval.jsonl")
    gen = ev.heldout_generation(model, tok, items)                         # greedy answers, whole-word match
    cho = ev.heldout_choice(model, tok, items)                             # argmax log-likelihood of the choices
    ev.summarize_heldout(items, gen, cho)                                  # per kind, with chance level
    ev.mc_accuracy(model, tok, ev.read_mc("ceval/val"), score="letter")    # C-Eval / CMMLU CSV or JSONL

Scoring a completion c after a prompt p uses the model's own per-token NLL (model(ids, labels=...,
loss_reduction="none"), computed through ops.linear_cross_entropy): log p(c | p) = -sum of the NLL of c's tokens.
Prompt and completion are tokenized separately and concatenated, which is what the model sees when it generates c
itself after p. Rows are right-padded: under the causal mask a real token never attends to the padding after it,
so no attention mask is needed and padding does not change any score.

  perplexity    exp(total NLL / total scored tokens) over a JSONL file: pretrain format ({"text"}: every token of
                [bos] + text + [eos] after the first) or SFT format ({"conversations"}: the assistant tokens, as in
                SFT training). Each record is one row, truncated to max_seq_len.
  held-out      data/sample/eval.jsonl: {"question", "answer", "kind", "choices"?}. Generation: the question as a
                user turn through the chat template, greedy decoding; correct when the answer appears in the reply as
                a whole word (case-insensitive) or a whole number (not part of a longer number, a decimal or a
                negative). Choice scoring (items with "choices"): the log-likelihood of each choice as the assistant's
                completion right after `<|im_start|>assistant\\n`; correct when the argmax is the answer (ties go to
                the first). Chance level of an item = 1 / len(choices).
  multiple      C-Eval / CMMLU layout: question, A, B, C, D (any number of consecutive letters from A), answer
  choice        (a letter). CSV (header row; C-Eval's id/explanation and CMMLU's unnamed index column are ignored)
                or JSONL; a folder is read file by file, the file name being the subject. The prompt lists the
                options as "A. text" lines; score="letter" compares the likelihood of each letter as the answer,
                score="text" that of each option's text. template="chat" asks through the chat template,
                "raw" writes question + options + "Answer:" and scores " A" ... (for pretrain-only models).

Every file error names path:line and what was expected (minimind_fast.data.DataError).
"""

from __future__ import annotations

import contextlib
import csv
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minimind_fast.data import ChatEncoder, DataError, check_sft, check_text, iter_jsonl
from minimind_fast.engine import Engine, SamplingParams
from minimind_fast.tokenizer import Tokenizer

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------------------ scoring core
def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _amp(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """bf16 autocast for an fp32 model on CUDA (as in training), plain fp32 on CPU."""
    p = next(model.parameters())
    if p.device.type == "cuda" and p.dtype == torch.float32:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def sequence_nll(
    model: torch.nn.Module,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 32,
    pad_id: int = 0,
) -> list[tuple[float, int]]:
    """Per row (input_ids, labels) -> (summed NLL of the labelled tokens in nats, number of labelled tokens).

    labels follow the training convention: labels[t] is the target at position t (-100 = not scored); position 0
    is never scored (nothing predicts it). Rows are batched longest first to keep padding small."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(rows[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
        for b, i in enumerate(idx):
            r_ids, r_labels = rows[i]
            if len(r_ids) != len(r_labels):
                raise ValueError(f"row {i}: {len(r_ids)} input ids but {len(r_labels)} labels")
            ids[b, : len(r_ids)] = torch.as_tensor(list(r_ids), dtype=torch.long)
            labels[b, : len(r_labels)] = torch.as_tensor(list(r_labels), dtype=torch.long)
        labels[:, 0] = IGNORE_INDEX
        ids, labels = ids.to(device), labels.to(device)
        with _amp(model):
            nll_BT = model(ids, labels=labels, loss_reduction="none").loss
        nll_BT = nll_BT.float().masked_fill(labels == IGNORE_INDEX, 0.0)
        sums = nll_BT.double().sum(dim=1).tolist()
        counts = (labels != IGNORE_INDEX).sum(dim=1).tolist()
        for b, i in enumerate(idx):
            out[i] = (sums[b], int(counts[b]))
    return out


def completion_logprobs(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 32,
    pad_id: int = 0,
) -> list[float]:
    """(prompt ids, completion ids) -> log p(completion | prompt), summed over the completion's tokens.

    Pairs that share a prompt (the choices of one question) are scored together with the prompt run once: see
    shared_prompt_logprobs."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (prompt, comp) in enumerate(pairs):
        if not prompt or not comp:
            raise ValueError(f"pair {i}: prompt and completion must both be non-empty")
        groups[tuple(prompt)].append(i)
    out = [0.0] * len(pairs)
    for prompt, idx in groups.items():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            scores = shared_prompt_logprobs(model, list(prompt), [pairs[i][1] for i in chunk], pad_id)
            for i, sc in zip(chunk, scores):
                out[i] = sc
    return out


@torch.inference_mode()
def shared_prompt_logprobs(
    model: torch.nn.Module, prompt: Sequence[int], completions: Sequence[Sequence[int]], pad_id: int = 0
) -> list[float]:
    """log p(c | prompt) for each completion c, with the prompt's keys and values computed once.

    prompt[:-1] is run into a batch-1 KV cache, which is copied to one row per completion; each row then feeds
    [prompt[-1]] + c (right-padded) with labels [-100] + c, so the per-token NLL of column j is -log p(c[j-1] | prompt,
    c[:j-1]) exactly as in a full forward over prompt + c."""
    from minimind_fast.model import KVCache

    device = _model_device(model)
    p = next(model.parameters())
    cache_dtype = torch.bfloat16 if device.type == "cuda" and p.dtype == torch.float32 else p.dtype
    n, width = len(completions), 1 + max(len(c) for c in completions)
    prefix = list(prompt[:-1])
    cache = KVCache(model.config, n, len(prefix) + width, device=device, dtype=cache_dtype)
    with _amp(model):
        if prefix:
            one = KVCache(model.config, 1, len(prefix), device=device, dtype=cache_dtype)
            model(torch.tensor([prefix], device=device), kv_cache=one, return_logits=False)
            cache.k[:, :, :, : len(prefix)] = one.k
            cache.v[:, :, :, : len(prefix)] = one.v
            cache.length = len(prefix)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        ids[:, 0] = prompt[-1]
        for b, c in enumerate(completions):
            ids[b, 1 : 1 + len(c)] = torch.as_tensor(list(c), dtype=torch.long)
            labels[b, 1 : 1 + len(c)] = torch.as_tensor(list(c), dtype=torch.long)
        ids, labels = ids.to(device), labels.to(device)
        nll = model(ids, labels=labels, kv_cache=cache, loss_reduction="none").loss
    nll = nll.float().masked_fill(labels == IGNORE_INDEX, 0.0)
    return (-nll.double().sum(dim=1)).tolist()


# -------------------------------------------------------------------------------------------------------- perplexity
def read_lm_rows(
    path: str | Path, tokenizer: Tokenizer, max_seq_len: int = 512, max_records: int | None = None
) -> tuple[str, list[tuple[list[int], list[int]]]]:
    """(format, rows) of a pretrain- or SFT-format JSONL file; the first record decides the format."""
    fmt = None
    rows: list[tuple[list[int], list[int]]] = []
    encoder = ChatEncoder(tokenizer, max_seq_len)
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if fmt is None:
            if "text" in obj:
                fmt = "pretrain"
            elif "conversations" in obj:
                fmt = "sft"
            else:
                raise DataError(
                    f'{where}: expected a pretrain record {{"text": ...}} or an SFT record '
                    f'{{"conversations": [...]}}, got fields {sorted(obj)[:5]}'
                )
        if fmt == "pretrain":
            ids = [tokenizer.bos_id] + tokenizer.encode(check_text(obj, where)) + [tokenizer.eos_id]
            ids = ids[:max_seq_len]
            rows.append((ids, list(ids)))
        else:
            ids_T, labels_T = encoder(check_sft(obj, where))
            rows.append((ids_T.tolist(), labels_T.tolist()))
        if max_records is not None and len(rows) >= max_records:
            break
    if not rows:
        raise DataError(f"{path}: no records (empty file)")
    return fmt, rows


def perplexity(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    path: str | Path,
    max_seq_len: int = 512,
    batch_size: int = 32,
    max_records: int | None = None,
) -> dict[str, Any]:
    """Token-level perplexity exp(sum NLL / scored tokens) of a JSONL file (pretrain or SFT format)."""
    fmt, rows = read_lm_rows(path, tokenizer, max_seq_len, max_records)
    scores = sequence_nll(model, rows, batch_size, tokenizer.pad_id)
    total = sum(s for s, _ in scores)
    n = sum(c for _, c in scores)
    if n == 0:
        raise DataError(f"{path}: no scored tokens (every record truncated before its first target?)")
    nll = total / n
    return {"path": str(path), "format": fmt, "records": len(rows), "tokens": n, "nll": nll, "ppl": math.exp(nll)}


# ---------------------------------------------------------------------------------------------- held-out questions
@dataclass
class HeldoutItem:
    question: str
    answer: str
    kind: str
    choices: list[str] | None
    where: str


def read_heldout(path: str | Path) -> list[HeldoutItem]:
    """{"question": str, "answer": str, "kind": str, "choices"?: [str, ...] containing the answer} per line."""
    items = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        for key in ("question", "answer", "kind"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                got = type(obj[key]).__name__ if key in obj else "nothing"
                raise DataError(f'{where}: field "{key}" must be a non-empty string, got {got}')
        choices = obj.get("choices")
        if choices is not None:
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise DataError(f'{where}: "choices" must be a list of at least 2 strings')
            if obj["answer"] not in choices:
                raise DataError(f'{where}: the answer {obj["answer"]!r} is not one of its "choices"')
        items.append(HeldoutItem(obj["question"], obj["answer"], obj["kind"], choices, where))
    if not items:
        raise DataError(f"{path}: no questions (empty file)")
    return items


# A whole number as written in a reply: not part of a word or of a longer number ("28" is not in "128", "2.28" or
# "28th"); a minus sign counts only where it is not a subtraction between two numbers ("3-8" holds 3 and 8).
_WHOLE_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w|\.\d)")


def answer_matches(answer: str, reply: str) -> bool:
    """The one notion of a correct answer, for held-out evaluation and for the RL rule reward alike.

    A numeric answer must be the reply's LAST whole number (a reply is judged by its conclusion: "It is 26, 27 or
    28." is wrong for 27, "3 - 8 = -5" is right for -5 and wrong for 5); any other answer must occur as a whole word,
    case-insensitively ("red" is not in "reddish")."""
    a = answer.strip()
    if not a:
        return False
    if _WHOLE_NUMBER.fullmatch(a):
        numbers = _WHOLE_NUMBER.findall(reply)
        return bool(numbers) and float(numbers[-1]) == float(a)
    return re.search(rf"(?<!\w){re.escape(a)}(?!\w)", reply, flags=re.IGNORECASE) is not None


def chat_prompt_ids(tokenizer: Tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )


def generate_replies(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int = 48,
    batch_size: int = 32,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> list[str]:
    """Replies (special tokens removed, stripped; `<think>` text kept in) to token-id prompts, through the inference
    engine with up to batch_size rows at a time. Greedy unless greedy=False; with a seed, prompt i samples from a
    generator seeded seed + i (so a reply does not depend on the batch it ran in)."""
    engine = Engine(model, tokenizer, max_batch=batch_size, max_batch_tokens=1 << 62)
    params = [
        SamplingParams(
            max_tokens=max_new_tokens,
            temperature=0.0 if greedy else temperature,
            top_p=top_p,
            top_k=top_k,
            seed=None if seed is None else seed + i,
            split_reasoning=False,
        )
        for i in range(len(prompts))
    ]
    return [r.content.strip() for r in engine.generate(prompts, params)] if prompts else []


def heldout_generation(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    items: Sequence[HeldoutItem],
    max_new_tokens: int = 48,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Per item {"reply", "correct"}: greedy reply through the chat template, judged by answer_matches."""
    was_training = model.training
    model.eval()
    replies = generate_replies(
        model, tokenizer, [chat_prompt_ids(tokenizer, it.question) for it in items], max_new_tokens, batch_size
    )
    model.train(was_training)
    return [{"reply": r, "correct": answer_matches(it.answer, r)} for it, r in zip(items, replies)]


def heldout_choice(
    model: torch.nn.Module, tokenizer: Tokenizer, items: Sequence[HeldoutItem], batch_size: int = 64
) -> list[dict[str, Any] | None]:
    """Per item with choices {"scores": [log p(choice)], "pred": choice, "correct"}; None for items without."""
    pairs, owners = [], []
    for k, it in enumerate(items):
        if it.choices is None:
            continue
        prompt = chat_prompt_ids(tokenizer, it.question)
        for c in it.choices:
            pairs.append((prompt, tokenizer.encode(c)))
            owners.append(k)
    was_training = model.training
    model.eval()
    logps = completion_logprobs(model, pairs, batch_size, tokenizer.pad_id) if pairs else []
    model.train(was_training)
    scores: dict[int, list[float]] = defaultdict(list)
    for k, lp in zip(owners, logps):
        scores[k].append(lp)
    out: list[dict[str, Any] | None] = []
    for k, it in enumerate(items):
        if it.choices is None:
            out.append(None)
            continue
        s = scores[k]
        best = max(range(len(s)), key=s.__getitem__)  # first index on ties
        out.append({"scores": s, "pred": it.choices[best], "correct": it.choices[best] == it.answer})
    return out


def summarize_heldout(
    items: Sequence[HeldoutItem],
    generation: Sequence[dict[str, Any]] | None = None,
    choice: Sequence[dict[str, Any] | None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per kind (and "all"): n, generation accuracy, choice accuracy over the items with choices, chance level
    (mean of 1/len(choices); None for kinds without choices)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for k, it in enumerate(items):
        groups[it.kind].append(k)
    groups = dict(sorted(groups.items()))
    groups["all"] = list(range(len(items)))
    summary = {}
    for kind, idx in groups.items():
        with_choices = [k for k in idx if items[k].choices]
        row: dict[str, Any] = {"n": len(idx), "n_choices": len(with_choices)}
        row["chance"] = (
            sum(1 / len(items[k].choices) for k in with_choices) / len(with_choices) if with_choices else None
        )
        if generation is not None:
            row["generation_acc"] = sum(generation[k]["correct"] for k in idx) / len(idx)
        if choice is not None:
            row["choice_acc"] = (
                sum(choice[k]["correct"] for k in with_choices) / len(with_choices) if with_choices else None
            )
        summary[kind] = row
    return summary


# ------------------------------------------------------------------------------------------ multiple choice (C-Eval)
@dataclass
class MCItem:
    question: str
    options: list[str]
    answer: int  # index into options
    subject: str
    where: str


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _mc_item(fields: dict[str, Any], subject: str, where: str) -> MCItem:
    """fields: lower-cased keys -> values of one record."""
    q = fields.get("question")
    if not isinstance(q, str) or not q.strip():
        raise DataError(f'{where}: missing or empty "question" (expected question, A, B, C, D, answer)')
    options = []
    for letter in _LETTERS:
        v = fields.get(letter.lower())
        if v is None:
            break
        if isinstance(v, (int, float)):
            v = str(v)
        if not isinstance(v, str):
            raise DataError(f"{where}: option {letter} must be text, got {type(v).__name__}")
        options.append(v)
    if len(options) < 2:
        raise DataError(f"{where}: expected at least options A and B, found {len(options)}")
    ans = fields.get("answer")
    if not isinstance(ans, str) or not ans.strip():
        raise DataError(
            f'{where}: missing or empty "answer" (expected a letter A-{_LETTERS[len(options) - 1]}; '
            "C-Eval's test split has no answers, use val or dev)"
        )
    ans = ans.strip().upper()
    if len(ans) != 1 or ans not in _LETTERS[: len(options)]:
        raise DataError(
            f"{where}: answer {fields['answer']!r} is not one of the option letters A-{_LETTERS[len(options) - 1]}"
        )
    return MCItem(q.strip(), options, _LETTERS.index(ans), subject, where)


def _read_mc_file(path: Path) -> list[MCItem]:
    subject = path.stem
    items = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(f"{path}: empty file (expected a header row: question, A, B, C, D, answer)") from None
            except csv.Error as exc:
                raise DataError(f"{path}:1: unreadable CSV header ({exc})") from exc
            keys = [h.strip().lower() for h in header]
            for need in ("question", "a", "b", "answer"):
                if need not in keys:
                    raise DataError(
                        f"{path}:1: header has no {need!r} column (found {header}); expected "
                        "question, A, B, C, D, answer"
                    )
            try:
                for row in reader:
                    if not any(cell.strip() for cell in row):
                        continue
                    where = f"{path}:{reader.line_num}"
                    if len(row) != len(keys):
                        raise DataError(f"{where}: {len(row)} columns, the header has {len(keys)}")
                    items.append(_mc_item(dict(zip(keys, row)), subject, where))
            except csv.Error as exc:
                raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from exc
    elif path.suffix.lower() in (".jsonl", ".json"):
        for lineno, obj in iter_jsonl(path):
            items.append(_mc_item({str(k).lower(): v for k, v in obj.items()}, subject, f"{path}:{lineno}"))
    else:
        raise DataError(f"{path}: unknown file type {path.suffix!r} (expected .csv or .jsonl)")
    if not items:
        raise DataError(f"{path}: no questions")
    return items


def read_mc(path: str | Path) -> list[MCItem]:
    """A C-Eval/CMMLU-style file (.csv or .jsonl), or a folder of them (one subject per file, sorted by name)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".csv", ".jsonl"))
        if not files:
            raise DataError(f"{p}: no .csv or .jsonl files in this folder")
        return [it for f in files for it in _read_mc_file(f)]
    if not p.is_file():
        raise DataError(f"{p}: no such file or folder")
    return _read_mc_file(p)


def mc_prompt(item: MCItem) -> str:
    lines = [item.question] + [f"{_LETTERS[i]}. {o}" for i, o in enumerate(item.options)]
    return "\n".join(lines)


def mc_accuracy(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    items: Sequence[MCItem],
    score: str = "letter",
    template: str = "chat",
    batch_size: int = 32,
    answer_prefix: str = "Answer:",
) -> dict[str, Any]:
    """Accuracy by log-likelihood of each option (its letter or its text), per subject and overall, with chance."""
    if score not in ("letter", "text"):
        raise ValueError(f"score must be 'letter' or 'text', got {score!r}")
    if template not in ("chat", "raw"):
        raise ValueError(f"template must be 'chat' or 'raw', got {template!r}")
    pairs, owners = [], []
    for k, it in enumerate(items):
        if template == "chat":
            prompt = chat_prompt_ids(tokenizer, mc_prompt(it))
            sep = ""
        else:
            prompt = [tokenizer.bos_id] + tokenizer.encode(f"{mc_prompt(it)}\n{answer_prefix}")
            sep = " "
        for i, opt in enumerate(it.options):
            comp = tokenizer.encode(sep + (_LETTERS[i] if score == "letter" else opt))
            pairs.append((prompt, comp))
            owners.append(k)
    was_training = model.training
    model.eval()
    logps = completion_logprobs(model, pairs, batch_size, tokenizer.pad_id)
    model.train(was_training)
    per_item: dict[int, list[float]] = defaultdict(list)
    for k, lp in zip(owners, logps):
        per_item[k].append(lp)
    preds = []
    subjects: dict[str, list[int]] = defaultdict(list)
    for k, it in enumerate(items):
        s = per_item[k]
        preds.append(max(range(len(s)), key=s.__getitem__))
        subjects[it.subject].append(k)

    def row(idx: list[int]) -> dict[str, Any]:
        return {
            "n": len(idx),
            "acc": sum(preds[k] == items[k].answer for k in idx) / len(idx),
            "chance": sum(1 / len(items[k].options) for k in idx) / len(idx),
        }

    return {
        "score": score,
        "template": template,
        "subjects": {s: row(idx) for s, idx in sorted(subjects.items())},
        "all": row(list(range(len(items)))),
        "preds": [_LETTERS[p] for p in preds],
    }


# ------------------------------------------------------------------------------------------------ sample sheets
def sample_sheet(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    **sampling: Any,
) -> list[dict[str, str]]:
    """[{"prompt", "reply"}] for chat prompts (greedy unless sampling arguments are given)."""
    was_training = model.training
    model.eval()
    replies = generate_replies(
        model, tokenizer, [chat_prompt_ids(tokenizer, p) for p in prompts], max_new_tokens, batch_size, **sampling
    )
    model.train(was_training)
    return [{"prompt": p, "reply": r} for p, r in zip(prompts, replies)]


def write_sample_sheet(path: str | Path, title: str, rows: Sequence[dict[str, str]]) -> Path:
    """Markdown: a heading, then per prompt a numbered section with the prompt quoted and the reply as text (and the
    expected answer when a row carries one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}\n"]
    for i, r in enumerate(rows, 1):
        parts.append(f"## {i}\n\n> {r['prompt']}\n\n{r['reply'] or '*(empty reply)*'}\n")
        if r.get("expected"):
            parts.append(f"*expected:* {r['expected']}\n")
    path.write_text("\n".join(parts))
    return path
