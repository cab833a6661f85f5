"""Generate the small data sets the project ships in data/sample/, in every MiniMind data format.

    python -m tools.make_sample_data --out data/sample --seed 0
    python tools/make_sample_data.py                 # the same, with the defaults (data/sample, seed 0, scale 1)

The content is a learnable, checkable task: facts about an invented world (people with a home town, profession,
favourite colour, pet creature and age; towns with a region, river, landmark, festival and dish; invented pet
creatures) and two-digit addition / subtraction, all in English. Files:

  pretrain.jsonl        {"text"}: encyclopedia-like paragraphs stating every fact hundreds of times in varied
                        phrasing, question-and-answer notes about the people that are not held out, arithmetic lines
  sft.jsonl             {"conversations"}: Q&A about the facts and arithmetic, and reading comprehension (a short
                        text about strangers, then a question on it); some with a system message, some multi-turn
  dpo.jsonl             {"chosen", "rejected"}: the rejected reply gives a wrong answer
  rlaif.jsonl           RL prompts in SFT format plus "answer", the verifiable answer string
  r1_mix.jsonl          reasoning conversations, assistant content
                        `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`
  lora_identity.jsonl   who-are-you conversations giving the assistant a name used nowhere else
  eval.jsonl            held-out {"question", "answer", "kind", "choices"?}: person facts stated in pretrain.jsonl
                        whose question/answer form appears in no conversation file, reading-comprehension questions
                        about strangers named nowhere else, and arithmetic pairs that appear in no other file;
                        "choices" lists every valid answer of that kind (chance = 1/len(choices))
  world.json            {"world", "people"}: every person's facts, the world the lookup tool answers from
  sft_tools.jsonl       tool-use SFT in MiniMind's format: a system message carrying "tools" (a JSON string of the
                        offered function specs), the question, an assistant turn with "tool_calls" (a JSON string),
                        the tool's result, the reply; and questions that need no tool, answered directly
  rl_tools.jsonl        tool-use RL prompts: system message with "tools", the question, and "answer"
  README.md             what the files are, their counts, the measured unigram entropy of pretrain.jsonl and the
                        token lengths of the tool-use records under the shipped tokenizer
                        (minimind/minimind_fast/assets), when that tokenizer is present

Output depends only on --seed and --scale: the same arguments give byte-identical files. The generator itself is
the package tools/sample_data/ (world, templates, tasks, one function per file); this file is its command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/make_sample_data.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.sample_data.files import generate  # noqa: E402

__all__ = ["generate", "main"]


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="size multiplier (tests use a small one)")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer folder for README's measurements (default: shipped)"
    )
    args = parser.parse_args(argv)
    counts = generate(Path(args.out), args.seed, args.scale, Path(args.tokenizer) if args.tokenizer else None)
    for name, count in counts.items():
        print(f"{name:22s} {count:7d} records")
    return counts


if __name__ == "__main__":
    main()
