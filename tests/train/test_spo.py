"""train/spo.py: the Beta value tracker by hand over two steps, and the stage end to end on CPU with its tracker
saved in the checkpoint and restored on resume."""

import math
import shutil

import pytest
import torch
from _stage_helpers import metric_rows

from minimind_fast import checkpoint as ckpt
from train import spo
from train.spo import BetaValueTracker

FAST = [
    "--kernels", "torch", "--batch_size", "2", "--accumulation_steps", "2", "--max_gen_len", "8",
    "--max_seq_len", "40", "--reward", "rule+shaping", "--learning_rate", "1e-4",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_tracker_over_two_steps_by_hand():
    t = BetaValueTracker(reward_min=0.0, reward_max=1.0)
    # Prior: N0 = 1 / (1 - 0.5) = 2 pseudo-counts split evenly -> alpha = beta = 1, baseline 0.5.
    assert (t.alpha, t.beta) == (1.0, 1.0) and t.baseline() == 0.5
    # Step 1: rewards 1, 0, 1, 1 -> pbar 0.75; no previous mean log-prob -> rho 0.9.
    rho1 = t.update(torch.tensor([1.0, 0.0, 1.0, 1.0]), mean_logp=-1.0)
    assert rho1 == 0.9
    alpha1, beta1 = 0.9 * 1.0 + 0.75, 0.9 * 1.0 + 0.25  # 1.65, 1.15
    assert t.alpha == pytest.approx(alpha1) and t.beta == pytest.approx(beta1)
    assert t.baseline() == pytest.approx(1.65 / 2.8)
    # Step 2: the mean log-prob moved by 0.03 -> rho = 2^(-0.03 / 0.06) = 2^-0.5 (inside [0.5, 0.96]); rewards 0, 0.
    rho2 = t.update(torch.tensor([0.0, 0.0]), mean_logp=-1.03)
    assert rho2 == pytest.approx(1 / math.sqrt(2))
    assert t.alpha == pytest.approx(alpha1 / math.sqrt(2))  # + pbar 0
    assert t.beta == pytest.approx(beta1 / math.sqrt(2) + 1.0)
    assert t.baseline() == pytest.approx((alpha1 / math.sqrt(2)) / (alpha1 / math.sqrt(2) + beta1 / math.sqrt(2) + 1))
    # rho is clipped: a big move forgets at most half, no move keeps at most 0.96.
    assert t.rho(-1.03 + 0.3) == 0.5 and t.rho(-1.03) == 0.96


def test_tracker_maps_rewards_into_its_range_and_back():
    t = BetaValueTracker(reward_min=-3.0, reward_max=3.0)
    assert t.baseline() == 0.0  # the middle of [-3, 3]
    t.update(torch.tensor([3.0, 9.0]), mean_logp=0.0)  # p = 1 (9 is clamped to 1): alpha 0.9 + 1, beta 0.9
    assert t.baseline() == pytest.approx(-3.0 + 6.0 * 1.9 / 2.8)
    state = t.state_dict()
    u = BetaValueTracker(reward_min=-3.0, reward_max=3.0)
    u.load_state_dict(state)
    assert u.state_dict() == state and u.baseline() == t.baseline()


def test_spo_runs_and_resume_restores_the_tracker(tmp_path, tiny_start):
    args = FAST + ["--from_weight", str(tiny_start), "--max_steps", "4", "--save_interval", "2", "--keep_last", "3"]
    args += ["--reward_min", "-1", "--reward_max", "1"]
    full = tmp_path / "full"
    res = spo.main(args + ["--out_dir", str(full)])
    m = metric_rows(full, "spo")
    assert sorted(m) == [1, 2, 3, 4]
    # Step 1 logs the mean baseline of its 2 rollouts: the prior's (0, the middle of [-1, 1]), then the one after
    # folding in rollout 1 (rho 0.9). This random policy's replies all earn the same reward r (premise checked).
    r = m[1]["reward"]
    assert m[1]["reward_std"] == 0.0
    p = (r + 1) / 2
    assert m[1]["baseline"] == pytest.approx((0.0 + (-1 + 2 * (0.9 + p) / (1.8 + 1))) / 2, abs=1e-5)
    assert all(r["baseline"] != m[1]["baseline"] for s, r in m.items() if s > 1)  # the tracker moves
    assert all(0.5 <= r["rho"] <= 0.96 for r in m.values())
    assert (full / "spo_reward.png").stat().st_size > 1000
    state = ckpt.load_train_state(full / "spo_resume" / "step_00000002")
    assert set(state["tracker"]) == {"alpha", "beta", "last_mean_logp"}
    ckpt.load_model(full / "spo")

    cut = tmp_path / "cut"
    shutil.copytree(full / "spo_resume" / "step_00000002", cut / "spo_resume" / "step_00000002")
    res_cut = spo.main(args + ["--out_dir", str(cut), "--from_resume", "1"])
    got = metric_rows(cut, "spo")
    assert sorted(got) == [3, 4]
    for s in (3, 4):  # same baselines, rewards, losses: the tracker was restored, not restarted
        assert {k: v for k, v in got[s].items() if k != "seconds"} == {k: v for k, v in m[s].items() if k != "seconds"}
    assert res_cut["tracker"] == res["tracker"]
    a, b = ckpt.load_model_state(full / "spo"), ckpt.load_model_state(cut / "spo")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_spo_two_ranks_share_one_tracker_and_average_their_losses(tmp_path, tiny_start, rl_two_ranks, completion_logp):
    # Step 1 again by hand: rank r samples one completion for each of its 2 prompts with its own RNG. Premise: the
    # two ranks' rewards differ, so trackers fed each rank's own rewards would disagree.
    out = tmp_path / "ranks"
    flags = FAST + ["--accumulation_steps", "1", "--reward_min", "-1", "--reward_max", "1"]
    policy, ros = rl_two_ranks(
        "spo.py", tiny_start, out, flags, 1, 2, lambda ros: ros[0].rewards.mean() != ros[1].rewards.mean()
    )
    m = metric_rows(out, "spo")
    assert sorted(m) == [1, 2]
    # The baseline is the prior's (0, the middle of [-1, 1]) and the KL is 0, so rank r's loss is
    # mean_i -A_i * mean_t log p_it with A_i = r_i; the logged loss is the mean over ranks.
    per_rank = []
    with torch.no_grad():
        for ro in ros:
            mask = ro.completion_mask
            token_mean = (completion_logp(policy, ro) * mask).sum(1) / mask.sum(1)
            per_rank.append((-(ro.rewards.clamp(-5, 5) * token_mean)).mean().item())
    assert m[1]["loss"] == pytest.approx(sum(per_rank) / 2, abs=1e-5)
    # One tracker over both ranks' rewards: pbar over all 4, rho 0.9 on the first update, prior alpha = beta = 1.
    rewards = torch.cat([ro.rewards for ro in ros])
    pbar = ((rewards + 1) / 2).clamp(0, 1).mean().item()
    assert m[1]["tracker_alpha"] == pytest.approx(0.9 + pbar, abs=1e-5)
    assert m[1]["tracker_beta"] == pytest.approx(0.9 + 1 - pbar, abs=1e-5)
    ckpt.load_model(out / "spo")
    assert (out / "spo_loss.png").stat().st_size > 1000 and (out / "spo_reward.png").exists()
    state = ckpt.load_train_state(out / "spo_resume" / "step_00000002")
    assert state["world_size"] == 2 and state["tracker"]["alpha"] == pytest.approx(m[2]["tracker_alpha"], abs=1e-5)
