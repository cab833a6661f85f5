"""Tokenize a large pretraining JSONL once into a flat uint16 token file that PretrainDataset memory-maps.

    python tools/prepare_data.py --data_path pretrain_hq.jsonl --out data/pretrain_hq.bin [--tokenizer PATH] \\
        [--workers N] [--skip_bad_lines]

Each {"text": ...} line becomes [bos] + tokens + [eos], written in file order. Lines go to a process pool in chunks
of about --chunk_bytes (1 MiB) and the results are written back in order, with a bounded number of chunks in flight
so memory stays flat however large the input. Next to the token file goes `<out>.json` (tokens, documents, dtype,
vocab size, tokenizer fingerprint, source path), which PretrainDataset checks before using the tokens. Both files are
written to temporary names and renamed into place, so an interrupted run never leaves a half-written file behind.
A bad line stops the run with its `path:lineno` (or, with --skip_bad_lines, is counted and recorded in the sidecar).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing import Pool
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/prepare_data.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from minimind_fast.data import (  # noqa: E402
    CHUNK_BYTES,
    MAX_REASONS,
    TOKEN_DTYPE,
    DataError,
    check_uint16_vocab,
    encode_pretrain_chunk,
    iter_line_chunks,
    token_file_meta_path,
    tokenizer_fingerprint,
)
from minimind_fast.tokenizer import Tokenizer  # noqa: E402

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _encode_job(job: tuple[str, list[tuple[int, bytes]], int]) -> tuple[np.ndarray, int, list[DataError], int]:
    path, lines, nbytes = job
    tokens, docs, errors = encode_pretrain_chunk(path, lines, _worker_tokenizer)
    return tokens, docs, errors, nbytes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", required=True, help='pretraining JSONL, one {"text": ...} per line')
    p.add_argument("--out", required=True, help="token file to write (e.g. data/pretrain_hq.bin)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.json (default: the shipped one)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes (1 = in-process)")
    p.add_argument("--chunk_bytes", type=int, default=CHUNK_BYTES, help="text per task sent to a worker")
    p.add_argument("--skip_bad_lines", action="store_true", help="count bad lines instead of stopping at the first")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Write the token file and its sidecar; return the sidecar's contents."""
    args = parse_args(argv)
    if args.workers < 1 or args.chunk_bytes < 1:
        raise SystemExit(f"--workers and --chunk_bytes must be >= 1, got {args.workers} and {args.chunk_bytes}")
    src, out = Path(args.data_path), Path(args.out)
    if not src.is_file():
        raise DataError(f"{src}: no such file")
    tokenizer = Tokenizer.load(args.tokenizer)
    check_uint16_vocab(tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin = out.with_name(f".{out.name}.tmp{os.getpid()}")
    meta_path = token_file_meta_path(out)
    tmp_meta = meta_path.with_name(f".{meta_path.name}.tmp{os.getpid()}")

    n_tokens = n_docs = n_bad = 0
    reasons: list[str] = []

    def write(result: tuple[np.ndarray, int, list[DataError], int]) -> None:
        nonlocal n_tokens, n_docs, n_bad
        tokens, docs, errors, nbytes = result
        if errors and not args.skip_bad_lines:
            raise errors[0]
        n_bad += len(errors)
        reasons.extend(str(e) for e in errors[: MAX_REASONS - len(reasons)])
        f.write(tokens.tobytes())
        n_tokens += len(tokens)
        n_docs += docs
        bar.update(nbytes)

    t0 = time.perf_counter()
    jobs = ((str(src), lines, nbytes) for lines, nbytes in iter_line_chunks(src, args.chunk_bytes))
    try:
        with open(tmp_bin, "wb") as f, tqdm(total=src.stat().st_size, unit="B", unit_scale=True, desc=src.name) as bar:
            if args.workers == 1:
                _init_worker(args.tokenizer)
                for job in jobs:
                    write(_encode_job(job))
            else:
                with Pool(args.workers, initializer=_init_worker, initargs=(args.tokenizer,)) as pool:
                    # Pool.imap would read the whole input ahead into its task queue; keep a bounded window instead.
                    pending: deque = deque()
                    for job in jobs:
                        pending.append(pool.apply_async(_encode_job, (job,)))
                        if len(pending) >= 2 * args.workers:
                            write(pending.popleft().get())
                    while pending:
                        write(pending.popleft().get())
        if n_docs == 0:
            raise DataError(f"{src}: no usable records" + (f" ({n_bad} bad lines skipped)" if n_bad else ""))
        meta = {
            "tokens": n_tokens,
            "documents": n_docs,
            "dtype": np.dtype(TOKEN_DTYPE).name,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "tokenizer": tokenizer.source,
            "source": str(src.resolve()),
            "source_bytes": src.stat().st_size,
            "bad_lines": n_bad,
            "bad_line_reasons": reasons,
        }
        tmp_meta.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp_bin, out)
        os.replace(tmp_meta, meta_path)
    finally:
        for tmp in (tmp_bin, tmp_meta):
            tmp.unlink(missing_ok=True)
    dt = time.perf_counter() - t0
    skipped = f", {n_bad} bad lines skipped" if n_bad else ""
    rate = meta["source_bytes"] / max(dt, 1e-9) / 2**20
    print(f"{out}: {n_tokens:,} tokens from {n_docs:,} documents in {dt:.1f} s ({rate:.1f} MiB/s){skipped}")
    return meta


if __name__ == "__main__":
    try:
        main()
    except DataError as err:
        sys.exit(f"error: {err}")
