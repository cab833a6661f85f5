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
matrices), gradient clipping 1.0, MiniMind's cosine schedule lr -> 0.1 * lr, bf16 autocast on CUDA/fast-bf16 CPUs. The
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

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/sft.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from minimind_fast.data import SFTDataset, collate_sft
from train import checks, common, step
from train.args import StageArgs, arg, parse_args, resolve_auto
from train.metrics import Timer, flops_per_token, peak_flops
from train.models import load_base_model, open_dataset, stage_tokenizer
from train.resume import restore_resume, save_step
from train.runtime import all_reduce_mean, describe_runtime, resolve_kernels, setup_runtime, wrap_model

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
class Args(StageArgs):
    data_path: str = arg("data/sample/sft.jsonl", "SFT JSONL ({'conversations': [{'role', 'content'}, ...]} per line)")
    save_weight: str = arg("full_sft", "name of the checkpoint folder under --out_dir")
    from_weight: str | None = arg(
        None, "checkpoint folder or MiniMind .pth to start from (default: {out_dir}/pretrain, else out/pretrain)"
    )
    epochs: int | None = arg(None, "passes over the data (default: 2)")
    batch_size: int | None = arg(None, "conversations per micro-batch and rank (default: 16)")
    learning_rate: float | None = arg(None, "peak learning rate (default: 1e-3 on CPU for tiny, 5e-6 on CUDA)")
    max_seq_len: int | None = arg(None, "tokens kept per conversation (default: 256 on CPU, 512 on CUDA)")
    aux_loss_alpha: float | None = arg(None, "MoE balance-loss weight (default: the one the model was trained with)")
    compile: bool = arg(False, "torch.compile the model (dynamic shapes: batches are padded to their own length)")
    group_by_length: bool = arg(True, "batch conversations of similar length (less padding); 0 = plain shuffle")


