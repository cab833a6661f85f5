"""The two ops where MiniMind2's own model computes differently from our torch reference, written as it computes them,
so `bench/e2e.py --baseline minimind` measures MiniMind's trainer and not a slower or faster stand-in.

Read from MiniMind2's model/model_minimind.py (commit 83e52f6):
- MOEFeedForward.forward, training branch: every token is repeated top-k times; for each expert, a boolean mask of
  the rows routed to it selects them, the expert's SwiGLU runs on them, and the result is written back in place into
  one preallocated buffer (y[mask] = out); an expert that got no row adds 0 * (sum of its weights) so that it still
  gets a gradient; after the loop the rows are weighted by their routing weights and summed over the top-k picks.
- Attention.forward: the K/V heads are repeated to the number of query heads (repeat_kv, a copy) before
  F.scaled_dot_product_attention(..., is_causal=True).

The rest of MiniMind's forward (RMSNorm, RoPE, SwiGLU, the LM head and cross-entropy over full logits) is what our
torch reference ops already do. Our reference moe_experts differs on purpose (index_copy out of place, weights applied
per expert); it is the readable reference for the kernels, not a model of MiniMind's cost.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

import minimind_kernels as kernels


def moe_experts(
    x_ND: torch.Tensor,
    topk_idx_NK: torch.Tensor,
    topk_weight_NK: torch.Tensor,
    w_gate_EFD: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts the way MiniMind2 trains them (see the module docstring); same result as
    minimind_kernels.reference.moe_experts."""
    n, d = x_ND.shape
    k = topk_idx_NK.shape[1]
    flat_idx = topk_idx_NK.reshape(-1)
    x_rep = x_ND.repeat_interleave(k, dim=0)
    y = torch.empty_like(x_rep)
    # MiniMind keeps one nn.Linear per expert; unbind gives the same per-expert views of our stacked weights, with a
    # backward that stacks the expert gradients once (indexing w[e] in the loop would allocate a full-size gradient
    # per expert, a cost MiniMind does not have).
    gates, ups, downs = w_gate_EFD.unbind(0), w_up_EFD.unbind(0), w_down_EDF.unbind(0)
    for e in range(len(gates)):
        mask = flat_idx == e
        xe = x_rep[mask]
        out = F.linear(F.silu(F.linear(xe, gates[e])) * F.linear(xe, ups[e]), downs[e])
        if out.shape[0] == 0:  # as MiniMind: a zero that still reaches the idle expert's weights
            out = out + 0 * (gates[e].sum() + ups[e].sum() + downs[e].sum())
        y[mask] = out.to(y.dtype)
    return (y.view(n, k, d) * topk_weight_NK.unsqueeze(-1).to(y.dtype)).sum(dim=1)


def attention(
    q_BHTD: torch.Tensor,
    k_BHkvSD: torch.Tensor,
    v_BHkvSD: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = True,
) -> torch.Tensor:
    """MiniMind2's training attention: K/V heads copied to the query heads, then SDPA (causal when no mask)."""
    rep = q_BHTD.shape[1] // k_BHkvSD.shape[1]
    b, hkv, s, dh = k_BHkvSD.shape
    k = k_BHkvSD[:, :, None].expand(b, hkv, rep, s, dh).reshape(b, hkv * rep, s, dh)
    v = v_BHkvSD[:, :, None].expand(b, hkv, rep, s, dh).reshape(b, hkv * rep, s, dh)
    if attn_mask is not None:
        return F.scaled_dot_product_attention(q_BHTD, k, v, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q_BHTD, k, v, is_causal=is_causal)


def ops() -> kernels.Ops:
    """Our torch reference ops with MiniMind's MoE loop and attention in place of ours."""
    base = kernels.resolve("torch")
    impl = {**base.impl, "moe_experts": "minimind loop", "attention": "minimind repeat_kv"}
    return dataclasses.replace(base, moe_experts=moe_experts, attention=attention, impl=impl, spec="minimind")
