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

Under torchrun (`torchrun --nproc_per_node N train/ppo.py`, --fsdp for FSDP2) each rank rolls out its own
batch_size prompts. The actor and the critic both train, so both are wrapped (DDP, or FSDP2 per block); the frozen
reference is not, every rank holds a copy. Advantages are whitened over the tokens of all ranks (all-reduced sums).
Each rank's policy and value losses are token means over its own minibatch and the gradients are averaged over
ranks, so ranks weigh equally rather than by their token counts. The approximate KL of the early stop is the mean
over ranks, so all ranks stop at the same minibatch; every backward all-reduces (no no_sync), since an early stop may
end an accumulation at any minibatch. Logged reward, KL and value statistics cover all ranks; the losses, clip
fraction and approximate KL are means of the ranks' values.

Deviations from MiniMind: MiniMind's current script adds the k3 KL to the loss; here the KL penalty is in the reward
(the classic RLHF formulation, as MiniMind's first PPO). Rollout sampling uses an RNG seeded by (seed, rollout index,
rank) so --from_resume on the same number of ranks continues exactly. The critic and its optimizer live in each
resume checkpoint's train state (only the actor is written as the model folder). Logged per step: reward, KL to the
reference, total loss (the loss curve), policy and value losses, clip fraction, approximate KL, completion length,
and the updates run before an early stop.

Outputs under --out_dir: {save_weight}/ (actor), {save_weight}_resume/step_N/, {save_weight}_metrics.jsonl,
{save_weight}_reward.png and {save_weight}_loss.png.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/ppo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn as nn

from minimind_fast.model import MiniMind
from train import common, rollout, step
from train import losses as L
from train.args import arg, parse_args
from train.metrics import Timer
from train.models import load_base_model
from train.resume import restore_resume, save_step
from train.runtime import (
    Runtime,
    all_reduce_mean,
    describe_runtime,
    full_state,
    load_full_state,
    setup_runtime,
    wrap_model,
)

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


