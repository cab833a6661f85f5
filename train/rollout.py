"""Rollouts for the RL stages (PPO, GRPO, SPO) and the plumbing those three scripts share.

A rollout, in the order it happens (rewards come before any policy/reference forward, so the reward model and the
text work never sit in memory next to the activations of a forward pass):
  1. sample: every prompt of the batch, each repeated num_samples times (row i*G + j is sample j of prompt i), goes
     through minimind_fast.generate.generate in ONE batch, left-padded, with the policy in eval mode;
  2. pack: rows become [left pad | prompt | completion | right pad] of width T = P + R, where P is the longest
     prompt and R the longest completion. The completion mask covers each completion up to and including its first
     eos (all of it when no eos came within max_new_tokens); attention_mask is 1 on prompt and masked completion
     tokens, and position_ids count real tokens only, so a left-padded row is computed exactly as the row alone;
  3. rewards on the decoded text (train/rewards.py);
  4. per-token log-probs of the completions under the policy (optional: `old_logp`, no grad) and the frozen
     reference, through the model's fused per-token NLL path (`model(ids, labels=..., loss_reduction="none",
     attention_mask=..., position_ids=...)`), never a full-vocab log_softmax over the whole rollout. Forwards run in
     chunks of `forward_batch` rows, under the training autocast, with the policy in the mode it trains in, so that
     the training forward over the same chunk reproduces `old_logp` bit for bit (the first ratio is exactly 1).

Agentic rollouts (train/grpo.py --agent 1; agent_collect, rank_agent_rollout): step 1 is minimind_fast.agent.run_agent,
the multi-turn loop in which the model calls tools and reads their results (up to max_turns model turns per row, all
rows of a turn in one engine batch), and the completion region holds the model's turns AND the observations between
them (tool results and the next generation prompt, as the chat template renders them). pack_turns lays the rows out
as above, with attention on every real token but labels and completion_mask only on the tokens the model sampled
(each turn through its turn-end token), so the loss, the KL and the completion length count the model's own tokens
and never an observation. Rewards read each row's final answer (agent.AgentResult.reply: "" when a call was left
pending). The log-probs are computed as for single-turn rollouts.

Under torchrun every rank rolls out its own prompts (rank_rollout) with its own sampling RNG, a function of
(seed, rollout index, rank); an FSDP2-sharded policy is gathered whole for the sampling (runtime.gathered), since
ranks stop decoding at different steps. Logged reward statistics are gathered over all ranks (reward_stats).

Shape legend: N rows (prompts x samples), P padded prompt width, R completion width, T = P + R.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minimind_fast.agent import run_agent, tools_from_messages
from minimind_fast.backend import BackendError, EngineBackend, RolloutBackend, make_backend
from minimind_fast.data import prompt_messages
from minimind_fast.engine import SamplingParams
from train import checks, common
from train.args import StageArgs, arg, resolve_auto
from train.models import frozen_model, load_base_model, open_dataset, stage_tokenizer
from train.runtime import Runtime, all_gather_cat, all_reduce_sum, gathered, resolve_kernels
from train.step import Plan

IGNORE_INDEX = -100


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T] 1 on prompt tokens and on completion tokens through the first eos
    position_ids: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T] the masked completion tokens, -100 elsewhere
    prompt_width: int  # P
    completion_mask: torch.Tensor  # [N, R] float
    rewards: torch.Tensor  # [N] float
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    completions: list[str] = field(default_factory=list)
    group: torch.Tensor | None = None  # [N] index of the row's prompt in the batch
    old_logp: torch.Tensor | None = None  # [N, R] policy log-probs at sampling time (0 outside the mask)
    ref_logp: torch.Tensor | None = None  # [N, R] reference log-probs (0 outside the mask)
    agent: dict[str, torch.Tensor] = field(default_factory=dict)  # agentic rows: per-row tool_calls, tool_errors, ...

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width :]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)

    def rows(self, idx: slice | torch.Tensor) -> dict[str, torch.Tensor]:
        """The model inputs of some rows (what forward_logp takes)."""
        return {
            "input_ids": self.input_ids[idx],
            "attention_mask": self.attention_mask[idx],
            "position_ids": self.position_ids[idx],
            "labels": self.labels[idx],
        }


# ---------------------------------------------------------------------------------------------------------- sampling
def sample_completions(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    num_samples: int,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int = 2,
    generator: torch.Generator | None = None,
    backend: RolloutBackend | None = None,
) -> list[list[int]]:
    """num_samples completions per prompt, all in one call of the rollout backend (default: the in-process engine
    over `model`, every row in one batch): row i*num_samples + j is sample j of prompt i. With a generator, each row
    samples from its own generator, seeded from it (reproducible, and the same on a resume)."""
    rows = [list(p) for p in prompts for _ in range(num_samples)]
    seeds = row_seeds(len(rows), generator)
    params = [
        SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=s)
        for s in seeds
    ]
    backend = backend if backend is not None else EngineBackend(model, None, eos_id)
    return [c.output_ids for c in backend.generate(rows, params)]


def row_seeds(n: int, generator: torch.Generator | None) -> list[int | None]:
    """One sampling seed per row, drawn from the rollout's generator (None without one: unseeded rows)."""
    if generator is None:
        return [None] * n
    return torch.randint(0, 2**62, (n,), generator=generator, device=generator.device).tolist()


