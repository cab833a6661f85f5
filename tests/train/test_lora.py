"""train/lora.py end to end on CPU: loss by hand, only the adapter trains and is saved, exact resume, errors."""

import json
import shutil

import pytest
import torch

from minimind_fast import checkpoint as ckpt
from minimind_fast import evaluate
from minimind_fast import lora as lora_lib
from minimind_fast.data import SFTDataset, collate_sft
from train import lora as lora_stage
from train.step import epoch_order, iterate_batches

DATA = "data/sample/lora_identity.jsonl"


from _stage_helpers import hand_ce, stage_argv, step_losses  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_trains_only_the_adapter_and_saves_only_the_adapter(tiny_start, tmp_path, tokenizer):
    out = tmp_path / "out"
    few = tmp_path / "few.jsonl"  # 8 conversations, 10 epochs: enough for the adapter to fit them
    few.write_text("".join(open(DATA).readlines()[:8]))
    res = lora_stage.main(
        stage_argv(tiny_start, out, "--data_path", str(few), "--max_steps", "20", "--learning_rate", "1e-2")
    )
    losses = step_losses(out, "lora_identity")
    assert len(losses) == 20
    base_model, _, _ = ckpt.load_model(tiny_start)
    # B = 0 at step 1: the first loss is the base model's assistant-token cross-entropy on the first batch.
    data = SFTDataset(few, tokenizer, 64)
    _, first = next(iterate_batches(data, collate_sft, 4, 42, 0))
    assert abs(losses[1] - hand_ce(base_model, first)) < 1e-4

    folder = out / "lora_identity"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "adapter_config.json", "manifest.json"]
    cfg, payload = lora_lib.read_adapter_config(folder)
    assert cfg.rank == 16 and cfg.alpha == 16 and payload["args"]["from_weight"] == str(tiny_start)
    assert (
        res["layers"]
        == cfg.targets
        == [f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "o_proj")]
    )
    # The base checkpoint is untouched, and base + adapter differs from base.
    reloaded, _, _ = ckpt.load_model(tiny_start)
    for (k, v), w in zip(base_model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(v, w), k
    lora_lib.load_adapter(reloaded, folder)
    before = evaluate.perplexity(base_model, tokenizer, few, max_seq_len=64)["nll"]
    after = evaluate.perplexity(reloaded, tokenizer, few, max_seq_len=64)["nll"]
    assert after < before - 0.5, (before, after)


def test_resume_reproduces_the_uninterrupted_run_exactly(tiny_start, tmp_path):
    args = stage_argv(tiny_start, tmp_path / "x", "--max_steps", "6", "--save_interval", "3", "--learning_rate", "5e-3")
    full = tmp_path / "full"
    lora_stage.main(args + ["--out_dir", str(full)])
    cut = tmp_path / "cut"
    shutil.copytree(full / "lora_identity_resume" / "step_00000003", cut / "lora_identity_resume" / "step_00000003")
    lora_stage.main(args + ["--out_dir", str(cut), "--from_resume", "1"])
    want, got = step_losses(full, "lora_identity"), step_losses(cut, "lora_identity")
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in got] == [want[s] for s in got]  # bit-identical on CPU
    from safetensors.torch import load_file

    a = load_file(str(full / "lora_identity" / "adapter.safetensors"))
    b = load_file(str(cut / "lora_identity" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rank_alpha_and_targets_flags(tiny_start, tmp_path):
    out = tmp_path / "o"
    extra = ["--max_steps", "1", "--lora_rank", "4", "--lora_alpha", "8", "--lora_targets", "v_proj"]
    lora_stage.main(stage_argv(tiny_start, out, *extra))
    cfg, _ = lora_lib.read_adapter_config(out / "lora_identity")
    assert (cfg.rank, cfg.scale) == (4, 2.0) and cfg.targets == [f"model.layers.{i}.self_attn.v_proj" for i in range(4)]
    with pytest.raises(SystemExit, match="matches no Linear"):
        lora_stage.main(stage_argv(tiny_start, out, "--lora_targets", "nope"))
    with pytest.raises(SystemExit, match="--from_weight"):
        lora_stage.main(stage_argv(tmp_path / "missing", out))


def test_two_ranks_under_torchrun_average_their_ownstep_losses(tiny_start, tmp_path, tokenizer, torchrun):
    out = tmp_path / "ranks"
    torchrun("lora.py", stage_argv(tiny_start, out, "--batch_size", "2", "--max_steps", "2", "--learning_rate", "5e-3"))
    losses = step_losses(out, "lora_identity")
    assert sorted(losses) == [1, 2]
    # B = 0 at step 1: rank r's loss is the base model's assistant-token CE on conversations order[2r : 2r + 2];
    # the logged loss is the mean of the two ranks' losses.
    base_model, _, _ = ckpt.load_model(tiny_start)
    data = SFTDataset(DATA, tokenizer, 64)
    order = epoch_order(len(data), 42, 0).tolist()
    per_rank = [hand_ce(base_model, collate_sft([data[i] for i in order[2 * r : 2 * r + 2]])) for r in (0, 1)]
    assert abs(per_rank[0] - per_rank[1]) > 1e-3
    assert abs(losses[1] - sum(per_rank) / 2) < 1e-4
    # Only the adapters train, and their gradients are averaged over the ranks: the step-1 gradient norm is that of
    # the mean of the two ranks' losses with respect to A and B (the same adapters, drawn from seed 42).
    model, _, _ = ckpt.load_model(tiny_start)
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
    merged, _, _ = ckpt.load_model(tiny_start)
    cfg = lora_lib.load_adapter(merged, out / "lora_identity")
    assert cfg.rank == 16
    ids = collate_sft([data[order[0]]])["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(merged(ids).logits, base_model(ids).logits)
    state = ckpt.load_train_state(out / "lora_identity_resume" / "step_00000002")
    assert state["world_size"] == 2 and state["rows_seen"] == 8


def test_fsdp_is_refused_with_a_reason(tiny_start, tmp_path):
    with pytest.raises(SystemExit, match="--fsdp is not supported for LoRA"):
        lora_stage.main(stage_argv(tiny_start, tmp_path / "o", "--fsdp"))
