"""The RL maths of train/losses.py (the "# RL" section) against small cases worked out by hand in each test."""

import math

import pytest
import torch

from train import losses as L


def test_gae_on_a_three_step_trajectory_by_hand():
    gamma, lam = 0.9, 0.95
    # Row 0: three steps, reward only at the end. Row 1: two steps, then one padded step holding garbage.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = L.gae(rewards, values, mask, gamma, lam)

    # Row 0, backwards: delta_t = r_t + gamma V_{t+1} - V_t (V_3 = 0), A_t = delta_t + gamma lam A_{t+1}.
    d2 = 1.0 + gamma * 0.0 - 0.7  # 0.3
    d1 = 0.0 + gamma * 0.7 - 0.6  # 0.03
    d0 = 0.0 + gamma * 0.6 - 0.5  # 0.04
    a2 = d2  # 0.3
    a1 = d1 + gamma * lam * a2  # 0.03 + 0.855 * 0.3 = 0.2865
    a0 = d0 + gamma * lam * a1  # 0.04 + 0.855 * 0.2865 = 0.2849575
    assert a0 == pytest.approx(0.2849575) and a1 == pytest.approx(0.2865)
    # Row 1 ends after step 1: its padded step must not leak (V_2 counts as 0).
    b1 = 2.0 + gamma * 0.0 - 1.0  # 1.0
    b0 = (0.0 + gamma * 1.0 - 1.0) + gamma * lam * b1  # -0.1 + 0.855 = 0.755
    want_adv = torch.tensor([[a0, a1, a2], [b0, b1, 0.0]])
    want_ret = torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7], [b0 + 1.0, b1 + 1.0, 0.0]])
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)


def test_gae_with_gamma_1_lambda_1_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    r, v = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.ones(2, 5)
    adv, ret = L.gae(r, v, mask, 1.0, 1.0)
    reward_to_go = r.flip(1).cumsum(1).flip(1)  # Monte-Carlo return: the sum of the rewards still to come
    torch.testing.assert_close(adv, reward_to_go - v)
    torch.testing.assert_close(ret, reward_to_go)


def test_group_normalisation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = L.group_advantages(rewards, group_size=4, eps=1e-4)
    # Group 1: mean 0.5, population std 0.5 -> +-0.5 / 0.5001. Group 2: all equal -> std 0, advantage 0.
    s = 0.5 / (0.5 + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([s, -s, -s, s, 0.0, 0.0, 0.0, 0.0]))


def test_k3_kl_by_hand_and_unbiased():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # d = ref - pi = log 0.5: exp(d) - d - 1 = 0.5 + log 2 - 1
    assert float(L.k3_kl(logp, ref)) == pytest.approx(0.5 + math.log(2) - 1)
    assert float(L.k3_kl(ref, ref)) == 0.0
    # Its expectation under pi is KL(pi || ref): check on a 3-token distribution.
    pi, q = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.4, 0.4, 0.2])
    expected = (pi * L.k3_kl(pi.log(), q.log())).sum()
    torch.testing.assert_close(expected, (pi * (pi / q).log()).sum())


def test_clipped_objective_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clipped = L.clipped_surrogate(logp, old, adv, clip=0.2)
    # ratio 1.5, A=+1: min(1.5, 1.2) = 1.2 (clipped); A=-1: min(-1.5, -1.2) = -1.5;
    # ratio 0.5, A=+1: min(0.5, 0.8) = 0.5; A=-1: min(-0.5, -0.8) = -0.8 (clipped). The loss is minus that.
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 1.5, -0.5, 0.8]]))
    assert clipped.tolist() == [[True, False, False, True]]
    loss.sum().backward()
    # Clipped tokens carry no gradient; the others -A * ratio (d ratio / d logp = ratio).
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.5, -0.5, 0.0]]))
    mask = torch.ones(1, 4)
    assert float(L.clip_fraction(logp.detach(), old, mask, 0.2)) == 1.0  # every ratio is outside [0.8, 1.2]


def test_grpo_loss_token_mean_per_sequence():
    # Row 0: 2 tokens, row 1: 1 token (+ 1 masked). Ratio 1 everywhere (old = logp), reference = policy except one.
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]])
    ref = torch.tensor([[-1.0, -2.0 + math.log(2)], [-0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    beta = 0.1
    loss = L.grpo_loss(logp, logp.clone(), ref, adv, mask, clip=0.2, beta=beta)
    kl_row0_t1 = 2.0 - math.log(2) - 1  # exp(log 2) - log 2 - 1
    row0 = ((-1.0) + (-1.0 + beta * kl_row0_t1)) / 2  # per token -(ratio * A) + beta * kl, ratio 1, A = 1
    row1 = 2.0  # -(1 * -2), kl 0; the masked token does not count
    assert float(loss) == pytest.approx((row0 + row1) / 2)


def test_spo_loss_by_hand():
    logp = torch.tensor([[-1.0, -3.0], [-2.0, -5.0]], requires_grad=True)
    ref = logp.detach().clone()
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([0.5, -1.0])
    loss = L.spo_loss(logp, ref, adv, mask, beta=0.02)
    # -logp * A, KL 0: row 0 mean(0.5, 1.5) = 1.0; row 1 (one token) -2.0; mean -0.5
    assert float(loss.detach()) == pytest.approx(-0.5)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5 / 2 / 2, -0.5 / 2 / 2], [1.0 / 2, 0.0]]))


def test_kl_penalised_rewards():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    r = L.kl_penalised_rewards(torch.tensor([3.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    # -0.1 * (logp - ref) per token, sequence reward added on the last masked token
    want = torch.tensor([[-0.05, 0.0, 0.05 + 3.0], [0.0 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(r, want)


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.1]])
    returns = torch.tensor([[0.6, 1.0]])
    mask = torch.ones(1, 2)
    # token 0: (1.0-0.6)^2 = 0.16; clipped V = 0.5+0.2 = 0.7 -> 0.01; max 0.16
    # token 1: (0-1)^2 = 1; clipped V = 0.1-0.1 = 0.0 (inside the band) -> 1; max 1
    assert float(L.clipped_value_loss(values, old, returns, mask, clip=0.2)) == pytest.approx(0.5 * (0.16 + 1.0) / 2)
    # A value moved far past the band toward the return keeps the clipped (larger) error.
    assert float(
        L.clipped_value_loss(torch.tensor([[0.6]]), torch.tensor([[0.0]]), torch.tensor([[0.6]]), mask[:, :1], 0.2)
    ) == (pytest.approx(0.5 * 0.4**2))


def test_whiten_and_approx_kl():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    w = L.whiten(x, mask)
    sel = w[mask.bool()]
    assert float(sel.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(sel.pow(2).mean()) == pytest.approx(1.0, abs=1e-5)  # population variance 1
    assert w[1, 1] == 0 and w[1, 2] == 0
    logp, old = torch.tensor([[0.2, -0.4]]), torch.zeros(1, 2)
    assert float(L.approx_kl(logp, old, torch.ones(1, 2))) == pytest.approx(0.5 * (0.04 + 0.16) / 2)
