"""The RL maths of train/losses.py (the "# RL" section) against small cases worked out by hand in each test, and the
GRPO stage's --loss_type cispo end to end."""

import math

import pytest
import torch
from _stage_helpers import metric_rows

from minimind_fast import checkpoint as ckpt
from train import grpo
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


def test_cispo_loss_and_gradient_by_hand():
    # CISPO (MiniMax-M1, arXiv:2506.13585, sec. 3.1) as MiniMind computes it, per token to minimise:
    #   w = sg(min(ratio, eps_high)), ratio = exp(logp - old);  loss = -(w * A * logp - beta * k3(logp, ref))
    # then the token mean within each row and the mean over rows. Rows: 3 tokens, and 2 tokens + 1 padded.
    eps_high, beta = 2.0, 0.1
    logp = [[-1.0, -2.0, -0.5], [-0.7, -1.2, -3.0]]
    old = [
        [-1.0, -2.0 - math.log(3.0), -0.5 + math.log(2.0)],  # ratios 1, 3 (> eps_high: clamped to 2), 0.5
        [-0.7 - math.log(1.5), -1.2, -3.0 - 10.0],  # ratios 1.5, 1, and e^10 on the padded token (must not count)
    ]
    ref = [[-1.0 + math.log(2.0), -2.0, -0.5], [-0.7, -1.2 - math.log(2.0), 5.0]]  # the padded ref is garbage too
    mask = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    adv = [1.5, -0.5]

    def k3(lp, rf):  # exp(ref - logp) - (ref - logp) - 1
        return math.exp(rf - lp) - (rf - lp) - 1

    rows, grad = [], [[0.0] * 3 for _ in range(2)]
    for i in range(2):
        n_i = sum(mask[i])
        terms = []
        for t in range(3):
            if not mask[i][t]:
                continue
            w = min(math.exp(logp[i][t] - old[i][t]), eps_high)
            terms.append(-(w * adv[i] * logp[i][t]) + beta * k3(logp[i][t], ref[i][t]))
            # d/d logp: -w * A (w detached) + beta * d k3 / d logp, where d k3 / d logp = 1 - exp(ref - logp)
            grad[i][t] = (-(w * adv[i]) + beta * (1 - math.exp(ref[i][t] - logp[i][t]))) / (n_i * 2)
        rows.append(sum(terms) / n_i)
    want = (rows[0] + rows[1]) / 2
    # The same numbers written out. Row 0: 1.5 + 0.1 (1 - ln 2), 2 * 1.5 * 2 = 6, 0.5 * 1.5 * 0.5 = 0.375.
    # Row 1: -(1.5 * -0.5 * -0.7) = -0.525, -(1 * -0.5 * -1.2) = -0.6 plus 0.1 (0.5 + ln 2 - 1).
    row0 = (1.5 + beta * (1 - math.log(2.0)) + 6.0 + 0.375) / 3
    row1 = (-0.525 - 0.6 + beta * (math.log(2.0) - 0.5)) / 2
    assert want == pytest.approx((row0 + row1) / 2)
    assert grad[0] == pytest.approx([(-1.5 + beta * (1 - 2)) / 6, -3.0 / 6, -0.75 / 6])
    assert grad[1] == pytest.approx([0.75 / 4, (0.5 + beta * (1 - 0.5)) / 4, 0.0])

    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    old_t, ref_t = torch.tensor(old, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    mask_t, adv_t = torch.tensor(mask, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)
    loss = L.cispo_loss(lp, old_t, ref_t, adv_t, mask_t, epsilon_high=eps_high, beta=beta)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-12)
    loss.backward()
    # Row 1 token 0 (ratio 1.5) would pick up an extra A * logp * ratio if the weight were not detached.
    torch.testing.assert_close(lp.grad, torch.tensor(grad, dtype=torch.float64))
    # Clamped weights: one of the 5 real tokens (ratio 3); the padded token's e^10 does not count.
    assert float(L.upper_clip_fraction(lp.detach(), old_t, mask_t, eps_high)) == pytest.approx(1 / 5)


