"""train/lora.py end to end on CPU: loss by hand, only the adapter trains and is saved, exact resume, errors."""

import json
import shutil

import pytest
import torch

from minimind import checkpoint as ckpt
from minimind import evaluate
from minimind import lora as lora_lib
from minimind.config import from_preset
from minimind.data import SFTDataset, collate_sft
from minimind.model import MiniMind
from minimind.tokenizer import Tokenizer
from train import common
from train import lora as lora_stage

DATA = "data/sample/lora_identity.jsonl"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A freshly initialised tiny model saved as the (frozen) base checkpoint."""
    torch.manual_seed(0)
    model = MiniMind(from_preset("tiny"))
    return ckpt.save_checkpoint(tmp_path_factory.mktemp("base") / "full_sft", model, model.config, Tokenizer.load())


def _args(base, out, *extra):
    return [
        "--from_weight",
        str(base),
        "--out_dir",
        str(out),
        "--max_seq_len",
        "64",
        "--batch_size",
        "4",
        "--kernels",
        "torch",
        "--log_interval",
        "1",
        *extra,
    ]


def _losses(out_dir, name="lora_identity"):
    lines = (out_dir / f"{name}_metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _hand_ce(model, batch):
    """Mean over assistant tokens of -log softmax(logits[t-1])[labels[t]], full logits in float64."""
    logp = model(batch["input_ids"]).logits.double().log_softmax(dim=-1)
    labels = batch["labels"]
    picked = [
        -logp[b, t - 1, labels[b, t]].item()
        for b in range(labels.shape[0])
        for t in range(1, labels.shape[1])
        if labels[b, t] != -100
    ]
    return sum(picked) / len(picked)


def test_trains_only_the_adapter_and_saves_only_the_adapter(base, tmp_path, tokenizer):
    out = tmp_path / "out"
    few = tmp_path / "few.jsonl"  # 8 conversations, 10 epochs: enough for the adapter to fit them
    few.write_text("".join(open(DATA).readlines()[:8]))
    res = lora_stage.main(_args(base, out, "--data_path", str(few), "--max_steps", "20", "--learning_rate", "1e-2"))
    losses = _losses(out)
    assert len(losses) == 20
    base_model, _, _ = ckpt.load_model(base)
    # B = 0 at step 1: the first loss is the base model's assistant-token cross-entropy on the first batch.
    data = SFTDataset(few, tokenizer, 64)
    _, first = next(common.iterate_batches(data, collate_sft, 4, 42, 0))
    assert abs(losses[1] - _hand_ce(base_model, first)) < 1e-4

    folder = out / "lora_identity"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "adapter_config.json", "manifest.json"]
    cfg, payload = lora_lib.read_adapter_config(folder)
    assert cfg.rank == 16 and cfg.alpha == 16 and payload["args"]["from_weight"] == str(base)
    assert (
        res["layers"]
        == cfg.targets
        == [f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "o_proj")]
    )
    # The base checkpoint is untouched, and base + adapter differs from base.
    reloaded, _, _ = ckpt.load_model(base)
    for (k, v), w in zip(base_model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(v, w), k
    lora_lib.load_adapter(reloaded, folder)
    before = evaluate.perplexity(base_model, tokenizer, few, max_seq_len=64)["nll"]
    after = evaluate.perplexity(reloaded, tokenizer, few, max_seq_len=64)["nll"]
    assert after < before - 0.5, (before, after)


def test_resume_reproduces_the_uninterrupted_run_exactly(base, tmp_path):
    args = _args(base, tmp_path / "x", "--max_steps", "6", "--save_interval", "3", "--learning_rate", "5e-3")
    full = tmp_path / "full"
    lora_stage.main(args + ["--out_dir", str(full)])
    cut = tmp_path / "cut"
    shutil.copytree(full / "lora_identity_resume" / "step_00000003", cut / "lora_identity_resume" / "step_00000003")
    lora_stage.main(args + ["--out_dir", str(cut), "--from_resume", "1"])
    want, got = _losses(full), _losses(cut)
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in got] == [want[s] for s in got]  # bit-identical on CPU
    from safetensors.torch import load_file

    a = load_file(str(full / "lora_identity" / "adapter.safetensors"))
    b = load_file(str(cut / "lora_identity" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rank_alpha_and_targets_flags(base, tmp_path):
    out = tmp_path / "o"
    extra = ["--max_steps", "1", "--lora_rank", "4", "--lora_alpha", "8", "--lora_targets", "v_proj"]
    lora_stage.main(_args(base, out, *extra))
    cfg, _ = lora_lib.read_adapter_config(out / "lora_identity")
    assert (cfg.rank, cfg.scale) == (4, 2.0) and cfg.targets == [f"model.layers.{i}.self_attn.v_proj" for i in range(4)]
    with pytest.raises(SystemExit, match="matches no Linear"):
        lora_stage.main(_args(base, out, "--lora_targets", "nope"))
    with pytest.raises(SystemExit, match="--from_weight"):
        lora_stage.main(_args(tmp_path / "missing", out))
