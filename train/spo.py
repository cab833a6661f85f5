"""SPO: single-stream policy optimisation with an adaptive Beta value tracker as the baseline.

    python train/spo.py                                           # CPU: out/full_sft -> out/spo, rule reward
    python train/spo.py --reward model --reward_model_path /path/to/reward_model
    python train/spo.py --from_resume 1                           # continue (the tracker state is restored too)

Algorithm, as implemented (MiniMind's SPO): one completion per prompt (no groups). A single tracker holds a Beta
belief (alpha, beta) over the normalised reward p = (r - r_min) / (r_max - r_min) in [0, 1]; it starts at
alpha = beta = 0.5 * N0 with N0 = 1 / (1 - rho_min) = 2 prior pseudo-counts.
  baseline    b = r_min + (r_max - r_min) * alpha / (alpha + beta)   (read BEFORE the rollout's update)
  advantage   A = clamp(r - b, -5, 5), one value for every token of the completion
  loss        per token -logp * A + beta_kl * k3KL(pi, ref), k3 = exp(ref - pi) - (ref - pi) - 1, beta_kl 0.02,
              token mean within each completion, then the mean over completions (+ MoE balance loss)
  update      after each rollout's backward: m = mean log-prob of the rollout's completion tokens,
              rho = clip(2^(-|m - m_prev| / 0.06), 0.5, 0.96) (rho = 0.9 on the first update, with no m_prev),
              pbar = mean over the rollout of clamp(p, 0, 1),
              alpha <- rho * alpha + pbar, beta <- rho * beta + 1 - pbar.
The tracker forgets fast when the policy's log-probs move (a changed policy makes old rewards stale) and slowly
when they do not. accumulation_steps rollouts (4) make one optimizer step. The tracker state is saved in every
resume checkpoint's train state and restored with --from_resume.

Under torchrun (`torchrun --nproc_per_node N train/spo.py`, --fsdp for FSDP2) each rank rolls out its own
batch_size prompts per rollout, and there is still one tracker: after each rollout every rank folds in the rewards
of all ranks (gathered) and the mean log-prob over all ranks' completion tokens (all-reduced), so the tracker is
identical on every rank and evolves as in one process whose rollouts hold all N ranks' prompts. Each rank's loss is
the mean over its own completions and the gradients are averaged over ranks (the same count on every rank: the mean
over all completions); they are all-reduced once per optimizer step. The frozen reference is not wrapped.

Deviations from MiniMind: MiniMind subtracts the baseline alpha / (alpha + beta), a number in [0, 1], from the raw
reward in [-3, 3]; here it is mapped back to reward units (r_min + (r_max - r_min) * ...), so A is a difference of
like quantities. r_min/r_max default to the range of the chosen reward kinds (train/rewards.py reward_range: [0, 1]
for the rule reward, [-3, 3] for the reward model as MiniMind's scale 3). MiniMind also re-weights prompt sampling by
a per-prompt reward EMA; prompts here follow the plain seeded epoch order (exact resume). Rollout sampling uses an
RNG seeded by (seed, rollout index, rank).

Outputs under --out_dir: {save_weight}/ (policy), {save_weight}_resume/step_N/ (+ optimizer, tracker, RNG),
{save_weight}_metrics.jsonl, {save_weight}_reward.png and {save_weight}_loss.png.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/spo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from train import checks, common, rewards, rollout, step
from train import losses as L
from train.args import arg, parse_args
from train.metrics import Timer
from train.resume import restore_resume, save_step
from train.runtime import all_gather_cat, all_reduce_sum, describe_runtime, no_sync, setup_runtime, wrap_model

# (CPU, CUDA). CUDA: MiniMind's SPO row (lr 1e-7, accumulation 4). CPU: as grpo.py; measured at 3e-4 from the CPU
# recipe's SFT model (one epoch, 137 steps): mean reward 0.042 (steps 1-30) -> 0.147 (121-137), see train/results/.
_AUTO = {"learning_rate": (3e-4, 1e-7)}


@dataclass
class Args(rollout.RLArgs):
    save_weight: str = arg("spo", "name of the checkpoint folder under --out_dir")
    accumulation_steps: int = arg(4, "rollouts per optimizer step")
    adv_clip: float = arg(5.0, "advantages are clamped to +-adv_clip")
    d_half: float = arg(0.06, "mean log-prob change that halves the tracker's memory")
    rho_min: float = arg(0.5, "lowest forgetting factor")
    rho_max: float = arg(0.96, "highest forgetting factor")
    rho_first: float = arg(0.9, "forgetting factor of the first update (no previous mean log-prob yet)")
    reward_min: float | None = arg(None, "reward mapped to p = 0 (default: the chosen reward kinds' lowest)")
    reward_max: float | None = arg(None, "reward mapped to p = 1 (default: the chosen reward kinds' highest)")


class BetaValueTracker:
    """The adaptive Beta value tracker of SPO (see the module docstring for the update rule)."""

    def __init__(
        self,
        reward_min: float = -3.0,
        reward_max: float = 3.0,
        d_half: float = 0.06,
        rho_min: float = 0.5,
        rho_max: float = 0.96,
        rho_first: float = 0.9,
    ):
        if not reward_max > reward_min:
            raise ValueError(f"reward_max ({reward_max}) must exceed reward_min ({reward_min})")
        self.reward_min, self.reward_max = float(reward_min), float(reward_max)
        self.d_half, self.rho_min, self.rho_max, self.rho_first = d_half, rho_min, rho_max, rho_first
        n0 = 1.0 / (1.0 - rho_min)  # the prior's pseudo-count: what the tracker holds at steady state under rho_min
        self.alpha = self.beta = 0.5 * n0
        self.last_mean_logp: float | None = None

    def baseline(self) -> float:
        p = self.alpha / (self.alpha + self.beta)
        return self.reward_min + (self.reward_max - self.reward_min) * p

    def rho(self, mean_logp: float) -> float:
        if self.last_mean_logp is None:
            return self.rho_first
        rho = 2.0 ** (-abs(mean_logp - self.last_mean_logp) / self.d_half)
        return min(max(rho, self.rho_min), self.rho_max)

    def update(self, rewards_N: torch.Tensor, mean_logp: float) -> float:
        """Fold one rollout in; returns the rho used."""
        rho = self.rho(mean_logp)
        self.last_mean_logp = float(mean_logp)
        span = self.reward_max - self.reward_min
        p = float(((rewards_N.float() - self.reward_min) / span).clamp(0, 1).mean())
        self.alpha = rho * self.alpha + p
        self.beta = rho * self.beta + (1.0 - p)
        return rho

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "last_mean_logp": self.last_mean_logp}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.beta = float(state["alpha"]), float(state["beta"])
        m = state["last_mean_logp"]
        self.last_mean_logp = None if m is None else float(m)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = setup_runtime(args.device, args.dtype, args.seed, args.dist_timeout)
    reward_fn, tok, _, policy, ref, data = rollout.start_stage(args, rt, _AUTO)
    lo, hi = rewards.reward_range(reward_fn.kinds, bool(args.reasoning))
    args.reward_min = lo if args.reward_min is None else args.reward_min
    args.reward_max = hi if args.reward_max is None else args.reward_max
    try:
        tracker = BetaValueTracker(
            args.reward_min, args.reward_max, args.d_half, args.rho_min, args.rho_max, args.rho_first
        )
    except ValueError as exc:
        checks.fail(f"error: {exc}")
    # One step = accumulation_steps rollouts of batch_size prompts on each of world_size ranks.
    plan = step.Plan.of(args, len(data), rt, "prompts")

    wrapped = wrap_model(policy, rt, fsdp=args.fsdp)
    backend = rollout.open_backend(args, policy, tok, rt)
    optimizer = step.build_optimizer(policy, args.learning_rate, args.weight_decay)
    start_step, state = restore_resume(args, rt, plan.rows_per_step, policy, optimizer, tokenizer=tok)
    if state:
        tracker.load_state_dict(state["tracker"])
        if rt.is_main:
            print(f"tracker restored: alpha {tracker.alpha:.4f}, beta {tracker.beta:.4f}")
    train_fwd = torch.compile(wrapped, dynamic=True) if args.compile else wrapped
    summary = (
        f"spo: {args.from_weight} ({policy.num_params():,} params) on {describe_runtime(rt, args)}; "
        f"{len(data):,} prompts; {args.batch_size} prompts x accum {args.accumulation_steps}; reward {args.reward} "
        f"in [{args.reward_min:g}, {args.reward_max:g}]; {plan.total_steps} steps, lr {args.learning_rate:g}"
    )
    metrics, guard = common.start_run(args, rt, start_step, summary)
    policy.train()
    history = []
    timer = Timer(rt.device)
    bar = common.progress(start_step, plan.total_steps, "spo", rt)
    with common.StopFlag() as stop:
        for s in bar:
            lr = plan.set_lr(optimizer, s)
            rollouts, baselines, advs, rhos = [], [], [], []
            sums = torch.zeros(3, dtype=torch.float64)  # this rank's loss (over its rollouts), KL sum, token count
            rollout.sync_backend(backend, policy)
            for micro in range(args.accumulation_steps):
                ro = rollout.rank_rollout(
                    args, rt, data, plan, s, micro, policy, ref, reward_fn, tok,
                    num_samples=1, with_old_logp=False, backend=backend,
                )  # fmt: skip
                b = tracker.baseline()
                adv = (ro.rewards - b).clamp(-args.adv_clip, args.adv_clip)
                n = ro.input_ids.shape[0]
                slices = rollout.chunks(n, args.forward_batch)
                logp_sum = torch.zeros(2, dtype=torch.float64)  # summed completion log-probs, token count
                for i, sl in enumerate(slices):
                    last = micro == args.accumulation_steps - 1 and i == len(slices) - 1
                    with no_sync(wrapped, sync=last):
                        with rt.autocast():
                            logp, aux = rollout.forward_logp(train_fwd, ro.rows(sl), ro.prompt_width)
                        logp = logp.float()
                        mask = ro.completion_mask[sl]
                        loss = L.spo_loss(logp, ro.ref_logp[sl], adv[sl], mask, args.beta)
                        frac = (sl.stop - sl.start) / n
                        total = loss * frac if aux is None else (loss + aux) * frac
                        (total / args.accumulation_steps).backward()
                    sums[0] += float(loss.detach()) * frac / args.accumulation_steps
                    sums[1] += float((L.k3_kl(logp.detach(), ro.ref_logp[sl]) * mask).sum())
                    sums[2] += float(mask.sum())
                    logp_sum += torch.tensor([float((logp.detach() * mask).sum()), float(mask.sum())])
                # Every rank folds in the whole global rollout, so the trackers stay identical across ranks.
                logp_sum = all_reduce_sum(logp_sum, rt)
                all_rewards = all_gather_cat(ro.rewards, rt)
                rhos.append(tracker.update(all_rewards, float(logp_sum[0] / logp_sum[1].clamp(min=1))))
                rollouts.append(ro)
                baselines.append(b)
                advs.append(all_gather_cat(adv, rt))
            grad_norm = step.optimizer_step([(policy, optimizer)], args.grad_clip, guard)

            done = s + 1
            guard.read(done)  # every step: an RL step waits on the host anyway (sampling)
            sums = all_reduce_sum(sums, rt)
            record = {
                "step": done,
                "epoch": plan.epoch(s),
                **rollout.reward_stats(rollouts, rt),
                "baseline": round(sum(baselines) / len(baselines), 5),
                "advantage": round(float(torch.cat(advs).mean()), 5),
                "rho": round(sum(rhos) / len(rhos), 5),
                "tracker_alpha": round(tracker.alpha, 5),
                "tracker_beta": round(tracker.beta, 5),
                "kl": round(float(sums[1] / sums[2].clamp(min=1)), 6),
                "loss": round(float(sums[0]) / rt.world_size, 6),
                "lr": lr,
                "grad_norm": round(float(grad_norm), 4),
                "skipped_steps": guard.skipped,
            }
            history.append(record["reward"])
            if plan.logs(done):
                record["seconds"] = round(timer.lap(), 3)
                metrics.write(record)
                bar.set_postfix(
                    reward=f"{record['reward']:.3f}", base=f"{record['baseline']:.3f}", kl=f"{record['kl']:.4f}"
                )
            stopping = plan.stopping(stop.requested, done, rt)
            if plan.saves(done) or stopping:
                extra = {"tracker": tracker.state_dict()}
                save_step(args, rt, done, plan.rows_per_step, policy, optimizer, tok, extra)
            if stopping:
                break
    bar.close()
    rollout.finish_stage(args, rt, metrics, "SPO", ("reward", "baseline", "kl"))
    out = Path(args.out_dir) / args.save_weight
    return {"rewards": history, "steps": plan.total_steps, "out": str(out), "tracker": tracker.state_dict()}


if __name__ == "__main__":
    main()
