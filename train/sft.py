"""Full supervised fine-tuning (SFT): every weight trained on conversations, loss on the assistant's tokens only.

    python train/sft.py                                        # CPU: out/pretrain -> out/full_sft on data/sample
    python train/sft.py --out_dir runs/a                       # runs/a/pretrain -> runs/a/full_sft
    python train/sft.py --from_weight MiniMind2.pth            # a MiniMind .pth (config read off its shapes)
    python train/sft.py --compile                              # CUDA: bf16, Triton kernels, MiniMind's defaults
    python train/sft.py --data_path sft_mini_512.jsonl --from_weight out/pretrain --max_seq_len 512
    python train/sft.py --from_resume 1                        # continue from the newest checkpoint
    torchrun --nproc_per_node 4 train/sft.py --data_path sft_mini_512.jsonl   # DDP (add --fsdp for FSDP2)

Algorithm, as implemented: each conversation is rendered with the ChatML template and tokenized; labels are the token
ids on assistant spans (everything after `<|im_start|>assistant\\n` up to and including `<|im_end|>\\n`) and -100
elsewhere (minimind_fast.data.SFTDataset), right-truncated to max_seq_len. A batch is padded only to its own longest row
(collate_sft), and batches are drawn from groups of similar length (--group_by_length, on by default: random batches of
the sample data are about 60% padding); MiniMind pads every sample to max_seq_len. Right padding needs no attention
mask: under the causal mask a real token never sees the pads after it, and pads carry label -100. The loss is the mean
cross-entropy over the batch's assistant tokens (+ MoE balance loss), AdamW (betas 0.9/0.999, weight decay 0.01 on
matrices), gradient clipping 1.0, MiniMind's cosine schedule lr -> 0.1 * lr, bf16 autocast on CUDA and fp32 on CPU. The
sample order of each epoch is a permutation seeded by (seed, epoch) and the data position is derived from the optimizer
step, so --from_resume replays exactly the batches an uninterrupted run would have seen; a non-finite gradient norm
skips the step (counted in the metrics; --max_bad_steps in a row stop the run). Under torchrun each rank takes its share
of every micro-batch and the data position is counted in conversations, so a run resumes on another number of ranks;
each rank's loss is the mean over its own assistant tokens and the ranks' gradients are averaged, so ranks weigh equally
rather than by their token counts (as in MiniMind's DDP).

Defaults: MiniMind's on CUDA (2 epochs, batch 16, lr 5e-6, accum 1, max_seq_len 512). On CPU the tiny model from
the CPU pretrain recipe needs a far larger learning rate: MiniMind's 1e-6..5e-6 is sized for a 26M+ model that has
read 1.6 GB of text; measured on the sample data, the tiny pretrain model barely moves at 5e-6 within 2 epochs (see
_AUTO below for the CPU values and the measurement behind them).

Outputs under --out_dir: {save_weight}/ (model folder), {save_weight}_resume/step_N/ (+ optimizer, step, RNG),
{save_weight}_metrics.jsonl and {save_weight}_loss.png.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/sft.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from minimind_fast.data import SFTDataset, collate_sft
from train import checks, common
from train.common import arg

# Defaults that depend on the machine: (CPU, CUDA). CUDA = MiniMind's full-SFT row. CPU: sized so that the sample
# SFT (2,282 conversations) finishes in about two minutes on 2 cores with the tiny preset; the
# learning rate was chosen by a sweep on the sample data from the default CPU pretrain checkpoint (see the report in
# the commit that set it).
_AUTO = {
    "epochs": (2, 2),
    "batch_size": (16, 16),
    "learning_rate": (1e-3, 5e-6),
    "max_seq_len": (256, 512),
}


@dataclass
class Args(common.StageArgs):
    data_path: str = arg("data/sample/sft.jsonl", "SFT JSONL ({'conversations': [{'role', 'content'}, ...]} per line)")
    save_weight: str = arg("full_sft", "name of the checkpoint folder under --out_dir")
    from_weight: str | None = arg(
        None, "checkpoint folder or MiniMind .pth to start from (default: {out_dir}/pretrain, else out/pretrain)"
    )
    epochs: int | None = arg(None, "passes over the data (default: 2)")
    batch_size: int | None = arg(None, "conversations per micro-batch and rank (default: 16)")
    learning_rate: float | None = arg(None, "peak learning rate (default: 1e-3 on CPU for tiny, 5e-6 on CUDA)")
    max_seq_len: int | None = arg(None, "tokens kept per conversation (default: 256 on CPU, 512 on CUDA)")
    aux_loss_alpha: float = arg(0.01, "MoE balance-loss weight")
    compile: bool = arg(False, "torch.compile the model (dynamic shapes: batches are padded to their own length)")
    group_by_length: bool = arg(True, "batch conversations of similar length (less padding); 0 = plain shuffle")


def length_grouped_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group: int = 64) -> torch.Tensor:
    """The epoch's sample order with batches of similar length: the (seed, epoch) permutation is cut into groups of
    group * batch_size samples, each group sorted by length and cut into batches, and the batches are shuffled (by a
    second permutation of the same seed and epoch). Consecutive batch_size slices of the result are the batches.

    Padding to each batch's longest row then wastes little compute (on the sample SFT data random batches are about
    60% padding). lengths are line sizes in bytes, a free proxy for token counts (no tokenization pass)."""
    perm = common.epoch_order(len(lengths), seed, epoch)
    span = group * batch_size
    chunks = []
    for start in range(0, len(perm), span):
        part = perm[start : start + span]
        # Stable sort, longest first, so equal lengths keep their random order.
        chunks.append(part[torch.from_numpy(np.argsort(-lengths[part.numpy()], kind="stable"))])
    grouped = torch.cat(chunks)
    n_batches = len(grouped) // batch_size
    batch_perm = common.epoch_order(n_batches, seed + 1, epoch)
    body = grouped[: n_batches * batch_size].view(n_batches, batch_size)[batch_perm].reshape(-1)
    return torch.cat([body, grouped[n_batches * batch_size :]])


def default_start(out_dir: str) -> str:
    """Where SFT starts when --from_weight is not given: the pretrain stage's output under --out_dir, else under
    out/ (the pretrain stage's default --out_dir)."""
    candidates = list(dict.fromkeys([str(Path(out_dir) / "pretrain"), str(Path("out") / "pretrain")]))
    found = next((c for c in candidates if Path(c).is_dir()), None)
    if found is None:
        checks.fail(
            f"error: --from_weight not given and no pretrain checkpoint at {' or '.join(candidates)} "
            "(run train/pretrain.py first, or pass --from_weight FOLDER or FILE.pth)"
        )
    return found


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean cross-entropy over the batch's labelled (assistant) tokens, MoE aux loss or None).

    batch: collate_sft output on the model's device: input_ids [B, T], labels [B, T] (-100 off the assistant spans
    and on the right padding)."""
    out = model(batch["input_ids"], labels=batch["labels"])
    return out.loss, out.aux_loss


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = common.setup_runtime(args.device, args.dtype, args.seed, args.dist_timeout)
    args = common.resolve_auto(args, rt.is_cuda, _AUTO)
    if args.from_weight is None:
        args.from_weight = default_start(args.out_dir)
    tok = common.stage_tokenizer(args.tokenizer, args.from_weight)
    ops = common.resolve_kernels(args.kernels, rt)
    model = common.load_base_model(args.from_weight, ops, rt.device, aux_loss_alpha=args.aux_loss_alpha)
    cfg = model.config
    if tok.vocab_size > cfg.vocab_size:
        checks.fail(f"error: tokenizer has {tok.vocab_size} tokens, the model's vocab {cfg.vocab_size}")
    if args.max_seq_len > cfg.max_position_embeddings:
        checks.fail(
            f"error: --max_seq_len {args.max_seq_len} exceeds the rotary table "
            f"({cfg.max_position_embeddings} positions)"
        )

    data = common.open_dataset(SFTDataset, args, tok, rt)
    # One optimizer step = accumulation_steps micro-batches of batch_size conversations on each of world_size ranks.
    rows_per_step = args.batch_size * args.accumulation_steps * rt.world_size
    steps_per_epoch, total_steps = common.plan_steps(len(data), rows_per_step, args, rt, "conversations")

    lengths = None
    if args.group_by_length:
        ends = np.append(data.index.offsets[1:], os.path.getsize(args.data_path))
        lengths = ends - data.index.offsets  # bytes per record (blank or skipped lines add a little: harmless)
    wrapped = common.wrap_model(model, rt, fsdp=args.fsdp)
    optimizer = common.build_optimizer(model, args.learning_rate, args.weight_decay)
    # The data position is counted in conversations, so a run may resume on another number of ranks.
    start_step, _ = common.restore_resume(args, rt, rows_per_step, model, optimizer, tokenizer=tok)

    n_active = model.num_active_params()
    peak = common.peak_flops(rt.device)
    # dynamic=True: every batch has its own padded length; one graph with a symbolic T instead of one per length.
    train_model = torch.compile(wrapped, dynamic=True) if args.compile else wrapped
    summary = (
        f"sft: {args.from_weight} ({model.num_params():,} params) on {common.describe_runtime(rt, args)}; "
        f"{len(data):,} conversations (<= {args.max_seq_len} tokens); batch {args.batch_size} x accum "
        f"{args.accumulation_steps}; {total_steps} steps ({steps_per_epoch} per epoch), lr {args.learning_rate:g}"
    )
    metrics, guard = common.start_run(args, rt, start_step, summary)
    model.train()
    order, order_epoch = None, -1
    loss_sum = torch.zeros((), device=rt.device)
    loss_count, last_loss = 0, float("nan")
    tokens_since, padded_since, label_since = 0, 0, 0
    timer = common.Timer(rt.device)
    bar = common.progress(start_step, total_steps, "sft", rt)
    with common.StopFlag() as stop:
        for step in bar:
            epoch, within = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                if lengths is not None:
                    order = length_grouped_order(lengths, args.batch_size * rt.world_size, args.seed, epoch)
                else:
                    order = common.epoch_order(len(data), args.seed, epoch)
                order_epoch = epoch
            lr = common.lr_at(step, total_steps, args.learning_rate, args.warmup_steps)
            common.set_lr(optimizer, lr)
            for micro in range(args.accumulation_steps):
                # This rank's share of the micro-batch (with one rank and --group_by_length 0, exactly the batches of
                # common.iterate_batches).
                batch = collate_sft([data[i] for i in common.rank_rows(order, within, micro, args, rt)], tok.pad_id)
                tokens_since += int(batch["attention_mask"].sum())
                padded_since += batch["input_ids"].numel()
                label_since += int((batch["labels"] != -100).sum())
                batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
                with common.no_sync(wrapped, sync=micro == args.accumulation_steps - 1), rt.autocast():
                    loss, aux = sft_loss(train_model, batch)
                    total = loss if aux is None else loss + aux
                    (total / args.accumulation_steps).backward()
                loss_sum += total.detach()
                loss_count += 1
            grad_norm = common.clip_grad_norm(model, args.grad_clip)
            if guard.ok(grad_norm, step + 1, skip_zero=True):  # a step without a label is skipped
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            if done % args.log_interval == 0 or done == total_steps:
                dt = timer.lap()
                last_loss = common.all_reduce_mean(loss_sum / max(loss_count, 1), rt).item()
                tok_s = tokens_since * rt.world_size / dt
                record = {
                    "step": done,
                    "epoch": epoch,
                    "loss": round(last_loss, 5),
                    "lr": lr,
                    "grad_norm": round(float(grad_norm), 4),
                    "tokens_per_s": round(tok_s, 1),
                    "label_tokens": label_since * rt.world_size,
                    "pad_fraction": round(1 - tokens_since / max(padded_since, 1), 4),
                    "skipped_steps": guard.skipped,
                }
                if peak:
                    seq = padded_since / max(loss_count * args.batch_size, 1)
                    flops = common.flops_per_token(cfg, n_active, int(seq))
                    record["mfu"] = round(tok_s * flops / (peak * rt.world_size), 4)
                metrics.write(record)
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                loss_sum.zero_()
                loss_count, tokens_since, padded_since, label_since = 0, 0, 0, 0
            stopping = common.any_rank(stop.requested, rt)
            if done % args.save_interval == 0 or done == total_steps or stopping:
                common.save_step(args, rt, done, rows_per_step, model, optimizer, tok)
            if stopping:
                break
    bar.close()
    if not common.finish(args, rt, metrics, "full SFT", last_loss):
        return {"loss": last_loss, "steps": total_steps}
    return {"loss": last_loss, "steps": total_steps, "out": str(Path(args.out_dir) / args.save_weight)}


if __name__ == "__main__":
    main()
