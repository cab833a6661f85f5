"""PPO: proximal policy optimisation of the SFT model with a learned critic and a KL-penalised reward.

    python train/ppo.py                                           # CPU: out/full_sft -> out/ppo_actor, rule reward
    python train/ppo.py --reward model --reward_model_path /path/to/reward_model
    python train/ppo.py --from_resume 1                           # continue (actor, critic and both optimizers)

Algorithm, as implemented (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", with the RLHF reward
of Ziegler et al. 2019 / Ouyang et al. 2022): three models start from --from_weight: the actor (trained), a frozen
reference, and a critic = a MiniMind backbone + Linear(hidden, 1) value head (zero-initialised, so the first values
are 0). Each step takes one rollout of batch_size prompts, one completion each (train/rollout.py: rewards before any
forward), then, without grad, the actor's log-probs (old), the reference's, and the critic's values V_t (read at the
position that predicts completion token t, i.e. the state before it). Per-token reward: -kl_coef * (old - ref) on
every completion token (kl_coef 0.02) plus the sequence reward on its last token (through the first eos).
Advantages: GAE (Schulman et al. 2016) with gamma 1, lambda 0.95, whitened over the rollout's tokens; returns =
advantages + V (before whitening). Then ppo_epochs (2) passes over minibatches of mini_batch_size rows (fixed row
chunks visited in a seeded random order; old log-probs were computed in the same chunks, so the first ratio is
exactly 1): clipped policy loss (clip 0.2) and clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2) (value clip
0.2), both token means over the minibatch, total = policy + vf_coef * value (vf_coef 0.5) + MoE balance loss. Before
each minibatch's update, the approximate KL 0.5 * mean (log ratio)^2 to the rollout policy is checked: above
early_stop_kl (0.25) the remaining updates on this rollout are skipped. accumulation_steps minibatches make one
optimizer step of actor and critic (separate AdamW optimizers, grad clip 1.0 each, MiniMind's cosine schedule).

Deviations from MiniMind: MiniMind's current script adds the k3 KL to the loss; here the KL penalty is in the reward
(the classic RLHF formulation, as MiniMind's first PPO). Rollout sampling uses an RNG seeded by (seed, rollout index)
so --from_resume continues exactly. The critic and its optimizer live in each resume checkpoint's train state (only
the actor is written as the model folder). Logged per step: reward, KL to the reference, value loss, clip fraction,
approximate KL, completion length, and the updates run before an early stop.

Outputs under --out_dir: {save_weight}/ (actor), {save_weight}_resume/step_N/, {save_weight}_metrics.jsonl and
{save_weight}_reward.png.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/ppo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn as nn
from tqdm import tqdm

from minimind import checkpoint as ckpt
from minimind.model import MiniMind
from train import common, rewards, rollout
from train import losses as L
from train.common import arg

# (CPU, CUDA). CUDA: MiniMind's PPO row (actor lr 3e-7, critic 5e-7). CPU: see grpo.py.
_AUTO = {"learning_rate": (1e-5, 3e-7), "critic_learning_rate": (1e-4, 5e-7)}


@dataclass
class Args(rollout.RLArgs):
    save_weight: str = arg("ppo_actor", "name of the checkpoint folder under --out_dir")
    critic_learning_rate: float | None = arg(None, "critic peak learning rate")
    clip_epsilon: float = arg(0.2, "policy ratio clip")
    cliprange_value: float = arg(0.2, "value clip around the rollout's values")
    vf_coef: float = arg(0.5, "value loss weight")
    kl_coef: float = arg(0.02, "KL penalty in the per-token reward")
    gamma: float = arg(1.0, "GAE discount")
    lam: float = arg(0.95, "GAE lambda")
    ppo_epochs: int = arg(2, "passes over each rollout")
    mini_batch_size: int = arg(2, "rows per PPO minibatch (also the chunk of the no-grad forwards)")
    early_stop_kl: float = arg(0.25, "skip the rest of a rollout's updates when the approximate KL exceeds this")
    whiten_advantages: int = arg(1, "1: normalise advantages over the rollout's tokens")


class ValueModel(nn.Module):
    """Critic: a MiniMind backbone and a value head Linear(hidden, 1) on its final-norm hidden states."""

    def __init__(self, backbone: MiniMind):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """-> values [B, T] in fp32: column t is the value of the state made of tokens <= t."""
        out = self.backbone(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            return_logits=False,
            return_hidden=True,
        )
        return self.value_head(out.hidden).squeeze(-1).float()


def completion_values(critic: ValueModel, rows: dict[str, torch.Tensor], prompt_width: int) -> torch.Tensor:
    """V_t for every completion token t [n, R]: the value at the position that predicts it (column P - 1 + t)."""
    v = critic(rows["input_ids"], rows["attention_mask"], rows["position_ids"])
    r = rows["input_ids"].shape[1] - prompt_width
    return v[:, prompt_width - 1 : prompt_width - 1 + r]


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = common.setup_runtime(args.device, args.dtype, args.seed)
    args = rollout.resolve_auto(args, rt.is_cuda, _AUTO)
    reward_fn = rewards.build_rewards(
        args.reward, args.reward_model_path, rt.device, bool(args.reasoning), args.reward_batch_size
    )
    tok = common.load_tokenizer(rollout.tokenizer_path(args))
    ops = common.resolve_kernels(args.kernels, rt)
    actor = common.load_base_model(args.from_weight, ops, rt.device)
    ref = common.load_base_model(args.from_weight, ops, rt.device).eval().requires_grad_(False)
    critic = ValueModel(common.load_base_model(args.from_weight, ops, rt.device)).to(rt.device)
    data = rollout.load_prompts(args, tok, reward_fn.kinds)

    steps_per_epoch = len(data) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {args.data_path} has {len(data)} prompts, fewer than one batch of {args.batch_size}")
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    actor_opt = common.build_optimizer(actor, args.learning_rate, args.weight_decay)
    critic_opt = common.build_optimizer(critic, args.critic_learning_rate, args.weight_decay)
    start_step = 0
    if args.from_resume:
        folder = common.latest_resume(args.out_dir, args.save_weight)
        if folder is None:
            print(f"no resume checkpoint under {common.resume_dir(args.out_dir, args.save_weight)}: starting fresh")
        else:
            ckpt.load_model_weights(actor, folder)
            state = ckpt.load_train_state(folder)
            actor_opt.load_state_dict(state["optimizer"])
            critic.load_state_dict(state["critic"])
            critic_opt.load_state_dict(state["critic_optimizer"])
            common.set_rng_state(state["rng"])
            start_step = int(state["step"])
            print(f"resumed from {folder} at step {start_step}")

    train_fwd = torch.compile(actor, dynamic=True) if args.compile else actor
    print(
        f"ppo: {args.from_weight} ({actor.num_params():,} params; actor, reference, critic) on {rt.device} "
        f"({'bf16 autocast' if rt.amp_dtype else 'fp32'}{', compiled' if args.compile else ''}); "
        f"{len(data):,} prompts; {args.batch_size} prompts per rollout, minibatch {args.mini_batch_size} x "
        f"{args.ppo_epochs} epochs; reward {args.reward}; {total_steps} steps, lr {args.learning_rate:g} / critic "
        f"{args.critic_learning_rate:g}"
    )

    metrics = common.MetricsLog(Path(args.out_dir) / f"{args.save_weight}_metrics.jsonl", append=start_step > 0)
    actor.train()
    critic.train()
    order, order_epoch = None, -1
    skipped, history = 0, []
    timer = common.Timer(rt.device)
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="ppo", dynamic_ncols=True)
    with common.StopFlag() as stop:
        for step in bar:
            epoch, within = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = common.epoch_order(len(data), args.seed, epoch), epoch
            lr = common.lr_at(step, total_steps, args.learning_rate)
            common.set_lr(actor_opt, lr)
            common.set_lr(critic_opt, common.lr_at(step, total_steps, args.critic_learning_rate))

            # 1. Rollout: sample, rewards, then old/ref log-probs and values in mini_batch_size chunks.
            batch = rollout.prompt_batch(data, order, within, args.batch_size)
            ro = rollout.collect(
                actor,
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
                forward_batch=args.mini_batch_size,
                with_old_logp=True,
                train_forward=train_fwd,
                temperature=args.temperature,
                top_p=args.top_p,
                generator=rollout.rollout_generator(rt.device, args.seed, step),
            )
            n, mask = ro.input_ids.shape[0], ro.completion_mask
            slices = rollout.chunks(n, args.mini_batch_size)
            with torch.no_grad(), rt.autocast():
                old_values = torch.cat([completion_values(critic, ro.rows(sl), ro.prompt_width) for sl in slices])
            token_rewards = L.kl_penalised_rewards(ro.rewards, ro.old_logp, ro.ref_logp, mask, args.kl_coef)
            adv, returns = L.gae(token_rewards, old_values, mask, args.gamma, args.lam)
            if args.whiten_advantages:
                adv = L.whiten(adv, mask)

            # 2. PPO epochs over fixed minibatch chunks in a seeded order, stopping early on a large approximate KL.
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0}
            updates, micro, stopped, grad_norm = 0, 0, False, torch.zeros(())
            for _ in range(args.ppo_epochs):
                for j in torch.randperm(len(slices), generator=gen).tolist():
                    sl = slices[j]
                    m = mask[sl]
                    with rt.autocast():
                        logp, aux = rollout.forward_logp(train_fwd, ro.rows(sl), ro.prompt_width)
                        values = completion_values(critic, ro.rows(sl), ro.prompt_width)
                    logp = logp.float()
                    kl_now = L.approx_kl(logp.detach(), ro.old_logp[sl], m)
                    if float(kl_now) > args.early_stop_kl:
                        stopped = True
                        break
                    surrogate, _ = L.clipped_surrogate(logp, ro.old_logp[sl], adv[sl], args.clip_epsilon)
                    policy_loss = L.masked_mean(surrogate, m)
                    value_loss = L.clipped_value_loss(values, old_values[sl], returns[sl], m, args.cliprange_value)
                    total = policy_loss + args.vf_coef * value_loss + (aux if aux is not None else 0.0)
                    (total / args.accumulation_steps).backward()
                    sums["policy_loss"] += float(policy_loss.detach())
                    sums["value_loss"] += float(value_loss.detach())
                    sums["clip_frac"] += float(L.clip_fraction(logp.detach(), ro.old_logp[sl], m, args.clip_epsilon))
                    sums["approx_kl"] += float(kl_now)
                    updates += 1
                    micro += 1
                    if micro % args.accumulation_steps == 0:
                        grad_norm = _step(actor, critic, actor_opt, critic_opt, args.grad_clip)
                        skipped += int(not torch.isfinite(grad_norm))
                if stopped:
                    break
            if micro % args.accumulation_steps:
                grad_norm = _step(actor, critic, actor_opt, critic_opt, args.grad_clip)
                skipped += int(not torch.isfinite(grad_norm))
            actor_opt.zero_grad(set_to_none=True)
            critic_opt.zero_grad(set_to_none=True)

            done = step + 1
            record = {
                "step": done,
                "epoch": epoch,
                "reward": round(float(ro.rewards.mean()), 5),
                "reward_std": round(float(ro.rewards.std(unbiased=False)), 5),
                **{f"reward_{k}": round(float(v.float().mean()), 5) for k, v in ro.reward_parts.items()},
                "kl": round(float(L.masked_mean(ro.old_logp - ro.ref_logp, mask)), 6),
                "completion_len": round(float(ro.lengths.mean()), 2),
                **{k: round(v / max(updates, 1), 6) for k, v in sums.items()},
                "value_mean": round(float(L.masked_mean(old_values, mask)), 5),
                "updates": updates,
                "early_stop": stopped,
                "lr": lr,
                "grad_norm": round(float(grad_norm), 4),
                "skipped_steps": skipped,
            }
            history.append(record["reward"])
            if done % args.log_interval == 0 or done == total_steps:
                record["seconds"] = round(timer.lap(), 3)
                metrics.write(record)
                bar.set_postfix(reward=f"{record['reward']:.3f}", vloss=f"{record['value_loss']:.3f}")
            if done % args.save_interval == 0 or done == total_steps or stop.requested:
                state = {
                    "step": done,
                    "optimizer": actor_opt.state_dict(),
                    "critic": critic.state_dict(),
                    "critic_optimizer": critic_opt.state_dict(),
                    "rng": common.rng_state(),
                }
                common.save_resume(args.out_dir, args.save_weight, done, actor, tok, args, state, args.keep_last)
            if stop.requested:
                break
    bar.close()
    png = rollout.plot_rl_curves(
        metrics.path,
        Path(args.out_dir) / f"{args.save_weight}_reward.png",
        f"PPO, reward {args.reward}",
        keys=("reward", "kl", "value_loss"),
    )
    out = Path(args.out_dir) / args.save_weight
    print(f"done: {len(history)} steps; actor in {out}" + (f"; reward curve {png}" if png else ""))
    return {"rewards": history, "steps": total_steps, "out": str(out)}


def _step(actor, critic, actor_opt, critic_opt, grad_clip: float) -> torch.Tensor:
    """Clip both models' gradients and step both optimizers; a non-finite norm skips both. -> the actor's norm."""
    limit = grad_clip or float("inf")
    a = torch.nn.utils.clip_grad_norm_(actor.parameters(), limit)
    c = torch.nn.utils.clip_grad_norm_(critic.parameters(), limit)
    if torch.isfinite(a) and torch.isfinite(c):
        actor_opt.step()
        critic_opt.step()
    else:
        a = torch.tensor(float("nan"))
    actor_opt.zero_grad(set_to_none=True)
    critic_opt.zero_grad(set_to_none=True)
    return a


if __name__ == "__main__":
    main()
