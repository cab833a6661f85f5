"""Ops that train faster on a CPU than their reference.py form, with exactly reference.py's signatures.

Shape legend: B batch, T query positions, S key positions, H query heads, Hkv key/value heads, D head_dim.

attention: causal training attention in bf16 (CPU autocast) runs PyTorch's CPU flash-attention forward in bf16 and its
backward in fp32. The same flash backward is slower on bf16 inputs than on fp32 ones (on a 2-core Xeon with AMX, at
tiny's 4 x 8 heads x 256 x 32: 6.3-6.8 ms in bf16, 3.7 ms in fp32; the whole tiny training step 109 -> 96 ms). The
backward gets the forward's bf16 output and its fp32 log-sum-exp, upcasts q, k, v, output and output gradient, and
rounds the three gradients back to their inputs' dtype: the same gradient formula (Dao et al. 2022,
"FlashAttention", Algorithm 4) with fp32 arithmetic throughout, so no less accurate than the bf16 backward.
Everything else (a mask, no causal mask, fp32 or fp64 inputs, no gradient wanted, torch.compile tracing) goes to
reference.attention unchanged.
"""

from __future__ import annotations

import torch

from minimind_kernels import reference


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
        and q_BHTD.device.type == "cpu"
        and q_BHTD.dtype in (torch.bfloat16, torch.float16)
        and q_BHTD.dtype == k_BHkvSD.dtype == v_BHkvSD.dtype
        and q_BHTD.shape[-2] == k_BHkvSD.shape[-2]  # causal over equal lengths, as in training
        and torch.is_grad_enabled()
        and (q_BHTD.requires_grad or k_BHkvSD.requires_grad or v_BHkvSD.requires_grad)
        and not torch.compiler.is_compiling()
    )
    if not fast:
        return reference.attention(q_BHTD, k_BHkvSD, v_BHkvSD, attn_mask=attn_mask, is_causal=is_causal)
    with torch.autocast("cpu", enabled=False):  # the inputs' dtype decides, as reference.attention's SDPA call
        return _CausalFlashFp32Backward.apply(q_BHTD, k_BHkvSD, v_BHkvSD)
