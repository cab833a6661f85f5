"""What a run reports: the metrics log (JSONL and optional trackers), the loss curve, and throughput (FLOPs per
token, the GPU's peak for MFU, a step timer)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from train import checks

if TYPE_CHECKING:
    from minimind_fast.config import MiniMindConfig


# -------------------------------------------------------------------------------------------------------- throughput
# Dense bf16 tensor-core peaks (vendor datasheets) used for the trainer's MFU line; bench/ measures the real peak.
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "4090": 165e12, "3090": 71e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16.items() if k in name), None)


def flops_per_token(cfg: MiniMindConfig, n_active_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N_active + 12 * layers * hidden * seq_len (PaLM, Chowdhery et al. 2022, app. B)."""
    return 6 * n_active_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


class Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return dt


# -------------------------------------------------------------------------------------------------------------- logging
class MetricsLog:
    """Appends one JSON object per line (the file survives a crash up to its last line) and forwards each record to
    the optional trackers from open_trackers."""

    def __init__(self, path: Path, enabled: bool = True, append: bool = False, trackers: list | None = None):
        self.path, self.enabled, self.trackers = path, enabled, trackers or []
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not append and path.exists():
                path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            for t in self.trackers:
                t.log(record, step=record.get("step"))

    def close(self) -> None:
        for t in self.trackers:
            t.finish()


def trim_metrics(path: Path, step: int) -> int:
    """Drop the records of steps after `step` from a metrics file (a resumed run logs those steps again, so each
    step appears once) and any line a kill cut short; rewritten atomically. -> the number of lines dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
            continue
        kept.append(line + "\n")
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped


def open_trackers(wandb: bool, swanlab: bool, project: str, name: str, config: dict[str, Any]) -> list:
    """Start the experiment trackers asked for (--wandb / --swanlab). A tracker that is not installed is an error
    before any compute, with the install command; the local JSONL metrics and loss PNG are always written."""
    trackers = []
    if wandb:
        try:
            import wandb as wb
        except ImportError:
            checks.fail("error: --wandb needs the wandb package: pip install wandb")
        trackers.append(wb.init(project=project, name=name, config=config))
    if swanlab:
        try:
            import swanlab as sl
        except ImportError:
            checks.fail("error: --swanlab needs the swanlab package: pip install swanlab")
        sl.init(project=project, experiment_name=name, config=config)
        trackers.append(sl)
    return trackers


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str) -> Path | None:
    """Draw loss against step from a metrics JSONL file into a PNG (nothing if there are no loss records)."""
    records = [json.loads(line) for line in open(metrics_path)] if metrics_path.exists() else []
    points = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
