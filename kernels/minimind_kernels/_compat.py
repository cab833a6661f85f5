"""Small host-side helpers shared by the Triton kernel files. Imports only torch, so any module may import it."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

# Set by plan_as_gpu(): launchers choose the tiles and grids of a GPU with this many multiprocessors even for CPU
# tensors, so that tools/compile_check.py can compile exactly the launches a GPU would make, on a machine without one.
_PLAN_AS_GPU_SMS: int | None = None


def rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] as a 2-D [N, D] tensor with unit stride along D: a view when the strides allow it, else a copy.

    Kernels index rows with one row stride, so a slice of a wider projection (row stride > D) runs without a copy.
    """
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] == 1 else x2.contiguous()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@contextlib.contextmanager
def plan_as_gpu(sm_count: int) -> Iterator[None]:
    """Within this block, launchers plan every launch (tile sizes, warps, grids) as on a GPU with `sm_count`
    multiprocessors, whatever the tensors' device. Only for compiling the launches without a GPU; nothing runs."""
    global _PLAN_AS_GPU_SMS
    before, _PLAN_AS_GPU_SMS = _PLAN_AS_GPU_SMS, sm_count
    try:
        yield
    finally:
        _PLAN_AS_GPU_SMS = before


def gpu_plan(device: torch.device) -> bool:
    """Whether launches for tensors on `device` get the GPU's tiles (True on CUDA and inside plan_as_gpu), or the
    interpreter's small ones."""
    return device.type == "cuda" or _PLAN_AS_GPU_SMS is not None


def persistent_programs(device: torch.device, blocks: int, per_sm: int = 4) -> int:
    """How many programs a persistent kernel (one that loops over row blocks) launches for `blocks` blocks of work.

    On a GPU: `per_sm` programs per multiprocessor, so each holds a partial reduction (dW) that is summed at the end.
    In the CPU interpreter: 4, so the tests exercise several programs, the loop and the final reduction.
    """
    if device.type == "cuda":
        cap = per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    elif _PLAN_AS_GPU_SMS is not None:
        cap = per_sm * _PLAN_AS_GPU_SMS
    else:
        cap = 4
    return max(1, min(blocks, cap))
