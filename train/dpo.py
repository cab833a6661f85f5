"""Direct Preference Optimization (Rafailov et al. 2023) on chosen/rejected answer pairs, from an SFT model.

    python train/dpo.py                                        # CPU: out/full_sft on data/sample/dpo.jsonl
    python train/dpo.py --from_weight out/full_sft --data_path dpo.jsonl --compile     # CUDA, MiniMind's defaults
    python train/dpo.py --from_resume 1                        # continue from the newest checkpoint

Algorithm, as implemented: the policy and a frozen reference start from the same checkpoint (--from_weight). The
reference is in eval mode, without gradients, its matmul weights stored in the compute dtype (bf16 on CUDA, fp32 on
CPU; embedding, norms and MoE router stay fp32, so policy and reference agree exactly before the first step).
Each batch of B pairs is one padded batch of 2B rows (chosen rows first, then the rejected rows of the same pairs),
so each model runs one forward per batch. Per-token log-probs come from the model's fused cross-entropy path
(loss_reduction="none", no [B, T, V] log-softmax) and are summed over the assistant tokens (sequence_logp); the loss
is -logsigmoid(beta * ((pc - pr) - (rc - rr))) averaged over pairs (train/losses.py: dpo_loss), plus the MoE balance
loss for MoE models, as MiniMind does. AdamW, gradient clipping 1.0, MiniMind's cosine schedule, as in pretraining.

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
from tqdm import tqdm

from minimind import checkpoint as ckpt
from minimind.data import DataError, DPODataset, collate_dpo
from minimind.model import MiniMind
from minimind.tokenizer import Tokenizer
from train import common
from train.common import arg
from train.losses import dpo_loss, sequence_logp

# (CPU, CUDA). CUDA: MiniMind2's 4e-8 (its script warns that more makes the model forget). CPU: the tiny model of the
# CPU recipe barely moves at that size; swept on the sample data from the CPU SFT checkpoint (1 epoch, 810 pairs, the
# last 90 held out; held-out accuracy logp(chosen) > logp(rejected), 0.567 before): 1e-6 0.567, 1e-5 0.578,
# 1e-4 0.633, 3e-4 0.644, 1e-3 0.578.
_AUTO = {"learning_rate": (3e-4, 4e-8)}

# The weights that only ever enter autocast matmuls: stored in bf16 they give bit-identical results at a third of the
# memory. Embedding (the residual stream's dtype and the tied head), norms and the MoE router stay fp32, as in the
# trained model, so the frozen copy computes exactly what the same weights compute under autocast.
_MATMUL_WEIGHTS = ("_proj.weight", "w_gate", "w_up", "w_down")


@dataclass
class Args:
    data_path: str = arg("data/sample/dpo.jsonl", "DPO JSONL ({'chosen': [...], 'rejected': [...]} per line)")
    out_dir: str = arg("out", "where checkpoints, metrics and the loss curve go")
    save_weight: str = arg("dpo", "name of the checkpoint folder under --out_dir")
    from_weight: str = arg("out/full_sft", "checkpoint folder of the SFT model (policy and reference start here)")
    from_resume: int = arg(0, "1: continue from the newest checkpoint in {out_dir}/{save_weight}_resume")
    tokenizer: str | None = arg(None, "tokenizer folder (default: the one saved with --from_weight)")
    epochs: int = arg(1, "passes over the training pairs")
    batch_size: int = arg(4, "pairs per micro-batch (2x rows: chosen + rejected)")
    accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    learning_rate: float | None = arg(None, "peak learning rate (default: 4e-8 on CUDA as MiniMind2, 3e-4 on CPU)")
    beta: float = arg(0.1, "DPO beta: strength of the implicit KL tie to the reference")
    length_norm: bool = arg(False, "1: mean log-prob per token instead of the sum (older behaviour; biases short)")
    eval_fraction: float = arg(0.1, "fraction of the file's last pairs held out for evaluation (0 = none)")
    eval_max_pairs: int = arg(512, "at most this many held-out pairs")
    warmup_steps: int = arg(0, "linear warmup steps before the cosine schedule")
    weight_decay: float = arg(0.01, "AdamW weight decay (matrices only)")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0 = off)")
    max_seq_len: int = arg(1024, "truncate each conversation to this many tokens")
    max_steps: int = arg(0, "stop after this many optimizer steps (0 = run all epochs)")
    device: str = arg("auto", "cuda, cpu, or auto")
    dtype: str = arg("auto", "bfloat16 or float32 (auto: bf16 autocast on CUDA, fp32 on CPU)")
    kernels: str = arg("auto", "ops spec: torch | triton | liger | auto, with overrides like 'triton,rope=torch'")
    compile: bool = arg(False, "torch.compile the policy and the reference")
    max_bad_steps: int = arg(10, "stop after this many non-finite steps in a row (each one is skipped and counted)")
    skip_bad_lines: bool = arg(False, "count and skip malformed data lines instead of stopping at the first")
    wandb: bool = arg(False, "also log to Weights & Biases (needs `pip install wandb`)")
    swanlab: bool = arg(False, "also log to SwanLab (needs `pip install swanlab`)")
    log_interval: int = arg(10, "optimizer steps between log lines")
    save_interval: int = arg(100, "optimizer steps between checkpoints")
    keep_last: int = arg(2, "resume checkpoints to keep")
    seed: int = arg(42, "seed for the data order")


def resolve_auto(args: Args, on_cuda: bool) -> Args:
    for name, (cpu, cuda) in _AUTO.items():
        if getattr(args, name) is None:
            setattr(args, name, cuda if on_cuda else cpu)
    return args


def stage_tokenizer(path: str | None, from_weight: str) -> Tokenizer:
    """--tokenizer, else the tokenizer saved with the starting checkpoint, else the shipped one."""
    if path is None and (Path(from_weight) / "tokenizer.json").is_file():
        path = from_weight
    return common.load_tokenizer(path)


def frozen_copy(from_weight: str, ops, rt: common.Runtime) -> MiniMind:
    """The reference: the same checkpoint, eval mode, no gradients, its matmul weights stored in the compute dtype
    (bf16 under autocast; see _MATMUL_WEIGHTS), so at step 0 it computes exactly what the policy computes."""
    ref = common.load_base_model(from_weight, ops, rt.device)
    ref.eval().requires_grad_(False)
    if rt.amp_dtype is not None:
        for pname, p in ref.named_parameters():
            if pname.endswith(_MATMUL_WEIGHTS):
                p.data = p.data.to(rt.amp_dtype)
    return ref


def pair_logps(model, batch: dict, rt: common.Runtime, mean: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed (or mean) assistant-token log-probs of the 2B rows [2B] and the MoE aux loss (None if dense/eval)."""
    ids = batch["input_ids"].to(rt.device, non_blocking=True)
    labels = batch["labels"].to(rt.device, non_blocking=True)
    # Right padding only: causal attention never lets a real token see the padding, so no attention mask is needed.
    with rt.autocast():
        out = model(ids, labels=labels, loss_reduction="none")
    return sequence_logp(out.loss, labels, mean=mean), out.aux_loss


