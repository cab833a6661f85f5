"""train/dpo.py end to end on CPU with a tiny model: preference learning, held-out evaluation, log-probs against a
full softmax, checkpoints, exact resume."""

import json
import math
import shutil

import pytest
import torch

from minimind_fast import checkpoint as ckpt
from minimind_fast.config import from_preset
from minimind_fast.data import DPODataset
from minimind_fast.model import MiniMind
from train import dpo
from train.runtime import Runtime
from train.step import epoch_order

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
RUN = ["--kernels", "torch", "--log_interval", "1", "--max_seq_len", "96", "--batch_size", "4"]


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def start(tmp_path_factory, tokenizer):
    """A tiny starting checkpoint (stands in for the SFT model) and a 48-pair slice of the sample DPO data."""
    root = tmp_path_factory.mktemp("dpo")
    torch.manual_seed(0)
    model = MiniMind(from_preset("tiny", **TINY))
    ckpt.save_checkpoint(root / "sft", model, model.config, tokenizer)
    lines = open("data/sample/dpo.jsonl").read().splitlines()[:48]
    (root / "dpo.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _records(out, name="dpo"):
    return [json.loads(line) for line in (out / f"{name}_metrics.jsonl").read_text().splitlines()]


def _args(start, out):
    return RUN + ["--from_weight", str(start / "sft"), "--data_path", str(start / "dpo.jsonl"), "--out_dir", str(out)]


def test_dpo_learns_the_preferences_and_evaluates_held_out_pairs(start):
    out = start / "learn"
    res = dpo.main(
        _args(start, out) + ["--learning_rate", "2e-3", "--epochs", "3", "--eval_fraction", "0.25", "--beta", "0.5"]
    )
    before, after = res["eval_before"], res["eval_after"]
    # Policy == reference in fp32 before any step: zero rewards, loss ln 2, no pair counted as won.
    assert before["eval_pairs"] == 12 and before["eval_margin"] == 0.0 and before["eval_reward_acc"] == 0.0
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert after["eval_pairs"] == 12 and math.isfinite(after["eval_loss"])
    train = [r for r in _records(out) if "loss" in r]
    assert len(train) == 27  # 36 training pairs / 4 = 9 steps x 3 epochs; the 12 held-out pairs never train
    last = train[-3:]
    assert all(r["loss"] < 0.5 for r in last), last
    assert all(r["accuracy"] >= 0.75 and r["margin"] > 0.5 for r in last), last
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in last)
    model, cfg, payload = ckpt.load_model(out / "dpo")
    assert cfg.hidden_size == 64 and payload["args"]["beta"] == 0.5
    assert (out / "dpo_loss.png").stat().st_size > 1000


def test_dpo_pair_logps_match_a_full_log_softmax(start, tokenizer):
    model, _, _ = ckpt.load_model(start / "sft")
    data = DPODataset(start / "dpo.jsonl", tokenizer, 96)
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None)
    args = dpo.Args(batch_size=3, beta=0.1)
    got = dpo.policy_logps(model, data, range(5), args, rt)
    args_mean = dpo.Args(batch_size=2, length_norm=True)
    got_mean = dpo.policy_logps(model, data, range(5), args_mean, rt)
    with torch.no_grad():
        for i in range(5):
            for j, key in enumerate(("chosen", "rejected")):
                ids, labels = data[i][f"{key}_input_ids"], data[i][f"{key}_labels"]
                logp = model(ids[None], return_logits=True).logits[0, :-1].double().log_softmax(-1)
                tgt = labels[1:]
                keep = tgt != -100
                tok = logp[keep].gather(1, tgt[keep][:, None])[:, 0]
                assert got[i, j].item() == pytest.approx(tok.sum().item(), rel=1e-5)
                assert got_mean[i, j].item() == pytest.approx(tok.mean().item(), rel=1e-5)


def test_dpo_resume_reproduces_the_uninterrupted_run_exactly(start):
    args = ["--learning_rate", "1e-3", "--max_steps", "6", "--save_interval", "3", "--keep_last", "3"]
    full = start / "full"
    dpo.main(_args(start, full) + args)
    cut = start / "cut"
    shutil.copytree(full / "dpo_resume" / "step_00000003", cut / "dpo_resume" / "step_00000003")
    dpo.main(_args(start, cut) + args + ["--from_resume", "1"])
    want = {r["step"]: r for r in _records(full) if "loss" in r}
    got = {r["step"]: r for r in _records(cut) if "loss" in r}
    assert sorted(got) == [4, 5, 6]
    for s in got:
        for k in ("loss", "chosen_reward", "rejected_reward", "accuracy"):
            assert got[s][k] == want[s][k]
    a, b = ckpt.load_model_state(full / "dpo"), ckpt.load_model_state(cut / "dpo")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_bad_flags_fail_before_compute(start):
    with pytest.raises(SystemExit, match="eval_fraction"):
        dpo.main(_args(start, start / "bad") + ["--eval_fraction", "1.0"])
    with pytest.raises(SystemExit, match="needs --from_weight|does not exist"):
        dpo.main(RUN + ["--from_weight", str(start / "nope"), "--out_dir", str(start / "bad")])


