"""Checkpoint folders: round trip, atomic replacement, torn/corrupt detection, .pth import without pickled code; a
kill at every point of a write, leftovers of dead writers, non-finite weights, the tokenizer's fingerprint."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from minimind_fast import checkpoint as ckpt
from minimind_fast.config import from_preset
from minimind_fast.model import MiniMind


def _tiny():
    torch.manual_seed(0)
    return MiniMind(from_preset("tiny", num_hidden_layers=1, use_moe=True))


def test_roundtrip_gives_identical_logits(tmp_path, tokenizer):
    model = _tiny().eval()
    folder = ckpt.save_checkpoint(
        tmp_path / "c",
        model,
        model.config,
        tokenizer,
        args={"lr": 1.0},
        train_state={"step": 7, "rng": torch.get_rng_state()},
    )
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "train_state.pt", "manifest.json"} <= names
    loaded, cfg, payload = ckpt.load_model(folder)
    assert cfg == model.config and payload["args"] == {"lr": 1.0}
    x = torch.randint(0, 6400, (2, 5))
    torch.testing.assert_close(loaded.eval()(x).logits, model(x).logits, rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert ckpt.load_train_state(folder)["step"] == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_overwrite_replaces_atomically(tmp_path):
    model = _tiny()
    ckpt.save_checkpoint(tmp_path / "c", model, model.config)
    with torch.no_grad():
        model.model.norm.weight.fill_(3.0)
    ckpt.save_checkpoint(tmp_path / "c", model, model.config)
    loaded, _, _ = ckpt.load_model(tmp_path / "c")
    assert torch.all(loaded.model.norm.weight == 3.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_truncated_or_corrupt_or_torn_checkpoints_are_refused(tmp_path):
    model = _tiny()
    folder = ckpt.save_checkpoint(tmp_path / "c", model, model.config)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.load_model(folder)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.load_model(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_model(folder)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_model(tmp_path / "nowhere")


def test_minimind_pth_loads_with_weights_only(tmp_path):
    model = _tiny().eval()
    sd = {k: v.half() for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "full_sft_640_moe.pth")
    other = MiniMind(model.config).eval()
    ckpt.load_minimind_pth(other, tmp_path / "full_sft_640_moe.pth")
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, sd[k].float(), rtol=0, atol=0)


def test_pth_with_pickled_code_is_rejected(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights only|unsupported|global"):
        ckpt.load_minimind_pth(_tiny(), tmp_path / "evil.pth")


def test_config_json_carries_model_and_args(tmp_path):
    model = _tiny()
    folder = ckpt.save_checkpoint(tmp_path / "c", model, model.config, args={"preset": "tiny"}, meta={"step": 3})
    payload = json.loads((folder / "config.json").read_text())
    assert payload["model"]["use_moe"] is True and payload["args"]["preset"] == "tiny" and payload["meta"]["step"] == 3


# ------------------------------------------------------------------------------ kills, leftovers, NaN, tokenizer
class Killed(BaseException):
    """A kill simulated in-process: raised between two steps of a write (a BaseException, as a kill skips the
    writer's `except Exception` handlers; the one handler of the write phase is disabled by the test)."""


def _norm_model(value: float):
    model = _tiny()
    with torch.no_grad():
        model.model.norm.weight.fill_(value)
    return model


def _norm_of(folder) -> float:
    return float(ckpt.load_model_state(folder)["model.norm.weight"][0])


def _kill_at(point, monkeypatch):
    """Patch the writer so that the next save_checkpoint of folder "c" dies at `point`."""
    if point == "writing":  # files half written, no manifest; the kill also skips the write phase's cleanup
        monkeypatch.setattr(ckpt, "write_manifest", lambda folder: (_ for _ in ()).throw(Killed()))
        monkeypatch.setattr(ckpt, "discard", lambda tmp, tag: None)
    elif point == "before_swap":
        monkeypatch.setattr(ckpt, "_exchange", lambda a, b: (_ for _ in ()).throw(Killed()))
    elif point == "after_swap":
        real = ckpt._exchange

        def exchange_then_die(a, b):
            assert real(a, b), "this file system has no RENAME_EXCHANGE: the fallback cases cover it"
            raise Killed

        monkeypatch.setattr(ckpt, "_exchange", exchange_then_die)
    else:  # the two-rename fallback
        monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
        real_replace, real_rmtree = ckpt.os.replace, ckpt.shutil.rmtree
        if point == "between_renames":

            def replace(src, dst):
                if ckpt.Path(src).name.startswith(".c.tmp-") and ckpt.Path(dst).name == "c":
                    raise Killed
                real_replace(src, dst)

            monkeypatch.setattr(ckpt.os, "replace", replace)
        else:  # "after_renames": the new folder is in place, the old one not yet deleted

            def rmtree(path, *a, **kw):
                if ckpt.Path(path).name.startswith(".c.old-"):
                    raise Killed
                real_rmtree(path, *a, **kw)

            monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)


@pytest.mark.parametrize(
    "point, on_disk, loaded",
    [
        ("writing", 1.0, 1.0),
        ("before_swap", 1.0, 1.0),
        ("after_swap", 3.0, 3.0),
        ("between_renames", None, 3.0),  # no folder named c until the next load or save recovers the new one
        ("after_renames", 3.0, 3.0),
    ],
)
def test_a_kill_at_any_point_of_a_replace_leaves_a_complete_folder(tmp_path, monkeypatch, point, on_disk, loaded):
    ckpt.save_checkpoint(tmp_path / "c", _norm_model(1.0), _tiny().config)
    with monkeypatch.context() as m:
        _kill_at(point, m)
        with pytest.raises(Killed):
            ckpt.save_checkpoint(tmp_path / "c", _norm_model(3.0), _tiny().config)
    ckpt._ACTIVE.clear()  # the killed process is gone: none of its writes is in progress
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".c.")], "the kill left no leftover"
    assert (tmp_path / "c").is_dir() == (on_disk is not None)
    if on_disk is not None:
        assert _norm_of(tmp_path / "c") == on_disk
    model, _, _ = ckpt.load_model(tmp_path / "c")  # verifies, recovering a missing folder first
    assert float(model.model.norm.weight[0].detach()) == loaded
    ckpt.save_checkpoint(tmp_path / "c", _norm_model(5.0), _tiny().config)  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert _norm_of(tmp_path / "c") == 5.0


