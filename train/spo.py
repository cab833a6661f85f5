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

Deviations from MiniMind: MiniMind subtracts the baseline alpha / (alpha + beta), a number in [0, 1], from the raw
reward in [-3, 3]; here it is mapped back to reward units (r_min + (r_max - r_min) * ...), so A is a difference of
like quantities. r_min/r_max default to the range of the chosen reward kinds (train/rewards.py reward_range: [0, 1]
for the rule reward, [-3, 3] for the reward model as MiniMind's scale 3). MiniMind also re-weights prompt sampling by
a per-prompt reward EMA; prompts here follow the plain seeded epoch order (exact resume). Rollout sampling uses an
RNG seeded by (seed, rollout index).

Outputs under --out_dir: {save_weight}/ (policy), {save_weight}_resume/step_N/ (+ optimizer, tracker, RNG),
{save_weight}_metrics.jsonl and {save_weight}_reward.png.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/spo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

from minimind import checkpoint as ckpt
from train import common, rewards, rollout
from train import losses as L
from train.common import arg

# (CPU, CUDA). CUDA: MiniMind's SPO row (lr 1e-7, accumulation 4). CPU: see grpo.py.
_AUTO = {"learning_rate": (1e-5, 1e-7)}


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
    args = common.parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = common.setup_runtime(args.device, args.dtype, args.seed)
    args = rollout.resolve_auto(args, rt.is_cuda, _AUTO)
    reward_fn = rewards.build_rewards(
        args.reward, args.reward_model_path, rt.device, bool(args.reasoning), args.reward_batch_size
    )
    lo, hi = rewards.reward_range(reward_fn.kinds, bool(args.reasoning))
    args.reward_min = lo if args.reward_min is None else args.reward_min
    args.reward_max = hi if args.reward_max is None else args.reward_max
    try:
        tracker = BetaValueTracker(
            args.reward_min, args.reward_max, args.d_half, args.rho_min, args.rho_max, args.rho_first
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    tok = common.load_tokenizer(rollout.tokenizer_path(args))
    ops = common.resolve_kernels(args.kernels, rt)
    policy = common.load_base_model(args.from_weight, ops, rt.device)
    ref = common.load_base_model(args.from_weight, ops, rt.device).eval().requires_grad_(False)
    data = rollout.load_prompts(args, tok, reward_fn.kinds)

    steps_per_epoch = len(data) // (args.batch_size * args.accumulation_steps)
    if steps_per_epoch == 0:
        raise SystemExit(
            f"error: {args.data_path} has {len(data)} prompts, fewer than one step needs "
            f"({args.batch_size} x {args.accumulation_steps}); lower --batch_size"
        )
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    optimizer = common.build_optimizer(policy, args.learning_rate, args.weight_decay)
    start_step = 0
    if args.from_resume:
        folder = common.latest_resume(args.out_dir, args.save_weight)
        if folder is None:
            print(f"no resume checkpoint under {common.resume_dir(args.out_dir, args.save_weight)}: starting fresh")
        else:
            ckpt.load_model_weights(policy, folder)
            state = ckpt.load_train_state(folder)
            optimizer.load_state_dict(state["optimizer"])
            tracker.load_state_dict(state["tracker"])
            common.set_rng_state(state["rng"])
            start_step = int(state["step"])
            print(
                f"resumed from {folder} at step {start_step} "
                f"(tracker alpha {tracker.alpha:.4f}, beta {tracker.beta:.4f})"
            )

    train_fwd = torch.compile(policy, dynamic=True) if args.compile else policy
    print(
        f"spo: {args.from_weight} ({policy.num_params():,} params) on {rt.device} "
        f"({'bf16 autocast' if rt.amp_dtype else 'fp32'}{', compiled' if args.compile else ''}); "
        f"{len(data):,} prompts; {args.batch_size} prompts x accum {args.accumulation_steps}; reward {args.reward} "
        f"in [{args.reward_min:g}, {args.reward_max:g}]; {total_steps} steps, lr {args.learning_rate:g}"
    )

    metrics = common.MetricsLog(Path(args.out_dir) / f"{args.save_weight}_metrics.jsonl", append=start_step > 0)
    policy.train()
    order, order_epoch = None, -1
    skipped, history = 0, []
    timer = common.Timer(rt.device)
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="spo", dynamic_ncols=True)
    with common.StopFlag() as stop:
        for step in bar:
            epoch, within = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = common.epoch_order(len(data), args.seed, epoch), epoch
            lr = common.lr_at(step, total_steps, args.learning_rate)
            common.set_lr(optimizer, lr)
            acc = {"reward": [], "baseline": [], "adv": [], "len": [], "loss": 0.0, "kl": 0.0, "tokens": 0.0, "rho": []}
            parts_acc: dict[str, list[torch.Tensor]] = {}
            for micro in range(args.accumulation_steps):
                batch = rollout.prompt_batch(data, order, within * args.accumulation_steps + micro, args.batch_size)
                ro = rollout.collect(
                    policy,
                    ref,
                    batch["ids"],
                    batch["texts"],
                    batch["records"],
                    reward_fn,
                    tok,
                    num_samples=1,
                    max_new_tokens=args.max_gen_len,
                    device=rt.device,
                    autocast=rt.autocast,
                    forward_batch=args.forward_batch,
                    with_old_logp=False,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    generator=rollout.rollout_generator(rt.device, args.seed, step * args.accumulation_steps + micro),
                )
                b = tracker.baseline()
                adv = (ro.rewards - b).clamp(-args.adv_clip, args.adv_clip)
                n = ro.input_ids.shape[0]
                logp_sum, tok_count = 0.0, 0.0
                for sl in rollout.chunks(n, args.forward_batch):
                    with rt.autocast():
                        logp, aux = rollout.forward_logp(train_fwd, ro.rows(sl), ro.prompt_width)
                    logp = logp.float()
                    mask = ro.completion_mask[sl]
                    loss = L.spo_loss(logp, ro.ref_logp[sl], adv[sl], mask, args.beta)
                    frac = (sl.stop - sl.start) / n
                    total = loss * frac if aux is None else (loss + aux) * frac
                    (total / args.accumulation_steps).backward()
                    acc["loss"] += float(loss.detach()) * frac / args.accumulation_steps
                    acc["kl"] += float((L.k3_kl(logp.detach(), ro.ref_logp[sl]) * mask).sum())
                    logp_sum += float((logp.detach() * mask).sum())
                    tok_count += float(mask.sum())
                acc["tokens"] += tok_count
                acc["rho"].append(tracker.update(ro.rewards, logp_sum / max(tok_count, 1)))
                acc["reward"].append(ro.rewards)
                acc["baseline"].append(b)
                acc["adv"].append(adv)
                acc["len"].append(ro.lengths)
                for k, v in ro.reward_parts.items():
                    parts_acc.setdefault(k, []).append(v.float())
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip or float("inf"))
            if torch.isfinite(grad_norm):
                optimizer.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            r_all = torch.cat(acc["reward"])
            record = {
                "step": done,
                "epoch": epoch,
                "reward": round(float(r_all.mean()), 5),
                "reward_std": round(float(r_all.std(unbiased=False)), 5),
                **{f"reward_{k}": round(float(torch.cat(v).mean()), 5) for k, v in parts_acc.items()},
                "baseline": round(sum(acc["baseline"]) / len(acc["baseline"]), 5),
                "advantage": round(float(torch.cat(acc["adv"]).mean()), 5),
                "rho": round(sum(acc["rho"]) / len(acc["rho"]), 5),
                "tracker_alpha": round(tracker.alpha, 5),
                "tracker_beta": round(tracker.beta, 5),
                "kl": round(acc["kl"] / max(acc["tokens"], 1), 6),
                "completion_len": round(float(torch.cat(acc["len"]).float().mean()), 2),
                "loss": round(acc["loss"], 6),
                "lr": lr,
                "grad_norm": round(float(grad_norm), 4) if math.isfinite(float(grad_norm)) else float("nan"),
                "skipped_steps": skipped,
            }
            history.append(record["reward"])
            if done % args.log_interval == 0 or done == total_steps:
                record["seconds"] = round(timer.lap(), 3)
                metrics.write(record)
                bar.set_postfix(
                    reward=f"{record['reward']:.3f}", base=f"{record['baseline']:.3f}", kl=f"{record['kl']:.4f}"
                )
            if done % args.save_interval == 0 or done == total_steps or stop.requested:
                state = {
                    "step": done,
                    "optimizer": optimizer.state_dict(),
                    "tracker": tracker.state_dict(),
                    "rng": common.rng_state(),
                }
                common.save_resume(args.out_dir, args.save_weight, done, policy, tok, args, state, args.keep_last)
            if stop.requested:
                break
    bar.close()
    png = rollout.plot_rl_curves(
        metrics.path,
        Path(args.out_dir) / f"{args.save_weight}_reward.png",
        f"SPO, reward {args.reward}",
        keys=("reward", "baseline", "kl"),
    )
    out = Path(args.out_dir) / args.save_weight
    print(f"done: {len(history)} steps; model in {out}" + (f"; reward curve {png}" if png else ""))
    return {"rewards": history, "steps": total_steps, "out": str(out), "tracker": tracker.state_dict()}


if __name__ == "__main__":
    main()
