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

Under torchrun (`torchrun --nproc_per_node N train/distill_reason.py`, --fsdp for FSDP2) each rank takes batch_size
conversations of every micro-batch (the data position is counted in conversations, so a run resumes on another
number of ranks). Each rank's loss is its weighted sum divided by its own trained-label count and the gradients are
averaged over ranks (all-reduced once per optimizer step), so ranks weigh equally rather than by their label counts;
the logged loss is the mean of the ranks' losses.

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

from minimind_fast.data import IGNORE_INDEX, SFTDataset, collate_sft
from minimind_fast.tokenizer import Tokenizer
from train import checks, common, step
from train.args import StageArgs, arg, parse_args, resolve_auto
from train.losses import tag_weights
from train.metrics import Timer
from train.models import load_base_model, open_dataset, stage_tokenizer
from train.resume import restore_resume, save_step
from train.runtime import all_reduce_mean, all_reduce_sum, describe_runtime, resolve_kernels, setup_runtime, wrap_model

# (CPU, CUDA). CUDA: MiniMind2's 1e-6. CPU: measured from the tiny CPU DPO model on the sample r1_mix (one epoch,
# 137 steps): the tag-weighted loss ended at 7.52 with 1e-4 and at 0.98 with 1e-3.
_AUTO = {"learning_rate": (1e-3, 1e-6)}
_TAG_SCAN = 64  # conversations checked at start-up for tag occurrences


@dataclass
class Args(StageArgs):
    data_path: str = arg("data/sample/r1_mix.jsonl", "reasoning SFT JSONL (think/answer text in assistant turns)")
    save_weight: str = arg("reason", "name of the checkpoint folder under --out_dir")
    from_weight: str = arg("out/dpo", "checkpoint folder to start from (a DPO or SFT model)")
    tags: str = arg("<think>,</think>,<answer>,</answer>", "comma-separated tag strings whose tokens are weighted")
    tag_weight: float = arg(10.0, "loss weight of the tag tokens (other trained tokens weigh 1)")
    epochs: int = arg(1, "passes over the data")
    batch_size: int = arg(8, "conversations per micro-batch and rank")
    learning_rate: float | None = arg(None, "peak learning rate (default: 1e-6 on CUDA as MiniMind2, 1e-3 on CPU)")
    max_seq_len: int = arg(720, "truncate conversations to this many tokens")


def tag_id_sequences(tokenizer: Tokenizer, tags: list[str]) -> list[list[int]]:
    """Each tag string as the tokenizer encodes it (e.g. `<think>` -> the ids of `<`, `think`, `>`)."""
    seqs = [tokenizer.encode(t) for t in tags]
    for t, s in zip(tags, seqs):
        if not s:
            checks.fail(f"error: tag {t!r} encodes to no tokens")
    return seqs


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = setup_runtime(args.device, args.dtype, args.seed, args.dist_timeout)
    args = resolve_auto(args, rt.is_cuda, _AUTO)
    tok = stage_tokenizer(args.tokenizer, args.from_weight)
    ops = resolve_kernels(args.kernels, rt)
    model = load_base_model(args.from_weight, ops, rt.device)
    tags = [t for t in args.tags.split(",") if t]
    tag_seqs = tag_id_sequences(tok, tags)

    data = open_dataset(SFTDataset, args, tok, rt)
    plan = step.Plan.of(args, len(data), rt, "conversations")
    # A tokenizer that merges a tag with its neighbours would silently leave every weight at 1: say so up front.
    scan = collate_sft([data[i] for i in range(min(_TAG_SCAN, len(data)))])["labels"]
    found = int((tag_weights(scan, tag_seqs, 2.0) > 1).sum())
    tag_tokens = sum(len(s) for s in tag_seqs) / len(tag_seqs)
    if rt.is_main:
        print(
            f"tags {tags} -> token ids {tag_seqs}; about {found / tag_tokens / scan.shape[0]:.1f} tag occurrences per "
            f"conversation in the first {scan.shape[0]}"
        )
        if found == 0:
            print(
                f"warning: no tag occurrence found in the first {scan.shape[0]} conversations; nothing is up-weighted"
            )

    wrapped = wrap_model(model, rt, fsdp=args.fsdp)
    optimizer = step.build_optimizer(model, args.learning_rate, args.weight_decay)
    start_step, _ = restore_resume(args, rt, plan.rows_per_step, model, optimizer, tokenizer=tok)
    train_model = torch.compile(wrapped) if args.compile else wrapped
    summary = (
        f"distill_reason: {model.num_params():,} params from {args.from_weight} on "
        f"{describe_runtime(rt, args)}; {len(data)} conversations; batch {args.batch_size} x accum "
        f"{args.accumulation_steps}; {plan.total_steps} steps, lr {args.learning_rate:g}, "
        f"tag weight {args.tag_weight:g}"
    )
    metrics, guard = common.start_run(args, rt, start_step, summary)
    # A step without a labelled token has a zero gradient and is skipped (skip_zero).
    stepper = step.Stepper(model, wrapped, optimizer, rt, guard, args.accumulation_steps, args.grad_clip, True)
    counts = {"tokens": 0, "tags": 0}  # CPU tensors, read at log steps

    def micro_batches(s: int):
        for rows in plan.micro_rows(s):
            batch = collate_sft([data[i] for i in rows], tok.pad_id)
            weight = tag_weights(batch["labels"], tag_seqs, args.tag_weight)  # on the CPU: no device sync
            counts["tokens"] += (batch["labels"] != IGNORE_INDEX).sum()
            counts["tags"] += (weight != 1).sum()
            yield tuple(t.to(rt.device, non_blocking=True) for t in (batch["input_ids"], batch["labels"], weight))

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, labels, weight = batch
        out = train_model(ids, labels=labels, token_weight=weight)
        return out.loss if out.aux_loss is None else out.loss + out.aux_loss

    model.train()
    loss_sum, steps_since = torch.zeros((), device=rt.device), 0
    last_loss = float("nan")
    timer = Timer(rt.device)
    bar = common.progress(start_step, plan.total_steps, "reason", rt)
    with common.StopFlag() as stop:
        for s in bar:
            lr = plan.set_lr(optimizer, s)
            loss, grad_norm = step.train_step(stepper, micro_batches(s), loss_fn)
            loss_sum += loss
            steps_since += 1
            done = s + 1
            if plan.logs(done):
                guard.read(done)
                dt = timer.lap()
                last_loss = all_reduce_mean(loss_sum / steps_since, rt).item()
                both = all_reduce_sum(torch.tensor([int(counts["tokens"]), int(counts["tags"])]), rt).tolist()
                metrics.write(
                    {
                        "step": done,
                        "epoch": plan.epoch(s),
                        "loss": round(last_loss, 5),
                        "tag_token_fraction": round(both[1] / max(both[0], 1), 4),
                        "lr": lr,
                        "grad_norm": round(float(grad_norm), 4),
                        "trained_tokens_per_s": round(both[0] / dt, 1),
                        "skipped_steps": guard.skipped,
                    }
                )
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.1e}")
                loss_sum.zero_()
                steps_since = 0
                counts.update(tokens=0, tags=0)
            stopping = plan.stopping(stop.requested, done, rt)
            if plan.saves(done) or stopping:
                guard.read(done)
                save_step(args, rt, done, plan.rows_per_step, model, optimizer, tok)
            if stopping:
                break
    bar.close()
    common.finish(args, rt, metrics, "reasoning SFT", last_loss)
    return {"loss": last_loss, "steps": plan.total_steps, "out": str(Path(args.out_dir) / args.save_weight)}


if __name__ == "__main__":
    main()
