"""LoRA fine-tuning: a frozen base model plus trainable low-rank adapters, trained on conversations like SFT.

    python train/lora.py                                       # CPU: out/full_sft + identity data -> out/lora_identity
    python train/lora.py --data_path lora_medical.jsonl --save_weight lora_medical --epochs 10
    python train/lora.py --lora_rank 8 --lora_alpha 16 --lora_targets q_proj,k_proj,v_proj,o_proj
    python tools/chat.py --load out/full_sft --lora out/lora_identity --prompt "Who are you?"

Algorithm, as implemented (minimind_fast/lora.py has the maths): the chosen Linear layers of the --from_weight model are
wrapped so that y = W x + (alpha / r) B A x, A ~ N(0, 0.02), B = 0; W stays frozen and only A and B are trained.
MiniMind's defaults: rank 16, adapters on the square Linear layers (q_proj and o_proj here), alpha = rank (scale 1,
"no alpha scaling"). The data, loss and loop are SFT's (train/sft.py): assistant-span cross-entropy, batches padded
to their own longest row, AdamW on the adapter parameters only (weight decay 0.01 on A and B, as MiniMind applies it),
gradient clipping 1.0, cosine schedule lr -> 0.1 * lr, exact resume from the step; a non-finite gradient norm skips
the step (--max_bad_steps in a row stop the run).

Under torchrun (`torchrun --nproc_per_node N train/lora.py`) the model is wrapped in DDP: every rank holds the frozen
base and the same adapters (drawn from the seed), takes batch_size conversations of every micro-batch, and only the
adapter gradients are all-reduced (once per optimizer step). Each rank's loss is the mean over its own assistant
tokens and the gradients are averaged over ranks, so ranks weigh equally rather than by their token counts; the
logged loss is the mean of the ranks' losses. The data position is counted in conversations, so a run resumes on
another number of ranks. --fsdp is refused: sharding the adapters (a few hundred KB) saves nothing, and sharding the
frozen base under them would need the adapter save, load and merge paths (minimind_fast/lora.py) to gather DTensors;
a base too large to replicate should be trained with full SFT under FSDP2 instead.

Outputs under --out_dir: {save_weight}/ is an adapter folder (adapter.safetensors + adapter_config.json with rank,
alpha, layer names and the base architecture's fingerprint; a few hundred KB instead of the whole model);
{save_weight}_resume/step_N/ adds train_state.pt (optimizer, step, RNG); {save_weight}_metrics.jsonl, _loss.png.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/lora.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from minimind_fast import lora
from minimind_fast.data import SFTDataset, collate_sft
from train import checks, common, step
from train.args import StageArgs, arg, parse_args, resolve_auto
from train.metrics import Timer
from train.models import load_base_model, open_dataset, stage_tokenizer
from train.resume import prune_resume, restore_resume, resume_dir, save_step, step_folder
from train.runtime import all_reduce_mean, describe_runtime, load_full_state, resolve_kernels, setup_runtime, wrap_model

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
class Args(StageArgs):
    data_path: str = arg("data/sample/lora_identity.jsonl", "SFT-format JSONL the adapter learns from")
    out_dir: str = arg("out", "where the adapter, metrics and the loss curve go")
    save_weight: str = arg("lora_identity", "name of the adapter folder under --out_dir")
    from_weight: str = arg("out/full_sft", "base checkpoint folder (frozen; the SFT stage's output)")
    lora_rank: int = arg(16, "rank r of the adapters")
    lora_alpha: float | None = arg(None, "alpha; the update is scaled by alpha / rank (default: = rank, scale 1)")
    lora_targets: str = arg(
        "square", "'square' (in == out: q_proj, o_proj), 'all-linear', or names like 'q_proj,v_proj'"
    )
    epochs: int | None = arg(None, "passes over the data (default: 10 on CPU, 50 on CUDA)")
    batch_size: int | None = arg(None, "conversations per micro-batch and rank (default: 16 on CPU, 32 on CUDA)")
    learning_rate: float | None = arg(None, "peak learning rate (default: 1e-3 on CPU, 1e-4 on CUDA)")
    weight_decay: float = arg(0.01, "AdamW weight decay on the adapter matrices")
    max_seq_len: int | None = arg(None, "tokens kept per conversation (default: 256 on CPU, 340 on CUDA)")
    compile: bool = arg(False, "torch.compile the model (dynamic shapes)")
    fsdp: bool = arg(False, "refused for LoRA: the adapters are replicated with DDP (see the module docstring)")
    seed: int = arg(42, "seed for the adapter initialisation and the data order")


def save_resume(args: Args, model: torch.nn.Module, step: int, state: dict) -> Path:
    """The adapter as {out_dir}/{save_weight} and a resumable copy {save_weight}_resume/step_N (with train_state.pt),
    keeping the last --keep_last: resume.save_resume's layout, with adapter folders instead of model folders."""
    run = asdict(args)
    meta = {"step": step, "run": state.get("run")}
    lora.save_adapter(Path(args.out_dir) / args.save_weight, model, args.from_weight, run, meta=meta)
    rdir = resume_dir(args.out_dir, args.save_weight)
    target = step_folder(rdir, step, state.get("run"))
    folder = lora.save_adapter(target, model, args.from_weight, run, train_state=state, meta=meta)
    prune_resume(rdir, args.keep_last, folder)
    return folder


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Args, argv, __doc__.split("\n\n")[0])
    if args.fsdp:
        checks.fail(
            "error: --fsdp is not supported for LoRA (the adapters are tiny; run under torchrun without --fsdp for DDP)"
        )
    rt = setup_runtime(args.device, args.dtype, args.seed, args.dist_timeout)
    args = resolve_auto(args, rt.is_cuda, _AUTO)
    tok = stage_tokenizer(args.tokenizer, args.from_weight)
    ops = resolve_kernels(args.kernels, rt)
    model = load_base_model(args.from_weight, ops, rt.device)
    if tok.vocab_size > model.config.vocab_size:
        checks.fail(f"error: tokenizer has {tok.vocab_size} tokens, the model's vocab {model.config.vocab_size}")
    try:
        # A generator of its own: the adapter init does not depend on how much global RNG the setup consumed, and
        # every rank draws the same adapters.
        names = lora.apply_lora(
            model,
            args.lora_rank,
            args.lora_alpha,
            args.lora_targets,
            generator=torch.Generator().manual_seed(args.seed),
        )
    except lora.AdapterError as exc:
        checks.fail(f"error: {exc}")

    data = open_dataset(SFTDataset, args, tok, rt)
    plan = step.Plan.of(args, len(data), rt, "conversations")

    wrapped = wrap_model(model, rt)  # DDP all-reduces only the trainable (adapter) gradients
    optimizer = step.build_optimizer(model, args.learning_rate, args.weight_decay)
    start_step, state = restore_resume(args, rt, plan.rows_per_step, tokenizer=tok, config=model.config)
    if state:
        try:
            lora.load_adapter(model, state["folder"], trainable=True)
        except lora.AdapterError as exc:
            checks.fail(f"error: --from_resume: {exc}")
        load_full_state(model, optimizer, None, state["optimizer"])

    n_train = lora.num_lora_params(model)
    train_model = torch.compile(wrapped, dynamic=True) if args.compile else wrapped
    summary = (
        f"lora: rank {args.lora_rank}, alpha {args.lora_alpha or args.lora_rank:g} on {len(names)} layers "
        f"({', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))}); {n_train:,} trainable of "
        f"{model.num_params():,} params; base {args.from_weight} on {describe_runtime(rt, args)}; "
        f"{len(data):,} conversations; batch {args.batch_size} x accum {args.accumulation_steps}; "
        f"{plan.total_steps} steps ({plan.steps_per_epoch} per epoch), lr {args.learning_rate:g}"
    )
    metrics, guard = common.start_run(args, rt, start_step, summary)
    # A step without a labelled token has a zero gradient and is skipped (skip_zero).
    stepper = step.Stepper(
        model, wrapped, optimizer, rt, guard, args.accumulation_steps, args.grad_clip, skip_zero=True
    )
    counts = {"tokens": 0}  # CPU tensors, read at log steps

    def micro_batches(s: int):
        for rows in plan.micro_rows(s):
            batch = collate_sft([data[i] for i in rows], tok.pad_id)
            counts["tokens"] += batch["attention_mask"].sum()
            yield batch["input_ids"].to(rt.device), batch["labels"].to(rt.device)

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        out = train_model(batch[0], labels=batch[1])
        return out.loss if out.aux_loss is None else out.loss + out.aux_loss

    model.train()
    loss_sum = torch.zeros((), device=rt.device)
    steps_since, last_loss = 0, float("nan")
    timer = Timer(rt.device)
    bar = common.progress(start_step, plan.total_steps, "lora", rt)
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
                metrics.write(
                    {
                        "step": done,
                        "epoch": plan.epoch(s),
                        "loss": round(last_loss, 5),
                        "lr": lr,
                        "grad_norm": round(float(grad_norm), 4),
                        "tokens_per_s": round(int(counts["tokens"]) * rt.world_size / dt, 1),
                        "skipped_steps": guard.skipped,
                    }
                )
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}")
                loss_sum.zero_()
                steps_since, counts["tokens"] = 0, 0
            stopping = plan.stopping(stop.requested, done, rt)
            if plan.saves(done) or stopping:
                guard.read(done)
                write = functools.partial(save_resume, args, model)
                save_step(args, rt, done, plan.rows_per_step, model, optimizer, tok, write=write)
            if stopping:
                break
    bar.close()
    common.finish(args, rt, metrics, "LoRA", last_loss)
    out_path = Path(args.out_dir) / args.save_weight
    return {"loss": last_loss, "steps": plan.total_steps, "out": str(out_path), "layers": names}


if __name__ == "__main__":
    main()
