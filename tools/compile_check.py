"""Compile every Triton kernel launch of kernels/ for a GPU, on a machine without one, and report what each needs.

    python tools/compile_check.py                        # sm_90 (H100 / H200): small, base, moe; bf16 and fp32
    python tools/compile_check.py --arch 80 --sms 108    # an A100
    python tools/compile_check.py --tokens 1024 --json out/compile_check.json

Triton's interpreter (the CPU tests) runs the kernels' arithmetic but never compiles them, so it cannot see what only
the GPU compiler sees: a tile that needs more shared memory than the card has, more registers than a launch may hold,
register spills, or code the compiler rejects. This tool closes that gap. Each Triton op runs forward and backward
on CPU tensors at the benchmark's shapes (bench/bench_kernels.py make_inputs, B=32 rows of T=512 tokens unless
--tokens says otherwise; qk_norm_rope also at MiniMind-3's heads, preset m3), and so does one training step of each
preset's whole model with the Triton ops (bf16 autocast, B=2, T=64), with the launchers planning their tiles and
grids as on the target card (_compat.plan_as_gpu) and every kernel launch turned into a compile-only warm-up for the
target: nothing executes, so the tensors the kernels would write hold garbage, and only the launches matter. An
autotuned launch (triton.autotune: the MoE grouped GEMMs, with moe.AUTOTUNE forced on here) compiles every candidate
config the autotuner would time, instead of timing them; the fixed tiles used with autotuning off are the first
candidate of each list, so they are covered too. Each distinct compiled kernel's binary is then read with cuobjdump
for its registers and local memory (spills).

It fails (exit status 1) when a kernel does not compile, when its shared memory exceeds the card's per-block limit,
or when its registers times its threads exceed the 64K registers of a multiprocessor (the launch would be refused).
Spills are reported, not failed. Needs Triton's NVIDIA backend and the ptxas and cuobjdump it bundles (the `triton`
wheel has all three); no CUDA driver, no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (after the sys.path line, for running as a script)

# Shared memory a block may use (opt-in maximum), bytes, by compute capability. Source: NVIDIA CUDA C++ Programming
# Guide, "Technical Specifications per Compute Capability" (8.0: 163 KB, 8.6 / 8.9: 99 KB, 9.0: 227 KB).
MAX_SHARED_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
REGISTERS_PER_SM = 65536  # 64K 32-bit registers per multiprocessor on every one of these (same table)
SMS = {80: 108, 86: 84, 89: 128, 90: 132}  # A100, RTX 3090 / A6000 class, L40S, H100 SXM (H200: 132 as well)
OPS = ("rmsnorm", "add_rmsnorm", "rope", "qk_norm_rope", "swiglu", "linear_cross_entropy", "moe_experts")
# qk_norm_rope also runs at MiniMind-3's own head shape (preset m3: head_dim 96, 8 query and 4 key/value heads; the
# only model with QK-norm), beside head_dim 64/96/80 (8 and 2 heads) at small/base/moe.
QK_NORM_PRESET = "m3"
PRESETS = ("small", "base", "moe")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Kernel:
    """One distinct compiled kernel (a kernel function under one specialisation and launch configuration)."""

    name: str
    used_by: list[str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int | None = None
    stack_bytes: int | None = None
    local_bytes: int | None = None  # per thread; register spills land here
    problems: list[str] = field(default_factory=list)
    autotune: str = ""  # "i/n": candidate i of the n configs of an autotuned launch ("" for a plain launch)


@dataclass
class Report:
    arch: int
    sms: int
    tokens: int
    triton: str
    torch: str
    cases: list[dict[str, Any]] = field(default_factory=list)  # {"case", "ok", "error", "kernels"}
    kernels: list[Kernel] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[str]:
        out = [f"{c['case']}: {c['error']}" for c in self.cases if not c["ok"]]
        out += [f"{k.name} ({', '.join(k.used_by[:2])}): {p}" for k in self.kernels for p in k.problems]
        return out


class _CompileOnlyDriver:
    """The few things Triton's launcher asks of the active driver, for a card that is not there."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def is_active(self) -> bool:
        return True


