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


pytestmark = pytest.mark.usefixtures("one_thread_module")


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


def test_two_ranks_under_torchrun_average_their_own_losses(base, tmp_path, tokenizer, torchrun):
    out = tmp_path / "ranks"
    torchrun("lora.py", _args(base, out, "--batch_size", "2", "--max_steps", "2", "--learning_rate", "5e-3"))
    losses = _losses(out)
    assert sorted(losses) == [1, 2]
    # B = 0 at step 1: rank r's loss is the base model's assistant-token CE on conversations order[2r : 2r + 2];
    # the logged loss is the mean of the two ranks' losses.
    base_model, _, _ = ckpt.load_model(base)
    data = SFTDataset(DATA, tokenizer, 64)
    order = common.epoch_order(len(data), 42, 0).tolist()
    per_rank = [_hand_ce(base_model, collate_sft([data[i] for i in order[2 * r : 2 * r + 2]])) for r in (0, 1)]
    assert abs(per_rank[0] - per_rank[1]) > 1e-3
    assert abs(losses[1] - sum(per_rank) / 2) < 1e-4
    # Only the adapters train, and their gradients are averaged over the ranks: the step-1 gradient norm is that of
    # the mean of the two ranks' losses with respect to A and B (the same adapters, drawn from seed 42).
    model, _, _ = ckpt.load_model(base)
    lora_lib.apply_lora(model, 16, None, "square", generator=torch.Generator().manual_seed(42))
    rank_losses = []
    for r in (0, 1):
        batch = collate_sft([data[i] for i in order[2 * r : 2 * r + 2]])
        rank_losses.append(model(batch["input_ids"], labels=batch["labels"]).loss)
    ((rank_losses[0] + rank_losses[1]) / 2).backward()
    grads = [p.grad.double().flatten() for p in model.parameters() if p.grad is not None]
    assert len(grads) == 2 * 2 * 4  # A and B of q_proj and o_proj in 4 layers; the base has no gradient
    record = json.loads((out / "lora_identity_metrics.jsonl").read_text().splitlines()[0])
    assert record["grad_norm"] == pytest.approx(torch.cat(grads).norm().item(), rel=1e-4)
    # The adapter written by rank 0 loads onto the base and changes it.
    merged, _, _ = ckpt.load_model(base)
    cfg = lora_lib.load_adapter(merged, out / "lora_identity")
    assert cfg.rank == 16
    ids = collate_sft([data[order[0]]])["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(merged(ids).logits, base_model(ids).logits)
    state = ckpt.load_train_state(out / "lora_identity_resume" / "step_00000002")
    assert state["world_size"] == 2 and state["rows_seen"] == 8


def test_fsdp_is_refused_with_a_reason(base, tmp_path):
    with pytest.raises(SystemExit, match="--fsdp is not supported for LoRA"):
        lora_stage.main(_args(base, tmp_path / "o", "--fsdp"))
