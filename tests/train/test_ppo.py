"""train/ppo.py end to end on CPU: actor + frozen reference + critic, checkpoints (critic in the train state),
exact resume; the critic's value alignment."""

import shutil

import pytest
import torch
from _stage_helpers import metric_rows

import minimind_kernels as kernels
from minimind_fast import checkpoint as ckpt
from minimind_fast.config import from_preset
from minimind_fast.model import MiniMind
from train import ppo, rollout

FAST = [
    "--kernels", "torch", "--batch_size", "4", "--mini_batch_size", "2", "--max_gen_len", "8",
    "--max_seq_len", "40", "--reward", "rule+shaping", "--learning_rate", "1e-4", "--critic_learning_rate", "1e-3",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_critic_values_sit_at_the_position_before_each_token():
    torch.manual_seed(0)
    critic = ppo.ValueModel(MiniMind(from_preset("tiny"), ops=kernels.resolve("torch")))
    torch.nn.init.normal_(critic.value_head.weight)
    p = rollout.pack([[1, 10, 11], [1, 12]], [[20, 2], [21, 22, 23]])
    rows = {k: p[k] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
    with torch.no_grad():
        v = ppo.completion_values(critic, rows, p["prompt_width"])
        # Row 1 alone, without padding: [1, 12, 21, 22, 23]; completion token t is predicted at position 1 + t.
        alone = critic(torch.tensor([[1, 12, 21, 22, 23]]))[0]
    assert v.shape == (2, 3)
    torch.testing.assert_close(v[1], alone[1:4], atol=1e-5, rtol=1e-5)


def test_ppo_runs_saves_and_resumes_exactly(tmp_path, tiny_start):
    args = FAST + ["--from_weight", str(tiny_start), "--max_steps", "4", "--save_interval", "2", "--keep_last", "3"]
    args += ["--early_stop_kl", "100"]  # every update runs here (the early stop has its own test)
    full = tmp_path / "full"
    ppo.main(args + ["--out_dir", str(full)])
    m = metric_rows(full, "ppo_actor")
    assert sorted(m) == [1, 2, 3, 4]
    for r in m.values():
        for key in ("reward", "kl", "value_loss", "policy_loss", "clip_frac", "approx_kl", "completion_len"):
            assert key in r and r[key] == r[key], key
        assert r["updates"] == 4 and not r["early_stop"]  # 2 epochs x 2 minibatches of 2 rows
    assert m[1]["value_mean"] == 0.0 and m[4]["value_mean"] != 0.0  # zero-initialised value head, then learned
    assert m[1]["kl"] == 0.0
    assert (full / "ppo_actor_reward.png").stat().st_size > 1000
    state = ckpt.load_train_state(full / "ppo_actor_resume" / "step_00000004")
    assert "value_head.weight" in state["critic"] and state["critic_optimizer"]["state"]
    ckpt.load_model(full / "ppo_actor")

    cut = tmp_path / "cut"
    shutil.copytree(full / "ppo_actor_resume" / "step_00000002", cut / "ppo_actor_resume" / "step_00000002")
    ppo.main(args + ["--out_dir", str(cut), "--from_resume", "1"])
    got = metric_rows(cut, "ppo_actor")
    assert sorted(got) == [3, 4]
    for s in (3, 4):
        assert {k: v for k, v in got[s].items() if k != "seconds"} == {k: v for k, v in m[s].items() if k != "seconds"}
    b = ckpt.load_train_state(cut / "ppo_actor_resume" / "step_00000004")
    assert all(torch.equal(state["critic"][k], b["critic"][k]) for k in state["critic"])


def test_ppo_early_stop_on_approximate_kl(tmp_path, tiny_start):
    out = tmp_path / "es"
    args = FAST + [
        "--from_weight",
        str(tiny_start),
        "--max_steps",
        "1",
        "--learning_rate",
        "5e-2",
        "--out_dir",
        str(out),
    ]
    ppo.main(args + ["--early_stop_kl", "1e-4", "--grad_clip", "0"])
    r = metric_rows(out, "ppo_actor")[1]
    # The first minibatch has ratio 1 (KL 0) and always updates; the huge lr then pushes the KL past the threshold.
    assert r["early_stop"] and 1 <= r["updates"] < 4


def test_ppo_two_ranks_whiten_over_all_tokens_and_average_gradients(
    tmp_path, tiny_start, rl_two_ranks, completion_logp
):
    # Step 1 again by hand: rank r samples one completion for each of its 2 prompts with its own RNG. Premise: the
    # two ranks' rewards differ, so whitening each rank's advantages on its own would give other advantages.
    out = tmp_path / "ranks"
    flags = FAST + ["--mini_batch_size", "2", "--ppo_epochs", "1"]
    policy, ros = rl_two_ranks(
        "ppo.py", tiny_start, out, flags, 1, 2, lambda ros: ros[0].rewards.mean() != ros[1].rewards.mean()
    )
    m = metric_rows(out, "ppo_actor")
    assert sorted(m) == [1, 2] and m[1]["updates"] == 1 and m[1]["kl"] == 0.0
    # Values start at 0 and the KL penalty is 0 (old == ref), so with gamma 1 the GAE advantage and return of token
    # t of a completion of length L with reward R are 0.95^(L-1-t) * R.
    raw = []
    for ro in ros:
        mask = ro.completion_mask
        length = mask.sum(1, keepdim=True)
        t = torch.arange(mask.shape[1])[None, :]
        raw.append(0.95 ** (length - 1 - t).clamp(min=0) * ro.rewards[:, None] * mask)
    # The value loss of each rank is 0.5 * its token mean of R^2; the logged value is the mean over ranks.
    value_losses = [0.5 * (a**2).sum() / ro.completion_mask.sum() for a, ro in zip(raw, ros)]
    assert m[1]["value_loss"] == pytest.approx(float(sum(value_losses) / 2), abs=1e-5)
    # Advantages are whitened over both ranks' tokens; the actor gradient is the mean of the ranks' gradients of
    # -token mean(A * ratio) at ratio 1.
    masks = torch.cat([ro.completion_mask for ro in ros])
    flat = torch.cat(raw)
    mean = flat.sum() / masks.sum()
    std = (((flat - mean) ** 2 * masks).sum() / masks.sum() + 1e-8).sqrt()
    rank_losses = []
    for a, ro in zip(raw, ros):
        mask, logp = ro.completion_mask, completion_logp(policy, ro)
        adv = (a - mean) / std * mask
        rank_losses.append(-(adv * torch.exp(logp - logp.detach()) * mask).sum() / mask.sum())
    ((rank_losses[0] + rank_losses[1]) / 2).backward()
    norm = torch.cat([p.grad.double().flatten() for p in policy.parameters() if p.grad is not None]).norm().item()
    assert m[1]["grad_norm"] == pytest.approx(norm, rel=1e-4, abs=1e-4)
    assert m[1]["policy_loss"] == pytest.approx(sum(x.detach().item() for x in rank_losses) / 2, abs=1e-5)
    ckpt.load_model(out / "ppo_actor")
    assert (out / "ppo_actor_loss.png").stat().st_size > 1000 and (out / "ppo_actor_reward.png").exists()
    state = ckpt.load_train_state(out / "ppo_actor_resume" / "step_00000002")
    assert state["world_size"] == 2 and "value_head.weight" in state["critic"]
