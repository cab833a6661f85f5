"""Direct Preference Optimization (Rafailov et al. 2023) on chosen/rejected answer pairs, from an SFT model.

    python train/dpo.py                                        # CPU: out/full_sft on data/sample/dpo.jsonl
    python train/dpo.py --from_weight out/full_sft --data_path dpo.jsonl --compile     # CUDA, MiniMind's defaults
    python train/dpo.py --from_resume 1                        # continue from the newest checkpoint
    torchrun --nproc_per_node 4 train/dpo.py --data_path dpo.jsonl   # DDP (add --fsdp for FSDP2)

Algorithm, as implemented: the policy and a frozen reference start from the same checkpoint (--from_weight). The
reference is in eval mode, without gradients, its matmul weights stored in the compute dtype (bf16 under bf16
autocast, else fp32; embedding, norms and MoE router stay fp32, so policy and reference agree exactly before the first
step).
Each batch of B pairs is one padded batch of 2B rows (chosen rows first, then the rejected rows of the same pairs),
so each model runs one forward per batch. Per-token log-probs come from the model's fused cross-entropy path
(loss_reduction="none", no [B, T, V] log-softmax) and are summed over the assistant tokens (sequence_logp); the loss
is -logsigmoid(beta * ((pc - pr) - (rc - rr))) averaged over pairs (train/losses.py: dpo_loss), plus the MoE balance
loss for MoE models, as MiniMind does. AdamW, gradient clipping 1.0, MiniMind's cosine schedule, as in pretraining.

Under torchrun each rank takes batch_size pairs of every micro-batch (the ranks together read what one process with
an N times larger batch would; the data position is counted in pairs, so a run resumes on another number of ranks).
Each rank's loss is the mean over its own pairs and the gradients are averaged over ranks (all-reduced once per
optimizer step): with the same number of pairs on every rank, exactly the loss of one process over the global
batch. The policy is wrapped (DDP, or FSDP2 per block with --fsdp); the frozen reference is not, every rank holds a
copy. The held-out evaluation runs over the whole held-out set on every rank (identical numbers; rank 0 logs them).

Deviations from MiniMind: log-probs without materialising logits; --length_norm 1 restores the older per-token mean
(it biased answers short, see sequence_logp); the last --eval_fraction of the file (at most --eval_max_pairs pairs)
is held out and evaluated before and after training:
  eval_logp_acc   fraction of pairs where the policy gives the chosen answer the higher log-prob (as trained)
  eval_reward_acc fraction where the implicit reward beta * (logp - ref_logp) of the chosen answer is higher
  eval_margin     mean chosen-minus-rejected implicit reward; eval_loss the DPO loss on the held-out pairs
Training logs loss, chosen/rejected rewards, their margin and the reward accuracy every --log_interval steps.

Outputs under --out_dir: {save_weight}/ (the policy), {save_weight}_resume/step_N/ (plus optimizer, step, RNG),
{save_weight}_metrics.jsonl, {save_weight}_loss.png.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/dpo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from minimind_fast.data import DPODataset, collate_dpo
from train import checks, common, step
from train.args import StageArgs, arg, parse_args, resolve_auto
from train.losses import dpo_loss, sequence_logp
from train.metrics import Timer
from train.models import frozen_model, load_base_model, open_dataset, stage_tokenizer
from train.resume import restore_resume, save_step
from train.runtime import Runtime, all_reduce_sum, describe_runtime, resolve_kernels, setup_runtime, wrap_model

# (CPU, CUDA). CUDA: MiniMind2's 4e-8 (its script warns that more makes the model forget). CPU: the tiny model of the
# CPU recipe barely moves at that size; swept on the sample data from the CPU SFT checkpoint (1 epoch, 810 pairs, the
# last 90 held out; held-out accuracy logp(chosen) > logp(rejected), 0.567 before): 1e-6 0.567, 1e-5 0.578,
# 1e-4 0.633, 3e-4 0.644, 1e-3 0.578. That sweep used earlier sample data; with the current data and tokenizer the
# default run (202 steps) from the CPU recipe's SFT checkpoint measured 0.767 -> 0.811 on its 90 held-out pairs.
_AUTO = {"learning_rate": (3e-4, 4e-8)}


@dataclass
class Args(StageArgs):
    data_path: str = arg("data/sample/dpo.jsonl", "DPO JSONL ({'chosen': [...], 'rejected': [...]} per line)")
    save_weight: str = arg("dpo", "name of the checkpoint folder under --out_dir")
    from_weight: str = arg("out/full_sft", "checkpoint folder of the SFT model (policy and reference start here)")
    epochs: int = arg(1, "passes over the training pairs")
    batch_size: int = arg(4, "pairs per micro-batch and rank (2x rows: chosen + rejected)")
    learning_rate: float | None = arg(None, "peak learning rate (default: 4e-8 on CUDA as MiniMind2, 3e-4 on CPU)")
    beta: float = arg(0.1, "DPO beta: strength of the implicit KL tie to the reference")
    length_norm: bool = arg(False, "1: mean log-prob per token instead of the sum (older behaviour; biases short)")
    eval_fraction: float = arg(0.1, "fraction of the file's last pairs held out for evaluation (0 = none)")
    eval_max_pairs: int = arg(512, "at most this many held-out pairs")
    max_seq_len: int = arg(1024, "truncate each conversation to this many tokens")
    compile: bool = arg(False, "torch.compile the policy and the reference")
    save_interval: int = arg(100, "optimizer steps between checkpoints")


def pair_logps(model, batch: dict, rt: Runtime, mean: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed (or mean) assistant-token log-probs of the 2B rows [2B] and the MoE aux loss (None if dense/eval)."""
    ids = batch["input_ids"].to(rt.device, non_blocking=True)
    labels = batch["labels"].to(rt.device, non_blocking=True)
    # Right padding only: causal attention never lets a real token see the padding, so no attention mask is needed.
    with rt.autocast():
        out = model(ids, labels=labels, loss_reduction="none")
    return sequence_logp(out.loss, labels, mean=mean), out.aux_loss