@torch.no_grad()
def evaluate(policy, ref_logp: torch.Tensor, data, indices: range, args: Args, rt: common.Runtime) -> dict:
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
def policy_logps(model, data, indices: range, args: Args, rt: common.Runtime) -> torch.Tensor:
    """[n, 2] (chosen, rejected) log-probs of the pairs data[i] for i in indices."""
    rows = []
    for a in range(0, len(indices), args.batch_size):
        batch = collate_dpo([data[i] for i in indices[a : a + args.batch_size]])
        logp, _ = pair_logps(model, batch, rt, args.length_norm)
        b = logp.shape[0] // 2
        rows.append(torch.stack([logp[:b], logp[b:]], dim=1).float().cpu())
    return torch.cat(rows) if rows else torch.zeros(0, 2)


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = common.setup_runtime(args.device, args.dtype, args.seed)
    if rt.world_size > 1:
        raise SystemExit("error: train/dpo.py runs in a single process; launch it without torchrun")
    args = resolve_auto(args, rt.is_cuda)
    if not 0.0 <= args.eval_fraction < 1.0:
        raise SystemExit(f"error: --eval_fraction must be in [0, 1), got {args.eval_fraction}")
    tok = stage_tokenizer(args.tokenizer, args.from_weight)
    ops = common.resolve_kernels(args.kernels, rt)
    trackers = common.open_trackers(args.wandb, args.swanlab, "minimind", args.save_weight, vars(args))
    model = common.load_base_model(args.from_weight, ops, rt.device)
    if tok.vocab_size > model.config.vocab_size:
        raise SystemExit(f"error: tokenizer has {tok.vocab_size} tokens, the model's vocab {model.config.vocab_size}")
    ref = frozen_copy(args.from_weight, ops, rt)

    try:
        data = DPODataset(args.data_path, tok, args.max_seq_len, skip_bad_lines=args.skip_bad_lines)
    except (DataError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    n_eval = min(int(len(data) * args.eval_fraction), args.eval_max_pairs)
    n_train = len(data) - n_eval
    eval_idx = range(n_train, len(data))  # the file's last pairs: never in a training batch
    pairs_per_step = args.batch_size * args.accumulation_steps
    steps_per_epoch = n_train // pairs_per_step
    if steps_per_epoch == 0:
        raise SystemExit(
            f"error: {args.data_path} has {n_train} training pairs, fewer than one optimizer step needs "
            f"({args.batch_size} x {args.accumulation_steps}); lower --batch_size"
        )
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    optimizer = common.build_optimizer(model, args.learning_rate, args.weight_decay)
    start_step = 0
    if args.from_resume:
        folder = common.latest_resume(args.out_dir, args.save_weight)
        if folder is None:
            print(f"no resume checkpoint under {common.resume_dir(args.out_dir, args.save_weight)}: starting fresh")
        else:
            ckpt.load_model_weights(model, folder)
            state = ckpt.load_train_state(folder)
            optimizer.load_state_dict(state["optimizer"])
            common.set_rng_state(state["rng"])
            start_step = int(state["step"])
            print(f"resumed from {folder} at step {start_step}")

    train_model = torch.compile(model) if args.compile else model
    ref_model = torch.compile(ref) if args.compile else ref
    print(
        f"dpo: {model.num_params():,} params from {args.from_weight} on {rt.device} "
        f"({'bf16 autocast, bf16 reference' if rt.amp_dtype else 'fp32'}{', compiled' if args.compile else ''}); "
        f"{n_train} training pairs, {n_eval} held out; batch {args.batch_size} x accum {args.accumulation_steps}; "
        f"{total_steps} steps, lr {args.learning_rate:g}, beta {args.beta:g}"
        f"{', length-normalised log-probs' if args.length_norm else ''}"
    )

    metrics = common.MetricsLog(
        Path(args.out_dir) / f"{args.save_weight}_metrics.jsonl", append=start_step > 0, trackers=trackers
    )
    eval_ref = policy_logps(ref_model, data, eval_idx, args, rt) if n_eval else None
    eval_before = evaluate(train_model, eval_ref, data, eval_idx, args, rt) if n_eval else {}
    if eval_before:
        metrics.write({"step": start_step, **eval_before})
        print("eval before: " + ", ".join(f"{k} {v}" for k, v in eval_before.items()))

    model.train()
    order, order_epoch = None, -1
    sums, pairs = torch.zeros(4, device=rt.device), 0  # summed over pairs: loss, chosen/rejected reward, accuracy
    skipped, bad_streak, last_loss, done = 0, 0, float("nan"), start_step
    timer = common.Timer(rt.device)
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="dpo", dynamic_ncols=True)
    with common.StopFlag() as stop:
        for step in bar:
            epoch, within = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = common.epoch_order(n_train, args.seed, epoch), epoch
            lr = common.lr_at(step, total_steps, args.learning_rate, args.warmup_steps)
            common.set_lr(optimizer, lr)
            for micro in range(args.accumulation_steps):
                first = (within * args.accumulation_steps + micro) * args.batch_size
                batch = collate_dpo([data[int(i)] for i in order[first : first + args.batch_size]])
                with torch.no_grad():
                    ref_logp, _ = pair_logps(ref_model, batch, rt, args.length_norm)
                logp, aux = pair_logps(train_model, batch, rt, args.length_norm)
                b = logp.shape[0] // 2
                loss, cr, rr = dpo_loss(logp[:b], logp[b:], ref_logp[:b], ref_logp[b:], args.beta)
                total = loss if aux is None else loss + aux
                (total / args.accumulation_steps).backward()
                sums += torch.stack([loss.detach() * b, cr.sum(), rr.sum(), (cr > rr).sum()]).float()
                pairs += b
            grad_norm = common.clip_grad_norm(model, args.grad_clip)
            if torch.isfinite(grad_norm):
                optimizer.step()
                bad_streak = 0
            else:
                skipped, bad_streak = skipped + 1, bad_streak + 1
                tqdm.write(f"step {step + 1}: non-finite loss or gradient, step skipped ({skipped} so far)")
                if bad_streak >= args.max_bad_steps:
                    metrics.write({"step": step + 1, "skipped_steps": skipped, "stopped": "non-finite"})
                    last = common.latest_resume(args.out_dir, args.save_weight)
                    raise SystemExit(
                        f"error: {bad_streak} non-finite steps in a row; stopping. Last good checkpoint: "
                        f"{last if last is not None else 'none written yet'}"
                    )
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            if done % args.log_interval == 0 or done == total_steps:
                dt = timer.lap()
                loss_s, cr_s, rr_s, acc_s = (sums / max(pairs, 1)).tolist()
                last_loss = loss_s
                metrics.write(
                    {
                        "step": done,
                        "epoch": epoch,
                        "loss": round(loss_s, 5),
                        "chosen_reward": round(cr_s, 5),
                        "rejected_reward": round(rr_s, 5),
                        "margin": round(cr_s - rr_s, 5),
                        "accuracy": round(acc_s, 4),
                        "lr": lr,
                        "grad_norm": round(float(grad_norm), 4),
                        "pairs_per_s": round(pairs / dt, 2),
                        "skipped_steps": skipped,
                    }
                )
                bar.set_postfix(loss=f"{loss_s:.4f}", acc=f"{acc_s:.2f}", margin=f"{cr_s - rr_s:.3f}", lr=f"{lr:.1e}")
                sums.zero_()
                pairs = 0
            if done % args.save_interval == 0 or done == total_steps or stop.requested:
                state = {"step": done, "optimizer": optimizer.state_dict(), "rng": common.rng_state()}
                common.save_resume(args.out_dir, args.save_weight, done, model, tok, args, state, args.keep_last)
            if stop.requested:
                break
    bar.close()
    eval_after = evaluate(train_model, eval_ref, data, eval_idx, args, rt) if n_eval else {}
    if eval_after:
        metrics.write({"step": done, **eval_after})
        print("eval after:  " + ", ".join(f"{k} {v}" for k, v in eval_after.items()))
    metrics.close()
    png = common.plot_loss_curve(metrics.path, Path(args.out_dir) / f"{args.save_weight}_loss.png", "DPO")
    print(
        f"done: loss {last_loss:.4f}; model in {Path(args.out_dir) / args.save_weight}"
        + (f"; loss curve {png}" if png else "")
    )
    return {
        "loss": last_loss,
        "steps": total_steps,
        "out": str(Path(args.out_dir) / args.save_weight),
        "eval_before": eval_before,
        "eval_after": eval_after,
    }


if __name__ == "__main__":
    main()
