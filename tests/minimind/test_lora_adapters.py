"""minimind/minimind_fast/lora.py: the LoRA update against its formula, merge/unmerge, frozen base, adapter folders."""

import json

import pytest
import torch
import torch.nn as nn

from minimind_fast import checkpoint as ckpt
from minimind_fast import lora
from minimind_fast.config import from_preset
from minimind_fast.model import MiniMind


def _model(seed: int = 0, **overrides) -> MiniMind:
    torch.manual_seed(seed)
    cfg = from_preset("tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **overrides)
    return MiniMind(cfg).eval()


def _randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    """B = 0 at init makes the adapter a no-op; give B values so that every test sees a real update."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)


def _ids(n=2, t=9, seed=3):
    return torch.randint(3, 6400, (n, t), generator=torch.Generator().manual_seed(seed))


def test_default_targets_are_the_square_linears():
    model = _model()
    want = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features == m.out_features]
    assert want == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj")]
    assert lora.apply_lora(model) == want
    first = model.model.layers[0].self_attn.q_proj
    assert isinstance(first, lora.LoRALinear) and first.rank == 16 and first.scale == 1.0
    assert first.lora_A.shape == (16, 64) and first.lora_B.shape == (64, 16)
    assert torch.count_nonzero(first.lora_B) == 0
    assert abs(first.lora_A.std().item() - 0.02) < 0.004  # N(0, 0.02): 1024 draws


def test_fresh_adapter_changes_nothing_and_base_names_are_kept():
    model = _model()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    before = model(ids).logits
    lora.apply_lora(model)
    assert torch.equal(model(ids).logits, before)  # B = 0
    sd = model.state_dict()
    assert {k for k in sd if ".lora_" not in k} == set(base_sd)
    assert all(torch.equal(sd[k], v) for k, v in base_sd.items())
    assert sorted(k for k in sd if ".lora_" in k) == sorted(lora.lora_state_dict(model))


def test_layer_output_matches_the_formula_with_alpha_scaling():
    torch.manual_seed(0)
    base = nn.Linear(12, 12, bias=True)
    layer = lora.LoRALinear(base, rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 12, dtype=torch.float64)
    w, b = base.weight.double(), base.bias.double()
    a_, b_ = layer.lora_A.double(), layer.lora_B.double()
    want = x @ w.T + b + (8.0 / 4) * (x @ a_.T @ b_.T)  # W x + b + (alpha / r) B A x
    got = layer.double()(x)
    assert torch.allclose(got, want, atol=1e-12)


def test_model_with_adapters_equals_a_plain_model_with_updated_weights():
    model = _model()
    lora.apply_lora(model, rank=4, alpha=2.0)
    _randomise_adapters(model)
    ids = _ids()
    got = model(ids).logits
    # Independent reference: a plain model whose weights are W + (alpha / r) B @ A, computed here in float64.
    ref = _model()
    with torch.no_grad():
        for name, layer in lora.lora_layers(model).items():
            delta = (layer.lora_B.double() @ layer.lora_A.double()) * (2.0 / 4)
            ref.get_submodule(name).weight.copy_((layer.weight.double() + delta).float())
    assert torch.allclose(got, ref(ids).logits, atol=2e-5, rtol=1e-4)


def test_merge_gives_same_logits_and_unmerge_restores_base_weights():
    model = _model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.apply_lora(model)
    _randomise_adapters(model)
    ids = _ids()
    unmerged = model(ids).logits
    lora.merge_lora(model)
    q = model.model.layers[0].self_attn.q_proj
    assert q.merged and not torch.allclose(q.weight, base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.allclose(model(ids).logits, unmerged, atol=2e-5, rtol=1e-4)
    lora.unmerge_lora(model)
    for k, v in base.items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-7, rtol=0), k
    assert torch.allclose(model(ids).logits, unmerged, atol=2e-5, rtol=1e-4)


def test_remove_lora_leaves_plain_linears():
    model = _model()
    lora.apply_lora(model)
    _randomise_adapters(model)
    ids = _ids()
    want = model(ids).logits
    lora.remove_lora(model, merge=True)
    assert not lora.lora_layers(model)
    assert type(model.model.layers[1].self_attn.o_proj) is nn.Linear
    assert torch.allclose(model(ids).logits, want, atol=2e-5, rtol=1e-4)
    assert not any(".lora_" in k for k in model.state_dict())


def test_only_adapters_train_and_get_gradients():
    model = _model()
    lora.apply_lora(model)
    _randomise_adapters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in lora.lora_layers(model) for p in ("lora_A", "lora_B")}
    assert lora.num_lora_params(model) == 4 * (16 * 64 + 64 * 16)
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
        if p.grad is not None:
            assert p.grad.abs().sum() > 0, n


def test_explicit_targets_and_refusals():
    model = _model()
    names = lora.apply_lora(model, rank=2, targets="v_proj,down_proj")
    assert names == [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.v_proj", "mlp.down_proj")]
    with pytest.raises(lora.AdapterError, match="already has LoRA"):
        lora.apply_lora(model)
    with pytest.raises(lora.AdapterError, match="matches no Linear"):
        lora.apply_lora(_model(), targets="qkv")
    with pytest.raises(lora.AdapterError, match="reads directly"):
        lora.apply_lora(_model(), targets="lm_head")
    moe = _model(use_moe=True, n_routed_experts=4)
    with pytest.raises(lora.AdapterError, match="reads directly"):
        lora.apply_lora(moe, targets="gate")
    assert "lm_head" not in lora.select_targets(_model(), "all-linear")


def test_adapter_folder_round_trip(tmp_path):
    model = _model()
    lora.apply_lora(model, rank=8, alpha=4.0)
    _randomise_adapters(model)
    ids = _ids()
    want = model(ids).logits
    folder = lora.save_adapter(tmp_path / "ad", model, base_checkpoint="somewhere", args={"lr": 1e-3})
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "adapter_config.json", "manifest.json"]
    ckpt.verify_checkpoint(folder)  # same manifest format as model checkpoints
    cfg = json.loads((folder / "adapter_config.json").read_text())["adapter"]
    assert cfg["rank"] == 8 and cfg["alpha"] == 4.0 and cfg["targets"] == list(lora.lora_layers(model))
    assert cfg["base_fingerprint"] == lora.config_fingerprint(model.config)

    fresh = _model()  # same seed: the same base weights
    loaded = lora.load_adapter(fresh, folder)
    assert loaded.scale == 0.5
    assert torch.equal(fresh(ids).logits, want)
    assert not any(p.requires_grad for p in fresh.parameters())
    # The adapter file is a small fraction of the model.
    model_bytes = sum(v.numel() * 4 for v in ckpt.model_state_dict(_model()).values())
    assert (folder / "adapter.safetensors").stat().st_size < model_bytes / 10


def test_loading_onto_the_wrong_base_or_a_damaged_file_is_a_clear_error(tmp_path):
    model = _model()
    lora.apply_lora(model)
    folder = lora.save_adapter(tmp_path / "ad", model)
    other = _model(intermediate_size=256)
    with pytest.raises(lora.AdapterError, match="different base architecture.*intermediate_size"):
        lora.load_adapter(other, folder)
    # Tensors that do not fit the recorded layers.
    from safetensors.torch import load_file, save_file

    t = load_file(str(folder / "adapter.safetensors"))
    t["model.layers.0.self_attn.q_proj.lora_A"] = torch.zeros(16, 63)
    save_file(t, str(folder / "adapter.safetensors"))
    with pytest.raises(lora.AdapterError, match=r"q_proj\.lora_A has shape \(16, 63\)"):
        lora.load_adapter(_model(), folder)
    del t["model.layers.1.self_attn.o_proj.lora_B"]
    save_file(t, str(folder / "adapter.safetensors"))
    with pytest.raises(lora.AdapterError, match="missing"):
        lora.load_adapter(_model(), folder)
    with pytest.raises(lora.AdapterError, match="does not exist"):
        lora.load_adapter(_model(), tmp_path / "nowhere")
    ckpt.save_checkpoint(tmp_path / "full", _model(), _model().config)
    with pytest.raises(lora.AdapterError, match="model checkpoint, not an adapter"):
        lora.load_adapter(_model(), tmp_path / "full")


def test_adapter_save_replaces_in_place_and_cleans_a_dead_writers_leftovers(tmp_path, monkeypatch):
    """Adapter folders go through checkpoint.py's temporary-folder and publish steps: a second save replaces the first
    whole, a temporary folder left by a killed writer (its pid gone) is removed, and an exception mid-write leaves
    the published folder as it was and no temporary behind."""
    import socket

    model = _model()
    lora.apply_lora(model, rank=4)
    _randomise_adapters(model, seed=1)
    folder = lora.save_adapter(tmp_path / "ad", model)
    first = (folder / "adapter.safetensors").read_bytes()
    dead = tmp_path / f".ad.tmp-{socket.gethostname()}-{2**22 + 12345}-deadbeef"  # above Linux's default pid_max
    dead.mkdir()
    (dead / "adapter.safetensors").write_bytes(b"half written")

    _randomise_adapters(model, seed=2)
    lora.save_adapter(tmp_path / "ad", model)
    second = (folder / "adapter.safetensors").read_bytes()
    assert second != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    ckpt.verify_checkpoint(folder)

    def torn(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(lora.torch, "save", torn)
    with pytest.raises(OSError, match="disk full"):
        lora.save_adapter(tmp_path / "ad", model, train_state={"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    assert (folder / "adapter.safetensors").read_bytes() == second
