"""Loss functions of the post-training stages: pure functions of tensors, shapes in the names and docstrings.

Shape legend: B batch (pairs for DPO), T sequence length, N tokens (rows), M selected tokens, V vocab, D hidden.

Preference and distillation losses (train/dpo.py, train/distill.py, train/distill_reason.py):
  sequence_logp       per-token NLL [B, T] -> summed (or mean) log-prob of the labelled tokens [B]
  dpo_loss            Rafailov et al. 2023, eq. 7
  distill_kl          KL(teacher || student) at temperature T from full logits (the definition; small inputs)
  chunked_distill_kl  the same from final hidden states and output heads, computed chunk by chunk over tokens
  tag_weights         per-label weights that single out multi-token tags (<think>, </answer>, ...)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sequence_logp(
    per_token_nll_BT: torch.Tensor, labels_BT: torch.Tensor, mean: bool = False, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Log-probability of each row's labelled tokens -> [B] (fp32).

    per_token_nll_BT: -log p(labels[t] | < t) per position (the model's loss_reduction="none" output); positions
    where labels == ignore_index are masked here whatever they hold. mean=False sums over the labelled tokens (the
    DPO paper and MiniMind2). mean=True divides by their count: the older length-normalised variant, which removes
    the per-token cost of a longer answer and was seen to bias MiniMind's DPO toward short replies.
    """
    mask_BT = labels_BT != ignore_index
    nll_BT = per_token_nll_BT.to(torch.promote_types(per_token_nll_BT.dtype, torch.float32))
    logp_B = -(nll_BT * mask_BT).sum(dim=-1)
    if mean:
        logp_B = logp_B / mask_BT.sum(dim=-1).clamp(min=1)
    return logp_B


def dpo_loss(
    policy_chosen_logp_B: torch.Tensor,
    policy_rejected_logp_B: torch.Tensor,
    ref_chosen_logp_B: torch.Tensor,
    ref_rejected_logp_B: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7):

        loss = mean_b -log sigmoid(beta * ((pc - pr) - (rc - rr)))

    -> (scalar loss, chosen_reward [B], rejected_reward [B]) where the implicit rewards are beta * (pi - ref)
    (sec. 5, "the language model is secretly a reward model"), detached: they are for logging and accuracy.
    """
    logits_B = (policy_chosen_logp_B - policy_rejected_logp_B) - (ref_chosen_logp_B - ref_rejected_logp_B)
    loss = -F.logsigmoid(beta * logits_B).mean()
    chosen_reward_B = beta * (policy_chosen_logp_B - ref_chosen_logp_B).detach()
    rejected_reward_B = beta * (policy_rejected_logp_B - ref_rejected_logp_B).detach()
    return loss, chosen_reward_B, rejected_reward_B


def distill_kl(
    student_logits_NV: torch.Tensor,
    teacher_logits_NV: torch.Tensor,
    temperature: float,
    mask_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the masked rows of KL(softmax(t / T) || softmax(s / T)) (Hinton et al. 2015, "Distilling the
    Knowledge in a Neural Network", sec. 2), in fp32, gradient to the student only.

    No T^2 factor: the caller scales (Hinton et al. multiply the soft term by T^2 so its gradients keep their size
    when T changes). mask_N (bool) selects the rows that count; None = all. Materialises [N, V] fp32 twice: for
    small inputs and as the test oracle; training uses chunked_distill_kl.
    """
    acc = torch.promote_types(student_logits_NV.dtype, torch.float32)  # fp32, or fp64 for a float64 oracle
    s = student_logits_NV.to(acc) / temperature
    t = teacher_logits_NV.detach().to(acc) / temperature
    t_logp = t.log_softmax(dim=-1)
    kl_N = (t_logp.exp() * (t_logp - s.log_softmax(dim=-1))).sum(dim=-1)
    if mask_N is None:
        return kl_N.mean()
    mask_N = mask_N.bool()
    return (kl_N * mask_N).sum() / mask_N.sum().clamp(min=1)


