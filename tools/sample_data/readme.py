"""data/sample/README.md: what the files are, their counts and sizes, and measurements under the shipped tokenizer."""

from __future__ import annotations

import math
import textwrap
from collections import Counter
from pathlib import Path

from tools.sample_data.tooluse import BOTH, WORLD_FILE, chat_messages
from tools.sample_data.world import IDENTITY_NAME, WORLD


def unigram_entropy(texts: list[str], tokenizer_dir: Path | None) -> tuple[float, int, int] | None:
    """Entropy in nats/token of the token unigram distribution over texts (no bos/eos), the token count and the
    number of distinct tokens; None when no tokenizer can be loaded from tokenizer_dir (None = the shipped one)."""
    try:
        from minimind_fast.tokenizer import Tokenizer

        tok = Tokenizer.load(tokenizer_dir)
    except Exception:
        return None
    counts: Counter[int] = Counter()
    for ids in tok.encode_batch(texts):
        counts.update(ids)
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    return entropy, total, len(counts)


def tool_token_lengths(
    files: dict[str, list[dict]], tokenizer_dir: Path | None
) -> dict[str, tuple[int, int, int]] | None:
    """(shortest, median, longest) token count of each file's records as rendered by the tokenizer's chat template
    with their tools (an SFT record whole; an RL record, which has no assistant turn, as the prompt with its
    generation prompt); None when no tokenizer can be loaded from tokenizer_dir (None = the shipped one)."""
    try:
        from minimind_fast.tokenizer import Tokenizer

        tok = Tokenizer.load(tokenizer_dir)
    except Exception:
        return None
    lengths = {}
    for name, records in files.items():
        texts = []
        for r in records:
            messages, tools = chat_messages(r)
            prompt_only = messages[-1]["role"] != "assistant"
            texts.append(tok.apply_chat_template(messages, add_generation_prompt=prompt_only, tools=tools))
        n = sorted(len(ids) for ids in tok.encode_batch(texts))
        lengths[name] = (n[0], n[len(n) // 2], n[-1])
    return lengths


def render(
    out: Path,
    seed: int,
    scale: float,
    counts: dict[str, int],
    world: dict[str, int],
    kinds: Counter[str],
    entropy: tuple[float, int, int] | None,
    person_paragraphs: int,
    qa_repeats: int,
    tool_kinds: dict[str, Counter[str]],
    tool_lengths: dict[str, tuple[int, int, int]] | None,
) -> str:
    """README.md's text; out holds the files already written (their sizes go into the table). tool_kinds: the
    records of each kind in each tool-use file; tool_lengths: their token lengths (tool_token_lengths)."""
    sizes = {name: (out / name).stat().st_size for name in counts}
    command = "python -m tools.make_sample_data --out data/sample" + (f" --seed {seed}" if seed else "")
    command += f" --scale {scale}" if scale != 1.0 else ""
    rows = "\n".join(f"| {name} | {counts[name]} | {sizes[name]:,} | {FILE_NOTES[name]} |" for name in counts)
    world_size = (out / WORLD_FILE).stat().st_size
    rows += f"\n| {WORLD_FILE} | {world['people']} | {world_size:,} | {FILE_NOTES[WORLD_FILE]} |"
    if entropy is None:
        entropy_text = "Not measured: no tokenizer could be loaded when these files were generated."
    else:
        h, total, distinct = entropy
        entropy_text = (
            f"Unigram entropy of pretrain.jsonl under the shipped tokenizer (minimind/minimind_fast/assets): "
            f"**{h:.3f} nats/token**"
            f" ({total:,} tokens of text, bos/eos not counted, {distinct:,} distinct token ids). A model that"
            " learns nothing but token frequencies reaches this loss; one that learns the facts and templates goes"
            " far below it."
        )
    eval_text = (
        f'eval.jsonl: {", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))}. Fact items carry `"choices"`,'
        " every valid answer of that kind (all towns, all professions, ...); chance accuracy is `1 / len(choices)`."
        " Arithmetic items have no choices: the answer is an integer."
    )
    mix = "; ".join(
        f"{name}: "
        + ", ".join(f"{kind} {count}" for kind, count in kinds.items() if kind != BOTH)
        + f" ({kinds[BOTH]} of them offered both tools)"
        for name, kinds in tool_kinds.items()
    )
    if tool_lengths is None:
        length_text = "Token lengths not measured: no tokenizer could be loaded when these files were generated."
    else:
        length_text = (
            "Token lengths under the shipped tokenizer, rendered with their tools by its chat template (an SFT record"
            " whole, an RL record as the prompt): "
            + "; ".join(f"{name} {lo}-{hi}, median {mid}" for name, (lo, mid, hi) in tool_lengths.items())
            + ". The tool specs alone take hundreds of tokens, so train on these files with --max_seq_len at least"
            " the longest record (the CPU SFT default of 256 would cut every record before its question), and give"
            " RL prompts as many prompt tokens."
        )
    return README_TEMPLATE.format(
        command=command,
        tool_mix=textwrap.fill(f"Records of each kind: {mix}.", 116),
        tool_lengths=textwrap.fill(length_text, 116),
        rows=rows,
        total=f"{sum(sizes.values()):,}",
        entropy=textwrap.fill(entropy_text, 116),
        eval_text=textwrap.fill(eval_text, 116),
        identity=IDENTITY_NAME,
        world=WORLD,
        person_paragraphs=person_paragraphs,
        qa_repeats=qa_repeats,
        **world,
    )


FILE_NOTES = {
    "pretrain.jsonl": '`{"text"}` paragraphs about people, towns, professions, creatures; Q&A notes; arithmetic',
    "sft.jsonl": '`{"conversations"}` Q&A on facts, sums and short texts; some with a system message, some multi-turn',
    "dpo.jsonl": '`{"chosen", "rejected"}`, the rejected reply gives a wrong value',
    "rlaif.jsonl": 'RL prompts in SFT format plus `"answer"`, the verifiable answer string',
    "r1_mix.jsonl": "reasoning: assistant content `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`",
    "lora_identity.jsonl": "who-are-you conversations that give the assistant its name",
    "eval.jsonl": '`{"question", "answer", "kind", "choices"?}` held-out questions',
    "sft_tools.jsonl": "tool-use conversations: a tool call, its result, the reply; some need no tool",
    "rl_tools.jsonl": 'tool-use RL prompts (system message with `"tools"`, a question) plus `"answer"`',
    WORLD_FILE: "every person's facts, for the `lookup` tool (records: people)",
}
README_TEMPLATE = """\
# Sample data

Small data sets in every MiniMind format, generated by `tools/make_sample_data.py` so that every training stage runs
on a fresh machine. They describe an invented world, {world}: {people} people (home town, profession, favourite
colour, pet creature, age), {towns} towns and {creatures} pet creatures, plus two-digit addition and subtraction.
Everything is procedurally generated and checkable; none of it is MiniMind's data.

Regenerate (same seed, same bytes; `tests/tools/test_sample_data.py` checks the shipped files are exactly this):

    {command}
    python -m tools.train_tokenizer --data data/sample/pretrain.jsonl data/sample/sft.jsonl data/sample/dpo.jsonl \\
        data/sample/rlaif.jsonl data/sample/r1_mix.jsonl data/sample/lora_identity.jsonl \\
        --out minimind/minimind_fast/assets

README.md (this file) is written by the first command; its entropy figure comes from the tokenizer in
minimind/minimind_fast/assets at the time, so run the first command again after retraining the tokenizer.

| file | records | bytes | content |
|---|---|---|---|
{rows}

Total {total} bytes of JSONL.

## The task

Every fact about a person is stated in pretrain.jsonl in {person_paragraphs} paragraphs, in several phrasings and
orders, and again in town and profession listings: the world is small so that each fact is read several hundred
times, which a tiny model needs before it recalls it. The people are split: for about seven in ten, every fact is
asked and answered (each in {qa_repeats} differently phrased conversations) in the conversation files (sft, dpo,
rlaif, r1_mix, lora_identity); the others are named in no conversation file and their facts are asked only in
eval.jsonl. So eval measures whether a model turns knowledge it read in pretraining into answers in a form it
learned about other people. Eval arithmetic problems (and, for sums, their swapped twins) appear in no other file.

Reading comprehension: sft.jsonl also holds conversations whose user message is a short text stating the five facts
of one or two strangers (invented names that appear nowhere else), then a question about one of those facts; the
reply states the value the text gives. eval.jsonl's reading items are built the same way about other strangers, so
they measure a skill learned in SFT (finding the asked fact in the context) rather than memorised knowledge. The tiny
model of the CPU recipe does not learn it (it does not learn to copy from its context within minutes); larger models
and longer runs are what these items are for.

{eval_text}

The assistant's name in lora_identity.jsonl, {identity}, appears in no other file, so a LoRA run on it is visible.

## Tool use

Two tools, the project's own (`minimind_fast.toolcall`): `calculator` (an arithmetic expression of integers) and
`lookup` (one fact about a person of {world}). world.json holds every person's facts, held-out people included, in
the form `lookup` reads: `{{"world": "{world}", "people": [{{"name", "age", "town", "profession", "colour", "pet"}},
...]}}`, all values strings.

sft_tools.jsonl is MiniMind's tool-call SFT format. The system message carries `"tools"`, a JSON string of the
offered function specs (one tool, or both when only one of them fits the question); an assistant turn with empty
content carries `"tool_calls"`, a JSON string `[{{"name", "arguments"}}]`; a `"tool"` message holds exactly what the
tool returns (compact JSON: `{{"result": 85}}`, `{{"name": "...", "age": "27"}}`, or for a name not in world.json
`{{"error": "no person named '...' in {world}"}}`); the last assistant turn states the value as the other files do
("37 + 48 = 85.", "Their age is 27.") or says that the person is unknown. A fifth of the records need no tool (a
reading-comprehension text in the question, a greeting) and are answered directly although tools are offered.
rl_tools.jsonl holds RL prompts (the system message with `"tools"`, the question) and `"answer"`, the verifiable
answer string.

{tool_mix}

Held out as in the other conversation files: no eval.jsonl problem (for sums, neither operand order) and no held-out
person is asked about in either tool-use file; the strangers of the reading texts and the unknown names are named in
no other file.

{tool_lengths}

## Token statistics

{entropy}

## Using MiniMind's real data instead

MiniMind's data sets (ModelScope / Hugging Face, `minimind_dataset`: pretrain_hq.jsonl, sft_mini_512.jsonl,
sft_512/1024/2048.jsonl, dpo.jsonl, r1_mix_1024.jsonl, rlaif-mini.jsonl, lora_identity.jsonl, lora_medical.jsonl)
are in the same formats and are not shipped. Download them yourself and point the stage scripts at them, e.g.
`--data_path /path/to/pretrain_hq.jsonl` for pretraining and `--data_path /path/to/sft_mini_512.jsonl` for SFT.
MiniMind's own tokenizer folder loads unchanged with `Tokenizer.load("/path/to/minimind_tokenizer")`.
"""
