"""train/pretrain.py end to end on CPU: learning, checkpoints, exact resume, bad input."""

import json
import shutil

import pytest
import torch
from _stage_helpers import step_losses

from minimind_fast import checkpoint as ckpt
from train import pretrain

SMALL = ["--preset", "tiny", "--max_seq_len", "64", "--batch_size", "4", "--kernels", "torch", "--log_interval", "1"]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_loss_falls_and_checkpoint_reloads(tmp_path):
    out = tmp_path / "out"
    res = pretrain.main(SMALL + ["--out_dir", str(out), "--max_steps", "30", "--learning_rate", "2e-3"])
    losses = step_losses(out, "pretrain")
    assert len(losses) == 30
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < first - 1.0, (first, last)
    model, cfg, payload = ckpt.load_model(out / "pretrain")
    assert cfg.hidden_size == 256 and payload["args"]["max_steps"] == 30
    assert (out / "pretrain_loss.png").stat().st_size > 1000
    assert res["steps"] == 30


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    args = SMALL + ["--max_steps", "8", "--save_interval", "4", "--keep_last", "3"]
    full = tmp_path / "full"
    pretrain.main(args + ["--out_dir", str(full)])
    # A second run that "died" right after its step-4 checkpoint: same folder contents as the full run had then.
    cut = tmp_path / "cut"
    shutil.copytree(full / "pretrain_resume" / "step_00000004", cut / "pretrain_resume" / "step_00000004")
    pretrain.main(args + ["--out_dir", str(cut), "--from_resume", "1"])
    want, got = step_losses(full, "pretrain"), step_losses(cut, "pretrain")
    assert sorted(got) == [5, 6, 7, 8]
    assert [got[s] for s in got] == [want[s] for s in got]  # bit-identical on CPU
    a = ckpt.load_train_state(full / "pretrain_resume" / "step_00000008")
    b = ckpt.load_train_state(cut / "pretrain_resume" / "step_00000008")
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])


def test_bad_data_line_reports_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"txt": "oops"}\n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl:3"):
        pretrain.main(SMALL + ["--data_path", str(data), "--out_dir", str(tmp_path / "o")])


def test_empty_or_too_small_data_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match="empty"):
        pretrain.main(SMALL + ["--data_path", str(empty), "--out_dir", str(tmp_path / "o")])
    few = _write_jsonl(tmp_path / "few.jsonl", [{"text": "a short document"}] * 25)
    with pytest.raises(SystemExit, match="fewer than one optimizer step"):
        pretrain.main(SMALL + ["--data_path", str(few), "--out_dir", str(tmp_path / "o")])


def test_unknown_flag_and_bad_kernels_fail_before_compute(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--no_such_flag", "1"])
    assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown kernels base"):
        pretrain.main(SMALL + ["--kernels", "fast", "--out_dir", str(tmp_path / "o")])