class _ChunkedKL(torch.autograd.Function):
    """Sum over rows of KL(softmax(h_t W_t^T / T) || softmax(h_s W_s^T / T)), logits made chunk by chunk.

    The gradient is computed in the forward pass (as fused linear cross-entropy kernels do): for one row,
    d KL / d s_logits = (softmax(s / T) - softmax(t / T)) / T, so each chunk's logits are used once and freed, and
    only d hidden [M, D] and d W [V, D] (fp32) are kept for backward. Matmuls run in the inputs' dtype (bf16 under
    autocast), softmaxes and the KL in fp32.
    """

    @staticmethod
    def forward(ctx, s_hidden_MD, s_weight_VD, t_hidden_MD, t_weight_VD, temperature, chunk):
        m = s_hidden_MD.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_hidden = torch.zeros_like(s_hidden_MD) if need_h else None
        acc = torch.promote_types(s_hidden_MD.dtype, torch.float32)
        d_weight = torch.zeros(s_weight_VD.shape, dtype=acc, device=s_weight_VD.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=s_hidden_MD.device)
        with torch.autocast(s_hidden_MD.device.type, enabled=False):
            for a in range(0, m, chunk):
                hs = s_hidden_MD[a : a + chunk]
                s = (hs @ s_weight_VD.t()).to(acc) / temperature
                t = (t_hidden_MD[a : a + chunk] @ t_weight_VD.t()).to(acc) / temperature
                t_logp = t.log_softmax(dim=-1)
                s_logp = s.log_softmax(dim=-1)
                t_p = t_logp.exp()
                total += (t_p * (t_logp - s_logp)).sum()
                if need_h or need_w:
                    g = ((s_logp.exp() - t_p) / temperature).to(hs.dtype)  # d KL / d student logits [chunk, V]
                    if need_h:
                        d_hidden[a : a + chunk] = g @ s_weight_VD
                    if need_w:
                        d_weight += (g.t() @ hs).to(acc)
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = s_weight_VD.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        d_hidden, d_weight = ctx.saved_tensors
        gh = (d_hidden * grad_total).to(d_hidden.dtype) if d_hidden is not None else None
        gw = (d_weight * grad_total).to(ctx.weight_dtype) if d_weight is not None else None
        return gh, gw, None, None, None, None


