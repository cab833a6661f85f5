"""One optimizer step and one plan of steps, shared by every training stage and by bench/e2e.py.

    plan = step.Plan.of(args, len(data), rows_per_step, rt, "packed rows")   # order, this rank's rows, lr, log/save
    stepper = step.Stepper(model, wrapped, optimizer, rt, guard, args.accumulation_steps, args.grad_clip)
    for s in range(start, plan.total_steps):
        plan.set_lr(optimizer, s)
        loss, grad_norm = step.train_step(stepper, (batch(rows) for rows in plan.micro_rows(s)), loss_fn)

train_step: for each micro-batch, forward + loss under autocast, backward of loss / accumulation_steps (the gradient
all-reduce only on the last one, see runtime no_sync), then optimizer_step: clip the global gradient norm, decide on
the device whether the step is taken (a NaN/inf norm, or with skip_zero a norm of exactly 0, skips it), AdamW,
zero_grad. The RL stages, whose backward passes run over rollouts, call optimizer_step directly.

The hot loop of the supervised stages (pretrain, sft, lora, dpo, distill, distill_reason) never waits on the
host. The skip decision is a device tensor handed to fused AdamW as `found_inf` (the mechanism torch.amp.GradScaler
uses: the fused kernel leaves weights, moments and step count untouched where it is non-zero), the guard counts
skipped steps on the device, and the stages read counters and losses only at log and save steps
(NonFiniteGuard.read), where a streak of max_bad_steps ends the run. A tensor is never turned into a Python number
in a step that neither logs nor saves (tests/train/test_host_syncs.py counts them). The RL stages sample text every
step, which waits on the host anyway: they read the guard every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

if TYPE_CHECKING:
    from train.args import StageArgs
    from train.metrics import MetricsLog
    from train.runtime import Runtime


# ---------------------------------------------------------------------------------------------- optimizer + schedule
def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm gains are not decayed). Always the fused implementation: it takes
    the skip decision as a device tensor (no host sync) and on a CPU it is ~5x faster than the foreach one (measured:
    26M parameters, 0.034 s vs 0.168 s per step; updates equal within 2.4e-7)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int = 0) -> float:
    """MiniMind's schedule: lr * (0.1 + 0.45 * (1 + cos(pi * t / T))), cosine from lr down to 0.1 * lr,
    after an optional linear warmup over warmup_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t, T = step - warmup_steps, max(total_steps - warmup_steps, 1)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(t, T) / T)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (0 = measure only); returns the norm before clipping as a plain tensor, also
    when FSDP2 gradients are sharded DTensors. No host sync: a non-finite norm makes the gradients non-finite, and
    the step is then skipped on the device (optimizer_step)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ------------------------------------------------------------------------------------------------- non-finite steps
class NonFiniteGuard:
    """Counts, on the device, the optimizer steps that are skipped: a NaN/inf gradient norm (weights and optimizer
    state stay as they were), and with skip_zero a norm of exactly 0 (the stages whose loss covers labelled tokens
    only: sft, lora, distill, distill_reason; no token of the step had a label, and AdamW would still move the weights
    by weight decay and stale momentum; the RL stages keep such steps: equal rewards are a legitimate outcome).

    check() runs every step and never syncs; read() runs at log and save steps: it updates .skipped / .empty, prints
    what was skipped since the last read, and when some run of non-finite steps reached max_bad_steps it writes a
    stop record and ends the run (exit status 1), naming the last checkpoint written (it holds the weights from before
    the streak). The norm is the all-reduced one, so every rank decides alike."""

    def __init__(self, max_bad_steps: int, metrics: MetricsLog, is_main: bool, last_good: Callable[[], Any]):
        self.max_bad_steps, self.metrics, self.is_main, self.last_good = max_bad_steps, metrics, is_main, last_good
        self.skipped, self.empty = 0, 0  # totals as of the last read()
        self._dev: torch.Tensor | None = None  # [non-finite total, zero total, current streak, longest streak]

    def check(self, grad_norm: torch.Tensor, skip_zero: bool = False) -> torch.Tensor:
        """-> a 0-dim float tensor on the norm's device: 1.0 where this step must not be taken."""
        if self._dev is None:
            self._dev = torch.zeros(4, dtype=torch.float32, device=grad_norm.device)
        bad = (~torch.isfinite(grad_norm)).any().float()
        empty = ((grad_norm == 0).all().float() * (1 - bad)) if skip_zero else torch.zeros_like(bad)
        streak = (self._dev[2] + 1) * bad
        self._dev = torch.stack([self._dev[0] + bad, self._dev[1] + empty, streak, torch.maximum(self._dev[3], streak)])
        return torch.maximum(bad, empty)

    def read(self, step: int) -> None:
        """Host side, at log and save steps: see the class docstring."""
        if self._dev is None:
            return
        bad, empty, _, longest = (int(v) for v in self._dev.tolist())
        if self.is_main and empty > self.empty:
            tqdm.write(f"step {step}: {empty - self.empty} step(s) with a zero gradient (no labelled token) skipped")
        if self.is_main and bad > self.skipped:
            tqdm.write(f"step {step}: {bad - self.skipped} step(s) with a non-finite loss or gradient skipped")
        self.skipped, self.empty = bad, empty
        self._dev[3] = self._dev[2]  # the longest streak is counted anew from the current one
        if longest >= self.max_bad_steps:
            self.metrics.write({"step": step, "skipped_steps": self.skipped, "stopped": "non-finite"})
            last = self.last_good()
            raise SystemExit(  # a failed run, not a bad setting: exit status 1
                f"error: {longest} non-finite steps in a row; stopping. Last good checkpoint: "
                f"{last if last is not None else 'none written yet'}"
            )

    def state(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "empty": self.empty}


