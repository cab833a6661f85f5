"""Tests of tools/prepare_data.py: the token file equals the JSONL path's tokens, its sidecar is checked, errors name
path:lineno and leave no file behind, vocabularies beyond uint16 are refused."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from minimind_fast.data import DataError, PretrainDataset
from minimind_fast.tokenizer import SPECIAL_TOKENS, Tokenizer
from tools import prepare_data

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [f"line {i}: " + "数据 pipeline, tokens and more tokens! " * (i % 5 + 1) for i in range(150)]


def write_lines(path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def token_stream(tokenizer, texts) -> list[int]:
    stream = []
    for t in texts:
        stream += [tokenizer.bos_id] + tokenizer.encode(t) + [tokenizer.eos_id]
    return stream


def run(src, out, tokenizer, *extra) -> dict:
    argv = ["--data_path", str(src), "--out", str(out), "--tokenizer", tokenizer.source, "--workers", "2"]
    return prepare_data.main(argv + ["--chunk_bytes", "1500", *extra])  # many small chunks: order must hold


def test_bin_gives_the_same_rows_as_jsonl(tokenizer, tmp_path):
    src = write_lines(tmp_path / "pre.jsonl", [json.dumps({"text": t}, ensure_ascii=False) for t in TEXTS])
    out = tmp_path / "out" / "pre.bin"
    meta = run(src, out, tokenizer)
    stream = token_stream(tokenizer, TEXTS)
    assert np.fromfile(out, dtype=np.uint16).tolist() == stream
    sidecar = json.loads((tmp_path / "out" / "pre.bin.json").read_text())
    assert sidecar == meta
    assert (meta["tokens"], meta["documents"], meta["dtype"]) == (len(stream), len(TEXTS), "uint16")
    assert meta["vocab_size"] == tokenizer.vocab_size and len(meta["tokenizer_fingerprint"]) == 64
    assert meta["source"] == str(src.resolve()) and meta["bad_lines"] == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["pre.bin", "pre.bin.json"]  # no temporary files left

    from_bin = PretrainDataset(out, tokenizer, max_seq_len=50)
    from_jsonl = PretrainDataset(src, tokenizer, max_seq_len=50)
    assert len(from_bin) == len(from_jsonl) == len(stream) // 50
    assert from_bin.num_documents == len(TEXTS)
    for i in range(len(from_bin)):
        assert torch.equal(from_bin[i], from_jsonl[i])
    assert isinstance(from_bin.tokens, np.memmap)


def test_sidecar_must_match(tokenizer, tmp_path):
    src = write_lines(tmp_path / "pre.jsonl", [json.dumps({"text": t}) for t in TEXTS[:20]])
    out = tmp_path / "pre.bin"
    meta = run(src, out, tokenizer)
    sidecar = tmp_path / "pre.bin.json"
    for key, value in [("vocab_size", 123), ("tokenizer_fingerprint", "0" * 64), ("tokens", 7), ("dtype", "int32")]:
        sidecar.write_text(json.dumps({**meta, key: value}))
        with pytest.raises(DataError, match=f"{key} is"):
            PretrainDataset(out, tokenizer, max_seq_len=8)
    sidecar.unlink()
    with pytest.raises(DataError, match="missing sidecar"):
        PretrainDataset(out, tokenizer, max_seq_len=8)


def test_bad_line_names_path_and_lineno_and_leaves_nothing(tokenizer, tmp_path):
    lines = [json.dumps({"text": t}) for t in TEXTS]
    lines[117] = '{"text": ["not", "a", "string"]}'
    src = write_lines(tmp_path / "pre.jsonl", lines)
    out = tmp_path / "out" / "pre.bin"
    with pytest.raises(DataError, match=f'^{src}:118: field "text" must be a string'):
        run(src, out, tokenizer)
    assert list(out.parent.iterdir()) == []

    meta = run(src, out, tokenizer, "--skip_bad_lines")
    assert meta["bad_lines"] == 1 and meta["bad_line_reasons"][0].startswith(f"{src}:118:")
    good = TEXTS[:117] + TEXTS[118:]
    assert np.fromfile(out, dtype=np.uint16).tolist() == token_stream(tokenizer, good)
    assert PretrainDataset(out, tokenizer, max_seq_len=8).bad_lines == 1


def test_empty_input_is_an_error(tokenizer, tmp_path):
    src = write_lines(tmp_path / "pre.jsonl", ["", "{bad"])
    with pytest.raises(DataError, match="no usable records.*1 bad lines skipped"):
        run(src, tmp_path / "pre.bin", tokenizer, "--skip_bad_lines")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pre.jsonl"]


def test_refuses_vocab_beyond_uint16(tmp_path):
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)} | {f"w{i}": i + 3 for i in range(70_000)}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[0]))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    big = Tokenizer.load(tmp_path)
    assert big.vocab_size == 70_003
    src = write_lines(tmp_path / "pre.jsonl", ['{"text": "w1 w2 w69999"}'])
    with pytest.raises(DataError, match="does not fit uint16"):
        run(src, tmp_path / "pre.bin", big)
    with pytest.raises(DataError, match="does not fit uint16"):
        PretrainDataset(src, big, max_seq_len=2)
    assert not (tmp_path / "pre.bin").exists()


def test_command_line_reports_bad_line(tokenizer, tmp_path):
    # Run as a script from the repository root, as documented; the error is one line naming path:lineno.
    src = write_lines(tmp_path / "pre.jsonl", ['{"text": "hello"}', "{broken"])
    cmd = [sys.executable, "tools/prepare_data.py", "--data_path", str(src), "--out", str(tmp_path / "p.bin")]
    proc = subprocess.run(cmd + ["--tokenizer", tokenizer.source, "--workers", "1"], cwd=ROOT, capture_output=True)
    assert proc.returncode == 1
    assert proc.stderr.decode().strip().splitlines()[-1].startswith(f"error: {src}:2: malformed JSON")
    assert not (tmp_path / "p.bin").exists()
