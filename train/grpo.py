"""GRPO: group relative policy optimisation of the SFT model against a pluggable reward.

    python train/grpo.py                                          # CPU: out/full_sft -> out/grpo, rule reward
    python train/grpo.py --reward rule+shaping --reasoning 1      # also MiniMind's shaping, think/answer format
    python train/grpo.py --reward model --reward_model_path /path/to/reward_model
    python train/grpo.py --from_resume 1                          # continue from the newest checkpoint

Algorithm, as implemented (Shao et al. 2024, "DeepSeekMath", sec. 4.1, outcome supervision): each rollout takes
batch_size prompts and samples num_generations (G) completions of each, all in one left-padded batch
(train/rollout.py); rewards come from train/rewards.py; the advantage of every token of completion i is
(r_i - mean_g) / (std_g + eps) over its group of G (population std, eps 1e-4). Loss per token:
-(min(ratio * A, clip(ratio, 1 - 0.2, 1 + 0.2) * A) - beta * KL), KL the k3 estimator exp(ref - pi) - (ref - pi) - 1
against the frozen SFT model (beta 0.02), averaged over each completion's tokens (through the first eos) and then
over completions; MoE balance loss added. accumulation_steps rollouts make one step; each step makes num_iterations
optimizer updates on its rollouts (mu in the paper). With num_iterations = 1 (default, as MiniMind) the old policy
is the current one, old log-probs are the detached training forward (ratio 1, the clip inactive) and no separate
old-policy forward is run; with more, old log-probs are computed at rollout time in the same chunks and autocast as
the training forward, so the first ratio is exactly 1. AdamW, grad clip 1.0, MiniMind's cosine schedule.

Deviations from MiniMind: its default loss is now CISPO; this script is the GRPO objective above (MiniMind's
`--loss_type grpo`). The rollout sampling RNG is a function of (seed, rollout index), so --from_resume reproduces
the uninterrupted run exactly. Logged per step: reward mean/std (and each reward kind), KL to the reference,
completion length, loss, clip fraction.

Outputs under --out_dir: {save_weight}/ (policy), {save_weight}_resume/step_N/, {save_weight}_metrics.jsonl and
{save_weight}_reward.png.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/grpo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

from minimind import checkpoint as ckpt
from train import common, rewards, rollout
from train import losses as L
from train.common import arg

# (CPU, CUDA). CUDA: MiniMind's GRPO row. CPU: the tiny model of the CPU recipe needs a far larger learning rate to
# move within a few hundred steps (see the report in the commit that set it).
_AUTO = {"learning_rate": (1e-5, 1e-7)}


@dataclass
class Args(rollout.RLArgs):
    save_weight: str = arg("grpo", "name of the checkpoint folder under --out_dir")
    num_generations: int = arg(8, "completions per prompt (G)")
    num_iterations: int = arg(1, "optimizer updates per step on the same rollouts (mu)")
    epsilon: float = arg(0.2, "ratio clip")
    adv_eps: float = arg(1e-4, "eps in (r - mean_g) / (std_g + eps)")


def train_on_rollout(
    train_fwd, ro: rollout.Rollout, adv_N: torch.Tensor, args: Args, rt: common.Runtime, scale: float
) -> dict[str, float]:
    """Forward + backward of the GRPO loss over one rollout, chunk by chunk; gradients are scaled by `scale`."""
    n = ro.input_ids.shape[0]
    loss_sum, kl_sum, clip_sum, tokens = 0.0, 0.0, 0.0, 0.0
    for sl in rollout.chunks(n, args.forward_batch):
        with rt.autocast():
            logp, aux = rollout.forward_logp(train_fwd, ro.rows(sl), ro.prompt_width)
        logp = logp.float()
        mask = ro.completion_mask[sl]
        old = ro.old_logp[sl] if ro.old_logp is not None else logp.detach()
        loss = L.grpo_loss(logp, old, ro.ref_logp[sl], adv_N[sl], mask, args.epsilon, args.beta)
        frac = (sl.stop - sl.start) / n  # per-completion means: chunk means weigh by their share of rows
        total = loss * frac if aux is None else (loss + aux) * frac
        (total * scale).backward()
        loss_sum += float(loss.detach()) * frac
        kl_sum += float((L.k3_kl(logp.detach(), ro.ref_logp[sl]) * mask).sum())
        clip_sum += float(L.clip_fraction(logp.detach(), old, mask, args.epsilon)) * float(mask.sum())
        tokens += float(mask.sum())
    return {"loss": loss_sum, "kl": kl_sum / max(tokens, 1), "clip_frac": clip_sum / max(tokens, 1)}


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = common.setup_runtime(args.device, args.dtype, args.seed)
    args = rollout.resolve_auto(args, rt.is_cuda, _AUTO)
    if args.num_generations < 2:
        raise SystemExit("error: --num_generations must be >= 2 (advantages are relative to the group)")
    # The reward is built first: a bad --reward or --reward_model_path fails before any model is loaded.
    reward_fn = rewards.build_rewards(
        args.reward, args.reward_model_path, rt.device, bool(args.reasoning), args.reward_batch_size
    )
    tok = common.load_tokenizer(rollout.tokenizer_path(args))
    ops = common.resolve_kernels(args.kernels, rt)
    policy = common.load_base_model(args.from_weight, ops, rt.device)
    ref = common.load_base_model(args.from_weight, ops, rt.device).eval().requires_grad_(False)
    data = rollout.load_prompts(args, tok, reward_fn.kinds)

    prompts_per_step = args.batch_size * args.accumulation_steps
    steps_per_epoch = len(data) // prompts_per_step
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
            common.set_rng_state(state["rng"])
            start_step = int(state["step"])
            print(f"resumed from {folder} at step {start_step}")

    train_fwd = torch.compile(policy, dynamic=True) if args.compile else policy
    g = args.num_generations
    print(
        f"grpo: {args.from_weight} ({policy.num_params():,} params) on {rt.device} "
        f"({'bf16 autocast' if rt.amp_dtype else 'fp32'}{', compiled' if args.compile else ''}); "
        f"{len(data):,} prompts; {args.batch_size} prompts x {g} samples x accum {args.accumulation_steps}; "
        f"reward {args.reward}; {total_steps} steps ({steps_per_epoch} per epoch), lr {args.learning_rate:g}"
    )

    metrics = common.MetricsLog(Path(args.out_dir) / f"{args.save_weight}_metrics.jsonl", append=start_step > 0)
    policy.train()
    order, order_epoch = None, -1
    skipped, history = 0, []
    timer = common.Timer(rt.device)
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="grpo", dynamic_ncols=True)
    with common.StopFlag() as stop:
        for step in bar:
            epoch, within = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = common.epoch_order(len(data), args.seed, epoch), epoch
            lr = common.lr_at(step, total_steps, args.learning_rate)
            common.set_lr(optimizer, lr)

            # 1. Rollouts (sample, rewards, then reference log-probs; old log-probs only when mu > 1).
            rollouts, advs = [], []
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
                    num_samples=g,
                    max_new_tokens=args.max_gen_len,
                    device=rt.device,
                    autocast=rt.autocast,
                    forward_batch=args.forward_batch,
                    with_old_logp=args.num_iterations > 1,
                    train_forward=train_fwd,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    generator=rollout.rollout_generator(rt.device, args.seed, step * args.accumulation_steps + micro),
                )
                rollouts.append(ro)
                advs.append(L.group_advantages(ro.rewards, g, args.adv_eps))

            # 2. num_iterations optimizer updates on them.
            stats: dict[str, float] = {}
            for _ in range(args.num_iterations):
                parts = [
                    train_on_rollout(train_fwd, ro, adv, args, rt, 1.0 / args.accumulation_steps)
                    for ro, adv in zip(rollouts, advs)
                ]
                stats = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip or float("inf"))
                if torch.isfinite(grad_norm):
                    optimizer.step()
                else:
                    skipped += 1
                optimizer.zero_grad(set_to_none=True)

            done = step + 1
            r_all = torch.cat([ro.rewards for ro in rollouts])
            lengths = torch.cat([ro.lengths for ro in rollouts])
            record = {
                "step": done,
                "epoch": epoch,
                "reward": round(float(r_all.mean()), 5),
                "reward_std": round(float(r_all.std(unbiased=False)), 5),
                "group_std": round(
                    float(torch.cat([ro.rewards.view(-1, g).std(1, unbiased=False) for ro in rollouts]).mean()), 5
                ),
                **{
                    f"reward_{k}": round(float(torch.cat([ro.reward_parts[k] for ro in rollouts]).float().mean()), 5)
                    for k in rollouts[0].reward_parts
                },
                "kl": round(stats["kl"], 6),
                "completion_len": round(float(lengths.float().mean()), 2),
                "loss": round(stats["loss"], 6),
                "clip_frac": round(stats["clip_frac"], 5),
                "lr": lr,
                "grad_norm": round(float(grad_norm), 4),
                "skipped_steps": skipped,
            }
            history.append(record["reward"])
            if done % args.log_interval == 0 or done == total_steps:
                record["seconds"] = round(timer.lap(), 3)
                metrics.write(record)
                bar.set_postfix(
                    reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.4f}", len=record["completion_len"]
                )
            if done % args.save_interval == 0 or done == total_steps or stop.requested:
                state = {"step": done, "optimizer": optimizer.state_dict(), "rng": common.rng_state()}
                common.save_resume(args.out_dir, args.save_weight, done, policy, tok, args, state, args.keep_last)
            if stop.requested:
                break
    bar.close()
    png = rollout.plot_rl_curves(
        metrics.path, Path(args.out_dir) / f"{args.save_weight}_reward.png", f"GRPO, reward {args.reward}"
    )
    out = Path(args.out_dir) / args.save_weight
    print(f"done: {len(history)} steps; model in {out}" + (f"; reward curve {png}" if png else ""))
    return {"rewards": history, "steps": total_steps, "out": str(out)}


if __name__ == "__main__":
    main()