# ------------------------------------------------------------------------------------------------------------ a step
def optimizer_step(
    pairs: list[tuple[torch.nn.Module, torch.optim.Optimizer]],
    grad_clip: float,
    guard: NonFiniteGuard,
    skip_zero: bool = False,
) -> torch.Tensor:
    """Clip each model's gradients, step each optimizer unless the guard says skip (one decision for all pairs:
    PPO's actor and critic move together or not at all), zero the gradients. -> the norm(s) before clipping, as a
    device tensor (stacked when there are several models)."""
    norms = [clip_grad_norm(model, grad_clip) for model, _ in pairs]
    norm = norms[0] if len(norms) == 1 else torch.stack(norms)
    skip = guard.check(norm, skip_zero)
    for _, optimizer in pairs:
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = skip  # read by the fused kernel: no update where non-zero (torch/optim/adam.py)
            optimizer.step()
            del optimizer.found_inf
        elif not bool(skip):  # an optimizer without found_inf support: the decision needs the host
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norm


@dataclass
class Stepper:
    """What every train_step of a run needs: set up once, before the loop.

    model is the unwrapped model (its parameters are clipped), wrapped its DDP/FSDP2 wrapper or itself (for no_sync),
    forward what computes the loss (wrapped, or torch.compile(wrapped))."""

    model: torch.nn.Module
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    rt: Runtime
    guard: NonFiniteGuard
    accumulation_steps: int
    grad_clip: float
    skip_zero: bool = False


def train_step(s: Stepper, micro_batches: Iterable[Any], loss_fn: Callable[[Any], torch.Tensor]):
    """One optimizer step over accumulation_steps micro-batches: loss_fn(batch) -> the scalar loss to minimise
    (including any MoE balance loss), computed under the run's autocast. -> (mean loss over the micro-batches,
    gradient norm before clipping), both device tensors: nothing here waits for the device."""
    from train.runtime import no_sync

    loss_sum = None
    n = 0
    for i, batch in enumerate(micro_batches):
        last = i == s.accumulation_steps - 1
        with no_sync(s.wrapped, sync=last), s.rt.autocast():
            loss = loss_fn(batch)
            (loss / s.accumulation_steps).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        n += 1
    if n != s.accumulation_steps:
        raise ValueError(f"train_step got {n} micro-batches, expected accumulation_steps = {s.accumulation_steps}")
    grad_norm = optimizer_step([(s.model, s.optimizer)], s.grad_clip, s.guard, s.skip_zero)
    return loss_sum / n, grad_norm


