"""LoRA fine-tuning: a frozen base model plus trainable low-rank adapters, trained on conversations like SFT.

    python train/lora.py                                       # CPU: out/full_sft + identity data -> out/lora_identity
    python train/lora.py --data_path lora_medical.jsonl --save_weight lora_medical --epochs 10
    python train/lora.py --lora_rank 8 --lora_alpha 16 --lora_targets q_proj,k_proj,v_proj,o_proj
    python tools/chat.py --load out/full_sft --lora out/lora_identity --prompt "Who are you?"

Algorithm, as implemented (minimind/lora.py has the maths): the chosen Linear layers of the --from_weight model are
wrapped so that y = W x + (alpha / r) B A x, A ~ N(0, 0.02), B = 0; W stays frozen and only A and B are trained.
MiniMind's defaults: rank 16, adapters on the square Linear layers (q_proj and o_proj here), alpha = rank (scale 1,
"no alpha scaling"). The data, loss and loop are SFT's (train/sft.py): assistant-span cross-entropy, batches padded
to their own longest row, AdamW on the adapter parameters only (weight decay 0.01 on A and B, as MiniMind applies it),
gradient clipping 1.0, cosine schedule lr -> 0.1 * lr, exact resume from the step; a non-finite gradient norm skips
the step (--max_bad_steps in a row stop the run). Single process: the adapters are small and train fast.

Outputs under --out_dir: {save_weight}/ is an adapter folder (adapter.safetensors + adapter_config.json with rank,
alpha, layer names and the base architecture's fingerprint; a few hundred KB instead of the whole model);
{save_weight}_resume/step_N/ adds train_state.pt (optimizer, step, RNG); {save_weight}_metrics.jsonl, _loss.png.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/lora.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

from minimind import checkpoint as ckpt
from minimind import lora
from minimind.data import DataError, SFTDataset, collate_sft
from train import common
from train.common import arg

# Defaults that depend on the machine: (CPU, CUDA). CUDA = MiniMind's LoRA row (identity data: 50 epochs, batch 32,
# lr 1e-4, max_seq_len 340). CPU: the identity file has 200 conversations of 45 tokens on average; see the commit that
# set these for the measurement behind the CPU learning rate and epoch count.
_AUTO = {
    "epochs": (10, 50),
    "batch_size": (16, 32),
    "learning_rate": (1e-3, 1e-4),
    "max_seq_len": (256, 340),
}


@dataclass
class Args:
    data_path: str = arg("data/sample/lora_identity.jsonl", "SFT-format JSONL the adapter learns from")
    out_dir: str = arg("out", "where the adapter, metrics and the loss curve go")
    save_weight: str = arg("lora_identity", "name of the adapter folder under --out_dir")
    from_weight: str = arg("out/full_sft", "base checkpoint folder (frozen; the SFT stage's output)")
    from_resume: int = arg(0, "1: continue from the newest checkpoint in {out_dir}/{save_weight}_resume")
    tokenizer: str | None = arg(None, "tokenizer folder or tokenizer.json (default: the one in --from_weight)")
    lora_rank: int = arg(16, "rank r of the adapters")
    lora_alpha: float | None = arg(None, "alpha; the update is scaled by alpha / rank (default: = rank, scale 1)")
    lora_targets: str = arg(
        "square", "'square' (in == out: q_proj, o_proj), 'all-linear', or names like 'q_proj,v_proj'"
    )
    epochs: int | None = arg(None, "passes over the data (default: 10 on CPU, 50 on CUDA)")
    batch_size: int | None = arg(None, "conversations per micro-batch (default: 16 on CPU, 32 on CUDA)")
    accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    learning_rate: float | None = arg(None, "peak learning rate (default: 1e-3 on CPU, 1e-4 on CUDA)")
    warmup_steps: int = arg(0, "linear warmup steps before the cosine schedule")
    weight_decay: float = arg(0.01, "AdamW weight decay on the adapter matrices")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0 = off)")
    max_seq_len: int | None = arg(None, "tokens kept per conversation (default: 256 on CPU, 340 on CUDA)")
    max_steps: int = arg(0, "stop after this many optimizer steps (0 = run all epochs)")
    device: str = arg("auto", "cuda, cpu, or auto")
    dtype: str = arg("auto", "bfloat16 or float32 (auto: bf16 autocast on CUDA, fp32 on CPU)")
    kernels: str = arg("auto", "ops spec: torch | triton | liger | auto, with overrides like 'triton,rope=torch'")
    compile: bool = arg(False, "torch.compile the model (dynamic shapes)")
    max_bad_steps: int = arg(10, "stop after this many non-finite steps in a row (each one is skipped and counted)")
    skip_bad_lines: bool = arg(False, "count and skip malformed data lines instead of stopping at the first")
    wandb: bool = arg(False, "also log to Weights & Biases (needs `pip install wandb`)")
    swanlab: bool = arg(False, "also log to SwanLab (needs `pip install swanlab`)")
    log_interval: int = arg(10, "optimizer steps between log lines")
    save_interval: int = arg(200, "optimizer steps between checkpoints")
    keep_last: int = arg(2, "resume checkpoints to keep")
    seed: int = arg(42, "seed for the adapter initialisation and the data order")


def resolve_auto(args: Args, on_cuda: bool) -> Args:
    """Fill the machine-dependent defaults (None) with their CPU or CUDA value."""
    for name, (cpu, cuda) in _AUTO.items():
        if getattr(args, name) is None:
            setattr(args, name, cuda if on_cuda else cpu)
    return args


def save_resume(args: Args, step: int, model: torch.nn.Module, state: dict) -> Path:
    """The adapter as {out_dir}/{save_weight} and a resumable copy {save_weight}_resume/step_N (with train_state.pt),
    keeping the last --keep_last: common.save_resume's layout, with adapter folders instead of model folders."""
    run = asdict(args)
    meta = {"step": step}
    lora.save_adapter(Path(args.out_dir) / args.save_weight, model, args.from_weight, run, meta=meta)
    rdir = common.resume_dir(args.out_dir, args.save_weight)
    folder = lora.save_adapter(rdir / f"step_{step:08d}", model, args.from_weight, run, train_state=state, meta=meta)
    steps = sorted(p for p in rdir.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for p in steps[: -args.keep_last] if args.keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = common.setup_runtime(args.device, args.dtype, args.seed)
    if rt.world_size > 1:
        raise SystemExit(
            "error: train/lora.py runs in a single process (adapters train fast); launch it without torchrun"
        )
    args = resolve_auto(args, rt.is_cuda)
    tok_path = args.tokenizer
    if tok_path is None and (Path(args.from_weight) / "tokenizer.json").is_file():
        tok_path = args.from_weight
    tok = common.load_tokenizer(tok_path)
    ops = common.resolve_kernels(args.kernels, rt)
    model = common.load_base_model(args.from_weight, ops, rt.device)
    if tok.vocab_size > model.config.vocab_size:
        raise SystemExit(f"error: tokenizer has {tok.vocab_size} tokens, the model's vocab {model.config.vocab_size}")
    trackers = common.open_trackers(args.wandb, args.swanlab, "minimind", args.save_weight, vars(args))
    try:
        # A generator of its own: the adapter init does not depend on how much global RNG the setup consumed.
        names = lora.apply_lora(
            model,
            args.lora_rank,
            args.lora_alpha,
            args.lora_targets,
            generator=torch.Generator().manual_seed(args.seed),
        )
    except lora.AdapterError as exc:
        raise SystemExit(f"error: {exc}") from exc

    try:
        data = SFTDataset(args.data_path, tok, args.max_seq_len, skip_bad_lines=args.skip_bad_lines)
    except (DataError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    if data.bad_lines:
        print(
            f"warning: skipped {data.bad_lines} malformed lines in {args.data_path}; first: {data.bad_line_reasons[0]}"
        )
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
            try:
                lora.load_adapter(model, folder, trainable=True)
            except lora.AdapterError as exc:
                raise SystemExit(f"error: --from_resume: {exc}") from exc
            state = ckpt.load_train_state(folder)
            optimizer.load_state_dict(state["optimizer"])
            common.set_rng_state(state["rng"])
            start_step = int(state["step"])
            print(f"resumed from {folder} at step {start_step}")

    n_train = lora.num_lora_params(model)
    train_model = torch.compile(model, dynamic=True) if args.compile else model
    print(
        f"lora: rank {args.lora_rank}, alpha {args.lora_alpha or args.lora_rank:g} on {len(names)} layers "
        f"({', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))}); {n_train:,} trainable of "
        f"{model.num_params():,} params; base {args.from_weight} on {rt.device} "
        f"({'bf16 autocast' if rt.amp_dtype else 'fp32'}); {len(data):,} conversations; batch {args.batch_size} x "
        f"accum {args.accumulation_steps}; {total_steps} steps ({steps_per_epoch} per epoch), lr {args.learning_rate:g}"
    )

    metrics = common.MetricsLog(
        Path(args.out_dir) / f"{args.save_weight}_metrics.jsonl", append=start_step > 0, trackers=trackers
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batches, batches_epoch = None, -1
    loss_sum = torch.zeros((), device=rt.device)
    loss_count, tokens_since, skipped, bad_streak, last_loss = 0, 0, 0, 0, float("nan")
    timer = common.Timer(rt.device)
    bar = tqdm(
        range(start_step, total_steps),
        initial=start_step,
        total=total_steps,
        desc="lora",
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
                tokens_since += int(batch["attention_mask"].sum())
                ids, labels = batch["input_ids"].to(rt.device), batch["labels"].to(rt.device)
                with rt.autocast():
                    out = train_model(ids, labels=labels)
                    loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
                (loss / args.accumulation_steps).backward()
                loss_sum += loss.detach()
                loss_count += 1
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf"))
            if torch.isfinite(grad_norm):
                optimizer.step()
                bad_streak = 0
            else:
                # A NaN/inf loss or gradient: the adapter and optimizer state stay as they were.
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
                last_loss = (loss_sum / max(loss_count, 1)).item()
                record = {
                    "step": done,
                    "epoch": epoch,
                    "loss": round(last_loss, 5),
                    "lr": lr,
                    "grad_norm": round(float(grad_norm), 4),
                    "tokens_per_s": round(tokens_since / dt, 1),
                    "skipped_steps": skipped,
                }
                metrics.write(record)
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}")
                loss_sum.zero_()
                loss_count, tokens_since = 0, 0
            if done % args.save_interval == 0 or done == total_steps or stop.requested:
                state = {"step": done, "optimizer": optimizer.state_dict(), "rng": common.rng_state()}
                save_resume(args, done, model, state)
            if stop.requested:
                break
    bar.close()
    metrics.close()
    png = common.plot_loss_curve(metrics.path, Path(args.out_dir) / f"{args.save_weight}_loss.png", "LoRA")
    out_path = Path(args.out_dir) / args.save_weight
    print(f"done: loss {last_loss:.4f}; adapter in {out_path}" + (f"; loss curve {png}" if png else ""))
    return {"loss": last_loss, "steps": total_steps, "out": str(out_path), "layers": names}


if __name__ == "__main__":
    main()