def length_grouped_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group: int = 64) -> torch.Tensor:
    """The epoch's sample order with batches of similar length: the (seed, epoch) permutation is cut into groups of
    group * batch_size samples, each group sorted by length and cut into batches, and the batches are shuffled (by a
    second permutation of the same seed and epoch). Consecutive batch_size slices of the result are the batches.

    Padding to each batch's longest row then wastes little compute (on the sample SFT data random batches are about
    60% padding). lengths are line sizes in bytes, a free proxy for token counts (no tokenization pass)."""
    perm = step.epoch_order(len(lengths), seed, epoch)
    span = group * batch_size
    chunks = []
    for start in range(0, len(perm), span):
        part = perm[start : start + span]
        # Stable sort, longest first, so equal lengths keep their random order.
        chunks.append(part[torch.from_numpy(np.argsort(-lengths[part.numpy()], kind="stable"))])
    grouped = torch.cat(chunks)
    n_batches = len(grouped) // batch_size
    batch_perm = step.epoch_order(n_batches, seed + 1, epoch)
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
    args = parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = setup_runtime(args.device, args.dtype, args.seed, args.dist_timeout)
    args = resolve_auto(args, rt.is_cuda, _AUTO)
    if args.from_weight is None:
        args.from_weight = default_start(args.out_dir)
    tok = stage_tokenizer(args.tokenizer, args.from_weight)
    ops = resolve_kernels(args.kernels, rt)
    alpha = {} if args.aux_loss_alpha is None else {"aux_loss_alpha": args.aux_loss_alpha}
    model = load_base_model(args.from_weight, ops, rt.device, **alpha)
    cfg = model.config
    if tok.vocab_size > cfg.vocab_size:
        checks.fail(f"error: tokenizer has {tok.vocab_size} tokens, the model's vocab {cfg.vocab_size}")
    if args.max_seq_len > cfg.max_position_embeddings:
        checks.fail(
            f"error: --max_seq_len {args.max_seq_len} exceeds the rotary table "
            f"({cfg.max_position_embeddings} positions)"
        )

    data = open_dataset(SFTDataset, args, tok, rt)
    order_fn = None
    if args.group_by_length:
        ends = np.append(data.index.offsets[1:], os.path.getsize(args.data_path))
        lengths = ends - data.index.offsets  # bytes per record (blank or skipped lines add a little: harmless)
        order_fn = functools.partial(length_grouped_order, lengths, args.batch_size * rt.world_size, args.seed)
    plan = step.Plan.of(args, len(data), rt, "conversations", order_fn)
    wrapped = wrap_model(model, rt, fsdp=args.fsdp)
    optimizer = step.build_optimizer(model, args.learning_rate, args.weight_decay)
    # The data position is counted in conversations, so a run may resume on another number of ranks.
    start_step, _ = restore_resume(args, rt, plan.rows_per_step, model, optimizer, tokenizer=tok)

    n_active = model.num_active_params()
    peak = peak_flops(rt.device)
    # dynamic=True: every batch has its own padded length; one graph with a symbolic T instead of one per length.
    train_model = torch.compile(wrapped, dynamic=True) if args.compile else wrapped
    summary = (
        f"sft: {args.from_weight} ({model.num_params():,} params) on {describe_runtime(rt, args)}; "
        f"{len(data):,} conversations (<= {args.max_seq_len} tokens); batch {args.batch_size} x accum "
        f"{args.accumulation_steps}; {plan.total_steps} steps ({plan.steps_per_epoch} per epoch), "
        f"lr {args.learning_rate:g}"
    )
    metrics, guard = common.start_run(args, rt, start_step, summary)
    # A step without a labelled token has a zero gradient and is skipped (skip_zero).
    stepper = step.Stepper(
        model, wrapped, optimizer, rt, guard, args.accumulation_steps, args.grad_clip, skip_zero=True
    )
    counts = {"tokens": 0, "padded": 0, "labels": 0}  # CPU tensors and ints, read at log steps

    def micro_batches(s: int):
        # This rank's share of each micro-batch (with one rank and --group_by_length 0, exactly the batches of
        # step.iterate_batches).
        for rows in plan.micro_rows(s):
            batch = collate_sft([data[i] for i in rows], tok.pad_id)
            counts["tokens"] += batch["attention_mask"].sum()
            counts["padded"] += batch["input_ids"].numel()
            counts["labels"] += (batch["labels"] != -100).sum()
            yield {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss, aux = sft_loss(train_model, batch)
        return loss if aux is None else loss + aux

    model.train()
    loss_sum = torch.zeros((), device=rt.device)
    steps_since, last_loss = 0, float("nan")
    timer = Timer(rt.device)
    bar = common.progress(start_step, plan.total_steps, "sft", rt)
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
                tokens, padded = int(counts["tokens"]), counts["padded"]
                tok_s = tokens * rt.world_size / dt
                record = {
                    "step": done,
                    "epoch": plan.epoch(s),
                    "loss": round(last_loss, 5),
                    "lr": lr,
                    "grad_norm": round(float(grad_norm), 4),
                    "tokens_per_s": round(tok_s, 1),
                    "label_tokens": int(counts["labels"]) * rt.world_size,
                    "pad_fraction": round(1 - tokens / max(padded, 1), 4),
                    "skipped_steps": guard.skipped,
                }
                if peak:
                    seq = padded / max(steps_since * args.accumulation_steps * args.batch_size, 1)
                    flops = flops_per_token(cfg, n_active, int(seq))
                    record["mfu"] = round(tok_s * flops / (peak * rt.world_size), 4)
                metrics.write(record)
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                loss_sum.zero_()
                steps_since = 0
                counts.update(tokens=0, padded=0, labels=0)
            stopping = plan.stopping(stop.requested, done, rt)
            if plan.saves(done) or stopping:
                guard.read(done)
                save_step(args, rt, done, plan.rows_per_step, model, optimizer, tok)
            if stopping:
                break
    bar.close()
    if not common.finish(args, rt, metrics, "full SFT", last_loss):
        return {"loss": last_loss, "steps": plan.total_steps}
    return {"loss": last_loss, "steps": plan.total_steps, "out": str(Path(args.out_dir) / args.save_weight)}


if __name__ == "__main__":
    main()
