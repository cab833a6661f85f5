"""Does the trainer's fused AdamW compute what torch's foreach AdamW computes, at the real shapes of a real run?

    python bench/optimizer_agreement.py                       # the default `python train/pretrain.py`, every step
    python bench/optimizer_agreement.py --pretrain_args "--max_steps 100"

Runs train/pretrain.py in this process (its defaults plus --pretrain_args, output in a temporary folder) with the
trainer's own optimizer (train/step.py build_optimizer: fused AdamW). Before every fused step, a foreach AdamW with the
same parameter groups and hyperparameters is given the fused optimizer's state (moments and step count, copied) and
steps on the same gradients from the same weights; the weights are then put back and the fused step runs, so the run
itself is the ordinary run. Per step it records the relative L2 difference of the two updates over all parameters
(|u_fused - u_foreach| / |u_foreach|), the worst tensor's max-abs difference relative to that tensor's largest update
element, and the largest relative difference of the moments. fp32 rounding is about 6e-8 relative per operation.

Writes <out_dir>/optimizer-agreement_cpu_<date>.{json,md} (default out_dir: bench/results/cpu without CUDA).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import bench  # noqa: E402
from train import pretrain, step  # noqa: E402


class Shadow:
    """Wraps the fused optimizer's step: first the foreach step from the same state, then the fused one."""

    def __init__(self, fused: torch.optim.AdamW, names: dict[int, str]):
        self.fused, self.names, self.rows = fused, names, []
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in fused.param_groups]
        d = fused.defaults
        self.foreach = torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], foreach=True)
        self._fused_step = fused.step
        fused.step = self.step

    def step(self, *args: Any, **kwargs: Any) -> Any:
        params = [p for g in self.fused.param_groups for p in g["params"] if p.grad is not None]
        before = [p.detach().clone() for p in params]
        for g, sg in zip(self.fused.param_groups, self.foreach.param_groups):
            sg["lr"] = g["lr"]
        for p in params:
            if p in self.fused.state:
                self.foreach.state[p] = {k: v.clone() for k, v in self.fused.state[p].items()}
            else:
                self.foreach.state.pop(p, None)
        self.foreach.step()
        after_fe = [p.detach().clone() for p in params]
        state_fe = {p: {k: v.clone() for k, v in self.foreach.state[p].items()} for p in params}
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
        out = self._fused_step(*args, **kwargs)
        diff2 = upd2 = 0.0
        worst, worst_name, moments = 0.0, "", 0.0
        for p, b, fe in zip(params, before, after_fe):
            u_fe, d = (fe - b).double(), (p.detach() - fe).double()
            diff2 += float(d.pow(2).sum())
            upd2 += float(u_fe.pow(2).sum())
            rel = float(d.abs().max()) / max(float(u_fe.abs().max()), 1e-30)
            if rel > worst:
                worst, worst_name = rel, self.names.get(id(p), "?")
            for k in ("exp_avg", "exp_avg_sq"):
                a, e = self.fused.state[p][k].double(), state_fe[p][k].double()
                moments = max(moments, float((a - e).abs().max()) / max(float(e.abs().max()), 1e-30))
        self.rows.append(
            {
                "step": len(self.rows) + 1,
                "lr": self.fused.param_groups[0]["lr"],
                "update_rel_l2": (diff2 / upd2) ** 0.5 if upd2 > 0 else 0.0,
                "worst_tensor_rel_max": worst,
                "worst_tensor": worst_name,
                "moments_rel_max": moments,
            }
        )
        return out


def markdown(result: dict[str, Any], json_name: str) -> str:
    m, rows = result["meta"], result["steps"]
    lines = [
        f"# Fused vs foreach AdamW, step by step on the same state: {m['device']}",
        "",
        *bench.provenance(m, json_name),
        f"- torch {m['torch']}; the run: `python train/pretrain.py {result['pretrain_args']}` ({len(rows)} steps)",
        "",
        "| steps | max update rel. L2 diff | max worst-tensor rel. max diff | max moments rel. diff |",
        "|---|---|---|---|",
    ]
    size = max(1, len(rows) // 10)
    for i in range(0, len(rows), size):
        w = rows[i : i + size]
        lines.append(
            f"| {w[0]['step']}-{w[-1]['step']} | {max(r['update_rel_l2'] for r in w):.2e} "
            f"| {max(r['worst_tensor_rel_max'] for r in w):.2e} | {max(r['moments_rel_max'] for r in w):.2e} |"
        )
    s = result["summary"]
    lines += [
        "",
        f"Over all steps: update rel. L2 diff at most {s['update_rel_l2_max']:.2e} (median "
        f"{s['update_rel_l2_median']:.2e}); worst tensor {s['worst_tensor_rel_max']:.2e} "
        f"(`{s['worst_tensor']}`); moments {s['moments_rel_max']:.2e}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain_args", default="", help="extra train/pretrain.py flags, e.g. '--max_steps 100'")
    p.add_argument("--out_dir", default="", help="where the results go (default: bench/results/cpu without CUDA)")
    args = p.parse_args(argv)
    out_dir = args.out_dir or str(bench.RESULTS_DIR if torch.cuda.is_available() else bench.RESULTS_DIR / "cpu")
    paths = bench.result_paths(out_dir, "optimizer-agreement")
    shadows: list[Shadow] = []
    build = step.build_optimizer

    def build_with_shadow(model: torch.nn.Module, *a: Any, **kw: Any) -> torch.optim.AdamW:
        opt = build(model, *a, **kw)
        shadows.append(Shadow(opt, {id(q): n for n, q in model.named_parameters()}))
        return opt

    step.build_optimizer = build_with_shadow
    try:
        with tempfile.TemporaryDirectory(prefix="optimizer-agreement-") as tmp:
            pretrain.main([*shlex.split(args.pretrain_args), "--out_dir", tmp])
    finally:
        step.build_optimizer = build
    rows = shadows[0].rows
    rels = sorted(r["update_rel_l2"] for r in rows)
    worst = max(rows, key=lambda r: r["worst_tensor_rel_max"])
    result = {
        "kind": "optimizer-agreement",
        "meta": bench.run_metadata(bench.command_line("bench/optimizer_agreement.py", argv)),
        "pretrain_args": args.pretrain_args,
        "summary": {
            "steps": len(rows),
            "update_rel_l2_max": rels[-1],
            "update_rel_l2_median": rels[len(rels) // 2],
            "worst_tensor_rel_max": worst["worst_tensor_rel_max"],
            "worst_tensor": worst["worst_tensor"],
            "moments_rel_max": max(r["moments_rel_max"] for r in rows),
        },
        "steps": rows,
    }
    bench.write_result(result, paths, markdown)
    print(markdown(result, paths[0].name))
    return result


if __name__ == "__main__":
    main()
