"""Reasoning distillation (black-box): SFT on R1-style `<think>...</think><answer>...</answer>` conversations, with
the tag tokens weighted up so the model learns the format firmly.

    python train/distill_reason.py                              # CPU: out/dpo on data/sample/r1_mix.jsonl
    python train/distill_reason.py --from_weight out/full_sft --data_path r1_mix_1024.jsonl --compile   # CUDA
    python train/distill_reason.py --from_resume 1

Algorithm, as implemented: the SFT loss (cross-entropy on assistant tokens only) where every label position that is
part of a tag occurrence (`<think>`, `</think>`, `<answer>`, `</answer>` by default, --tags) weighs --tag_weight (10,
MiniMind2's value) and every other trained position 1. The weighted sum is divided by the number of trained labels,
not by the sum of the weights (MiniMind's normalisation), via the model's token_weight. Tags are located as whole token
sequences on the labels (with the shipped tokenizer each tag is three tokens, e.g. `<` `think` `>`), so only tag
occurrences are weighted; MiniMind instead weighs every position whose token id appears in any tag, which also hits
unrelated `<` and `>`. AdamW, clipping 1.0, MiniMind's cosine schedule, bf16 autocast on CUDA, as in the other stages.

Outputs under --out_dir: {save_weight}/, {save_weight}_resume/step_N/, {save_weight}_metrics.jsonl,
{save_weight}_loss.png.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/distill_reason.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

from minimind import checkpoint as ckpt
from minimind.data import IGNORE_INDEX, DataError, SFTDataset, collate_sft
from minimind.tokenizer import Tokenizer
from train import common
from train.common import arg
from train.losses import tag_weights

# (CPU, CUDA). CUDA: MiniMind2's 1e-6. CPU: measured from the tiny CPU DPO model on the sample r1_mix (one epoch,
# 137 steps): the tag-weighted loss ended at 7.52 with 1e-4 and at 0.98 with 1e-3.
_AUTO = {"learning_rate": (1e-3, 1e-6)}
_TAG_SCAN = 64  # conversations checked at start-up for tag occurrences


@dataclass
class Args:
    data_path: str = arg("data/sample/r1_mix.jsonl", "reasoning SFT JSONL (think/answer text in assistant turns)")
    out_dir: str = arg("out", "where checkpoints, metrics and the loss curve go")
    save_weight: str = arg("reason", "name of the checkpoint folder under --out_dir")
    from_weight: str = arg("out/dpo", "checkpoint folder to start from (a DPO or SFT model)")
    from_resume: int = arg(0, "1: continue from the newest checkpoint in {out_dir}/{save_weight}_resume")
    tokenizer: str | None = arg(None, "tokenizer folder (default: the one saved with --from_weight)")
    tags: str = arg("<think>,</think>,<answer>,</answer>", "comma-separated tag strings whose tokens are weighted")
    tag_weight: float = arg(10.0, "loss weight of the tag tokens (other trained tokens weigh 1)")
    epochs: int = arg(1, "passes over the data")
    batch_size: int = arg(8, "conversations per micro-batch")
    accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    learning_rate: float | None = arg(None, "peak learning rate (default: 1e-6 on CUDA as MiniMind2, 1e-3 on CPU)")
    warmup_steps: int = arg(0, "linear warmup steps before the cosine schedule")
    weight_decay: float = arg(0.01, "AdamW weight decay (matrices only)")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0 = off)")
    max_seq_len: int = arg(720, "truncate conversations to this many tokens")
    max_steps: int = arg(0, "stop after this many optimizer steps (0 = run all epochs)")
    device: str = arg("auto", "cuda, cpu, or auto")
    dtype: str = arg("auto", "bfloat16 or float32 (auto: bf16 autocast on CUDA, fp32 on CPU)")
    kernels: str = arg("auto", "ops spec: torch | triton | liger | auto, with overrides like 'triton,rope=torch'")
    compile: bool = arg(False, "torch.compile the model")
    max_bad_steps: int = arg(10, "stop after this many non-finite steps in a row (each one is skipped and counted)")
    skip_bad_lines: bool = arg(False, "count and skip malformed data lines instead of stopping at the first")
    wandb: bool = arg(False, "also log to Weights & Biases (needs `pip install wandb`)")
    swanlab: bool = arg(False, "also log to SwanLab (needs `pip install swanlab`)")
    log_interval: int = arg(10, "optimizer steps between log lines")
    save_interval: int = arg(200, "optimizer steps between checkpoints")
    keep_last: int = arg(2, "resume checkpoints to keep")
    seed: int = arg(42, "seed for the data order")


def resolve_auto(args: Args, on_cuda: bool) -> Args:
    for name, (cpu, cuda) in _AUTO.items():
        if getattr(args, name) is None:
            setattr(args, name, cuda if on_cuda else cpu)
    return args


def tag_id_sequences(tokenizer: Tokenizer, tags: list[str]) -> list[list[int]]:
    """Each tag string as the tokenizer encodes it (e.g. `<think>` -> the ids of `<`, `think`, `>`)."""
    seqs = [tokenizer.encode(t) for t in tags]
    for t, s in zip(tags, seqs):
        if not s:
            raise SystemExit(f"error: tag {t!r} encodes to no tokens")
    return seqs


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = common.setup_runtime(args.device, args.dtype, args.seed)
    if rt.world_size > 1:
        raise SystemExit("error: train/distill_reason.py runs in a single process; launch it without torchrun")
    args = resolve_auto(args, rt.is_cuda)
    tok_path = args.tokenizer
    if tok_path is None and (Path(args.from_weight) / "tokenizer.json").is_file():
        tok_path = args.from_weight
    tok = common.load_tokenizer(tok_path)
    ops = common.resolve_kernels(args.kernels, rt)
    trackers = common.open_trackers(args.wandb, args.swanlab, "minimind", args.save_weight, vars(args))
    model = common.load_base_model(args.from_weight, ops, rt.device)
    tags = [t for t in args.tags.split(",") if t]
    tag_seqs = tag_id_sequences(tok, tags)

    try:
        data = SFTDataset(args.data_path, tok, args.max_seq_len, skip_bad_lines=args.skip_bad_lines)
    except (DataError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    rows_per_step = args.batch_size * args.accumulation_steps
    steps_per_epoch = len(data) // rows_per_step
    if steps_per_epoch == 0:
        raise SystemExit(
            f"error: {args.data_path} has {len(data)} conversations, fewer than one optimizer step needs "
            f"({args.batch_size} x {args.accumulation_steps}); lower --batch_size"
        )
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    # A tokenizer that merges a tag with its neighbours would silently leave every weight at 1: say so up front.
    scan = collate_sft([data[i] for i in range(min(_TAG_SCAN, len(data)))])["labels"]
    found = int((tag_weights(scan, tag_seqs, 2.0) > 1).sum())
    tag_tokens = sum(len(s) for s in tag_seqs) / len(tag_seqs)
    print(
        f"tags {tags} -> token ids {tag_seqs}; about {found / tag_tokens / scan.shape[0]:.1f} tag occurrences per "
        f"conversation in the first {scan.shape[0]}"
    )
    if found == 0:
        print(f"warning: no tag occurrence found in the first {scan.shape[0]} conversations; nothing is up-weighted")

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
    print(
        f"distill_reason: {model.num_params():,} params from {args.from_weight} on {rt.device} "
        f"({'bf16 autocast' if rt.amp_dtype else 'fp32'}{', compiled' if args.compile else ''}); "
        f"{len(data)} conversations; batch {args.batch_size} x accum {args.accumulation_steps}; {total_steps} steps, "
        f"lr {args.learning_rate:g}, tag weight {args.tag_weight:g}"
    )

    metrics = common.MetricsLog(
        Path(args.out_dir) / f"{args.save_weight}_metrics.jsonl", append=start_step > 0, trackers=trackers
    )
    model.train()
    order, order_epoch = None, -1
    loss_sum, count, tokens_since, tags_since = torch.zeros((), device=rt.device), 0, 0, 0
    skipped, bad_streak, last_loss, done = 0, 0, float("nan"), start_step
    timer = common.Timer(rt.device)
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="reason", dynamic_ncols=True)
    with common.StopFlag() as stop:
        for step in bar:
            epoch, within = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = common.epoch_order(len(data), args.seed, epoch), epoch
            lr = common.lr_at(step, total_steps, args.learning_rate, args.warmup_steps)
            common.set_lr(optimizer, lr)
            for micro in range(args.accumulation_steps):
                first = (within * args.accumulation_steps + micro) * args.batch_size
                batch = collate_sft([data[int(i)] for i in order[first : first + args.batch_size]])
                ids = batch["input_ids"].to(rt.device, non_blocking=True)
                labels = batch["labels"].to(rt.device, non_blocking=True)
                weight = tag_weights(labels, tag_seqs, args.tag_weight)
                with rt.autocast():
                    out = train_model(ids, labels=labels, token_weight=weight)
                    loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
                (loss / args.accumulation_steps).backward()
                loss_sum += loss.detach()
                count += 1
                tokens_since += int((labels != IGNORE_INDEX).sum())
                tags_since += int((weight != 1).sum())
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
                last_loss = (loss_sum / max(count, 1)).item()
                metrics.write(
                    {
                        "step": done,
                        "epoch": epoch,
                        "loss": round(last_loss, 5),
                        "tag_token_fraction": round(tags_since / max(tokens_since, 1), 4),
                        "lr": lr,
                        "grad_norm": round(float(grad_norm), 4),
                        "trained_tokens_per_s": round(tokens_since / dt, 1),
                        "skipped_steps": skipped,
                    }
                )
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.1e}")
                loss_sum.zero_()
                count, tokens_since, tags_since = 0, 0, 0
            if done % args.save_interval == 0 or done == total_steps or stop.requested:
                state = {"step": done, "optimizer": optimizer.state_dict(), "rng": common.rng_state()}
                common.save_resume(args.out_dir, args.save_weight, done, model, tok, args, state, args.keep_last)
            if stop.requested:
                break
    bar.close()
    metrics.close()
    png = common.plot_loss_curve(metrics.path, Path(args.out_dir) / f"{args.save_weight}_loss.png", "reasoning SFT")
    print(
        f"done: loss {last_loss:.4f}; model in {Path(args.out_dir) / args.save_weight}"
        + (f"; loss curve {png}" if png else "")
    )
    return {"loss": last_loss, "steps": total_steps, "out": str(Path(args.out_dir) / args.save_weight)}


if __name__ == "__main__":
    main()