@torch.no_grad()
def evaluate(policy, ref_logp: torch.Tensor, data, indices: range, args: Args, rt: Runtime) -> dict:
    """Held-out preference metrics of the policy against cached reference log-probs ref_logp [n, 2]."""
    was_training = policy.training
    policy.eval()
    pol = policy_logps(policy, data, indices, args, rt)
    policy.train(was_training)
    loss, cr, rr = dpo_loss(pol[:, 0], pol[:, 1], ref_logp[:, 0], ref_logp[:, 1], args.beta)
    return {
        "eval_loss": round(loss.item(), 5),
        "eval_logp_acc": round((pol[:, 0] > pol[:, 1]).float().mean().item(), 4),
        "eval_reward_acc": round((cr > rr).float().mean().item(), 4),
        "eval_margin": round((cr - rr).mean().item(), 5),
        "eval_pairs": len(indices),
    }


@torch.no_grad()
def policy_logps(model, data, indices: range, args: Args, rt: Runtime) -> torch.Tensor:
    """[n, 2] (chosen, rejected) log-probs of the pairs data[i] for i in indices."""
    rows = []
    for a in range(0, len(indices), args.batch_size):
        batch = collate_dpo([data[i] for i in indices[a : a + args.batch_size]])
        logp, _ = pair_logps(model, batch, rt, args.length_norm)
        b = logp.shape[0] // 2
        rows.append(torch.stack([logp[:b], logp[b:]], dim=1).float().cpu())
    return torch.cat(rows) if rows else torch.zeros(0, 2)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = setup_runtime(args.device, args.dtype, args.seed, args.dist_timeout)
    args = resolve_auto(args, rt.is_cuda, _AUTO)
    if not 0.0 <= args.eval_fraction < 1.0:
        checks.fail(f"error: --eval_fraction must be in [0, 1), got {args.eval_fraction}")
    tok = stage_tokenizer(args.tokenizer, args.from_weight)
    ops = resolve_kernels(args.kernels, rt)
    model = load_base_model(args.from_weight, ops, rt.device)
    if tok.vocab_size > model.config.vocab_size:
        checks.fail(f"error: tokenizer has {tok.vocab_size} tokens, the model's vocab {model.config.vocab_size}")
    ref = frozen_model(args.from_weight, ops, rt)

    data = open_dataset(DPODataset, args, tok, rt)
    n_eval = min(int(len(data) * args.eval_fraction), args.eval_max_pairs)
    n_train = len(data) - n_eval
    eval_idx = range(n_train, len(data))  # the file's last pairs: never in a training batch
    plan = step.Plan.of(args, n_train, rt, "training pairs")

    wrapped = wrap_model(model, rt, fsdp=args.fsdp)
    optimizer = step.build_optimizer(model, args.learning_rate, args.weight_decay)
    start_step, _ = restore_resume(args, rt, plan.rows_per_step, model, optimizer, tokenizer=tok)
    train_model = torch.compile(wrapped) if args.compile else wrapped
    ref_model = torch.compile(ref) if args.compile else ref
    summary = (
        f"dpo: {model.num_params():,} params from {args.from_weight} on {describe_runtime(rt, args)}"
        f"{', bf16 reference' if rt.amp_dtype else ''}; {n_train} training pairs, {n_eval} held out; batch "
        f"{args.batch_size} x accum {args.accumulation_steps}; {plan.total_steps} steps, lr {args.learning_rate:g}, "
        f"beta {args.beta:g}{', length-normalised log-probs' if args.length_norm else ''}"
    )
    metrics, guard = common.start_run(args, rt, start_step, summary)
    eval_ref = policy_logps(ref_model, data, eval_idx, args, rt) if n_eval else None
    eval_before = evaluate(train_model, eval_ref, data, eval_idx, args, rt) if n_eval else {}
    if eval_before:
        metrics.write({"step": start_step, **eval_before})
        if rt.is_main:
            print("eval before: " + ", ".join(f"{k} {v}" for k, v in eval_before.items()))

    stepper = step.Stepper(model, wrapped, optimizer, rt, guard, args.accumulation_steps, args.grad_clip)
    sums = torch.zeros(5, device=rt.device)  # this rank's sums over pairs: loss, chosen/rejected reward, won; pairs

    def micro_batches(s: int):
        return (collate_dpo([data[i] for i in rows]) for rows in plan.micro_rows(s))

    def loss_fn(batch: dict) -> torch.Tensor:
        nonlocal sums
        with torch.no_grad():
            ref_logp, _ = pair_logps(ref_model, batch, rt, args.length_norm)
        logp, aux = pair_logps(train_model, batch, rt, args.length_norm)
        b = logp.shape[0] // 2
        loss, cr, rr = dpo_loss(logp[:b], logp[b:], ref_logp[:b], ref_logp[b:], args.beta)
        won = (cr > rr).sum()
        sums += torch.stack([loss.detach() * b, cr.detach().sum(), rr.detach().sum(), won, won.new_tensor(b)]).float()
        return loss if aux is None else loss + aux

    model.train()
    last_loss, done = float("nan"), start_step
    timer = Timer(rt.device)
    bar = common.progress(start_step, plan.total_steps, "dpo", rt)
    with common.StopFlag() as stop:
        for s in bar:
            lr = plan.set_lr(optimizer, s)
            _, grad_norm = step.train_step(stepper, micro_batches(s), loss_fn)
            done = s + 1
            if plan.logs(done):
                guard.read(done)
                dt = timer.lap()
                # Means over the pairs of all ranks (each rank's loss is the mean over its own, equally many, pairs).
                totals = all_reduce_sum(sums, rt)
                loss_s, cr_s, rr_s, acc_s = (totals[:4] / totals[4].clamp(min=1)).tolist()
                last_loss = loss_s
                metrics.write(
                    {
                        "step": done,
                        "epoch": plan.epoch(s),
                        "loss": round(loss_s, 5),
                        "chosen_reward": round(cr_s, 5),
                        "rejected_reward": round(rr_s, 5),
                        "margin": round(cr_s - rr_s, 5),
                        "accuracy": round(acc_s, 4),
                        "lr": lr,
                        "grad_norm": round(float(grad_norm), 4),
                        "pairs_per_s": round(float(totals[4]) / dt, 2),
                        "skipped_steps": guard.skipped,
                    }
                )
                bar.set_postfix(loss=f"{loss_s:.4f}", acc=f"{acc_s:.2f}", margin=f"{cr_s - rr_s:.3f}", lr=f"{lr:.1e}")
                sums.zero_()
            stopping = plan.stopping(stop.requested, done, rt)
            if plan.saves(done) or stopping:
                guard.read(done)
                save_step(args, rt, done, plan.rows_per_step, model, optimizer, tok)
            if stopping:
                break
    bar.close()
    eval_after = evaluate(train_model, eval_ref, data, eval_idx, args, rt) if n_eval else {}
    if eval_after:
        metrics.write({"step": done, **eval_after})
        if rt.is_main:
            print("eval after:  " + ", ".join(f"{k} {v}" for k, v in eval_after.items()))
    common.finish(args, rt, metrics, "DPO", last_loss)
    out = Path(args.out_dir) / args.save_weight
    return {
        "loss": last_loss,
        "steps": plan.total_steps,
        "out": str(out),
        "eval_before": eval_before,
        "eval_after": eval_after,
    }


if __name__ == "__main__":
    main()