def mask_through_first_eos(completion_ids_NR: torch.Tensor, valid_NR: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on each row's tokens up to and including its first eos, within the valid (generated) tokens; float [N, R]."""
    is_eos = (completion_ids_NR == eos_id) & valid_NR.bool()
    r = completion_ids_NR.shape[1]
    # Index of the first eos, or R when there is none (then every valid token counts).
    first = torch.where(
        is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(is_eos[:, 0], r, dtype=torch.long)
    )
    cols = torch.arange(r, device=completion_ids_NR.device)[None, :]
    return ((cols <= first[:, None]) & valid_NR.bool()).float()


def pack(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], eos_id: int = 2, pad_id: int = 0
) -> dict[str, Any]:
    """Rows [left pad | prompt | completion | right pad] -> input_ids, attention_mask, position_ids, labels [N, T],
    completion_mask [N, R], prompt_width P."""
    n = len(prompts)
    p_w = max(len(p) for p in prompts)
    r_w = max(1, max(len(c) for c in completions))
    ids = torch.full((n, p_w + r_w), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, p_w), dtype=torch.long)
    valid = torch.zeros((n, r_w), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, p_w - len(p) : p_w] = torch.tensor(list(p), dtype=torch.long)
        prompt_mask[i, p_w - len(p) :] = 1
        if len(c):
            ids[i, p_w : p_w + len(c)] = torch.tensor(list(c), dtype=torch.long)
            valid[i, : len(c)] = 1
    cmask = mask_through_first_eos(ids[:, p_w:], valid, eos_id)
    attn = torch.cat([prompt_mask, cmask.long()], dim=1)
    pos = (attn.cumsum(dim=1) - 1).clamp(min=0)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, p_w:] = torch.where(cmask.bool(), ids[:, p_w:], torch.full_like(ids[:, p_w:], IGNORE_INDEX))
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "position_ids": pos,
        "labels": labels,
        "completion_mask": cmask,
        "prompt_width": p_w,
    }


def pack_turns(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    model_masks: Sequence[Sequence[int]],
    pad_id: int = 0,
) -> dict[str, Any]:
    """Agentic rows [left pad | prompt | model turns and observations | right pad] -> what pack returns. Every real
    token is attended (attention_mask 1) and positioned; labels and completion_mask are the completion tokens whose
    model_mask is 1 (the ones the model sampled), so observations are read but never trained on."""
    n = len(prompts)
    p_w = max(len(p) for p in prompts)
    r_w = max(1, max(len(c) for c in completions))
    ids = torch.full((n, p_w + r_w), pad_id, dtype=torch.long)
    attn = torch.zeros((n, p_w + r_w), dtype=torch.long)
    cmask = torch.zeros((n, r_w), dtype=torch.float)
    for i, (p, c, m) in enumerate(zip(prompts, completions, model_masks)):
        if len(m) != len(c):
            raise ValueError(f"row {i}: {len(c)} completion ids but {len(m)} mask entries")
        ids[i, p_w - len(p) : p_w + len(c)] = torch.tensor([*p, *c], dtype=torch.long)
        attn[i, p_w - len(p) : p_w + len(c)] = 1
        cmask[i, : len(c)] = torch.tensor(list(m), dtype=torch.float)
    pos = (attn.cumsum(dim=1) - 1).clamp(min=0)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, p_w:] = torch.where(cmask.bool(), ids[:, p_w:], torch.full_like(ids[:, p_w:], IGNORE_INDEX))
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "position_ids": pos,
        "labels": labels,
        "completion_mask": cmask,
        "prompt_width": p_w,
    }