@contextlib.contextmanager
def compile_only(arch: int, on_compile: Callable[[Any, Any, str], None], all_candidates: bool = True) -> Iterator[None]:
    """Within this block every `kernel[grid](...)` compiles the kernel for sm_<arch> (a warm-up) and launches
    nothing; on_compile(jit_function, compiled_kernel, candidate) sees each launch. An autotuned kernel compiles each
    of its candidate configs (those its prune step keeps) in turn, with candidate = "i/n" ("" for a plain launch)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    original_run = JITFunction.run
    original_tuned_run = Autotuner.run
    candidate = [""]

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        compiled = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        on_compile(self, compiled, candidate[0])
        return compiled

    def tuned_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        # In place of Autotuner.run, which would time each config on the device: compile them all.
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        configs = self.prune_configs(kwargs)
        configs = configs if all_candidates else configs[:1]  # --autotune first: the fixed tiles only
        self.nargs = None
        try:
            for i, config in enumerate(configs):
                candidate[0] = f"{i + 1}/{len(configs)}"
                compiled = self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            candidate[0] = ""
        return compiled

    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run = run
    Autotuner.run = tuned_run
    try:
        yield
    finally:
        JITFunction.run = original_run
        Autotuner.run = original_tuned_run
        with contextlib.suppress(RuntimeError):  # raised where there is no real driver to go back to
            driver.reset_active()


def _op_case(op: str, preset: str, dtype: torch.dtype, tokens: int) -> Callable[[], None]:
    """Forward and backward of one Triton op at the benchmark's inputs (make_inputs) for `tokens` tokens."""
    import minimind_kernels as kernels
    from bench import bench_kernels

    def run() -> None:
        batch = (tokens // 512, 512) if tokens >= 512 and tokens % 512 == 0 else (1, tokens)
        inp = bench_kernels.make_inputs(op, preset, "full", torch.device("cpu"), dtype, True, batch=batch)
        fn = getattr(kernels.resolve("triton", check_runnable=False), op)
        variants: list[dict[str, Any]] = [{}]
        if op == "linear_cross_entropy":  # the fused path (mean) and the per-token path (none, weighted) differ
            n = inp.args[2].numel()
            variants = [{}, {"reduction": "none", "token_weight_N": torch.rand(n, generator=torch.Generator())}]
        for extra in variants:
            out = fn(*inp.args, **extra)
            outs = out if isinstance(out, tuple) else (out,)
            total = sum(o.float().sum() for o in outs)
            grads = [inp.args[i] for i in inp.grad_idx]
            torch.autograd.grad(total, grads, allow_unused=True)

    return run


def _model_case(preset: str) -> Callable[[], None]:
    """One training step's forward and backward of the preset's model with the Triton ops, bf16 autocast."""
    import minimind_kernels as kernels
    from minimind_fast.config import from_preset
    from minimind_fast.model import MiniMind

    def run() -> None:
        torch.manual_seed(0)
        cfg = from_preset(preset)
        model = MiniMind(cfg, ops=kernels.resolve("triton", check_runnable=False))
        ids = torch.randint(0, cfg.vocab_size, (2, 64))
        labels = ids.clone()
        labels[:, :5] = -100
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels=labels)
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        loss.backward()

    return run


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None, int | None]:
    """(registers per thread, stack bytes, local-memory bytes per thread) of the compiled binary itself, from
    cuobjdump --dump-resource-usage (bundled with Triton). Local memory is where register spills go."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)], capture_output=True, text=True
        )
    found = {key: re.search(rf"\b{key}:(\d+)", proc.stdout) for key in ("REG", "STACK", "LOCAL")}
    reg, stack, local = (int(m.group(1)) if m else None for m in found.values())
    return reg, stack, local


def limit_problems(k: Kernel, arch: int) -> list[str]:
    """Why a compiled kernel could not be launched on a card of compute capability `arch` (empty: it can)."""
    out = []
    max_shared = MAX_SHARED_PER_BLOCK[arch]
    if k.shared_bytes > max_shared:
        out.append(f"needs {k.shared_bytes} B of shared memory; sm_{arch} allows {max_shared} per block")
    threads = 32 * k.num_warps
    if k.registers is None:
        out.append("cuobjdump reported no register count")
    elif k.registers * threads > REGISTERS_PER_SM:
        out.append(f"{k.registers} registers x {threads} threads > {REGISTERS_PER_SM}, a multiprocessor's registers")
    return out


def check(
    arch: int,
    sms: int,
    tokens: int,
    presets: tuple[str, ...],
    dtypes: tuple[str, ...],
    models: bool,
    all_candidates: bool = True,
    ops: tuple[str, ...] = OPS,
) -> Report:
    import triton

    from minimind_kernels._compat import plan_as_gpu

    report = Report(arch=arch, sms=sms, tokens=tokens, triton=triton.__version__, torch=torch.__version__)
    start = time.perf_counter()
    seen: dict[int, Kernel] = {}
    current: list[str] = [""]

    def on_compile(fn: Any, compiled: Any, candidate: str) -> None:
        key = id(compiled)
        if key not in seen:
            md = compiled.metadata
            consts = {fn.arg_names[p[0]]: v for p, v in getattr(compiled.src, "constants", {}).items() if len(p) == 1}
            kern = Kernel(
                name=fn.__name__,
                used_by=[],
                constexprs={k: v for k, v in consts.items() if isinstance(v, (bool, int, float, str))},
                num_warps=md.num_warps,
                num_stages=md.num_stages,
                shared_bytes=md.shared,
                autotune=candidate,
            )
            kern.registers, kern.stack_bytes, kern.local_bytes = _resource_usage(compiled.asm.get("cubin", b""))
            kern.problems = limit_problems(kern, arch)
            seen[key] = kern
        if current[0] not in seen[key].used_by:
            seen[key].used_by.append(current[0])

    cases: list[tuple[str, Callable[[], None]]] = []
    for preset in presets:
        for dname in dtypes:
            for op in ops:
                if op == "moe_experts" and preset != "moe":
                    continue
                cases.append((f"{op} {preset} {dname}", _op_case(op, preset, DTYPES[dname], tokens)))
        if models:
            cases.append((f"model {preset} bf16-autocast", _model_case(preset)))
    if "qk_norm_rope" in ops:
        for dname in dtypes:
            op_case = _op_case("qk_norm_rope", QK_NORM_PRESET, DTYPES[dname], tokens)
            cases.append((f"qk_norm_rope {QK_NORM_PRESET} {dname}", op_case))

    from minimind_kernels import moe

    # Autotuning on, whatever MINIMIND_MOE_AUTOTUNE says: every candidate tile config compiles (the fixed ones too).
    autotune_before, moe.AUTOTUNE = moe.AUTOTUNE, True
    try:
        with compile_only(arch, on_compile, all_candidates), plan_as_gpu(sms):
            for name, run in cases:
                current[0] = name
                t0 = time.perf_counter()
                try:
                    run()
                    entry = {"case": name, "ok": True, "error": ""}
                except Exception as exc:  # a compile error names the kernel and the line; keep going, report them all
                    entry = {"case": name, "ok": False, "error": f"{type(exc).__name__}: {str(exc).strip()[:2000]}"}
                entry["kernels"] = sorted({k.name for k in seen.values() if name in k.used_by})
                entry["seconds"] = round(time.perf_counter() - t0, 2)
                report.cases.append(entry)
                print(f"  {'ok ' if entry['ok'] else 'FAIL'} {name:<42} {entry['seconds']:6.1f} s", flush=True)
    finally:
        moe.AUTOTUNE = autotune_before

    report.kernels = sorted(seen.values(), key=lambda k: (k.name, k.shared_bytes))
    report.seconds = round(time.perf_counter() - start, 1)
    return report


def table(report: Report) -> str:
    tuned = sum(1 for k in report.kernels if k.autotune)
    lines = [
        f"sm_{report.arch}, {report.sms} multiprocessors, triton {report.triton}, torch {report.torch}, "
        f"{report.tokens} tokens per op case; {len(report.kernels)} distinct kernels from {len(report.cases)} cases "
        f"({tuned} of them autotune candidates)",
        "",
        f"{'kernel':<28} {'warps':>5} {'stages':>6} {'smem KiB':>8} {'regs':>5} {'local B':>7}  {'first used by':<30} "
        "constexprs",
    ]
    for k in report.kernels:
        consts = " ".join(f"{n}={int(v) if isinstance(v, bool) else v}" for n, v in k.constexprs.items())
        consts += f" [autotune {k.autotune}]" if k.autotune else ""
        local = "?" if k.local_bytes is None else str(k.local_bytes)
        regs = "?" if k.registers is None else str(k.registers)
        lines.append(
            f"{k.name:<28} {k.num_warps:>5} {k.num_stages:>6} {k.shared_bytes / 1024:>8.1f} {regs:>5} {local:>7}  "
            f"{k.used_by[0]:<30} {consts}"
        )
    failures = report.failures
    lines += ["", f"{len(failures)} problem(s)" + (":" if failures else "; every launch compiles and fits the card.")]
    lines += [f"  - {f}" for f in failures]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED_PER_BLOCK), help="compute capability")
    ap.add_argument(
        "--sms",
        type=int,
        default=None,
        help="multiprocessors the grids are planned for (default: "
        + ", ".join(f"{n} for {a}" for a, n in SMS.items())
        + ")",
    )
    ap.add_argument("--tokens", type=int, default=32 * 512, help="tokens per op case (default 16384, the benchmark's)")
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets (default: small,base,moe)")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32")
    ap.add_argument("--no-models", action="store_true", help="skip the whole-model training-step cases")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated ops (default: all of {','.join(OPS)})")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    ap.add_argument(
        "--autotune",
        choices=("all", "first"),
        default="all",
        help="autotuned launches: compile every candidate config (default) or only the first, the fixed tiles that "
        "MINIMIND_MOE_AUTOTUNE=0 uses (the test suite's quick pass)",
    )
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # The interpreter replaces @triton.jit functions when kernels/ is imported: there would be nothing to compile.
        ap.exit(
            2, "compile_check: unset TRITON_INTERPRET (it makes Triton interpret kernels instead of compiling them)\n"
        )
    presets = tuple(p for p in args.presets.split(",") if p)
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    for p in presets:
        if p not in PRESETS:
            ap.error(f"unknown preset {p!r}; expected some of {', '.join(PRESETS)}")
    ops = tuple(o for o in args.ops.split(",") if o)
    for o in ops:
        if o not in OPS:
            ap.error(f"unknown op {o!r}; expected some of {', '.join(OPS)}")
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}; expected some of {', '.join(DTYPES)}")
    if args.tokens < 1:
        ap.error("--tokens must be at least 1")
    sms = args.sms or SMS[args.arch]
    print(f"compiling every Triton launch for sm_{args.arch} ({sms} multiprocessors); nothing runs", flush=True)
    all_candidates = args.autotune == "all"
    report = check(args.arch, sms, args.tokens, presets, dtypes, not args.no_models, all_candidates, ops)
    print()
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = asdict(report)
        payload["failures"] = report.failures
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"\nwrote {args.json}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
