"""GRPO: group relative policy optimisation of the SFT model against a pluggable reward.

    python train/grpo.py                                          # CPU: out/full_sft -> out/grpo, rule reward
    python train/grpo.py --reward rule+shaping --reasoning 1      # also MiniMind's shaping, think/answer format
    python train/grpo.py --reward model --reward_model_path /path/to/reward_model
    python train/grpo.py --from_resume 1                          # continue from the newest checkpoint
    python train/grpo.py --loss_type cispo                        # MiniMind's current default loss (below)
    python train/grpo.py --agent 1                                # agentic RL with tools: out/tool_sft -> out/grpo

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

Under torchrun (`torchrun --nproc_per_node N train/grpo.py`, --fsdp for FSDP2) each rank rolls out its own
batch_size prompts per rollout, so the ranks together read what one process with an N times larger batch would, and
normalises advantages within its own groups (a group never spans ranks). Each rank's loss is the mean over its own
completions and the gradients are averaged over ranks: with the same number of completions on every rank, that is
the mean over all completions, as in one process. Gradients are all-reduced once per optimizer update (no_sync on
the earlier backward passes); an FSDP2 policy is gathered whole for sampling. The frozen reference is not wrapped:
every rank holds a copy. The logged reward statistics, KL and clip fraction cover all ranks' completions; the
logged loss is the mean of the ranks' losses.

--loss_type cispo replaces the clipped ratio term with CISPO's (MiniMax 2025, "MiniMax-M1", arXiv:2506.13585,
sec. 3.1): per token -(sg(min(ratio, epsilon_high)) * A * logp - beta * KL), the importance weight clamped at
--epsilon_high (5.0) and detached, so every token keeps the gradient w * A (no token is clipped out); same KL term
and same per-completion token mean (losses.cispo_loss). Its logged clip fraction is the share of tokens whose ratio
exceeded epsilon_high (their weight was clamped); its logged loss is not comparable to GRPO's (A * logp, not
ratio * A). With num_iterations = 1 the ratio is 1 and the two losses give the same gradient.

Deviations from MiniMind: its current release defaults to CISPO (`--loss_type cispo`); here the default stays
`--loss_type grpo`, the GRPO objective above, so earlier runs and results are unchanged. The rollout sampling RNG
is a function of (seed, rollout index, rank), so --from_resume on the same number of ranks reproduces the
uninterrupted run exactly. Logged per step: reward mean/std (and each reward kind), KL to the reference, completion
length, loss, clip fraction.

--agent 1 is agentic RL (MiniMind's train_agent.py, as a mode of this stage: the plan, resume, DDP, logging and both
losses are the ones above). Each completion is a multi-turn rollout (minimind_fast.agent.run_agent): the model
answers, may call tools (minimind_fast.toolcall: the calculator, and lookup in the --world file), reads their
results and goes on, for up to --max_turns model turns of up to --max_gen_len tokens each, every row of a turn
sampled in one batch with the same per-(seed, rollout index, rank) RNG and sampling settings as above. The
observations between the turns (tool results and the next generation prompt) sit in the completion but are masked
out of the labels and the completion mask, so the loss and the KL are the token means over the model's own tokens
only (each turn through its turn-end token). The prompt records are MiniMind's: {"conversations": [system message
with "tools" (a JSON string or a list of function specs), user], "answer": ...}; a record without tools is offered
the toolbox's. A prompt is never cut (the tool list would go): one longer than --max_seq_len stops the run. The
reward reads each rollout's final answer (the last turn's text without its tool-call blocks): the rule reward
(answer_matches) and, with shaping in --reward, MiniMind's shaping, exactly as above; a rollout that ends with a
call still pending (--max_turns ran out, or a turn was cut before its end) has no final answer and is scored as an
empty reply. Logged per step as well: the mean tool calls, tool errors and model turns per rollout, and the share
of unfinished rollouts. Defaults that change with --agent 1: --data_path data/sample/rl_tools.jsonl, --from_weight
out/tool_sft, --max_seq_len 1024 (the tool list alone is a few hundred tokens), --max_gen_len 96 per turn (a
tool call alone is 54-64 tokens with the shipped tokenizer). The generation prompt is the
template's default (no empty <think> block), the way SFT renders an assistant turn. Unlike MiniMind's trainer, the
model's turn-end token is trained (the model must learn to hand the turn over), the calculator never runs eval on
model text, and the rollouts are batched across rows instead of generated one conversation at a time.

Outputs under --out_dir: {save_weight}/ (policy), {save_weight}_resume/step_N/, {save_weight}_metrics.jsonl,
{save_weight}_reward.png and {save_weight}_loss.png.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/grpo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from minimind_fast.toolcall import Toolbox, WorldError
from train import checks, common, rollout, step
from train import losses as L
from train.args import arg, parse_args
from train.metrics import Timer
from train.resume import restore_resume, save_step
from train.runtime import Runtime, all_reduce_mean, all_reduce_sum, describe_runtime, no_sync, setup_runtime, wrap_model

# (CPU, CUDA). CUDA: MiniMind's GRPO row. CPU: the tiny model of the CPU recipe needs a far larger learning rate to
# move within a few hundred steps. Measured from the CPU recipe's SFT model on data/sample/rlaif.jsonl (rule reward,
# batch 2 x G 8): at 1e-5 the mean reward stays at 0.09-0.10 over 300 steps; at 3e-4 it goes 0.060 (steps 1-100) ->
# 0.094 (201-300) -> 0.165 (501-550) while the KL to the reference grows to about 1.1.
_AUTO = {"learning_rate": (3e-4, 1e-7)}


# Defaults that depend on --agent: (plain GRPO, agentic RL). Declared None below and filled in Args.__post_init__,
# before the flags are checked, so that an explicit value is always kept.
_MODE_DEFAULTS = {
    "data_path": ("data/sample/rlaif.jsonl", "data/sample/rl_tools.jsonl"),
    "from_weight": ("out/full_sft", "out/tool_sft"),
    "max_seq_len": (66, 1024),
    "max_gen_len": (None, 96),  # plain: the machine's default (RL_AUTO); a tool call alone is 54-64 tokens
}


@dataclass
class Args(rollout.RLArgs):
    data_path: str | None = arg(
        None,
        "RL prompts: SFT-format JSONL (an 'answer' field for --reward rule); default data/sample/rlaif.jsonl, "
        "data/sample/rl_tools.jsonl with --agent 1",
    )
    from_weight: str | None = arg(
        None,
        "checkpoint folder of the policy to start from (also the frozen reference); default out/full_sft, "
        "out/tool_sft with --agent 1 (under --out_dir when that holds one)",
    )
    max_seq_len: int | None = arg(
        None,
        "prompt tokens kept, the last ones (default 66); with --agent 1 the longest prompt allowed, tools included "
        "(default 1024)",
    )
    save_weight: str = arg("grpo", "name of the checkpoint folder under --out_dir")
    num_generations: int = arg(8, "completions per prompt (G)")
    num_iterations: int = arg(1, "optimizer updates per step on the same rollouts (mu)")
    epsilon: float = arg(0.2, "ratio clip (grpo)")
    loss_type: str = arg("grpo", "policy loss: grpo (clipped ratio) or cispo (clamped, detached IS weight)")
    epsilon_high: float = arg(5.0, "upper clamp of the importance weight (cispo; MiniMind's value)")
    adv_eps: float = arg(1e-4, "eps in (r - mean_g) / (std_g + eps)")
    agent: int = arg(0, "1: agentic RL, multi-turn rollouts with tool calls (see the docstring)")
    max_turns: int = arg(3, "most model turns per rollout (--agent 1)")
    world: str = arg("data/sample/world.json", "world file of the lookup tool (--agent 1; 'none': calculator only)")

    def __post_init__(self) -> None:
        default_start = self.from_weight is None
        for name, (plain, agentic) in _MODE_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, agentic if self.agent else plain)
        if default_start:  # as train/args.py does for every stage: the previous stage's output under --out_dir
            there = Path(self.out_dir) / Path(self.from_weight).relative_to("out")
            if there.is_dir():
                self.from_weight = str(there)


def load_toolbox(world: str) -> Toolbox:
    """The tools of agentic RL: the calculator, and lookup over --world ('none': the calculator only)."""
    try:
        return Toolbox(None if world.lower() == "none" else world)
    except WorldError as exc:
        checks.fail(f"error: --world: {exc}")


def train_on_rollout(
    wrapped,
    train_fwd,
    ro: rollout.Rollout,
    adv_N: torch.Tensor,
    args: Args,
    rt: Runtime,
    scale: float,
    sync: bool,
) -> dict[str, float]:
    """Forward + backward of the policy loss (GRPO's or CISPO's, --loss_type) over one rollout, chunk by chunk;
    gradients are scaled by `scale`. The gradient all-reduce runs only on the last chunk, and only when sync (the
    last backward before a step). -> this rank's loss and its summed KL, clipped tokens (for CISPO: clamped weights)
    and token count (for global token means)."""
    n = ro.input_ids.shape[0]
    slices = rollout.chunks(n, args.forward_batch)
    out = {"loss": 0.0, "kl_sum": 0.0, "clip_sum": 0.0, "tokens": 0.0}
    for i, sl in enumerate(slices):
        with no_sync(wrapped, sync=sync and i == len(slices) - 1):
            with rt.autocast():
                logp, aux = rollout.forward_logp(train_fwd, ro.rows(sl), ro.prompt_width)
            logp = logp.float()
            mask = ro.completion_mask[sl]
            old = ro.old_logp[sl] if ro.old_logp is not None else logp.detach()
            if args.loss_type == "cispo":
                loss = L.cispo_loss(logp, old, ro.ref_logp[sl], adv_N[sl], mask, args.epsilon_high, args.beta)
            else:
                loss = L.grpo_loss(logp, old, ro.ref_logp[sl], adv_N[sl], mask, args.epsilon, args.beta)
            frac = (sl.stop - sl.start) / n  # per-completion means: chunk means weigh by their share of rows
            total = loss * frac if aux is None else (loss + aux) * frac
            (total * scale).backward()
        out["loss"] += float(loss.detach()) * frac
        out["kl_sum"] += float((L.k3_kl(logp.detach(), ro.ref_logp[sl]) * mask).sum())
        if args.loss_type == "cispo":  # tokens whose importance weight was clamped at epsilon_high
            frac_clipped = L.upper_clip_fraction(logp.detach(), old, mask, args.epsilon_high)
        else:  # tokens whose ratio left [1 - epsilon, 1 + epsilon]
            frac_clipped = L.clip_fraction(logp.detach(), old, mask, args.epsilon)
        out["clip_sum"] += float(frac_clipped) * float(mask.sum())
        out["tokens"] += float(mask.sum())
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = setup_runtime(args.device, args.dtype, args.seed, args.dist_timeout)
    if args.num_generations < 2:
        checks.fail("error: --num_generations must be >= 2 (advantages are relative to the group)")
    reward_fn, tok, _, policy, ref, data = rollout.start_stage(args, rt, _AUTO)
    toolbox = load_toolbox(args.world) if args.agent else None
    # One step = accumulation_steps rollouts of batch_size prompts on each of world_size ranks.
    plan = step.Plan.of(args, len(data), rt, "prompts")

    wrapped = wrap_model(policy, rt, fsdp=args.fsdp)
    backend = rollout.open_backend(args, policy, tok, rt)
    optimizer = step.build_optimizer(policy, args.learning_rate, args.weight_decay)
    start_step, _ = restore_resume(args, rt, plan.rows_per_step, policy, optimizer, tokenizer=tok)
    train_fwd = torch.compile(wrapped, dynamic=True) if args.compile else wrapped
    g = args.num_generations
    summary = (
        f"grpo: {args.from_weight} ({policy.num_params():,} params) on {describe_runtime(rt, args)}; "
        f"{len(data):,} prompts; {args.batch_size} prompts x {g} samples x accum {args.accumulation_steps}; "
        f"reward {args.reward}; {plan.total_steps} steps ({plan.steps_per_epoch} per epoch), lr {args.learning_rate:g}"
    )
    if args.agent:
        tools = ", ".join(spec["function"]["name"] for spec in toolbox.specs)
        summary += f"; agentic: up to {args.max_turns} turns, tools {tools}"
    metrics, guard = common.start_run(args, rt, start_step, summary)
    policy.train()
    history = []
    timer = Timer(rt.device)
    bar = common.progress(start_step, plan.total_steps, "grpo", rt)
    with common.StopFlag() as stop:
        for s in bar:
            lr = plan.set_lr(optimizer, s)

            rollout.sync_backend(backend, policy)
            # 1. This rank's rollouts (sample, rewards, then reference log-probs; old log-probs only when mu > 1).
            rollouts, advs = [], []
            for micro in range(args.accumulation_steps):
                if args.agent:
                    ro = rollout.rank_agent_rollout(
                        args, rt, data, plan, s, micro, policy, ref, reward_fn, tok, toolbox, num_samples=g,
                        max_turns=args.max_turns, with_old_logp=args.num_iterations > 1, train_forward=train_fwd,
                        backend=backend,
                    )  # fmt: skip
                else:
                    ro = rollout.rank_rollout(
                        args, rt, data, plan, s, micro, policy, ref, reward_fn, tok,
                        num_samples=g, with_old_logp=args.num_iterations > 1, train_forward=train_fwd,
                        backend=backend,
                    )  # fmt: skip
                rollouts.append(ro)
                advs.append(L.group_advantages(ro.rewards, g, args.adv_eps))

            # 2. num_iterations optimizer updates on them.
            for _ in range(args.num_iterations):
                parts = [
                    train_on_rollout(wrapped, train_fwd, ro, adv, args, rt, 1.0 / len(rollouts), j == len(rollouts) - 1)
                    for j, (ro, adv) in enumerate(zip(rollouts, advs))
                ]
                grad_norm = step.optimizer_step([(policy, optimizer)], args.grad_clip, guard)

            done = s + 1
            guard.read(done)  # every step: an RL step waits on the host anyway (sampling)
            keys = ("loss", "kl_sum", "clip_sum", "tokens")
            sums = all_reduce_sum(torch.tensor([sum(p[k] for p in parts) for k in keys], dtype=torch.float64), rt)
            group_std = torch.cat([ro.rewards.view(-1, g).std(1, unbiased=False) for ro in rollouts]).mean()
            record = {
                "step": done,
                "epoch": plan.epoch(s),
                **rollout.reward_stats(rollouts, rt),
                "group_std": round(float(all_reduce_mean(group_std, rt)), 5),
                "kl": round(float(sums[1] / sums[3].clamp(min=1)), 6),
                "loss": round(float(sums[0]) / (len(parts) * rt.world_size), 6),
                "clip_frac": round(float(sums[2] / sums[3].clamp(min=1)), 5),
                "lr": lr,
                "grad_norm": round(float(grad_norm), 4),
                "skipped_steps": guard.skipped,
            }
            if args.agent:
                record.update(rollout.agent_stats(rollouts, rt))
            history.append(record["reward"])
            if plan.logs(done):
                record["seconds"] = round(timer.lap(), 3)
                metrics.write(record)
                bar.set_postfix(
                    reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.4f}", len=record["completion_len"]
                )
            stopping = plan.stopping(stop.requested, done, rt)
            if plan.saves(done) or stopping:
                save_step(args, rt, done, plan.rows_per_step, policy, optimizer, tok)
            if stopping:
                break
    bar.close()
    title = ("CISPO" if args.loss_type == "cispo" else "GRPO") + (", agentic" if args.agent else "")
    rollout.finish_stage(args, rt, metrics, title, ("reward", "kl", "tool_calls") if args.agent else ("reward", "kl"))
    return {"rewards": history, "steps": plan.total_steps, "out": str(Path(args.out_dir) / args.save_weight)}


if __name__ == "__main__":
    main()
