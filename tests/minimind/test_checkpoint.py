"""Checkpoint folders: round trip, atomic replacement, torn/corrupt detection, .pth import without pickled code."""

import json

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
