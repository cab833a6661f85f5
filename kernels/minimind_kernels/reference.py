"""Pure-PyTorch reference of every op the model uses.

This file is the spec of each op, the CPU fallback, the oracle the kernel tests compare against and the baseline the
benchmarks time. Every kernel in minimind_kernels/<op>.py has exactly the signature of its function here.

Shape legend: B batch, T sequence, H query heads, Hkv key/value heads, D head_dim (or hidden in norms), D2 = D // 2,
N tokens (B*T flattened), V vocab, E experts, K experts per token, F expert FFN width.

Dtype rule shared by all implementations: the output has the dtype of the first activation argument; internal
reductions (norms, softmax, log-sum-exp) run in fp32. Weights may be fp32 while activations are bf16 (autocast);
the ops accept that mix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """y = (x / sqrt(mean(x^2) + eps)) * weight over the last dim.

    Follows MiniMind / HF Llama: the normalisation runs in fp32, is cast back to x's dtype, then times the weight
    (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", eq. 4, without the bias).
    """
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed * weight).to(x.dtype)


def add_rmsnorm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add fused with the next norm: h = x + delta; returns (h, rmsnorm(h)). h has x's dtype."""
    h = (x + delta).to(x.dtype)
    return h, rmsnorm(h, weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Non-interleaved "rotate-half" layout (HF Llama): pair (i, i + D/2) rotates by angle theta_i.
    # RoFormer (Su et al. 2021) eq. 34, with the halves as the two coordinates of each pair.
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2].float(), x[..., d2:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope(
    q_BTHD: torch.Tensor, k_BTHkvD: torch.Tensor, cos_TD2: torch.Tensor, sin_TD2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding applied to q and k.

    q [B, T, H, D], k [B, T, Hkv, D]; cos/sin [T, D/2] (one row per position, already offset for a KV cache) or
    [B, T, D/2] (per-sequence positions, e.g. left padding). Tables are fp32; the rotation is computed in fp32 and
    cast back to q's dtype.
    """
    if cos_TD2.dim() == 2:
        cos, sin = cos_TD2[None, :, None, :], sin_TD2[None, :, None, :]
    else:
        cos, sin = cos_TD2[:, :, None, :], sin_TD2[:, :, None, :]
    cos, sin = cos.float(), sin.float()
    return _rotate(q_BTHD, cos, sin), _rotate(k_BTHkvD, cos, sin)


def qk_norm_rope(
    q_BTHD: torch.Tensor,
    k_BTHkvD: torch.Tensor,
    q_weight_D: torch.Tensor,
    k_weight_D: torch.Tensor,
    eps: float,
    cos_TD2: torch.Tensor,
    sin_TD2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """QK-norm then rotary embedding (MiniMind-3 / Qwen3 attention): each query head and each key head is
    RMS-normalised over head_dim with its own learned gain (q_weight [D] shared by the query heads, k_weight [D] by
    the key heads), then rotated as rope() does. Shapes and tables as in rope(); the result has q's dtype.

    Defined as exactly rope(rmsnorm(q, q_weight, eps), rmsnorm(k, k_weight, eps), cos, sin): a fused kernel computes
    both in fp32 and rounds once, which is no less accurate."""
    return rope(rmsnorm(q_BTHD, q_weight_D, eps), rmsnorm(k_BTHkvD, k_weight_D, eps), cos_TD2, sin_TD2)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Shazeer 2020, "GLU Variants Improve Transformer", FFN_SwiGLU without the projections)."""
    return (F.silu(gate) * up).to(gate.dtype)


def linear_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_N: torch.Tensor,
    ignore_index: int = -100,
    token_weight_N: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of softmax(hidden @ weight.T) against labels, without bias.

    reduction:
      "mean": sum_i w_i * loss_i / (number of non-ignored labels)   (w_i = 1 when token_weight is None; the
              denominator does not include the weights, as in MiniMind's reasoning-distillation loss)
      "sum":  sum_i w_i * loss_i
      "none": loss_i per token [N] in fp32, 0 at ignored positions (so -loss_i is the token's log-prob).
    Logits are computed in the dtype of the inputs (bf16 under autocast) and the softmax in fp32.
    This reference materialises the full [N, V] logits; the fused kernel does not.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    # fp32 softmax for fp32/bf16 inputs; float64 inputs stay float64 (the tests' truth).
    logits = hidden_ND @ weight_VD.to(hidden_ND.dtype).t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits, labels_N, ignore_index=ignore_index, reduction="none")
    if token_weight_N is not None:
        loss = loss * token_weight_N.to(loss.dtype)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    count = (labels_N != ignore_index).sum().clamp(min=1)
    return total / count


def moe_experts(
    x_ND: torch.Tensor,
    topk_idx_NK: torch.Tensor,
    topk_weight_NK: torch.Tensor,
    w_gate_EFD: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts: y_n = sum_k topk_weight[n,k] * FFN_{topk_idx[n,k]}(x_n).

    FFN_e(x) = (silu(x @ w_gate[e].T) * (x @ w_up[e].T)) @ w_down[e].T. This is the per-expert Python loop of the
    reference MiniMind trainer (it syncs with the host on every expert); kernels/moe.py sorts tokens by expert on the
    device and runs grouped GEMMs instead. Every expert runs, even on zero tokens, so all expert weights get a
    (possibly zero) gradient.
    """
    n, d = x_ND.shape
    k = topk_idx_NK.shape[1]
    flat_idx = topk_idx_NK.reshape(-1)
    flat_w = topk_weight_NK.reshape(-1, 1)
    x_rep = x_ND.repeat_interleave(k, dim=0)  # row n*K + j is token n for its j-th pick
    y = torch.zeros(n * k, d, dtype=x_ND.dtype, device=x_ND.device)
    for e in range(w_gate_EFD.shape[0]):
        rows = (flat_idx == e).nonzero(as_tuple=True)[0]
        xe = x_rep[rows]
        he = F.silu(xe @ w_gate_EFD[e].to(xe.dtype).t()) * (xe @ w_up_EFD[e].to(xe.dtype).t())
        ye = (he @ w_down_EDF[e].to(xe.dtype).t()) * flat_w[rows].to(xe.dtype)
        y = y.index_copy(0, rows, ye.to(y.dtype))
    return y.view(n, k, d).sum(dim=1)


def attention(
    q_BHTD: torch.Tensor,
    k_BHkvSD: torch.Tensor,
    v_BHkvSD: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = True,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads (H a multiple of Hkv), scale 1/sqrt(D).

    attn_mask (bool, True = attend) [B or 1, 1, T, S] overrides is_causal when given (KV cache, left padding).
    K/V heads are not copied per query head: SDPA's enable_gqa handles the grouping.
    """
    if attn_mask is not None:
        return F.scaled_dot_product_attention(q_BHTD, k_BHkvSD, v_BHkvSD, attn_mask=attn_mask, enable_gqa=True)
    return F.scaled_dot_product_attention(q_BHTD, k_BHkvSD, v_BHkvSD, is_causal=is_causal, enable_gqa=True)