# --------------------------------------------------------------------------------------------------------- log-probs
def forward_logp(
    model: Callable, rows: dict[str, torch.Tensor], prompt_width: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of the completion columns [n, R] (0 where labels are -100) and the MoE aux loss, through
    the model's fused per-token NLL. Runs under whatever grad/autocast mode the caller set."""
    out = model(
        rows["input_ids"],
        labels=rows["labels"],
        loss_reduction="none",
        attention_mask=rows["attention_mask"],
        position_ids=rows["position_ids"],
    )
    return -out.loss[:, prompt_width:], out.aux_loss


def chunks(n: int, size: int) -> list[slice]:
    """Row slices of at most size rows (size <= 0: one slice)."""
    size = n if size <= 0 else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def token_logprobs(
    model: Callable, ro: Rollout, forward_batch: int, autocast: contextlib.AbstractContextManager | None = None
) -> torch.Tensor:
    """forward_logp over the whole rollout in chunks of forward_batch rows, without grad -> [N, R] fp32."""
    outs = []
    for sl in chunks(ro.input_ids.shape[0], forward_batch):
        with autocast if autocast is not None else contextlib.nullcontext():
            logp, _ = forward_logp(model, ro.rows(sl), ro.prompt_width)
        outs.append(logp.float())
    return torch.cat(outs)


def collect(
    policy: torch.nn.Module,
    ref: torch.nn.Module | None,
    prompts: Sequence[Sequence[int]],
    prompt_texts: Sequence[str],
    records: Sequence[dict],
    reward_fn: Callable,
    tokenizer: Any,
    *,
    num_samples: int,
    max_new_tokens: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    forward_batch: int = 0,
    with_old_logp: bool = True,
    train_forward: Callable | None = None,
    temperature: float = 0.8,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    backend: RolloutBackend | None = None,
) -> Rollout:
    """One rollout: sample (through backend, default the in-process engine over the policy), pack, rewards, then the
    policy's (optional) and reference's log-probs.

    train_forward is what the training step calls (e.g. the compiled policy; default the policy itself), so old_logp
    comes from the same function; it runs in the policy's current train/eval mode."""
    g = num_samples
    with gathered(policy):  # FSDP2: ranks stop sampling at different steps, so no collective per token
        comps = sample_completions(
            policy,
            prompts,
            g,
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            eos_id=tokenizer.eos_id,
            generator=generator,
            backend=backend,
        )
    rows = [p for p in prompts for _ in range(g)]
    packed = pack(rows, comps, tokenizer.eos_id, tokenizer.pad_id)
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in comps]
    rewards, parts = reward_fn(
        [t for t in prompt_texts for _ in range(g)], texts, [rec for rec in records for _ in range(g)]
    )
    ro = _rollout(packed, rewards, parts, texts, len(prompts), g, device)
    return _add_logprobs(ro, policy, ref, train_forward, forward_batch, autocast, with_old_logp)


def _rollout(
    packed: dict[str, Any], rewards: torch.Tensor, parts: dict, texts: list[str], n_prompts: int, g: int, device
) -> Rollout:
    return Rollout(
        input_ids=packed["input_ids"].to(device),
        attention_mask=packed["attention_mask"].to(device),
        position_ids=packed["position_ids"].to(device),
        labels=packed["labels"].to(device),
        prompt_width=packed["prompt_width"],
        completion_mask=packed["completion_mask"].to(device),
        rewards=rewards.float().to(device),
        reward_parts=parts,
        completions=texts,
        group=torch.arange(n_prompts, device=device).repeat_interleave(g),
    )


def _add_logprobs(
    ro: Rollout,
    policy: torch.nn.Module,
    ref: torch.nn.Module | None,
    train_forward: Callable | None,
    forward_batch: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
    with_old_logp: bool,
) -> Rollout:
    """The policy's (optional) and the reference's per-token log-probs of a packed rollout."""
    if with_old_logp:
        ro.old_logp = token_logprobs(train_forward or policy, ro, forward_batch, autocast())
    if ref is not None:
        ro.ref_logp = token_logprobs(ref, ro, forward_batch, autocast())
    return ro


