"""Routed MoE experts through torch._grouped_mm, to compare with our Triton grouped GEMMs (minimind_kernels/moe.py).

Same op and signature as reference.moe_experts; select it with a per-op override, `--kernels triton,moe_experts=grouped`
(or `torch,moe_experts=grouped`). torch._grouped_mm is the grouped GEMM that torchtitan's MoE layers call; here it
does the three expert projections, and everything around it is plain PyTorch:

 1. routing, on the device with no host synchronisation: a stable argsort of the M = N*K (token, slot) pairs by
    expert id; per-expert row counts by a scatter-add of ones (a counting pass, no bincount: that one syncs on CUDA);
    offs = their int32 cumulative sum, the end row of each expert's group in the sorted order.
 2. x rows gathered in that order (row p of the sorted pairs is token order[p] // K);
    G = grouped_mm(x_sorted, Wg^T), U = grouped_mm(x_sorted, Wu^T), H = silu(G) * U, O = grouped_mm(H, Wd^T).
 3. combine: O back in pair order (a gather through the inverse permutation), times topk_weight, summed over the K
    slots of each token (no atomics in the forward).
Autograd is torch's own derivative of _grouped_mm (a grouped GEMM for the input gradient, a 2-D x 2-D grouped GEMM over
the same offs for the weight gradient) and of the ops around it.

Expert ids outside [0, E) contribute nothing, as in the reference: such a pair is routed to expert 0 with its weight
replaced by 0 (torch.where), so its output term and every gradient through it are exactly zero (the pair's
topk_weight gradient included), and offs[-1] = M always (no rows past the last group, which _grouped_mm would leave
unwritten). An expert with no rows gets an exactly zero weight gradient whatever the backend writes for an empty
group (its gradient is masked by its row count).

Constraints of torch._grouped_mm (from PyTorch's aten/src/ATen/native/cuda/GroupedBlas.cpp _grouped_mm_cuda and
aten/src/ATen/native/GroupedMMUtils.h, main branch; the CPU behaviour checked on torch 2.13), which this module checks
up front (cannot_run) and reports in a one-line error:
  - dtypes: bf16, fp16 or fp32 operands, output in the operands' dtype; no fp64 (the tests' fp64 truth runs the
    reference instead).
  - CUDA: only bf16 on compute capability 9.x or 10.x (H100/H200, B200) takes the CUTLASS kernel. Anything else takes
    _grouped_mm_fallback, a loop of mm over the groups that first copies offs to the host (a device sync per call),
    which this module refuses to run (our no-host-sync rule): bf16 on sm_90/sm_100 or nothing.
  - CUDA: every operand's data pointer and leading stride 16-byte aligned (TMA): with bf16, D and F multiples of 8.
  - Strides: each operand must be row- or column-major in its last two dims, gradients included: torch's derivative
    rejects a stride-0 (expanded) output gradient, such as .sum() produces when it directly follows a _grouped_mm
    (seen on a CPU in fp32 and bf16). Here the ops after each _grouped_mm already hand on dense gradients; the
    incoming gradient is made contiguous anyway (_ContiguousGrad, free when it already is), so that no graph around
    the op (torch.compile's included) can hand it a layout the derivative refuses.
  - CPU: fp32, bf16 and fp16 run (a loop of mm per group, no sync issue on a CPU); this is what the tests check.
  - torch.compile: _grouped_mm's meta function accepts bf16 only, so compiled graphs need bf16 (autocast) inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def cannot_run(device: torch.device, dtype: torch.dtype, d: int | None = None, f: int | None = None) -> str:
    """Why moe_experts cannot run on `device` at `dtype` (with hidden size d and expert width f when given), or ''."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if device.type == "cpu":
        return "" if dtype in _DTYPES else f"torch._grouped_mm takes bf16, fp16 or fp32, not {dtype}"
    if device.type != "cuda":
        return f"torch._grouped_mm runs on CUDA and CPU tensors, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return (
            f"torch._grouped_mm's grouped kernel needs compute capability 9.x or 10.x (this GPU is {major}.{minor}); "
            "its fallback syncs with the host"
        )
    if dtype != torch.bfloat16:
        return f"torch._grouped_mm's grouped kernel takes bf16 only on CUDA (got {dtype}; use bf16 autocast)"
    bad = [f"{name}={n}" for name, n in (("D", d), ("F", f)) if n is not None and n % 8]
    if bad:
        return (
            f"torch._grouped_mm needs 16-byte-aligned rows on CUDA: D and F multiples of 8 in bf16 ({', '.join(bad)})"
        )
    return ""


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (the derivative of _grouped_mm checks strides)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _MaskIdleGrad(torch.autograd.Function):
    """Identity on a stacked weight [E, ...] whose backward zeroes the gradient of experts with no rows."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(counts_E)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (counts_E,) = ctx.saved_tensors
        used = (counts_E > 0).view(-1, *([1] * (grad.dim() - 1)))
        return torch.where(used, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None


def _grouped_mm(a_MK: torch.Tensor, w_ENK: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Row group e of a (rows offs[e-1]:offs[e]) times w[e]^T: [M, K] x [E, N, K] -> [M, N]."""
    return _ContiguousGrad.apply(torch._grouped_mm(a_MK, w_ENK.transpose(-2, -1), offs=offs_E))


def moe_experts(
    x_ND: torch.Tensor,
    topk_idx_NK: torch.Tensor,
    topk_weight_NK: torch.Tensor,
    w_gate_EFD: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts, y_n = sum_k topk_weight[n,k] * FFN_{topk_idx[n,k]}(x_n), with torch._grouped_mm.

    See reference.moe_experts for the op and the module docstring for what _grouped_mm allows. Weights and topk_weight
    are cast to x's dtype (as the reference does); the output has x's dtype. No host synchronisation."""
    n, d = x_ND.shape
    k = topk_idx_NK.shape[1]
    e, f, _ = w_gate_EFD.shape
    dt, dev = x_ND.dtype, x_ND.device
    why = cannot_run(dev, dt, d, f)
    if why:
        raise RuntimeError(f"moe_experts=grouped cannot run here: {why}")
    m = n * k
    idx = topk_idx_NK.reshape(-1)
    valid = (idx >= 0) & (idx < e)
    idx = torch.where(valid, idx, torch.zeros_like(idx))  # out-of-range pairs ride with expert 0, at weight 0
    weight = torch.where(valid, topk_weight_NK.reshape(-1).to(dt), torch.zeros((), dtype=dt, device=dev))

    order = torch.argsort(idx, stable=True)  # sorted row -> pair
    counts = torch.zeros(e, dtype=torch.int32, device=dev).scatter_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(m, device=dev))  # pair -> sorted row

    w_gate = _MaskIdleGrad.apply(w_gate_EFD.to(dt), counts)
    w_up = _MaskIdleGrad.apply(w_up_EFD.to(dt), counts)
    w_down = _MaskIdleGrad.apply(w_down_EDF.to(dt), counts)
    x_sorted = x_ND[order // k]
    h = F.silu(_grouped_mm(x_sorted, w_gate, offs)) * _grouped_mm(x_sorted, w_up, offs)
    o_pairs = _grouped_mm(h, w_down, offs)[inverse]  # [M, D], row n*K + j is token n's j-th pick
    return (o_pairs * weight[:, None]).view(n, k, d).sum(dim=1)
