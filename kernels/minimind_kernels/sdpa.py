"""Attention through one chosen backend of PyTorch's scaled_dot_product_attention, for comparing them.

reference.attention lets SDPA pick its backend for each call (flash, cuDNN, memory-efficient or math, by what the
inputs allow). The functions here take exactly reference.attention's arguments and force one backend through
torch.nn.attention.sdpa_kernel, which torch.compile traces without a graph break. Select one with a per-op override of
the kernels spec, e.g. `--kernels triton,attention=cudnn`; the kernel bench (bench/bench_kernels.py) times each of them
beside SDPA's own choice, so the default can follow a measurement.

A backend that cannot take the inputs (flash on a CPU, cuDNN without CUDA, an unsupported dtype or head size) raises
PyTorch's own error at the first call ("No available kernel"); nothing falls back silently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def _attention(
    backend: SDPBackend,
    q_BHTD: torch.Tensor,
    k_BHkvSD: torch.Tensor,
    v_BHkvSD: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
) -> torch.Tensor:
    with sdpa_kernel([backend]):
        if attn_mask is not None:
            return F.scaled_dot_product_attention(q_BHTD, k_BHkvSD, v_BHkvSD, attn_mask=attn_mask, enable_gqa=True)
        return F.scaled_dot_product_attention(q_BHTD, k_BHkvSD, v_BHkvSD, is_causal=is_causal, enable_gqa=True)


def attention_flash(q_BHTD, k_BHkvSD, v_BHkvSD, attn_mask=None, is_causal=True) -> torch.Tensor:
    """FlashAttention-2 kernels (CUDA, fp16/bf16)."""
    return _attention(SDPBackend.FLASH_ATTENTION, q_BHTD, k_BHkvSD, v_BHkvSD, attn_mask, is_causal)


def attention_cudnn(q_BHTD, k_BHkvSD, v_BHkvSD, attn_mask=None, is_causal=True) -> torch.Tensor:
    """cuDNN's fused attention (CUDA, sm_80 and newer)."""
    return _attention(SDPBackend.CUDNN_ATTENTION, q_BHTD, k_BHkvSD, v_BHkvSD, attn_mask, is_causal)


def attention_efficient(q_BHTD, k_BHkvSD, v_BHkvSD, attn_mask=None, is_causal=True) -> torch.Tensor:
    """The memory-efficient kernels (CUDA)."""
    return _attention(SDPBackend.EFFICIENT_ATTENTION, q_BHTD, k_BHkvSD, v_BHkvSD, attn_mask, is_causal)


def attention_math(q_BHTD, k_BHkvSD, v_BHkvSD, attn_mask=None, is_causal=True) -> torch.Tensor:
    """The unfused math path (any device, any dtype): the slow, exact baseline."""
    return _attention(SDPBackend.MATH, q_BHTD, k_BHkvSD, v_BHkvSD, attn_mask, is_causal)