def agent_collect(
    policy: torch.nn.Module,
    ref: torch.nn.Module | None,
    conversations: Sequence[Sequence[dict]],
    tools: Sequence[Sequence[dict] | None],
    prompt_texts: Sequence[str],
    records: Sequence[dict],
    reward_fn: Callable,
    tokenizer: Any,
    toolbox: Any,
    *,
    num_samples: int,
    max_new_tokens: int,
    max_turns: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    forward_batch: int = 0,
    with_old_logp: bool = True,
    train_forward: Callable | None = None,
    temperature: float = 0.8,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    max_total_tokens: int | None = None,
    backend: RolloutBackend | None = None,
) -> Rollout:
    """One agentic rollout: every conversation num_samples times (row i*G + j is sample j of conversation i) through
    agent.run_agent (max_new_tokens per model turn, the same per-row seeds from the generator as collect draws),
    pack_turns, rewards on each row's final reply, then the log-probs as collect computes them. Per-row tool_calls,
    tool_errors, unfinished and turns go into Rollout.agent."""
    g = num_samples
    rows = [conv for conv in conversations for _ in range(g)]
    row_tools = [t for t in tools for _ in range(g)]
    params = [
        SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=s)
        for s in row_seeds(len(rows), generator)
    ]
    backend = backend if backend is not None else EngineBackend(policy, None, tokenizer.eos_id)
    with gathered(policy):
        results = run_agent(backend, tokenizer, rows, row_tools, toolbox, params, max_turns, None, max_total_tokens)
    packed = pack_turns([r.prompt_ids for r in results], [r.completion_ids for r in results],
                        [r.model_mask for r in results], tokenizer.pad_id)  # fmt: skip
    replies = [r.reply for r in results]
    rewards, parts = reward_fn(
        [t for t in prompt_texts for _ in range(g)], replies, [rec for rec in records for _ in range(g)]
    )
    ro = _rollout(packed, rewards, parts, replies, len(conversations), g, device)
    ro.agent = {
        "tool_calls": torch.tensor([r.tool_calls for r in results], dtype=torch.float, device=device),
        "tool_errors": torch.tensor([r.tool_errors for r in results], dtype=torch.float, device=device),
        "unfinished": torch.tensor([not r.finished for r in results], dtype=torch.float, device=device),
        "turns": torch.tensor([r.turns for r in results], dtype=torch.float, device=device),
    }
    return _add_logprobs(ro, policy, ref, train_forward, forward_batch, autocast, with_old_logp)


def rollout_generator(device: torch.device, seed: int, index: int) -> torch.Generator:
    """The sampling RNG of rollout number `index`: a function of (seed, index) only, so --from_resume samples exactly
    what the uninterrupted run would have."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


def rank_generator(seed: int, rt: Runtime, plan: Plan, step: int, micro: int) -> torch.Generator:
    """The sampling RNG of this rank's rollout `micro` at optimizer step `step`: rollout number
    (step * accumulation_steps + micro) * world_size + rank."""
    return rollout_generator(rt.device, seed, (step * plan.accumulation_steps + micro) * rt.world_size + rt.rank)


def rank_rollout(
    args: RLArgs,
    rt: Runtime,
    data: Any,
    plan: Plan,
    step: int,
    micro: int,
    policy: torch.nn.Module,
    ref: torch.nn.Module | None,
    reward_fn: Callable,
    tokenizer: Any,
    *,
    num_samples: int,
    with_old_logp: bool,
    train_forward: Callable | None = None,
    forward_batch: int | None = None,
    backend: RolloutBackend | None = None,
) -> Rollout:
    """Rollout `micro` (of plan.accumulation_steps rollouts per optimizer step) of this rank at optimizer step `step`:
    its own batch_size prompts of the epoch order (plan.rows: rank r takes the r-th slice, so the ranks together read
    what one process with a world_size times larger batch would) and its own sampling RNG, rollout number
    (step * accumulation_steps + micro) * world_size + rank. The rest is collect() with the stage's flags."""
    batch = prompt_batch(data, plan.order(step), plan.batch_index(step, micro), args.batch_size)
    return collect(
        policy,
        ref,
        batch["ids"],
        batch["texts"],
        batch["records"],
        reward_fn,
        tokenizer,
        num_samples=num_samples,
        max_new_tokens=args.max_gen_len,
        device=rt.device,
        autocast=rt.autocast,
        forward_batch=args.forward_batch if forward_batch is None else forward_batch,
        with_old_logp=with_old_logp,
        train_forward=train_forward,
        temperature=args.temperature,
        top_p=args.top_p,
        generator=rank_generator(args.seed, rt, plan, step, micro),
        backend=backend,
    )