def whiten_global(x_NR: torch.Tensor, mask_NR: torch.Tensor, rt: Runtime, eps: float = 1e-8) -> torch.Tensor:
    """losses.whiten over the masked tokens of every rank's rollout (mean and variance from all-reduced sums), so
    advantages are normalised over the global batch as in one process."""
    mean = rollout.global_masked_mean(x_NR, mask_NR, rt)
    var = rollout.global_masked_mean((x_NR - mean) ** 2, mask_NR, rt)
    return (x_NR - mean) * torch.rsqrt(var + eps) * mask_NR


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = setup_runtime(args.device, args.dtype, args.seed, args.dist_timeout)
    reward_fn, tok, ops, actor, ref, data = rollout.start_stage(args, rt, _AUTO)
    critic = ValueModel(load_base_model(args.from_weight, ops, rt.device)).to(rt.device)
    # One step = one rollout of batch_size prompts on each of world_size ranks (--accumulation_steps counts
    # minibatches per update here, not rollouts).
    plan = step.Plan.of(args, len(data), rt, "prompts", rollouts_per_step=1)

    actor_wrapped = wrap_model(actor, rt, fsdp=args.fsdp)
    critic_wrapped = wrap_model(critic, rt, fsdp=args.fsdp)
    backend = rollout.open_backend(args, actor, tok, rt)
    actor_opt = step.build_optimizer(actor, args.learning_rate, args.weight_decay)
    critic_opt = step.build_optimizer(critic, args.critic_learning_rate, args.weight_decay)
    start_step, state = restore_resume(args, rt, plan.rows_per_step, actor, actor_opt, tokenizer=tok)
    if state:
        load_full_state(critic, critic_opt, state["critic"], state["critic_optimizer"])
    train_fwd = torch.compile(actor_wrapped, dynamic=True) if args.compile else actor_wrapped
    summary = (
        f"ppo: {args.from_weight} ({actor.num_params():,} params; actor, reference, critic) on "
        f"{describe_runtime(rt, args)}; {len(data):,} prompts; {args.batch_size} prompts per rollout, "
        f"minibatch {args.mini_batch_size} x {args.ppo_epochs} epochs; reward {args.reward}; {plan.total_steps} steps, "
        f"lr {args.learning_rate:g} / critic {args.critic_learning_rate:g}"
    )
    metrics, guard = common.start_run(args, rt, start_step, summary)
    actor.train()
    critic.train()
    history = []
    timer = Timer(rt.device)
    bar = common.progress(start_step, plan.total_steps, "ppo", rt)
    pairs = [(actor, actor_opt), (critic, critic_opt)]  # stepped together, or skipped together
    with common.StopFlag() as stop:
        for s in bar:
            lr = plan.set_lr(actor_opt, s)
            step.set_lr(critic_opt, step.lr_at(s, plan.total_steps, args.critic_learning_rate, args.warmup_steps))

            # 1. Rollout: sample, rewards, then old/ref log-probs and values in mini_batch_size chunks.
            rollout.sync_backend(backend, actor)
            ro = rollout.rank_rollout(
                args, rt, data, plan, s, 0, actor, ref, reward_fn, tok,
                num_samples=1, with_old_logp=True, train_forward=train_fwd, forward_batch=args.mini_batch_size,
                backend=backend,
            )  # fmt: skip
            n, mask = ro.input_ids.shape[0], ro.completion_mask
            slices = rollout.chunks(n, args.mini_batch_size)
            with torch.no_grad(), rt.autocast():
                old_values = torch.cat(
                    [completion_values(critic_wrapped, ro.rows(sl), ro.prompt_width) for sl in slices]
                )
            token_rewards = L.kl_penalised_rewards(ro.rewards, ro.old_logp, ro.ref_logp, mask, args.kl_coef)
            adv, returns = L.gae(token_rewards, old_values, mask, args.gamma, args.lam)
            if args.whiten_advantages:
                adv = whiten_global(adv, mask, rt)

            # 2. PPO epochs over fixed minibatch chunks in a seeded order (the same on every rank), stopping early on
            # a large approximate KL (averaged over ranks, so all ranks stop together). Every backward all-reduces:
            # an early stop may end an accumulation at any minibatch.
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + s)
            sums = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0}
            updates, micro, stopped, grad_norm = 0, 0, False, torch.zeros(())
            for _ in range(args.ppo_epochs):
                for j in torch.randperm(len(slices), generator=gen).tolist():
                    sl = slices[j]
                    m = mask[sl]
                    with rt.autocast():
                        logp, aux = rollout.forward_logp(train_fwd, ro.rows(sl), ro.prompt_width)
                        values = completion_values(critic_wrapped, ro.rows(sl), ro.prompt_width)
                    logp = logp.float()
                    kl_now = all_reduce_mean(L.approx_kl(logp.detach(), ro.old_logp[sl], m), rt)
                    if float(kl_now) > args.early_stop_kl:
                        stopped = True
                        break
                    surrogate, _ = L.clipped_surrogate(logp, ro.old_logp[sl], adv[sl], args.clip_epsilon)
                    policy_loss = L.masked_mean(surrogate, m)
                    value_loss = L.clipped_value_loss(values, old_values[sl], returns[sl], m, args.cliprange_value)
                    total = policy_loss + args.vf_coef * value_loss + (aux if aux is not None else 0.0)
                    (total / args.accumulation_steps).backward()
                    sums["loss"] += float(total.detach())
                    sums["policy_loss"] += float(policy_loss.detach())
                    sums["value_loss"] += float(value_loss.detach())
                    sums["clip_frac"] += float(L.clip_fraction(logp.detach(), ro.old_logp[sl], m, args.clip_epsilon))
                    sums["approx_kl"] += float(kl_now)
                    updates += 1
                    micro += 1
                    if micro % args.accumulation_steps == 0:
                        grad_norm = step.optimizer_step(pairs, args.grad_clip, guard)[0]
                if stopped:
                    break
            if micro % args.accumulation_steps:
                grad_norm = step.optimizer_step(pairs, args.grad_clip, guard)[0]
            actor_opt.zero_grad(set_to_none=True)
            critic_opt.zero_grad(set_to_none=True)

            done = s + 1
            guard.read(done)  # every step: an RL step waits on the host anyway (sampling)
            means = all_reduce_mean(torch.tensor(list(sums.values()), dtype=torch.float64), rt)
            record = {
                "step": done,
                "epoch": plan.epoch(s),
                **rollout.reward_stats([ro], rt),
                "kl": round(float(rollout.global_masked_mean(ro.old_logp - ro.ref_logp, mask, rt)), 6),
                **{k: round(float(v) / max(updates, 1), 6) for k, v in zip(sums, means)},
                "value_mean": round(float(rollout.global_masked_mean(old_values, mask, rt)), 5),
                "updates": updates,
                "early_stop": stopped,
                "lr": lr,
                "grad_norm": round(float(grad_norm), 4),
                "skipped_steps": guard.skipped,
            }
            history.append(record["reward"])
            if plan.logs(done):
                record["seconds"] = round(timer.lap(), 3)
                metrics.write(record)
                bar.set_postfix(reward=f"{record['reward']:.3f}", vloss=f"{record['value_loss']:.3f}")
            stopping = plan.stopping(stop.requested, done, rt)
            if plan.saves(done) or stopping:
                critic_sd, critic_opt_sd = full_state(critic, critic_opt, rt)
                extra = {"critic": critic_sd, "critic_optimizer": critic_opt_sd}
                save_step(args, rt, done, plan.rows_per_step, actor, actor_opt, tok, extra)
            if stopping:
                break
    bar.close()
    rollout.finish_stage(args, rt, metrics, "PPO", ("reward", "kl", "value_loss"))
    return {"rewards": history, "steps": plan.total_steps, "out": str(Path(args.out_dir) / args.save_weight)}


if __name__ == "__main__":
    main()
