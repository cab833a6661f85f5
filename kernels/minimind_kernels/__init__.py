"""The one ops registry.

    ops = kernels.resolve("auto")          # or "torch", "triton", "liger", "triton,rope=torch", ...
    model = MiniMind(cfg, ops=ops)
    print(kernels.describe(ops))

A spec is a base implementation followed by optional per-op overrides, comma separated. Bases:
  torch   the pure-PyTorch reference (minimind_kernels/reference.py); runs everywhere
  triton  our Triton kernels (minimind_kernels/<op>.py); needs CUDA, or TRITON_INTERPRET=1 with CPU tensors (tests)
  liger   Liger-Kernel where it has the op, else ours (Triton), else torch, with a note for each fallback
  auto    triton when CUDA and Triton work, else torch with the cpu family's ops
Families that implement one op only, named in a per-op override (never as the base):
  grouped moe_experts through torch._grouped_mm (minimind_kernels/moe_grouped.py), e.g. triton,moe_experts=grouped;
          bf16 on sm_90/sm_100 CUDA, or a CPU
  flash, cudnn, efficient, math
          attention through that one backend of PyTorch's SDPA (minimind_kernels/sdpa.py), e.g.
          triton,attention=cudnn; all but math need CUDA
  cpu     ops that train faster on a CPU than their reference form (minimind_kernels/cpu.py): attention (bf16
          forward, fp32 backward) and linear_cross_entropy (its gradient written out); auto picks them where there
          is no CUDA; by hand e.g. torch,attention=cpu
An explicit implementation that cannot run is an error, never a silent fallback. The environment is read here, once,
never inside a forward pass. Implementations are imported lazily so that `import kernels` needs only torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

OP_NAMES: tuple[str, ...] = (
    "rmsnorm",
    "add_rmsnorm",
    "rope",
    "qk_norm_rope",
    "swiglu",
    "linear_cross_entropy",
    "moe_experts",
    "attention",
)

# op -> "module:function" for each implementation family. An op missing from a family has no such implementation.
_IMPLS: dict[str, dict[str, str]] = {
    "torch": {op: f"minimind_kernels.reference:{op}" for op in OP_NAMES},
    "triton": {
        "rmsnorm": "minimind_kernels.rmsnorm:rmsnorm",
        "add_rmsnorm": "minimind_kernels.rmsnorm:add_rmsnorm",
        "rope": "minimind_kernels.rope:rope",
        "qk_norm_rope": "minimind_kernels.qk_norm_rope:qk_norm_rope",
        "swiglu": "minimind_kernels.swiglu:swiglu",
        "linear_cross_entropy": "minimind_kernels.linear_ce:linear_cross_entropy",
        "moe_experts": "minimind_kernels.moe:moe_experts",
    },
    "liger": {
        "rmsnorm": "minimind_kernels.liger:rmsnorm",
        "add_rmsnorm": "minimind_kernels.liger:add_rmsnorm",
        "rope": "minimind_kernels.liger:rope",
        "swiglu": "minimind_kernels.liger:swiglu",
        "linear_cross_entropy": "minimind_kernels.liger:linear_cross_entropy",
    },
    "grouped": {"moe_experts": "minimind_kernels.moe_grouped:moe_experts"},
    **{b: {"attention": f"minimind_kernels.sdpa:attention_{b}"} for b in ("flash", "cudnn", "efficient", "math")},
    "cpu": {op: f"minimind_kernels.cpu:{op}" for op in ("attention", "linear_cross_entropy")},
}
_CUDA_ONLY = ("flash", "cudnn", "efficient")  # SDPA backends with no CPU kernels
_BASES = ("torch", "triton", "liger", "auto")


class KernelSpecError(ValueError):
    """A kernels spec that is malformed or names an implementation that cannot run here."""


@dataclass(frozen=True)
class Ops:
    """The resolved implementation of every op: call ops.rmsnorm(...), etc. `impl` maps op -> family name."""

    rmsnorm: Callable
    add_rmsnorm: Callable
    rope: Callable
    qk_norm_rope: Callable
    swiglu: Callable
    linear_cross_entropy: Callable
    moe_experts: Callable
    attention: Callable
    impl: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    spec: str = "torch"


def triton_available() -> bool:
    """True when the triton package imports (it may still have no device to run on)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton")
    except Exception:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runnable() -> bool:
    """Triton kernels can run: CUDA is present, or the interpreter is on (CPU tensors, tests)."""
    import torch

    return triton_available() and (torch.cuda.is_available() or triton_interpreting())


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _load(path: str) -> Callable:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _check_family(family: str) -> None:
    if family == "triton" and not triton_runnable():
        why = "triton is not installed" if not triton_available() else "no CUDA device (and TRITON_INTERPRET is not 1)"
        raise KernelSpecError(f"kernels 'triton' cannot run here: {why}. Use --kernels torch or auto.")
    if family == "liger":
        if not liger_available():
            raise KernelSpecError(
                "kernels 'liger' asked for but liger-kernel is not installed (pip install liger-kernel)"
            )
        if not triton_runnable():
            raise KernelSpecError("kernels 'liger' needs Triton on a CUDA device")
    if family in _CUDA_ONLY:
        import torch

        if not torch.cuda.is_available():
            raise KernelSpecError(
                f"kernels '{family}' cannot run here: needs CUDA (attention={family} is an SDPA backend)"
            )
    if family == "grouped":
        import torch

        from minimind_kernels.moe_grouped import cannot_run

        # The device the run will use (CUDA when there is one); the dtype is checked per call (bf16 on CUDA).
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        why = cannot_run(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        if why:
            raise KernelSpecError(f"kernels 'grouped' cannot run here: {why}")


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'triton,rope=torch' -> ('triton', {'rope': 'torch'}). Raises KernelSpecError on anything unknown."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or "=" in parts[0]:
        raise KernelSpecError(f"kernels spec {spec!r} must start with one of {', '.join(_BASES)}")
    base, overrides = parts[0], {}
    if base in _IMPLS and base not in _BASES:
        raise KernelSpecError(
            f"{base!r} implements only {', '.join(_IMPLS[base])}: name it per op, e.g. "
            f"triton,{next(iter(_IMPLS[base]))}={base}"
        )
    if base not in _BASES:
        raise KernelSpecError(f"unknown kernels base {base!r} in {spec!r}; expected one of {', '.join(_BASES)}")
    for part in parts[1:]:
        op, _, family = part.partition("=")
        op, family = op.strip(), family.strip()
        if op not in OP_NAMES:
            raise KernelSpecError(f"unknown op {op!r} in kernels spec {spec!r}; ops are {', '.join(OP_NAMES)}")
        if family not in _IMPLS:
            raise KernelSpecError(f"unknown implementation {family!r} for op {op!r}; expected {', '.join(_IMPLS)}")
        if family not in _BASES and op not in _IMPLS[family]:
            only = ", ".join(_IMPLS[family])
            raise KernelSpecError(f"op {op!r} has no {family} implementation ({family} implements only {only})")
        overrides[op] = family
    return base, overrides


def resolve(spec: str = "auto", check_runnable: bool = True) -> Ops:
    """Resolve a kernels spec into an Ops table. See the module docstring for the grammar.

    check_runnable=False skips the check that each chosen family can run here (tools/compile_check.py compiles the
    Triton launches for a GPU on a machine without one)."""
    base, overrides = parse_spec(spec)
    if base == "auto":
        import torch

        if triton_available() and torch.cuda.is_available():
            base = "triton"
        else:  # no CUDA: the reference ops, with the cpu family's where it has one and no override names another
            base = "torch"
            overrides = {**{op: "cpu" for op in _IMPLS["cpu"]}, **overrides}
    chosen: dict[str, str] = {}
    notes: list[str] = []
    for op in OP_NAMES:
        family = overrides.get(op, base)
        if op not in _IMPLS[family]:
            if op in overrides:
                raise KernelSpecError(f"op {op!r} has no {family} implementation")
            fallback = "triton" if family == "liger" and op in _IMPLS["triton"] and triton_runnable() else "torch"
            if family != "triton" or op != "attention":
                notes.append(f"{op}: no {family} implementation, using {fallback}")
            family = fallback
        chosen[op] = family
    for family in set(chosen.values()) if check_runnable else ():
        _check_family(family)
    fns = {}
    for op, family in chosen.items():
        try:
            fns[op] = _load(_IMPLS[family][op])
        except ImportError as exc:
            raise KernelSpecError(f"cannot import the {family} implementation of {op}: {exc}") from exc
    return Ops(**fns, impl=chosen, notes=tuple(notes), spec=spec)


def describe(ops: Ops) -> str:
    """The start-up table: one line per op with the implementation in use."""
    width = max(len(op) for op in OP_NAMES)
    lines = [f"kernels ({ops.spec}):"]
    lines += [f"  {op:<{width}}  {ops.impl[op]}" for op in OP_NAMES]
    lines += [f"  note: {n}" for n in ops.notes]
    return "\n".join(lines)