def rank_agent_rollout(
    args: RLArgs,
    rt: Runtime,
    data: Any,
    plan: Plan,
    step: int,
    micro: int,
    policy: torch.nn.Module,
    ref: torch.nn.Module | None,
    reward_fn: Callable,
    tokenizer: Any,
    toolbox: Any,
    *,
    num_samples: int,
    max_turns: int,
    with_old_logp: bool,
    train_forward: Callable | None = None,
    forward_batch: int | None = None,
    backend: RolloutBackend | None = None,
) -> Rollout:
    """rank_rollout for agentic RL: the same prompts of the epoch order, the same sampling RNG and settings, through
    agent_collect. Each record's tools come from its system message (agent.tools_from_messages), else the
    toolbox's; its prompt, tools included, must fit --max_seq_len (it is never cut: the tool list would go)."""
    batch = agent_prompt_batch(
        data, plan.order(step), plan.batch_index(step, micro), args.batch_size, tokenizer, toolbox, args.max_seq_len
    )
    return agent_collect(
        policy,
        ref,
        batch["conversations"],
        batch["tools"],
        batch["texts"],
        batch["records"],
        reward_fn,
        tokenizer,
        toolbox,
        num_samples=num_samples,
        max_new_tokens=args.max_gen_len,
        max_turns=max_turns,
        device=rt.device,
        autocast=rt.autocast,
        forward_batch=args.forward_batch if forward_batch is None else forward_batch,
        with_old_logp=with_old_logp,
        train_forward=train_forward,
        temperature=args.temperature,
        top_p=args.top_p,
        generator=rank_generator(args.seed, rt, plan, step, micro),
        backend=backend,
    )


# ---------------------------------------------------------------------------------------------- shared stage plumbing
# Defaults that depend on the machine: (CPU, CUDA). SPEC/MiniMind: batch 2, prompt 66, generation up to 1536 tokens,
# lr ~1e-7 for the 26M-104M models; the CPU recipe uses the tiny preset, short answers and a larger lr.
RL_AUTO = {
    "max_gen_len": (48, 1536),
    "forward_batch": (16, 16),
}


@dataclass
class RLArgs(StageArgs):
    """Flags shared by ppo.py, grpo.py and spo.py (each adds its own and sets its defaults)."""

    data_path: str = arg(
        "data/sample/rlaif.jsonl", "RL prompts: SFT-format JSONL (an 'answer' field for --reward rule)"
    )
    save_weight: str = arg("rl", "name of the checkpoint folder under --out_dir")
    from_weight: str = arg("out/full_sft", "checkpoint folder of the policy to start from (also the frozen reference)")
    reward: str = arg("rule", "reward kinds joined by '+': rule, shaping, model (see train/rewards.py)")
    reward_model_path: str = arg("none", "local HF sequence-classification reward model folder (for --reward model)")
    reward_batch_size: int = arg(16, "texts per reward-model forward")
    reasoning: int = arg(0, "1: ask every reply for <think>/<answer> format (rule reward reads the <answer> block)")
    epochs: int = arg(1, "passes over the prompts")
    batch_size: int = arg(2, "prompts per rollout (per rank)")
    accumulation_steps: int = arg(1, "rollouts per optimizer step")
    learning_rate: float | None = arg(None, "peak learning rate")
    max_seq_len: int = arg(66, "prompt tokens kept (the last ones)")
    max_gen_len: int | None = arg(None, "most new tokens per completion (default: 48 on CPU, 1536 on CUDA)")
    temperature: float = arg(0.8, "sampling temperature of the rollouts")
    top_p: float = arg(1.0, "nucleus sampling of the rollouts (1 = off)")
    beta: float = arg(0.02, "KL coefficient against the frozen reference")
    forward_batch: int | None = arg(None, "rows per log-prob forward (0 = the whole rollout at once)")
    log_interval: int = arg(1, "optimizer steps between log lines")
    save_interval: int = arg(50, "optimizer steps between checkpoints")
    seed: int = arg(42, "seed for data order and sampling")
    rollout_backend: str = arg(
        "engine",
        "where rollouts are sampled: engine (in-process) or the URL of a tools/serve.py started with "
        "--allow_weight_reload, e.g. http://127.0.0.1:8998 (minimind_fast/backend.py)",
    )


