"""Bar chart of end-to-end training throughput from the e2e result files of bench/e2e.py.

    python tools/plot_bench.py                                  # every e2e JSON in bench/results/
    python tools/plot_bench.py bench/results/e2e-matrix_h100_20261121.json --out e2e.png

One panel per result file (card and date in its title), one bar per measured configuration, grouped by preset: tokens/s
counting non-pad tokens only, labelled with the speed-up over the same preset's MiniMind baseline when the file has one.
Runs that failed or were skipped are listed under the panel instead of drawn. Kernel result files (kind "kernels")
and anything else that is not an e2e result are passed over.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
COLORS = {"baseline": "#8c8c8c", "torch": "#4c72b0", "triton": "#dd8452", "liger": "#55a868"}


def load_e2e(paths: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """(path, result) for every e2e result among paths (folders are searched for *.json), sorted by name."""
    files: list[Path] = []
    for p in paths:
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    out = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("kind") == "e2e" and data.get("runs"):
            out.append((f, data))
    return out


def bar_label(run: dict[str, Any]) -> str:
    if run["mode"] == "baseline-minimind":
        return f"{run['preset']}\nMiniMind"
    return f"{run['preset']}\n{run['kernels']}{' +compile' if run['compile'] else ''}"


def _family(run: dict[str, Any]) -> str:
    if run["mode"] == "baseline-minimind":
        return "baseline"
    base = str(run["kernels"]).split(",")[0]
    return base if base in COLORS else "torch"


def plot(results: list[tuple[Path, dict[str, Any]]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(11, 4.2 * len(results)), squeeze=False)
    for ax, (path, data) in zip(axes[:, 0], results):
        meta = data.get("meta", {})
        ok = [r for r in data["runs"] if r.get("status") == "ok"]
        ok.sort(key=lambda r: (r["preset"], r["mode"] != "baseline-minimind"))
        base = {r["preset"]: r["tokens_per_s"] for r in ok if r["mode"] == "baseline-minimind"}
        xs = range(len(ok))
        bars = ax.bar(
            xs,
            [r["tokens_per_s"] for r in ok],
            color=[COLORS[_family(r)] for r in ok],
            hatch=None,
            edgecolor="black",
            linewidth=0.5,
        )
        for bar, r in zip(bars, ok):
            if r["compile"]:
                bar.set_hatch("//")
            if base.get(r["preset"]) and r["mode"] != "baseline-minimind":
                ax.annotate(
                    f"{r['tokens_per_s'] / base[r['preset']]:.2f}x",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        ax.set_xticks(list(xs), [bar_label(r) for r in ok], fontsize=8)
        ax.set_xlim(-0.6, max(len(ok), 6) - 0.4)  # a file with few runs keeps bars of the usual width
        ax.set_ylabel("tokens/s (non-pad)")
        title = (
            f"{meta.get('device', '?')}, {meta.get('date_utc', '?')[:10]}, commit {str(meta.get('git_commit'))[:10]}"
        )
        ax.set_title(f"{path.name}: {title}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        bad = [
            f"{r['preset']} {r.get('kernels')} c{int(bool(r.get('compile')))}: {r['status']}"
            for r in data["runs"]
            if r.get("status") != "ok"
        ]
        if bad:
            ax.text(
                0.0, -0.28, "not measured: " + "; ".join(bad), transform=ax.transAxes, fontsize=7, va="top", wrap=True
            )
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=c, edgecolor="black", label=k if k != "baseline" else "MiniMind baseline")
        for k, c in COLORS.items()
    ] + [Patch(facecolor="white", edgecolor="black", hatch="//", label="compiled")]
    axes[0, 0].legend(handles=handles, fontsize=8, loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[RESULTS], help="e2e JSON files or folders")
    parser.add_argument("--out", type=Path, default=RESULTS / "e2e_tokens_per_s.png", help="PNG to write")
    args = parser.parse_args(argv)
    results = load_e2e(args.paths)
    if not results:
        raise SystemExit(f"error: no e2e result files in {', '.join(str(p) for p in args.paths)}")
    out = plot(results, args.out)
    print(f"wrote {out} ({len(results)} result file(s))")
    return out


if __name__ == "__main__":
    main()
