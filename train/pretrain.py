"""Pretraining: next-token prediction on packed text.

    python train/pretrain.py                                   # CPU: tiny preset on data/sample, a few minutes
    python train/pretrain.py                                   # CUDA: small preset, bf16, Triton kernels, compiled
    python train/pretrain.py --preset base --data_path pretrain_hq.jsonl --max_seq_len 512
    python train/pretrain.py --from_resume 1                   # continue the last run from its newest checkpoint

Algorithm, as implemented: documents become [bos] + tokens + [eos] and are packed back to back into rows of exactly
max_seq_len tokens (no padding; MiniMind pads every sample instead). The loss is the token-mean cross-entropy of
predicting token t+1 from tokens <= t over every position, plus the MoE balance loss of all MoE layers. AdamW
(betas 0.9/0.999, weight decay 0.01 on matrices), gradient accumulation, gradient clipping at 1.0, MiniMind's cosine
schedule from lr to 0.1 * lr (optional linear warmup), bf16 autocast on CUDA and on a CPU with fast bf16 matmuls, else
fp32 (train/runtime.py setup_runtime).
The sample order of each epoch is a permutation seeded by (seed, epoch), and the data position is the optimizer step,
so --from_resume replays exactly the batches an uninterrupted run would have seen.

Outputs under --out_dir: {save_weight}/ (model.safetensors, config.json, tokenizer files), {save_weight}_resume/step_N/
(the same plus train_state.pt: optimizer, step, RNG), {save_weight}_metrics.jsonl and {save_weight}_loss.png.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/pretrain.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from minimind_fast.data import PretrainDataset
from minimind_fast.model import MiniMind
from train import checks, common, step
from train.args import StageArgs, arg, parse_args, resolve_auto
from train.metrics import Timer, flops_per_token, peak_flops
from train.models import build_config, load_init_weights, load_tokenizer, open_dataset
from train.resume import restore_resume, save_step
from train.runtime import (
    all_reduce_mean,
    cpu_compile_default,
    describe_runtime,
    resolve_kernels,
    setup_runtime,
    wrap_model,
)

# Defaults that depend on the machine: (CPU, CUDA). On a CPU the run must finish in minutes on 2 cores; batch 4 at
# lr 3e-3 runs about as many tokens per second as batch 16 and makes 4x the optimizer steps, which is what the tiny
# model needs to start recalling the sample world's facts (measured: colour cloze 15% -> 38-62%, chance 10%).
_AUTO = {
    "preset": ("tiny", "small"),
    "batch_size": (4, 32),
    "accumulation_steps": (1, 8),
    "max_seq_len": (256, 340),
    "learning_rate": (3e-3, 5e-4),
    "epochs": (2, 1),
    # packed rows of one length: one compiled graph (tests/minimind/test_one_graph.py); on a CPU decided once the model
    # is known (train/runtime.py cpu_compile_default)
    "compile": (None, True),
}


@dataclass
class Args(StageArgs):
    """StageArgs plus pretraining's own flags. tokenizer, accumulation_steps and seed are re-declared: their
    defaults or help differ here (no --from_weight to take a tokenizer from; accumulation is machine-dependent)."""

    data_path: str = arg(
        "data/sample/pretrain.jsonl", "pretrain JSONL ({'text': ...} per line) or a .bin from tools/prepare_data.py"
    )
    save_weight: str = arg("pretrain", "name of the checkpoint folder under --out_dir")
    from_weight: str = arg("none", "checkpoint folder (or MiniMind .pth) to initialise from; 'none' = scratch")
    tokenizer: str | None = arg(None, "tokenizer folder or tokenizer.json (default: the shipped one)")
    preset: str | None = arg(
        None, "model preset: tiny, small, base, moe, m3, m3-moe, m3-tiny (default: tiny on CPU, small on CUDA)"
    )
    use_moe: int = arg(0, "1: mixture-of-experts feed-forward on the chosen preset")
    epochs: int | None = arg(None, "passes over the data (default: 2 on CPU for the small sample data, 1 on CUDA)")
    batch_size: int | None = arg(None, "sequences per micro-batch (default: 4 on CPU, 32 on CUDA)")
    accumulation_steps: int | None = arg(None, "micro-batches per optimizer step (default: 1 on CPU, 8 on CUDA)")
    learning_rate: float | None = arg(None, "peak learning rate (default: 3e-3 on CPU for tiny, 5e-4 on CUDA)")
    max_seq_len: int | None = arg(None, "tokens per packed row (default: 256 on CPU, 340 on CUDA)")
    aux_loss_alpha: float | None = arg(
        None, "MoE balance-loss weight (default: the preset's, 0.01 for MiniMind2, 5e-4 for MiniMind-3)"
    )
    seed: int = arg(42, "seed for initialisation and data order")
    compile: bool | None = arg(
        None,
        "torch.compile the model (default: on with CUDA; on a CPU on for dense models of hidden size >= 512 where a "
        "C++ compiler is found; --compile 0 = off)",
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = setup_runtime(args.device, args.dtype, args.seed, args.dist_timeout)
    args = resolve_auto(args, rt.is_cuda, _AUTO)
    tok = load_tokenizer(args.tokenizer)
    overrides: dict = {"use_moe": True} if args.use_moe else {}
    if args.aux_loss_alpha is not None:
        overrides["aux_loss_alpha"] = args.aux_loss_alpha
    cfg = build_config(args.preset, tok, **overrides)
    if args.compile is None:  # a CPU: where it pays back its first step
        args.compile = cpu_compile_default(cfg.hidden_size, cfg.use_moe, rt.world_size)
    if args.max_seq_len > cfg.max_position_embeddings:
        checks.fail(
            f"error: --max_seq_len {args.max_seq_len} exceeds the rotary table ({cfg.max_position_embeddings} "
            "positions); YaRN scaling is an inference-time switch, not for training"
        )
    ops = resolve_kernels(args.kernels, rt)
    model = MiniMind(cfg, ops=ops)
    load_init_weights(model, args.from_weight)
    model.to(rt.device)

    data = open_dataset(PretrainDataset, args, tok, rt)
    plan = step.Plan.of(args, len(data), rt, f"packed rows of {args.max_seq_len} tokens")

    wrapped = wrap_model(model, rt, fsdp=args.fsdp)
    optimizer = step.build_optimizer(model, args.learning_rate, args.weight_decay)
    # The data position is counted in rows, so a run may resume on a different number of ranks.
    start_step, _ = restore_resume(args, rt, plan.rows_per_step, model, optimizer, tokenizer=tok)

    n_active = model.num_active_params()
    flops_tok = flops_per_token(cfg, n_active, args.max_seq_len)
    peak = peak_flops(rt.device)
    train_model = torch.compile(wrapped) if args.compile else wrapped
    summary = (
        f"pretrain: preset {args.preset} ({model.num_params():,} params, {n_active:,} active) on "
        f"{describe_runtime(rt, args)}; {data.num_tokens:,} tokens -> {len(data):,} rows of "
        f"{args.max_seq_len}; batch {args.batch_size} x accum {args.accumulation_steps}; {plan.total_steps} steps "
        f"({plan.steps_per_epoch} per epoch), lr {args.learning_rate:g}"
    )
    metrics, guard = common.start_run(args, rt, start_step, summary)
    stepper = step.Stepper(model, wrapped, optimizer, rt, guard, args.accumulation_steps, args.grad_clip)

    def micro_batches(s: int):  # this rank's rows of each micro-batch of step s
        for rows in plan.micro_rows(s):
            yield torch.stack([data[i] for i in rows]).to(rt.device, non_blocking=True)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        out = train_model(x, labels=x)
        return out.loss if out.aux_loss is None else out.loss + out.aux_loss

    model.train()
    loss_sum = torch.zeros((), device=rt.device)
    steps_since, last_loss = 0, float("nan")
    tokens_per_step = plan.rows_per_step * args.max_seq_len  # packed rows: every position is a token
    timer = Timer(rt.device)
    bar = common.progress(start_step, plan.total_steps, "pretrain", rt)
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
                tok_s = tokens_per_step * steps_since / dt
                record = {
                    "step": done,
                    "epoch": plan.epoch(s),
                    "loss": round(last_loss, 5),
                    "lr": lr,
                    "grad_norm": round(float(grad_norm), 4),
                    "tokens_per_s": round(tok_s, 1),
                    "skipped_steps": guard.skipped,
                }
                if peak:
                    record["mfu"] = round(tok_s * flops_tok / (peak * rt.world_size), 4)
                metrics.write(record)
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                loss_sum.zero_()
                steps_since = 0
            stopping = plan.stopping(stop.requested, done, rt)
            if plan.saves(done) or stopping:
                guard.read(done)
                save_step(args, rt, done, plan.rows_per_step, model, optimizer, tok)
            if stopping:
                break
    bar.close()
    if not common.finish(args, rt, metrics, f"pretrain {args.preset}", last_loss):
        return {"loss": last_loss, "steps": plan.total_steps}
    return {"loss": last_loss, "steps": plan.total_steps, "out": str(Path(args.out_dir) / args.save_weight)}


if __name__ == "__main__":
    main()
