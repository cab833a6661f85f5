"""Train the project's byte-level BPE tokenizer (MiniMind's layout: vocab 6400, specials at ids 0-2).

    python -m tools.train_tokenizer --data data/sample/pretrain.jsonl data/sample/sft.jsonl \\
        --out minimind/minimind_fast/assets

Text is taken from every JSONL record: the "text" of pretrain records and the "content" of every message in
"conversations", "chosen" and "rejected". The model is HF `tokenizers` BPE with a ByteLevel pre-tokenizer
(add_prefix_space False) and ByteLevel decoder, no normaliser, all 256 bytes in the initial alphabet, and
<|endoftext|>, <|im_start|>, <|im_end|> as ids 0, 1, 2 and the only special tokens. The result is saved through
minimind_fast.tokenizer.Tokenizer.save, so tokenizer_config.json carries the ChatML template. The same input files give
the same tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minimind_fast.tokenizer import SPECIAL_TOKENS, Tokenizer

MESSAGE_LISTS = ("conversations", "chosen", "rejected")


def iter_texts(paths: Sequence[str | Path]) -> Iterator[str]:
    """Every piece of text in the JSONL files: pretrain "text" fields and message contents."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"{path}:{line_no}: not JSON ({exc})") from exc
                if isinstance(record.get("text"), str):
                    yield record["text"]
                for key in MESSAGE_LISTS:
                    for message in record.get(key) or ():
                        if isinstance(message.get("content"), str):
                            yield message["content"]


def train_tokenizer(texts: Iterator[str] | Sequence[str], vocab_size: int = 6400) -> Tokenizer:
    """A byte-level BPE trained on texts, with the three special tokens at ids 0, 1, 2."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf, "<trained>")


def main(argv: Sequence[str] | None = None) -> Tokenizer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", required=True, help="JSONL files (pretrain / conversation formats)")
    parser.add_argument("--vocab_size", type=int, default=6400)
    parser.add_argument(
        "--out", default="minimind/minimind_fast/assets", help="folder for tokenizer.json + tokenizer_config.json"
    )
    args = parser.parse_args(argv)

    tok = train_tokenizer(iter_texts(args.data), args.vocab_size)
    folder = tok.save(args.out)
    print(f"vocab size {tok.vocab_size} (asked {args.vocab_size}); saved to {folder}")
    if tok.vocab_size != args.vocab_size:
        print("warning: the corpus has too few distinct byte pairs to reach the asked vocabulary size")
    return tok


if __name__ == "__main__":
    main()
