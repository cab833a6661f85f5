"""A run's lifecycle, shared by the stage scripts: the stop flag (SIGTERM/SIGINT), the start-up summary with the
metrics and the non-finite guard (start_run), the progress bar, and the end of a run (finish).

No trainer class and no callbacks: each stage keeps its loop in plain sight and calls these helpers and those of
train/args.py, runtime.py, models.py, metrics.py and resume.py.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from train import step
from train.metrics import MetricsLog, open_trackers, plot_loss_curve, trim_metrics
from train.resume import latest_resume
from train.runtime import Runtime, shutdown

if TYPE_CHECKING:
    from train.args import RunArgs


class StopFlag:
    """SIGTERM/SIGINT set a flag instead of killing the process, so the loop can save and exit cleanly.
    A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nsignal {signal.Signals(signum).name}: saving a checkpoint and stopping after this step", flush=True)

    def __enter__(self) -> StopFlag:
        if hasattr(signal, "SIGTERM") and _in_main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def start_run(args: RunArgs, rt: Runtime, start_step: int, summary: str) -> tuple[MetricsLog, step.NonFiniteGuard]:
    """Print the run's start-up summary (rank 0) and open its metrics, {out_dir}/{save_weight}_metrics.jsonl (written
    by rank 0 only; when resuming at step S, the records of steps after S, which the run is about to log again, are
    dropped first) with the trackers asked for (--wandb / --swanlab), and its NonFiniteGuard."""
    if rt.is_main:
        print(summary)
    flags = {k: v for k, v in vars(args).items() if not k.startswith("_")}  # not the run record restore_resume adds
    trackers = open_trackers(args.wandb, args.swanlab, "minimind", args.save_weight, flags) if rt.is_main else []
    path = Path(args.out_dir) / f"{args.save_weight}_metrics.jsonl"
    if rt.is_main and start_step > 0:
        trim_metrics(path, start_step)
    metrics = MetricsLog(path, enabled=rt.is_main, append=start_step > 0, trackers=trackers)

    def last_good() -> Path | None:  # the newest checkpoint of this run: its weights are from before a streak
        run = getattr(args, "_run", None) or {}
        return latest_resume(args.out_dir, args.save_weight, instance=run.get("instance"))

    return metrics, step.NonFiniteGuard(args.max_bad_steps, metrics, rt.is_main, last_good)


def progress(start: int, total: int, desc: str, rt: Runtime) -> tqdm:
    """The progress bar over optimizer steps (rank 0 only)."""
    return tqdm(range(start, total), initial=start, total=total, desc=desc, dynamic_ncols=True, disable=not rt.is_main)


def finish(args: RunArgs, rt: Runtime, metrics: MetricsLog, title: str, last_loss: float | None = None) -> bool:
    """End of a run: close the metrics and trackers and leave the process group; rank 0 draws the loss curve
    ({save_weight}_loss.png) and says where the model went. -> whether this is rank 0."""
    metrics.close()
    shutdown(rt)
    if not rt.is_main:
        return False
    png = plot_loss_curve(metrics.path, Path(args.out_dir) / f"{args.save_weight}_loss.png", title)
    loss = f"loss {last_loss:.4f}; " if last_loss is not None else ""
    print(f"done: {loss}model in {Path(args.out_dir) / args.save_weight}" + (f"; loss curve {png}" if png else ""))
    return True
