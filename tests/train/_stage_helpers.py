"""Helpers the stage tests share: the common CLI of a short CPU run, the metrics a run logs, and the cross-entropy
of a batch computed by hand (float64 over the full logits) to check a stage's logged loss against."""

from __future__ import annotations

import json
from pathlib import Path


def stage_argv(start, out, *extra) -> list[str]:
    """A short CPU run from checkpoint `start` into `out`: 64-token rows, batch 4, torch ops, a log line per step."""
    return [
        "--from_weight",
        str(start),
        "--out_dir",
        str(out),
        "--max_seq_len",
        "64",
        "--batch_size",
        "4",
        "--kernels",
        "torch",
        "--log_interval",
        "1",
        *extra,
    ]


def metric_rows(out_dir, name: str) -> dict[int, dict]:
    """step -> the row a run logged to <out_dir>/<name>_metrics.jsonl."""
    lines = (Path(out_dir) / f"{name}_metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def step_losses(out_dir, name: str) -> dict[int, float]:
    """step -> logged loss."""
    return {step: row["loss"] for step, row in metric_rows(out_dir, name).items()}


def hand_ce(model, batch) -> float:
    """Mean over labelled tokens of -log softmax(logits[t-1])[labels[t]], from the full logits in float64."""
    logp = model(batch["input_ids"]).logits.double().log_softmax(dim=-1)
    labels = batch["labels"]
    picked = [
        -logp[b, t - 1, labels[b, t]].item()
        for b in range(labels.shape[0])
        for t in range(1, labels.shape[1])
        if labels[b, t] != -100
    ]
    return sum(picked) / len(picked)