def chunked_distill_kl(
    student_hidden_ND: torch.Tensor,
    student_weight_VD: torch.Tensor,
    teacher_hidden_ND: torch.Tensor,
    teacher_weight_VD: torch.Tensor,
    temperature: float,
    mask_N: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """distill_kl(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, temperature, mask) without
    ever holding the [N, V] logits: the masked rows are gathered and processed chunk_size rows at a time.

    student_hidden_ND [N, Ds] and teacher_hidden_ND [N, Dt] are the models' final-norm hidden states of the same
    token rows (the two widths may differ); the weights [V, Ds] / [V, Dt] are their output heads and must share
    the vocabulary. Gradients flow to the student's hidden states and head; the teacher side is treated as constant.
    Peak extra memory: a few [chunk_size, V] fp32 buffers plus an fp32 [V, Ds] head gradient.
    """
    if student_weight_VD.shape[0] != teacher_weight_VD.shape[0]:
        raise ValueError(
            f"student and teacher vocabularies differ: {student_weight_VD.shape[0]} vs {teacher_weight_VD.shape[0]}"
        )
    if mask_N is not None:
        idx = mask_N.bool().nonzero(as_tuple=True)[0]
        student_hidden_ND, teacher_hidden_ND = student_hidden_ND[idx], teacher_hidden_ND[idx]
    count = student_hidden_ND.shape[0]
    if count == 0:
        return (student_hidden_ND.sum() + student_weight_VD.sum()) * 0.0  # keeps the graph; no rows, no loss
    total = _ChunkedKL.apply(
        student_hidden_ND,
        student_weight_VD.to(student_hidden_ND.dtype),
        teacher_hidden_ND.detach().to(student_hidden_ND.dtype),
        teacher_weight_VD.detach().to(student_hidden_ND.dtype),
        float(temperature),
        int(chunk_size),
    )
    return total / count


def tag_weights(ids_BT: torch.Tensor, tag_id_sequences: Sequence[Sequence[int]], weight: float = 10.0) -> torch.Tensor:
    """Per-position weights [B, T] (fp32): `weight` on every token of every occurrence of one of the tag id
    sequences in ids_BT, 1.0 elsewhere.

    A tag such as `<think>` is often several tokens (`<`, `think`, `>` with the shipped tokenizer); matching whole
    sequences weighs exactly the tag occurrences and not every `<` or `>` elsewhere in the text (MiniMind marks every
    position whose id is among the tags' ids). Pass labels (ignored positions hold -100 and never match) to restrict
    the weights to trained tokens.
    """
    b, t = ids_BT.shape
    hit_BT = torch.zeros(b, t, dtype=torch.bool, device=ids_BT.device)
    for seq in tag_id_sequences:
        m = len(seq)
        if m == 0 or m > t:
            continue
        pat = torch.as_tensor(list(seq), dtype=ids_BT.dtype, device=ids_BT.device)
        match_BJ = (ids_BT.unfold(1, m, 1) == pat).all(dim=-1)  # [B, T - m + 1]: occurrence starting at j
        for k in range(m):
            hit_BT[:, k : k + match_BJ.shape[1]] |= match_BJ
    return 1.0 + hit_BT.to(torch.float32) * (float(weight) - 1.0)


# RL
# Policy-gradient maths of train/ppo.py, train/grpo.py and train/spo.py. Shapes: N rollout rows, R completion
# tokens; every [N, R] input comes with a completion mask (1 on the tokens that count, 0 after the first eos).


def masked_mean(x_NR: torch.Tensor, mask_NR: torch.Tensor) -> torch.Tensor:
    """Mean of x over the masked tokens of the whole batch (0 when the mask is empty)."""
    return (x_NR * mask_NR).sum() / mask_NR.sum().clamp(min=1)


def sequence_token_mean(x_NR: torch.Tensor, mask_NR: torch.Tensor) -> torch.Tensor:
    """Token mean within each row, then the mean over rows (GRPO's 1/G sum_i 1/|o_i| sum_t)."""
    return ((x_NR * mask_NR).sum(dim=1) / mask_NR.sum(dim=1).clamp(min=1)).mean()


def k3_kl(logp_NR: torch.Tensor, ref_logp_NR: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate to the reference, exp(ref - pi) - (ref - pi) - 1 >= 0 (Schulman 2020, "Approximating
    KL divergence", k3; the estimator of DeepSeekMath, Shao et al. 2024, eq. 4)."""
    d = ref_logp_NR - logp_NR
    return torch.exp(d) - d - 1


def group_advantages(rewards_N: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024, sec. 4.1.2): (r - mean_g) / (std_g + eps) within each group of
    group_size consecutive rows; std is the population std (unbiased=False, as MiniMind). -> [N]."""
    g = rewards_N.float().view(-1, group_size)
    adv = (g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1)


def clipped_surrogate(
    logp_NR: torch.Tensor, old_logp_NR: torch.Tensor, adv: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped objective to MINIMISE (Schulman et al. 2017, eq. 7, negated):
    -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), ratio = exp(logp - old_logp). adv is [N, R] or [N] (one
    advantage per row). -> (loss [N, R], clipped [N, R] bool: the tokens where the clipped term was the smaller)."""
    if adv.dim() == 1:
        adv = adv[:, None]
    ratio = torch.exp(logp_NR - old_logp_NR)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip) * adv
    return -torch.min(unclipped, clipped), clipped < unclipped


def clip_fraction(logp_NR: torch.Tensor, old_logp_NR: torch.Tensor, mask_NR: torch.Tensor, clip: float) -> torch.Tensor:
    """Share of masked tokens whose ratio left [1 - clip, 1 + clip]."""
    out = ((torch.exp(logp_NR - old_logp_NR) - 1).abs() > clip).float()
    return masked_mean(out, mask_NR)


def approx_kl(logp_NR: torch.Tensor, old_logp_NR: torch.Tensor, mask_NR: torch.Tensor) -> torch.Tensor:
    """0.5 * mean (log ratio)^2 over masked tokens: the approximate KL(old || new) that PPO's early stop watches."""
    return masked_mean(0.5 * (logp_NR - old_logp_NR) ** 2, mask_NR)


def grpo_loss(
    logp_NR: torch.Tensor,
    old_logp_NR: torch.Tensor,
    ref_logp_NR: torch.Tensor,
    adv_N: torch.Tensor,
    mask_NR: torch.Tensor,
    clip: float = 0.2,
    beta: float = 0.02,
) -> torch.Tensor:
    """GRPO objective (Shao et al. 2024, eq. 3), negated: per token -(min(r A, clip(r) A) - beta * k3 KL), the
    token mean within each completion, then the mean over completions."""
    surrogate, _ = clipped_surrogate(logp_NR, old_logp_NR, adv_N, clip)
    return sequence_token_mean(surrogate + beta * k3_kl(logp_NR, ref_logp_NR), mask_NR)


def cispo_loss(
    logp_NR: torch.Tensor,
    old_logp_NR: torch.Tensor,
    ref_logp_NR: torch.Tensor,
    adv_N: torch.Tensor,
    mask_NR: torch.Tensor,
    epsilon_high: float = 5.0,
    beta: float = 0.02,
) -> torch.Tensor:
    """CISPO, clipped IS-weight policy optimization (MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently
    with Lightning Attention", arXiv:2506.13585, sec. 3.1, the J_CISPO objective), negated, as MiniMind's trainer
    computes it. Per token:

        w = sg(min(ratio, epsilon_high)),  ratio = exp(logp - old_logp)
        loss = -(w * A * logp - beta * k3 KL(logp, ref))

    sg = stop-gradient: the weight is clamped and detached, so d loss / d logp = -w * A + beta * d k3 / d logp and
    every token keeps a gradient (PPO's clip instead zeroes it outside [1 - eps, 1 + eps]). As in MiniMind, this
    departs from the paper's J_CISPO: only the upper clamp (the paper clips to [1 - eps_low, 1 + eps_high]), and
    grpo_loss's k3 KL term and reduction (the token mean within each completion, then the mean over completions,
    where J_CISPO has no KL term and divides by the group's total token count), so the two losses differ only in the
    per-token policy term. The value is not comparable to grpo_loss's (A * logp, not ratio * A); at ratio 1 the
    gradients are the same. adv is [N] (one advantage per completion) or [N, R]."""
    adv = adv_N[:, None] if adv_N.dim() == 1 else adv_N
    w = torch.clamp(torch.exp(logp_NR - old_logp_NR), max=epsilon_high).detach()
    per_token = -(w * adv * logp_NR) + beta * k3_kl(logp_NR, ref_logp_NR)
    return sequence_token_mean(per_token, mask_NR)


def upper_clip_fraction(
    logp_NR: torch.Tensor, old_logp_NR: torch.Tensor, mask_NR: torch.Tensor, epsilon_high: float
) -> torch.Tensor:
    """Share of masked tokens whose ratio exceeded epsilon_high: those whose CISPO weight was clamped."""
    return masked_mean((torch.exp(logp_NR - old_logp_NR) > epsilon_high).float(), mask_NR)


def spo_loss(
    logp_NR: torch.Tensor, ref_logp_NR: torch.Tensor, adv_N: torch.Tensor, mask_NR: torch.Tensor, beta: float = 0.02
) -> torch.Tensor:
    """SPO policy loss (MiniMind's single-stream variant): per token -logp * A + beta * k3 KL, token mean within each
    completion, then the mean over completions."""
    per_token = -logp_NR * adv_N[:, None] + beta * k3_kl(logp_NR, ref_logp_NR)
    return sequence_token_mean(per_token, mask_NR)


def kl_penalised_rewards(
    rewards_N: torch.Tensor, logp_NR: torch.Tensor, ref_logp_NR: torch.Tensor, mask_NR: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """PPO's per-token rewards (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", eq. 2;
    Ouyang et al. 2022, eq. 2): -kl_coef * (logp - ref_logp) on every completion token, plus the sequence reward on
    its last masked token. Rows with an empty mask get nothing. -> [N, R]."""
    token_r = -kl_coef * (logp_NR - ref_logp_NR) * mask_NR
    lengths = mask_NR.sum(dim=1).long()
    rows = torch.nonzero(lengths > 0, as_tuple=True)[0]
    token_r[rows, lengths[rows] - 1] += rewards_N[rows].to(token_r.dtype)
    return token_r


def gae(
    token_rewards_NR: torch.Tensor,
    values_NR: torch.Tensor,
    mask_NR: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE",
    eq. 16): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V and A zero past each
    row's last masked token (the episode ends there). -> (advantages [N, R], returns = A + V [N, R]), 0 off mask."""
    n, r = token_rewards_NR.shape
    values = values_NR * mask_NR
    adv = torch.zeros_like(token_rewards_NR)
    next_adv = torch.zeros(n, dtype=token_rewards_NR.dtype, device=token_rewards_NR.device)
    next_value = torch.zeros_like(next_adv)
    for t in reversed(range(r)):
        delta = token_rewards_NR[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask_NR[:, t]
        adv[:, t] = next_adv
        next_value = values[:, t]
    return adv, (adv + values) * mask_NR


def whiten(x_NR: torch.Tensor, mask_NR: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked tokens of the batch, 0 off mask (PPO's advantage normalisation)."""
    mean = masked_mean(x_NR, mask_NR)
    var = masked_mean((x_NR - mean) ** 2, mask_NR)
    return (x_NR - mean) * torch.rsqrt(var + eps) * mask_NR


def clipped_value_loss(
    values_NR: torch.Tensor, old_values_NR: torch.Tensor, returns_NR: torch.Tensor, mask_NR: torch.Tensor, clip: float
) -> torch.Tensor:
    """0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), mean over masked tokens (the value clipping of
    the PPO reference implementation, Dhariwal et al. 2017, OpenAI baselines ppo2)."""
    v_clipped = old_values_NR + torch.clamp(values_NR - old_values_NR, -clip, clip)
    err = torch.max((values_NR - returns_NR) ** 2, (v_clipped - returns_NR) ** 2)
    return 0.5 * masked_mean(err, mask_NR)