def test_cispo_and_grpo_have_the_same_gradient_at_ratio_1():
    torch.manual_seed(0)
    logp0 = -torch.rand(4, 5, dtype=torch.float64) * 3
    ref = logp0 + 0.3 * torch.randn(4, 5, dtype=torch.float64)
    adv = torch.randn(4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float64)
    grads, values = {}, {}
    for name, fn, kw in (("grpo", L.grpo_loss, {"clip": 0.2}), ("cispo", L.cispo_loss, {"epsilon_high": 5.0})):
        lp = logp0.clone().requires_grad_()
        loss = fn(lp, lp.detach(), ref, adv, mask, beta=0.05, **kw)  # old = current: ratio 1, nothing clipped
        loss.backward()
        grads[name], values[name] = lp.grad, float(loss.detach())
    # Both: -A / (n_i * rows) + beta * d k3 / d logp / (n_i * rows) on each masked token, 0 off mask.
    n = mask.sum(1, keepdim=True)
    want = (-adv[:, None] + 0.05 * (1 - torch.exp(ref - logp0))) / (n * 4) * mask
    torch.testing.assert_close(grads["grpo"], want)
    torch.testing.assert_close(grads["cispo"], want)
    # The values differ: per token GRPO has -ratio * A = -A, CISPO -A * logp; the KL terms cancel in the difference.
    diff = [-float(adv[i]) * (float((logp0[i] * mask[i]).sum() / n[i]) - 1) for i in range(4)]
    assert values["cispo"] - values["grpo"] == pytest.approx(sum(diff) / 4)


@pytest.mark.usefixtures("one_thread_module")
def test_grpo_stage_with_cispo_loss_runs_and_checks_its_flags(tmp_path, tiny_start, capsys):
    fast = [
        "--kernels", "torch", "--batch_size", "2", "--num_generations", "4", "--max_gen_len", "4",
        "--max_seq_len", "40", "--reward", "rule+shaping", "--learning_rate", "1e-4",
        "--from_weight", str(tiny_start), "--max_steps", "2",
    ]  # fmt: skip
    # test_grpo.py's quick flags, but 4 new tokens (not 8): with this seed the rewards then differ within a group
    # at step 1, so the step has a gradient (with 8 every completion of step 1 gets the same reward).
    out = tmp_path / "cispo"
    res = grpo.main(fast + ["--out_dir", str(out), "--loss_type", "cispo"])
    m = metric_rows(out, "grpo")
    assert sorted(m) == [1, 2] and res["steps"] == 2
    assert m[1]["group_std"] > 0 and m[1]["kl"] == 0.0 and m[2]["kl"] > 0.0  # premise; then the policy moved
    for r in m.values():
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert r["clip_frac"] == 0.0  # one update per rollout: ratio 1, no weight reaches epsilon_high
    model, _, payload = ckpt.load_model(out / "grpo")
    assert payload["args"]["loss_type"] == "cispo" and payload["args"]["epsilon_high"] == 5.0
    first = ckpt.load_model_state(tiny_start)
    assert any(not torch.equal(first[k], v) for k, v in model.state_dict().items() if k in first)
    # Step 1 of the default GRPO loss samples the same rollouts (the sampling RNG is a function of the seed and step)
    # and, at ratio 1, takes the same gradient.
    ref_out = tmp_path / "grpo"
    grpo.main(fast[:-1] + ["1", "--out_dir", str(ref_out)])
    g = metric_rows(ref_out, "grpo")[1]
    assert g["reward"] == m[1]["reward"] and g["group_std"] == m[1]["group_std"]
    assert g["grad_norm"] > 0 and g["grad_norm"] == pytest.approx(m[1]["grad_norm"], abs=2e-4)
    # ...but not the same value: GRPO's is -mean(A) = 0 within each group, CISPO's -mean_i A_i * mean_t logp_it.
    assert g["loss"] == pytest.approx(0.0, abs=1e-5) and abs(m[1]["loss"]) > 1e-3

    capsys.readouterr()
    for flags, start in (
        (["--loss_type", "bogus"], "error: --loss_type bogus: "),
        (["--loss_type", "cispo", "--epsilon_high", "1"], "error: --epsilon_high 1: "),
    ):
        bad_out = tmp_path / "bad"
        with pytest.raises(SystemExit) as exc:
            grpo.main(fast + ["--out_dir", str(bad_out)] + flags)
        assert exc.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and errors[0].startswith(start), errors
        assert not bad_out.exists()