def test_dpo_bf16_reference_agrees_exactly_with_the_policy_before_training(start):
    """Under bf16 autocast the reference stores its matmul weights in bf16 and keeps embedding and norms fp32: before
    the first update it must compute exactly the policy's log-probs (any drift would show up as fake rewards)."""
    out = start / "bf16"
    res = dpo.main(_args(start, out) + ["--dtype", "bfloat16", "--max_steps", "1", "--eval_fraction", "0.25"])
    first = [r for r in _records(out) if "loss" in r][0]
    assert res["eval_before"]["eval_margin"] == 0.0 and res["eval_before"]["eval_reward_acc"] == 0.0
    assert first["chosen_reward"] == 0.0 and first["rejected_reward"] == 0.0 and first["accuracy"] == 0.0


TORCHRUN = ["--batch_size", "2", "--max_steps", "2", "--eval_fraction", "0.25", "--learning_rate", "1e-3"]
TORCHRUN += ["--save_interval", "1", "--keep_last", "3"]


@pytest.fixture(scope="module")
def ddp_out(start, torchrun):
    """A 2-step DDP run on 2 ranks, 2 pairs per rank (36 training pairs, 12 held out)."""
    out = start / "ddp"
    torchrun("dpo.py", _args(start, out) + TORCHRUN)
    return out


def _pair_logp(model, pair, key):
    """Summed log-prob of the assistant tokens of pair[key] from a full log-softmax (with grad if the model has it)."""
    ids, labels = pair[f"{key}_input_ids"], pair[f"{key}_labels"]
    logp = model(ids[None], return_logits=True).logits[0, :-1].log_softmax(-1)
    tgt = labels[1:]
    keep = tgt != -100
    return logp[keep].gather(1, tgt[keep][:, None]).sum()


def test_dpo_two_ranks_first_step_gradient_is_the_mean_of_the_ranks_losses(start, ddp_out, tokenizer):
    records = _records(ddp_out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert len(evals) == 2 and all(r["eval_pairs"] == 12 for r in evals)  # written once, by rank 0 only
    # Step 1: policy == reference, so every pair's loss is ln 2; the gradient is what carries the information. Rank r
    # trains on pairs order[2r : 2r + 2]; DDP averages the two ranks' gradients of their own pair-mean losses.
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    policy, _, _ = ckpt.load_model(start / "sft")
    ref, _, _ = ckpt.load_model(start / "sft")
    data = DPODataset(start / "dpo.jsonl", tokenizer, 96)
    order = epoch_order(36, 42, 0).tolist()
    rank_losses = []
    for r in (0, 1):
        pair_losses = []
        for i in order[2 * r : 2 * r + 2]:
            pc, pr = _pair_logp(policy, data[i], "chosen"), _pair_logp(policy, data[i], "rejected")
            with torch.no_grad():
                rc, rr = _pair_logp(ref, data[i], "chosen"), _pair_logp(ref, data[i], "rejected")
            pair_losses.append(-torch.nn.functional.logsigmoid(0.1 * ((pc - pr) - (rc - rr))))
        rank_losses.append(sum(pair_losses) / 2)
    ((rank_losses[0] + rank_losses[1]) / 2).backward()
    norm = torch.cat([p.grad.double().flatten() for p in policy.parameters() if p.grad is not None]).norm().item()
    assert norm > 0.01
    assert train[0]["grad_norm"] == pytest.approx(norm, rel=1e-4, abs=1e-4)
    # The checkpoint loads and records the world size and the data position in pairs.
    trained, cfg, _ = ckpt.load_model(ddp_out / "dpo")
    assert cfg.hidden_size == 64
    assert not torch.equal(trained.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    state = ckpt.load_train_state(ddp_out / "dpo_resume" / "step_00000002")
    assert state["world_size"] == 2 and state["rows_seen"] == 8


def test_dpo_fsdp_matches_ddp_and_resumes_on_one_process(start, ddp_out, torchrun):
    fsdp = start / "fsdp"
    proc = torchrun("dpo.py", _args(start, fsdp) + TORCHRUN + ["--fsdp", "1"])
    assert "FSDP2" in proc.stdout
    want = {r["step"]: r for r in _records(ddp_out) if "loss" in r}
    got = {r["step"]: r for r in _records(fsdp) if "loss" in r}
    for s in (1, 2):
        for k in ("loss", "chosen_reward", "rejected_reward", "grad_norm"):
            # grad_norm is logged rounded to 4 decimals: two equal norms can round 1e-4 apart.
            assert got[s][k] == pytest.approx(want[s][k], abs=1.2e-4 if k == "grad_norm" else 2e-5), (s, k)
    a, b = ckpt.load_model_state(ddp_out / "dpo"), ckpt.load_model_state(fsdp / "dpo")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # The step-1 checkpoint of 2 FSDP ranks (gathered full state) continues in one process with the same global batch.
    cut = start / "fsdp_then_one"
    step1 = fsdp / "dpo_resume" / "step_00000001"
    shutil.copytree(step1, cut / "dpo_resume" / step1.name)
    dpo.main(_args(start, cut) + TORCHRUN + ["--batch_size", "4", "--from_resume", "1"])
    resumed = {r["step"]: r for r in _records(cut) if "loss" in r}
    assert sorted(resumed) == [2]
    assert resumed[2]["loss"] == pytest.approx(want[2]["loss"], abs=2e-5)
