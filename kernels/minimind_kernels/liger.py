"""Liger-Kernel behind our op signatures, as the "liger" family of the registry (a baseline to compare against).

Each function has exactly the signature of its reference.py counterpart; the Liger op it calls (checked against
liger-kernel 0.8.5):
  rmsnorm               LigerRMSNormFunction, casting mode "llama" (rstd in fp32, normalised row cast back to x's
                        dtype, then times the weight: the reference's rule), offset 0, in_place=False (Liger's default
                        writes dx into the incoming gradient).
  add_rmsnorm           LigerFusedAddRMSNormFunction, same settings; Liger returns (norm, sum), we return (sum, norm).
  rope                  LigerRopeFunction. Liger takes q/k as [B, H, T, D] and cos/sin as full-width [T, D] or
                        [B, T, D]; it transposes back to [B, T, H, D] internally, so our [B, T, H, D] tensors go in as
                        transposed views (no copy), and our half-width [T, D/2] / [B, T, D/2] tables go in unchanged
                        with rotary_dim = D (Liger reads the first rotary_dim / 2 entries of each row).
  swiglu                LigerSiLUMulFunction (silu(a) * b).
  linear_cross_entropy  LigerFusedLinearCrossEntropyFunction, accum_dtype fp32 (dW summed over token chunks in
                        fp32). "mean" runs as Liger's "sum" divided by the number of non-ignored labels clamped to 1,
                        so an all-ignored batch gives 0 like the reference instead of 0/0. Liger has no per-token
                        weights (its ce_weight weighs classes): with token_weight_N, and for "none" on a Liger older
                        than the 0.8.5 checked here, the call goes to our fused kernel (linear_ce.py) when it
                        imports, else to minimind_kernels.reference.
Liger works in place where it can: rope overwrites q and k (and, in backward, the incoming gradients) when they are
contiguous in [B, T, H, D], and swiglu's backward overwrites the saved gate and up with their gradients. The model
never reads those tensors again, but a caller that does must pass copies.

Liger's rms_norm, fused add rms_norm and swiglu kernels do not run in Triton's CPU interpreter (they call `.to` on
scalar arguments, which the interpreter passes as Python floats); rope and fused linear cross-entropy do.
"""

from __future__ import annotations

import importlib.metadata

import torch
from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
from liger_kernel.ops.rms_norm import LigerRMSNormFunction
from liger_kernel.ops.rope import LigerRopeFunction
from liger_kernel.ops.swiglu import LigerSiLUMulFunction

try:
    from minimind_kernels.linear_ce import linear_cross_entropy as _ce_fallback
except ImportError:
    from minimind_kernels.reference import linear_cross_entropy as _ce_fallback


def _liger_version() -> tuple[int, ...]:
    try:
        text = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:  # importable without its metadata: assume the oldest behaviour
        return (0,)
    return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


# reduction="none" with a correct backward (per-token upstream gradient) is verified from this version on
_LIGER_HAS_NONE = _liger_version() >= (0, 8, 5)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)


def add_rmsnorm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    normed, h = LigerFusedAddRMSNormFunction.apply(x, delta, weight, eps, 0.0, "llama", False)
    return h, normed


def rope(
    q_BTHD: torch.Tensor, k_BTHkvD: torch.Tensor, cos_TD2: torch.Tensor, sin_TD2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    head_dim = q_BTHD.shape[-1]
    q_BHTD, k_BHkvTD = LigerRopeFunction.apply(
        q_BTHD.transpose(1, 2), k_BTHkvD.transpose(1, 2), cos_TD2.float(), sin_TD2.float(), None, 1, head_dim
    )
    return q_BHTD.transpose(1, 2), k_BHkvTD.transpose(1, 2)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return LigerSiLUMulFunction.apply(gate, up)


def linear_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_N: torch.Tensor,
    ignore_index: int = -100,
    token_weight_N: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if token_weight_N is not None or (reduction == "none" and not _LIGER_HAS_NONE):
        return _ce_fallback(hidden_ND, weight_VD, labels_N, ignore_index, token_weight_N, reduction)
    weight = weight_VD.to(hidden_ND.dtype)  # logits in the activations' dtype, as in the reference
    liger_reduction = "sum" if reduction == "mean" else reduction
    # Liger's default accum_dtype keeps the weight's dtype: bf16 sums of dW over chunks under autocast
    loss = LigerFusedLinearCrossEntropyFunction.apply(
        hidden_ND, weight, labels_N, None, None, ignore_index, 0.0, 0.0, liger_reduction, None, False, torch.float32
    )[0]
    if reduction == "mean":
        loss = loss / (labels_N != ignore_index).sum().clamp(min=1)
    return loss