# ----------------------------------------------------------------------------------------------------------- the plan
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch), so resume replays it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class Plan:
    """The run's steps: how many, which rows each rank reads, the learning rate, when to log and save.

    One optimizer step reads rows_per_step rows of the epoch's order = accumulation_steps micro-batches of batch_size
    rows on each of world_size ranks; rank r takes the r-th batch_size slice of each micro-batch, so the ranks
    together read exactly the rows one process with a world_size times larger batch would. The data position is the
    step, so a resumed run replays the batches of an uninterrupted one. order_fn(epoch) gives an epoch's order (default
    epoch_order; SFT groups by length)."""

    def __init__(
        self,
        n_rows: int,
        *,
        batch_size: int,
        accumulation_steps: int,
        epochs: int,
        max_steps: int,
        learning_rate: float,
        warmup_steps: int,
        log_interval: int,
        save_interval: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        order_fn: Callable[[int], torch.Tensor] | None = None,
    ):
        self.n_rows, self.batch_size, self.accumulation_steps = n_rows, batch_size, accumulation_steps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.learning_rate, self.warmup_steps = learning_rate, warmup_steps
        self.log_interval, self.save_interval = log_interval, save_interval
        self.rows_per_step = batch_size * accumulation_steps * world_size
        self.steps_per_epoch = n_rows // self.rows_per_step
        total = self.steps_per_epoch * epochs
        self.total_steps = min(total, max_steps) if max_steps else total
        self._order_fn = order_fn or (lambda epoch: epoch_order(n_rows, seed, epoch))
        self._order: tuple[int, torch.Tensor] | None = None

    @classmethod
    def of(
        cls,
        args: StageArgs,
        n_rows: int,
        rt: Runtime,
        what: str,
        order_fn: Callable[[int], torch.Tensor] | None = None,
        rollouts_per_step: int | None = None,
    ) -> Plan:
        """The plan of a stage's flags (--batch_size, --accumulation_steps, --epochs, --max_steps, --learning_rate,
        --warmup_steps, --log_interval, --save_interval, --seed); rollouts_per_step replaces --accumulation_steps as
        the number of batches read per step (PPO: one rollout; its flag counts minibatches). Too few rows for one step
        is an error that says what to lower."""
        from train import checks

        plan = cls(
            n_rows,
            batch_size=args.batch_size,
            accumulation_steps=args.accumulation_steps if rollouts_per_step is None else rollouts_per_step,
            epochs=args.epochs,
            max_steps=args.max_steps,
            learning_rate=args.learning_rate,
            warmup_steps=args.warmup_steps,
            log_interval=args.log_interval,
            save_interval=args.save_interval,
            seed=args.seed,
            rank=rt.rank,
            world_size=rt.world_size,
            order_fn=order_fn,
        )
        if plan.steps_per_epoch == 0:
            checks.fail(
                f"error: {args.data_path} has {n_rows} {what}, fewer than one optimizer step needs "
                f"({plan.rows_per_step} over {rt.world_size} rank{'s' * (rt.world_size > 1)}); lower --batch_size"
            )
        return plan

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def order(self, step: int) -> torch.Tensor:
        """The order of the epoch that step (0-based) falls in (computed once per epoch)."""
        epoch = self.epoch(step)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self._order_fn(epoch))
        return self._order[1]

    def batch_index(self, step: int, micro: int) -> int:
        """Which batch_size-row slice of the epoch order this rank reads at micro-batch `micro` of `step`."""
        within = step % self.steps_per_epoch
        return (within * self.accumulation_steps + micro) * self.world_size + self.rank

    def rows(self, step: int, micro: int) -> list[int]:
        """The data indices of this rank's micro-batch `micro` of `step`."""
        b = self.batch_index(step, micro)
        return self.order(step)[b * self.batch_size : (b + 1) * self.batch_size].tolist()

    def micro_rows(self, step: int) -> Iterator[list[int]]:
        """rows(step, micro) for each micro-batch of the step."""
        return (self.rows(step, m) for m in range(self.accumulation_steps))

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.learning_rate, self.warmup_steps)

    def set_lr(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr(step)
        set_lr(optimizer, lr)
        return lr

    def logs(self, done: int) -> bool:
        """Whether the step that completes `done` steps writes a log record."""
        return done % self.log_interval == 0 or done == self.total_steps

    def saves(self, done: int) -> bool:
        """Whether it writes a checkpoint (a stop request saves too: see stopping)."""
        return done % self.save_interval == 0 or done == self.total_steps

    def stopping(self, requested: bool, done: int, rt: Runtime) -> bool:
        """Whether the run stops after this step: a signal (StopFlag) on any rank. One process decides at once;
        under torchrun the ranks agree at log and save steps only (one small all-reduce there, none elsewhere)."""
        from train.runtime import any_rank

        if rt.world_size == 1:
            return requested
        return any_rank(requested, rt) if (self.logs(done) or self.saves(done)) else False


def iterate_batches(dataset: Any, collate: Any, batch_size: int, seed: int, epoch: int, start_batch: int = 0) -> Any:
    """Yield (batch_index, collated batch) for one epoch in the (seed, epoch) order, from start_batch on.

    The last partial batch is dropped so every optimizer step sees the same number of sequences."""
    order = epoch_order(len(dataset), seed, epoch)
    for b in range(start_batch, len(dataset) // batch_size):
        idx = order[b * batch_size : (b + 1) * batch_size]
        yield b, collate([dataset[int(i)] for i in idx])