def open_backend(args: RLArgs, policy: torch.nn.Module, tokenizer: Any, rt: Runtime) -> RolloutBackend:
    """--rollout_backend: the in-process engine over the policy (default), or an OpenAI-compatible server that
    samples the rollouts; sync_backend then sends it the policy's weights before every step's rollouts. A server
    serves one process: under torchrun every rank samples with its own engine."""
    if args.rollout_backend.strip() == "engine":
        return EngineBackend(policy, None, tokenizer.eos_id)
    if rt.world_size > 1:
        checks.fail("error: --rollout_backend URL runs in one process only; under torchrun leave it at engine")
    try:
        return make_backend(args.rollout_backend, policy, tokenizer, tokenizer.eos_id)
    except ValueError as exc:
        checks.fail(f"error: --rollout_backend: {exc}")


def sync_backend(backend: RolloutBackend, policy: torch.nn.Module) -> None:
    """Make the backend sample with the policy's current weights (nothing to do for the in-process engine); a
    server that cannot take them ends the run with its one-line reason."""
    try:
        backend.sync_weights(policy)
    except BackendError as exc:
        raise SystemExit(f"error: rollout backend: {exc}") from None


def start_stage(
    args: RLArgs, rt: Runtime, auto: dict[str, tuple[Any, Any]]
) -> tuple[Callable, Any, Any, torch.nn.Module, torch.nn.Module, Any]:
    """What every RL stage loads first -> (reward function, tokenizer, kernel ops, policy, frozen reference, prompts),
    after filling the machine-dependent defaults (RL_AUTO and the stage's auto). The reward is built first: a bad
    --reward or --reward_model_path fails before any model is loaded. The reference is the same checkpoint, frozen
    (models.frozen_model): every rank holds its own copy."""
    from train import rewards

    resolve_auto(args, rt.is_cuda, {**RL_AUTO, **auto})
    reward_fn = rewards.build_rewards(
        args.reward, args.reward_model_path, rt.device, bool(args.reasoning), args.reward_batch_size
    )
    tok = stage_tokenizer(args.tokenizer, args.from_weight)
    ops = resolve_kernels(args.kernels, rt)
    policy = load_base_model(args.from_weight, ops, rt.device)
    ref = frozen_model(args.from_weight, ops, rt)
    return reward_fn, tok, ops, policy, ref, load_prompts(args, tok, reward_fn.kinds, rt)


def load_prompts(args: RLArgs, tokenizer: Any, kinds: Sequence[str], rt: Runtime) -> Any:
    """The prompt data set, checked up front: a DataError, or a record without "answer" for --reward rule, stops the
    run naming path:lineno (--skip_bad_lines skips such records). Every record is checked, in the one validation pass
    that indexes the file."""
    from minimind_fast.data import RLPromptDataset

    require = {"answer": "--reward rule compares each reply with it"} if "rule" in kinds else {}
    return open_dataset(functools.partial(RLPromptDataset, require=require), args, tokenizer, rt)


def prompt_batch(data: Any, order: torch.Tensor, batch_index: int, batch_size: int) -> dict[str, list]:
    """Prompts number batch_index of an epoch order -> prompt ids, texts and records."""
    items = [data[int(i)] for i in order[batch_index * batch_size : (batch_index + 1) * batch_size]]
    return {
        "ids": [it["prompt_ids"].tolist() for it in items],
        "texts": [it["prompt_text"] for it in items],
        "records": [it["record"] for it in items],
    }


