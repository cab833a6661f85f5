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
from train import checks, common
from train.common import arg
from train.losses import tag_weights

# (CPU, CUDA). CUDA: MiniMind2's 1e-6. CPU: measured from the tiny CPU DPO model on the sample r1_mix (one epoch,
# 137 steps): the tag-weighted loss ended at 7.52 with 1e-4 and at 0.98 with 1e-3.
_AUTO = {"learning_rate": (1e-3, 1e-6)}
_TAG_SCAN = 64  # conversations checked at start-up for tag occurrences


@dataclass
class Args(common.StageArgs):
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
    args = common.parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = common.setup_runtime(args.device, args.dtype, args.seed, args.dist_timeout)
    args = common.resolve_auto(args, rt.is_cuda, _AUTO)
    tok = common.stage_tokenizer(args.tokenizer, args.from_weight)
    ops = common.resolve_kernels(args.kernels, rt)
    model = common.load_base_model(args.from_weight, ops, rt.device)
    tags = [t for t in args.tags.split(",") if t]
    tag_seqs = tag_id_sequences(tok, tags)

    data = common.open_dataset(SFTDataset, args, tok, rt)
    # One optimizer step = accumulation_steps micro-batches of batch_size conversations on each of world_size ranks.
    rows_per_step = args.batch_size * args.accumulation_steps * rt.world_size
    steps_per_epoch, total_steps = common.plan_steps(len(data), rows_per_step, args, rt, "conversations")
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

    wrapped = common.wrap_model(model, rt, fsdp=args.fsdp)
    optimizer = common.build_optimizer(model, args.learning_rate, args.weight_decay)
    start_step, _ = common.restore_resume(args, rt, rows_per_step, model, optimizer, tokenizer=tok)
    train_model = torch.compile(wrapped) if args.compile else wrapped
    summary = (
        f"distill_reason: {model.num_params():,} params from {args.from_weight} on "
        f"{common.describe_runtime(rt, args)}; {len(data)} conversations; batch {args.batch_size} x accum "
        f"{args.accumulation_steps}; {total_steps} steps, lr {args.learning_rate:g}, tag weight {args.tag_weight:g}"
    )
    metrics, guard = common.start_run(args, rt, start_step, summary)
    model.train()
    order, order_epoch = None, -1
    loss_sum, count, tokens_since, tags_since = torch.zeros((), device=rt.device), 0, 0, 0
    last_loss = float("nan")
    timer = common.Timer(rt.device)
    bar = common.progress(start_step, total_steps, "reason", rt)
    with common.StopFlag() as stop:
        for step in bar:
            epoch, within = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = common.epoch_order(len(data), args.seed, epoch), epoch
            lr = common.lr_at(step, total_steps, args.learning_rate, args.warmup_steps)
            common.set_lr(optimizer, lr)
            for micro in range(args.accumulation_steps):
                batch = collate_sft([data[i] for i in common.rank_rows(order, within, micro, args, rt)], tok.pad_id)
                ids = batch["input_ids"].to(rt.device, non_blocking=True)
                labels = batch["labels"].to(rt.device, non_blocking=True)
                weight = tag_weights(labels, tag_seqs, args.tag_weight)
                with common.no_sync(wrapped, sync=micro == args.accumulation_steps - 1), rt.autocast():
                    out = train_model(ids, labels=labels, token_weight=weight)
                    loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
                    (loss / args.accumulation_steps).backward()
                loss_sum += loss.detach()
                count += 1
                tokens_since += int((labels != IGNORE_INDEX).sum())
                tags_since += int((weight != 1).sum())
            grad_norm = common.clip_grad_norm(model, args.grad_clip)
            if guard.ok(grad_norm, step + 1, skip_zero=True):  # a step without a label is skipped
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            if done % args.log_interval == 0 or done == total_steps:
                dt = timer.lap()
                last_loss = common.all_reduce_mean(loss_sum / max(count, 1), rt).item()
                counts = common.all_reduce_sum(torch.tensor([tokens_since, tags_since]), rt).tolist()
                metrics.write(
                    {
                        "step": done,
                        "epoch": epoch,
                        "loss": round(last_loss, 5),
                        "tag_token_fraction": round(counts[1] / max(counts[0], 1), 4),
                        "lr": lr,
                        "grad_norm": round(float(grad_norm), 4),
                        "trained_tokens_per_s": round(counts[0] / dt, 1),
                        "skipped_steps": guard.skipped,
                    }
                )
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.1e}")
                loss_sum.zero_()
                count, tokens_since, tags_since = 0, 0, 0
            stopping = common.any_rank(stop.requested, rt)
            if done % args.save_interval == 0 or done == total_steps or stopping:
                common.save_step(args, rt, done, rows_per_step, model, optimizer, tok)
            if stopping:
                break
    bar.close()
    common.finish(args, rt, metrics, "reasoning SFT", last_loss)
    return {"loss": last_loss, "steps": total_steps, "out": str(Path(args.out_dir) / args.save_weight)}


if __name__ == "__main__":
    main()
