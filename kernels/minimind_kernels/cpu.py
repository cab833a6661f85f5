"""Ops that train faster on a CPU than their reference.py form, with exactly reference.py's signatures.

Shape legend: B batch, T query positions, S key positions, H query heads, Hkv key/value heads, D head_dim, N tokens,
V vocab.

Each op takes its own path only for what it was measured on: CPU tensors in training (autograd recording, not under
torch.compile), bf16 or fp16 as CPU autocast gives them. Every other call goes to reference.py unchanged.

attention: causal training attention in bf16 (CPU autocast) runs PyTorch's CPU flash-attention forward in bf16 and its
backward in fp32. The same flash backward is slower on bf16 inputs than on fp32 ones (on a 2-core Xeon with AMX, at
tiny's 4 x 8 heads x 256 x 32: 6.3-6.8 ms in bf16, 3.7 ms in fp32; the whole tiny training step 109 -> 96 ms). The
backward gets the forward's bf16 output and its fp32 log-sum-exp, upcasts q, k, v, output and output gradient, and
rounds the three gradients back to their inputs' dtype: the same gradient formula (Dao et al. 2022,
"FlashAttention", Algorithm 4) with fp32 arithmetic throughout, so no less accurate than the bf16 backward.
A mask, a non-causal call (KV cache) or unequal query/key lengths go to reference.attention.

linear_cross_entropy: the loss's gradient written out in the forward (below), for reductions mean and sum; "none"
goes to the reference. The whole tiny step 1.03x, small 1.04x (median of 12 and 6 alternating pairs, same machine);
in fp32 it measured no faster, so fp32 stays on the reference.
"""

from __future__ import annotations

import torch

from minimind_kernels import reference


def _cpu_training(*tensors: torch.Tensor) -> bool:
    """The calls the ops here were measured on (module docstring): CPU tensors of one half dtype (bf16 or fp16, as
    CPU autocast gives them), autograd recording a gradient for at least one of them, not under torch.compile."""
    first = tensors[0]
    return (
        first.device.type == "cpu"
        and first.dtype in (torch.bfloat16, torch.float16)
        and all(t.dtype == first.dtype for t in tensors)
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and not torch.compiler.is_compiling()
    )


class _CausalFlashFp32Backward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BHTD: torch.Tensor, k_BHkvSD: torch.Tensor, v_BHkvSD: torch.Tensor) -> torch.Tensor:
        out_BHTD, lse_BHT = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_BHTD, k_BHkvSD, v_BHkvSD, 0.0, True
        )
        ctx.save_for_backward(q_BHTD, k_BHkvSD, v_BHkvSD, out_BHTD, lse_BHT)
        return out_BHTD

    @staticmethod
    def backward(ctx, dout_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out, lse = ctx.saved_tensors
        f32 = torch.float32
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout_BHTD.to(f32), q.to(f32), k.to(f32), v.to(f32), out.to(f32), lse, 0.0, True
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention(
    q_BHTD: torch.Tensor,
    k_BHkvSD: torch.Tensor,
    v_BHkvSD: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = True,
) -> torch.Tensor:
    """reference.attention; causal bf16/fp16 CPU training calls take the fp32-backward path above."""
    fast = (
        attn_mask is None
        and is_causal
        and q_BHTD.shape[-2] == k_BHkvSD.shape[-2]  # causal over equal lengths, as in training
        and _cpu_training(q_BHTD, k_BHkvSD, v_BHkvSD)
    )
    if not fast:
        return reference.attention(q_BHTD, k_BHkvSD, v_BHkvSD, attn_mask=attn_mask, is_causal=is_causal)
    with torch.autocast("cpu", enabled=False):  # the inputs' dtype decides, as reference.attention's SDPA call
        return _CausalFlashFp32Backward.apply(q_BHTD, k_BHkvSD, v_BHkvSD)


# ---- linear + cross-entropy -----------------------------------------------------------------------------------------
# reference.linear_cross_entropy's loss, and its gradient written out instead of autograd's. For row i with scale s_i
# (token weight, / the count of labelled rows for "mean", 0 where ignored) and p_i = softmax(h_i W^T) computed in fp32:
#     loss = sum_i s_i * -log p_i[t_i];   dlogits_i = s_i * (p_i - onehot(t_i));   dh = dlogits W;  dW = dlogits^T h
# (the softmax cross-entropy gradient; e.g. Goodfellow et al. 2016, "Deep Learning", section 6.2.2.3). The forward
# keeps dlogits in the logits' dtype for the backward's two matmuls: no fp32 logits kept, no zero-filled one-hot
# gradient, no separate log-softmax backward pass (in a profile of the tiny bf16 step those, with the log-softmax,
# were ~20% of its time).
# Rows go in chunks of CE_CHUNK_ROWS so the fp32 log-probabilities of one chunk are the largest temporary.

CE_CHUNK_ROWS = 2048


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, ignore_index, token_weight_N, reduction):
        valid_N = labels_N != ignore_index
        scale_N = valid_N.to(torch.float32)
        if token_weight_N is not None:
            scale_N = scale_N * token_weight_N.float()
        if reduction == "mean":
            scale_N = scale_N / valid_N.sum().clamp(min=1)
        target_N = torch.where(valid_N, labels_N, 0)
        dlogits_NV = torch.empty(h_ND.shape[0], w_VD.shape[0], dtype=h_ND.dtype)
        total = torch.zeros((), dtype=torch.float32)
        for s in range(0, h_ND.shape[0], CE_CHUNK_ROWS):
            e = min(s + CE_CHUNK_ROWS, h_ND.shape[0])
            logp = torch.log_softmax((h_ND[s:e] @ w_VD.t()).float(), dim=-1)
            rows = torch.arange(e - s)
            total -= (logp[rows, target_N[s:e]] * scale_N[s:e]).sum()
            p = logp.exp_()
            p[rows, target_N[s:e]] -= 1.0
            dlogits_NV[s:e] = p.mul_(scale_N[s:e, None])  # fp32 math, one rounding (mul(out=bf16) is slower)
        ctx.save_for_backward(h_ND, w_VD, dlogits_NV)
        return total

    @staticmethod
    def backward(ctx, dloss):
        h_ND, w_VD, dlogits_NV = ctx.saved_tensors
        g = dloss.to(h_ND.dtype)
        dh = (dlogits_NV @ w_VD).mul_(g) if ctx.needs_input_grad[0] else None
        dw = (dlogits_NV.t() @ h_ND).mul_(g) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None


def linear_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_N: torch.Tensor,
    ignore_index: int = -100,
    token_weight_N: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """reference.linear_cross_entropy; bf16/fp16 CPU training calls with reduction mean or sum take the gradient
    above."""
    # in fp32 it measured no faster than the reference, so _cpu_training's half dtypes only
    if not (reduction in ("mean", "sum") and _cpu_training(hidden_ND, weight_VD)):
        return reference.linear_cross_entropy(hidden_ND, weight_VD, labels_N, ignore_index, token_weight_N, reduction)
    with torch.autocast("cpu", enabled=False):
        return _LinearCrossEntropy.apply(hidden_ND, weight_VD, labels_N, ignore_index, token_weight_N, reduction)