def test_recovery_puts_back_the_old_folder_when_the_new_copy_is_incomplete(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path / "c", _norm_model(1.0), _tiny().config)
    with monkeypatch.context() as m:
        _kill_at("between_renames", m)
        with pytest.raises(Killed):
            ckpt.save_checkpoint(tmp_path / "c", _norm_model(3.0), _tiny().config)
    (tmp := next(tmp_path.glob(".c.tmp-*"))).joinpath("model.safetensors").write_bytes(b"torn")
    assert tmp.is_dir() and not (tmp_path / "c").exists()
    ckpt.verify_checkpoint(tmp_path / "c")
    assert _norm_of(tmp_path / "c") == 1.0


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_leftovers_whose_writer_is_gone_are_deleted(tmp_path):
    ckpt.save_checkpoint(tmp_path / "c", _norm_model(1.0), _tiny().config)
    host, dead, live = ckpt._HOST, _dead_pid(), os.getppid()
    names = {
        f".c.tmp-{host}-{dead}-0badc0de": False,  # a killed writer's half-written folder
        f".c.old-{host}-{dead}-0badbeef": False,  # its old copy, after the new folder was in place
        f".step_00000004.tmp-{host}-{dead}-00c0ffee": False,  # another name in the same folder
        f".c.old-{dead}": False,  # the aside folder of the first version of checkpoint.py
        f".c.tmp-{host}-{os.getpid()}-feedface": False,  # this process's own, not being written
        f".c.tmp-{host}-{live}-5ca1ab1e": True,  # a live process may still be writing it
        f".c.tmp-otherhost-{dead}-5eed5eed": True,  # another host's: whether its writer lives cannot be told
        ".c.tmp-k2j4x9_a": True,  # no writer named: not ours to judge
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    ckpt.save_checkpoint(tmp_path / "c", _norm_model(2.0), _tiny().config)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c"] + [n for n, keep in names.items() if keep])
    assert _norm_of(tmp_path / "c") == 2.0


_KILL_BETWEEN_RENAMES = """
import os, sys, torch
from minimind_fast import checkpoint as ckpt
from minimind_fast.config import from_preset
from minimind_fast.model import MiniMind

torch.manual_seed(0)
model = MiniMind(from_preset("tiny", num_hidden_layers=1, use_moe=True))
with torch.no_grad():
    model.model.norm.weight.fill_(3.0)
ckpt._exchange = lambda a, b: False  # the fallback swap, as on a file system without RENAME_EXCHANGE
real = os.replace

def replace(src, dst):
    real(src, dst)
    if os.path.basename(dst).startswith(".c.old-"):
        os.kill(os.getpid(), 9)

os.replace = replace
ckpt.save_checkpoint(sys.argv[1], model, model.config)
"""


def test_a_real_sigkill_between_the_fallback_renames_is_recovered_by_the_next_load(tmp_path):
    ckpt.save_checkpoint(tmp_path / "c", _norm_model(1.0), _tiny().config)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(tmp_path / "c")], env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "c").exists()
    assert {p.name.split("-")[0] for p in tmp_path.iterdir()} == {".c.tmp", ".c.old"}
    model, _, _ = ckpt.load_model(tmp_path / "c")
    assert float(model.model.norm.weight[0].detach()) == 3.0
    ckpt.save_checkpoint(tmp_path / "c", _norm_model(5.0), _tiny().config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_nonfinite_weights_are_refused_naming_the_first_bad_tensor(tmp_path):
    model = _tiny()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[3, 5] = float("nan")
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
    folder = ckpt.save_checkpoint(tmp_path / "c", model, model.config)
    ckpt.verify_checkpoint(folder, check_hashes=False)  # the quick size check reads no tensor
    with pytest.raises(ckpt.CheckpointError, match=r"non-finite weights \(first: model.layers.0.self_attn.k_proj"):
        ckpt.load_model(folder)
    n = model.model.layers[0].self_attn.k_proj.weight.numel()
    with pytest.raises(ckpt.CheckpointError, match=rf"{folder}: model.safetensors holds .* 1 of {n} values"):
        ckpt.verify_checkpoint(folder)


def test_a_checkpoint_records_its_tokenizer_fingerprint(tmp_path, tokenizer):
    from minimind_fast.data import tokenizer_fingerprint

    model = _tiny()
    folder = ckpt.save_checkpoint(tmp_path / "c", model, model.config, tokenizer)
    want = {"fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": 6400}
    assert json.loads((folder / "config.json").read_text())["tokenizer"] == want
    assert ckpt.saved_tokenizer(folder) == want
    payload = json.loads((folder / "config.json").read_text())
    del payload["tokenizer"]  # a folder from before the record: the fingerprint comes from its tokenizer.json
    (folder / "config.json").write_text(json.dumps(payload))
    assert ckpt.saved_tokenizer(folder) == want
    assert ckpt.saved_tokenizer(ckpt.save_checkpoint(tmp_path / "bare", model, model.config)) is None