def agent_prompt_batch(
    data: Any, order: torch.Tensor, batch_index: int, batch_size: int, tokenizer: Any, toolbox: Any, max_prompt: int
) -> dict[str, list]:
    """Prompts number batch_index of an epoch order, for agentic rollouts -> conversations (the prompt messages),
    their tools, prompt texts (rendered with the tools and the generation prompt) and records. A record whose tools
    cannot be read, or whose prompt is longer than max_prompt tokens, stops the run naming path:lineno."""
    out: dict[str, list] = {"conversations": [], "tools": [], "texts": [], "records": []}
    for i in order[batch_index * batch_size : (batch_index + 1) * batch_size].tolist():
        where = data.index.where(int(i))
        record = data.index.record(int(i))
        messages = prompt_messages(record, where)
        try:
            tools = tools_from_messages(messages)
        except ValueError as exc:
            checks.fail(f"error: {where}: {exc}")
        tools = toolbox.specs if tools is None else tools
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        n = len(tokenizer.encode(text))
        if n > max_prompt:
            checks.fail(
                f"error: {where}: the prompt with its tools is {n} tokens, more than --max_seq_len {max_prompt} "
                "(agent prompts are not cut, which would drop the tool list): raise --max_seq_len"
            )
        out["conversations"].append(messages)
        out["tools"].append(tools)
        out["texts"].append(text)
        out["records"].append(record)
    return out


def agent_stats(rollouts: Sequence[Rollout], rt: Runtime) -> dict[str, float]:
    """Per-row means over every rank's agentic rows: tool calls, tool errors, unfinished rollouts (a call left
    pending), model turns."""
    return {
        k: round(float(all_gather_cat(torch.cat([ro.agent[k] for ro in rollouts]), rt).mean()), 5)
        for k in ("tool_calls", "tool_errors", "unfinished", "turns")
    }


def reward_stats(rollouts: Sequence[Rollout], rt: Runtime) -> dict[str, float]:
    """Reward mean and std, each reward kind's mean and the mean completion length over the rollouts of every rank
    (gathered, so they describe the global batch)."""
    r = all_gather_cat(torch.cat([ro.rewards for ro in rollouts]), rt)
    lengths = all_gather_cat(torch.cat([ro.lengths for ro in rollouts]), rt)
    parts = {
        k: all_gather_cat(torch.cat([ro.reward_parts[k].float() for ro in rollouts]), rt)
        for k in rollouts[0].reward_parts
    }
    return {
        "reward": round(float(r.mean()), 5),
        "reward_std": round(float(r.std(unbiased=False)), 5),
        **{f"reward_{k}": round(float(v.mean()), 5) for k, v in parts.items()},
        "completion_len": round(float(lengths.float().mean()), 2),
    }


def global_masked_mean(x_NR: torch.Tensor, mask_NR: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """losses.masked_mean over the masked tokens of every rank's rows: sum and count are all-reduced."""
    sums = all_reduce_sum(torch.stack([(x_NR * mask_NR).sum(), mask_NR.sum()]).float(), rt)
    return sums[0] / sums[1].clamp(min=1)


def finish_stage(args: RLArgs, rt: Runtime, metrics: Any, title: str, keys: Sequence[str]) -> None:
    """common.finish, then rank 0 also draws the reward curves ({save_weight}_reward.png): reward and the keys."""
    if common.finish(args, rt, metrics, title):
        out = Path(args.out_dir) / f"{args.save_weight}_reward.png"
        png = plot_rl_curves(metrics.path, out, f"{title}, reward {args.reward}", keys)
        if png:
            print(f"reward curve {png}")


def plot_rl_curves(
    metrics_path: Path, png_path: Path, title: str, keys: Sequence[str] = ("reward", "kl")
) -> Path | None:
    """Reward (with a moving average) and other metrics against step from a metrics JSONL file into a PNG."""
    records = [json.loads(line) for line in open(metrics_path)] if metrics_path.exists() else []
    records = [r for r in records if "step" in r and "reward" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if all(k in r for r in records)]
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), sharex=True, squeeze=False)
    steps = [r["step"] for r in records]
    for ax, k in zip(axes[:, 0], keys):
        ys = [r[k] for r in records]
        ax.plot(steps, ys, lw=0.8, alpha=0.5, label=k)
        w = max(1, len(ys) // 20)
        if w > 1:
            avg = [sum(ys[max(0, i - w + 1) : i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(ys))]
            ax.plot(steps, avg, lw=1.6, label=f"{k} (moving mean of {w})")
        ax.set_ylabel(k)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("optimizer step")
    axes[0, 0].set_title(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
