"""Full supervised fine-tuning (SFT): every weight trained on conversations, loss on the assistant's tokens only.

    python train/sft.py                                        # CPU: out/pretrain -> out/full_sft on data/sample
    python train/sft.py --compile                              # CUDA: bf16, Triton kernels, MiniMind's defaults
    python train/sft.py --data_path sft_mini_512.jsonl --from_weight out/pretrain --max_seq_len 512
    python train/sft.py --from_resume 1                        # continue from the newest checkpoint

Algorithm, as implemented: each conversation is rendered with the ChatML template and tokenized; labels are the
token ids on assistant spans (everything after `<|im_start|>assistant\\n` up to and including `<|im_end|>\\n`) and
-100 elsewhere (minimind.data.SFTDataset), right-truncated to max_seq_len. A batch is padded only to its own longest
row (collate_sft); MiniMind pads every sample to max_seq_len. Right padding needs no attention mask: under the causal
mask a real token never sees the pads after it, and pads carry label -100. The loss is the mean cross-entropy over
the batch's assistant tokens (+ MoE balance loss), AdamW (betas 0.9/0.999, weight decay 0.01 on matrices), gradient
clipping 1.0, MiniMind's cosine schedule lr -> 0.1 * lr, bf16 autocast on CUDA and fp32 on CPU. The sample order of
each epoch is a permutation seeded by (seed, epoch) and the data position is derived from the optimizer step, so
--from_resume replays exactly the batches an uninterrupted run would have seen; a non-finite gradient norm skips the
step (counted in the metrics).

Defaults: MiniMind's on CUDA (2 epochs, batch 16, lr 5e-6, accum 1, max_seq_len 512). On CPU the tiny model from
the CPU pretrain recipe needs a far larger learning rate: MiniMind's 1e-6..5e-6 is sized for a 26M+ model that has
read 1.6 GB of text; measured on the sample data, the tiny pretrain model barely moves at 5e-6 within 2 epochs (see
_AUTO below for the CPU values and the measurement behind them).

Outputs under --out_dir: {save_weight}/ (model folder), {save_weight}_resume/step_N/ (+ optimizer, step, RNG),
{save_weight}_metrics.jsonl and {save_weight}_loss.png.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/sft.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

from minimind import checkpoint as ckpt
from minimind.data import DataError, SFTDataset, collate_sft
from train import common
from train.common import arg

# Defaults that depend on the machine: (CPU, CUDA). CUDA = MiniMind's full-SFT row. CPU: sized so that the sample
# SFT (2,743 conversations, 37 tokens on average) finishes in a few minutes on 2 cores with the tiny preset; the
# learning rate was chosen by a sweep on the sample data from the default CPU pretrain checkpoint (see the report in
# the commit that set it).
_AUTO = {
    "epochs": (2, 2),
    "batch_size": (16, 16),
    "learning_rate": (1e-3, 5e-6),
    "max_seq_len": (256, 512),
}


@dataclass
class Args:
    data_path: str = arg("data/sample/sft.jsonl", "SFT JSONL ({'conversations': [{'role', 'content'}, ...]} per line)")
    out_dir: str = arg("out", "where checkpoints, metrics and the loss curve go")
    save_weight: str = arg("full_sft", "name of the checkpoint folder under --out_dir")
    from_weight: str = arg("out/pretrain", "checkpoint folder to start from (the pretrain stage's output)")
    from_resume: int = arg(0, "1: continue from the newest checkpoint in {out_dir}/{save_weight}_resume")
    tokenizer: str | None = arg(None, "tokenizer folder or tokenizer.json (default: the one in --from_weight)")
    epochs: int | None = arg(None, "passes over the data (default: 2)")
    batch_size: int | None = arg(None, "conversations per micro-batch (default: 16)")
    accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    learning_rate: float | None = arg(None, "peak learning rate (default: 1e-3 on CPU for tiny, 5e-6 on CUDA)")
    warmup_steps: int = arg(0, "linear warmup steps before the cosine schedule")
    weight_decay: float = arg(0.01, "AdamW weight decay (matrices only)")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0 = off)")
    max_seq_len: int | None = arg(None, "tokens kept per conversation (default: 256 on CPU, 512 on CUDA)")
    max_steps: int = arg(0, "stop after this many optimizer steps (0 = run all epochs)")
    aux_loss_alpha: float = arg(0.01, "MoE balance-loss weight")
    device: str = arg("auto", "cuda, cpu, or auto")
    dtype: str = arg("auto", "bfloat16 or float32 (auto: bf16 autocast on CUDA, fp32 on CPU)")
    kernels: str = arg("auto", "ops spec: torch | triton | liger | auto, with overrides like 'triton,rope=torch'")
    compile: bool = arg(False, "torch.compile the model (dynamic shapes: batches are padded to their own length)")
    log_interval: int = arg(10, "optimizer steps between log lines")
    save_interval: int = arg(200, "optimizer steps between checkpoints")
    keep_last: int = arg(2, "resume checkpoints to keep")
    seed: int = arg(42, "seed for the data order")


def resolve_auto(args: Args, on_cuda: bool) -> Args:
    """Fill the machine-dependent defaults (None) with their CPU or CUDA value."""
    for name, (cpu, cuda) in _AUTO.items():
        if getattr(args, name) is None:
            setattr(args, name, cuda if on_cuda else cpu)
    return args


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean cross-entropy over the batch's labelled (assistant) tokens, MoE aux loss or None).

    batch: collate_sft output on the model's device: input_ids [B, T], labels [B, T] (-100 off the assistant spans
    and on the right padding)."""
    out = model(batch["input_ids"], labels=batch["labels"])
    return out.loss, out.aux_loss


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = common.setup_runtime(args.device, args.dtype, args.seed)
    args = resolve_auto(args, rt.is_cuda)
    tok_path = args.tokenizer
    if tok_path is None and (Path(args.from_weight) / "tokenizer.json").is_file():
        tok_path = args.from_weight
    tok = common.load_tokenizer(tok_path)
    ops = common.resolve_kernels(args.kernels, rt)
    model = common.load_base_model(args.from_weight, ops, rt.device, aux_loss_alpha=args.aux_loss_alpha)
    cfg = model.config

    try:
        data = SFTDataset(args.data_path, tok, args.max_seq_len)
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

    n_active = model.num_active_params()
    peak = common.peak_flops(rt.device)
    # dynamic=True: every batch has its own padded length; one graph with a symbolic T instead of one per length.
    train_model = torch.compile(model, dynamic=True) if args.compile else model
    print(
        f"sft: {args.from_weight} ({model.num_params():,} params) on {rt.device} "
        f"({'bf16 autocast' if rt.amp_dtype else 'fp32'}{', compiled' if args.compile else ''}); "
        f"{len(data):,} conversations (<= {args.max_seq_len} tokens); batch {args.batch_size} x accum "
        f"{args.accumulation_steps}; {total_steps} steps ({steps_per_epoch} per epoch), lr {args.learning_rate:g}"
    )

    metrics = common.MetricsLog(Path(args.out_dir) / f"{args.save_weight}_metrics.jsonl", append=start_step > 0)
    model.train()
    batches, batches_epoch = None, -1
    loss_sum = torch.zeros((), device=rt.device)
    loss_count, tokens_since, padded_since, label_since, skipped = 0, 0, 0, 0, 0
    last_loss = float("nan")
    timer = common.Timer(rt.device)
    bar = tqdm(
        range(start_step, total_steps),
        initial=start_step,
        total=total_steps,
        desc="sft",
        dynamic_ncols=True,
        disable=not rt.is_main,
    )
    with common.StopFlag() as stop:
        for step in bar:
            epoch, within = divmod(step, steps_per_epoch)
            if epoch != batches_epoch:
                start_batch = within * args.accumulation_steps
                batches = common.iterate_batches(data, collate_sft, args.batch_size, args.seed, epoch, start_batch)
                batches_epoch = epoch
            lr = common.lr_at(step, total_steps, args.learning_rate, args.warmup_steps)
            common.set_lr(optimizer, lr)
            for _ in range(args.accumulation_steps):
                _, batch = next(batches)
                n_real = int(batch["attention_mask"].sum())
                batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
                with rt.autocast():
                    loss, aux = sft_loss(train_model, batch)
                    total = loss if aux is None else loss + aux
                (total / args.accumulation_steps).backward()
                loss_sum += total.detach()
                loss_count += 1
                tokens_since += n_real
                padded_since += batch["input_ids"].numel()
                label_since += int((batch["labels"] != -100).sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
            if torch.isfinite(grad_norm):
                optimizer.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            if done % args.log_interval == 0 or done == total_steps:
                dt = timer.lap()
                last_loss = (loss_sum / max(loss_count, 1)).item()
                tok_s = tokens_since / dt
                record = {
                    "step": done,
                    "epoch": epoch,
                    "loss": round(last_loss, 5),
                    "lr": lr,
                    "grad_norm": round(float(grad_norm), 4),
                    "tokens_per_s": round(tok_s, 1),
                    "label_tokens": label_since,
                    "pad_fraction": round(1 - tokens_since / max(padded_since, 1), 4),
                    "skipped_steps": skipped,
                }
                if peak:
                    seq = padded_since / max(loss_count * args.batch_size, 1)
                    record["mfu"] = round(tok_s * common.flops_per_token(cfg, n_active, int(seq)) / peak, 4)
                metrics.write(record)
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                loss_sum.zero_()
                loss_count, tokens_since, padded_since, label_since = 0, 0, 0, 0
            if done % args.save_interval == 0 or done == total_steps or stop.requested:
                state = {"step": done, "optimizer": optimizer.state_dict(), "rng": common.rng_state()}
                common.save_resume(args.out_dir, args.save_weight, done, model, tok, args, state, args.keep_last)
            if stop.requested:
                break
    bar.close()
    png = common.plot_loss_curve(metrics.path, Path(args.out_dir) / f"{args.save_weight}_loss.png", "full SFT")
    print(
        f"done: loss {last_loss:.4f}; model in {Path(args.out_dir) / args.save_weight}"
        + (f"; loss curve {png}" if png else "")
    )
    return {"loss": last_loss, "steps": total_steps, "out": str(Path(args.out_dir) / args.save_weight)}


if __name__ == "__main__":
    main()
