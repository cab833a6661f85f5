"""White-box knowledge distillation: a student learns from a teacher's full next-token distributions on SFT data.

    python train/distill.py --teacher out/full_sft_base --from_weight out/full_sft      # CUDA: base -> small
    python train/distill.py --teacher out/full_sft --student_preset tiny --hidden_size 128 --num_hidden_layers 2
                                                    # CPU recipe: the tiny SFT model into a fresh, smaller student
    python train/distill.py --from_resume 1
    torchrun --nproc_per_node 4 train/distill.py --teacher out/full_sft_base      # DDP (add --fsdp for FSDP2)

Algorithm, as implemented (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", sec. 2):

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))

over the assistant tokens only (the positions whose next token is labelled), both terms averaged over those tokens;
alpha 0.5 and T 1.5 by default (MiniMind2's values), plus the MoE balance loss for an MoE student. The teacher may
have any size (hidden width and depth come from each checkpoint's config) but must share the tokenizer and vocab.
It runs in eval mode without gradients, its matmul weights stored in the compute dtype (bf16 under bf16 autocast).

Memory: no [B, T, V] logits are materialised. The CE goes through the model's fused linear cross-entropy; for the KL
both models return their final-norm hidden states, and train/losses.py:chunked_distill_kl makes the two models'
logits --kl_chunk tokens at a time, computing the student's gradient chunk by chunk in the same pass (MiniMind
holds both models' full fp32 logits for the whole batch).

Under torchrun each rank takes batch_size conversations of every micro-batch (the data position is counted in
conversations, so a run resumes on another number of ranks). Each rank's CE and KL are means over its own trained
tokens and the student's gradients are averaged over ranks (all-reduced once per optimizer step), so ranks weigh
equally rather than by their token counts; the logged losses are the means of the ranks' losses. The student is
wrapped (DDP, or FSDP2 per block with --fsdp: the tied head is read after the forward, while the root's parameters
are still gathered); the frozen teacher is not, every rank holds a copy.

--student_preset builds a fresh student from a preset (optionally narrower or shallower with --hidden_size /
--num_hidden_layers) instead of loading --from_weight. Outputs under --out_dir: {save_weight}/ (the student),
{save_weight}_resume/step_N/, {save_weight}_metrics.jsonl, {save_weight}_loss.png.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/distill.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from minimind_fast.data import IGNORE_INDEX, SFTDataset, collate_sft, tokenizer_fingerprint
from minimind_fast.model import MiniMind, compute_dtype
from minimind_fast.tokenizer import Tokenizer
from train import checks, common, step
from train.args import StageArgs, arg, parse_args, resolve_auto
from train.losses import chunked_distill_kl
from train.metrics import Timer
from train.models import build_config, frozen_model, load_base_model, load_tokenizer, open_dataset
from train.resume import restore_resume, save_step
from train.runtime import all_reduce_mean, describe_runtime, resolve_kernels, setup_runtime, wrap_model

# (CPU, CUDA). CUDA: MiniMind2's row. CPU: one pass over the sample SFT data; lr measured with the tiny CPU SFT model
# as teacher and a fresh 128-wide, 2-layer student (171 steps): at 1e-4 the last logged CE/KL were 6.38/4.35, at
# 1e-3 2.06/0.46 (MiniMind2's 5e-6 is sized for 26M+ models over 6 epochs of real data).
_AUTO = {
    "epochs": (1, 6),
    "batch_size": (16, 32),
    "learning_rate": (1e-3, 5e-6),
    "max_seq_len": (256, 340),
}


@dataclass
class Args(StageArgs):
    data_path: str = arg("data/sample/sft.jsonl", "SFT JSONL ({'conversations': [...]} per line)")
    save_weight: str = arg("full_dist", "name of the checkpoint folder under --out_dir")
    teacher: str = arg("out/full_sft_base", "checkpoint folder of the teacher (any size, same tokenizer)")
    from_weight: str = arg("out/full_sft", "checkpoint folder the student starts from (unless --student_preset)")
    student_preset: str | None = arg(
        None, "start a fresh student from this preset (tiny, small, base, moe, m3, m3-moe, m3-tiny)"
    )
    hidden_size: int = arg(0, "with --student_preset: the student's hidden size (0 = the preset's)")
    num_hidden_layers: int = arg(0, "with --student_preset: the student's depth (0 = the preset's)")
    tokenizer: str | None = arg(None, "tokenizer folder (default: the one saved with the student, else the teacher)")
    alpha: float = arg(0.5, "weight of the hard-label cross-entropy; 1 - alpha weighs the soft KL term")
    temperature: float = arg(1.5, "softmax temperature T of the KL term (scaled by T^2)")
    kl_chunk: int = arg(1024, "tokens per chunk of the KL (bounds its [chunk, vocab] fp32 buffers)")
    epochs: int | None = arg(None, "passes over the data (default: 1 on CPU, 6 on CUDA as MiniMind2)")
    batch_size: int | None = arg(None, "conversations per micro-batch and rank (default: 16 on CPU, 32 on CUDA)")
    learning_rate: float | None = arg(None, "peak learning rate (default: 1e-3 on CPU for tiny, 5e-6 on CUDA)")
    max_seq_len: int | None = arg(None, "truncate conversations to this many tokens (default: 256 CPU, 340 CUDA)")
    compile: bool = arg(False, "torch.compile the student and the teacher")
    seed: int = arg(42, "seed for a fresh student's initialisation and the data order")


def check_same_vocab(student: MiniMind, teacher: MiniMind, tok: Tokenizer, teacher_folder: str) -> None:
    """Distillation compares distributions token by token: both models must index the same vocabulary."""
    vs, vt = student.config.vocab_size, teacher.config.vocab_size
    if vs != vt:
        checks.fail(f"error: student vocab {vs} != teacher vocab {vt}: they must share the tokenizer")
    if (Path(teacher_folder) / "tokenizer.json").is_file():
        t_tok = Tokenizer.load(teacher_folder)
        if tokenizer_fingerprint(t_tok) != tokenizer_fingerprint(tok):
            checks.fail(
                f"error: the teacher's tokenizer ({teacher_folder}) differs from the student's ({tok.source}); "
                "distillation needs both models to use the same tokenizer"
            )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Args, argv, __doc__.split("\n\n")[0])
    rt = setup_runtime(args.device, args.dtype, args.seed, args.dist_timeout)
    args = resolve_auto(args, rt.is_cuda, _AUTO)
    if not 0.0 <= args.alpha <= 1.0 or args.temperature <= 0:
        checks.fail(f"error: need 0 <= --alpha <= 1 and --temperature > 0 (got {args.alpha}, {args.temperature})")
    ops = resolve_kernels(args.kernels, rt)
    tok_path = args.tokenizer
    if tok_path is None:
        candidates = [args.teacher] if args.student_preset else [args.from_weight, args.teacher]
        tok_path = next((c for c in candidates if (Path(c) / "tokenizer.json").is_file()), None)
    tok = load_tokenizer(tok_path)
    if args.student_preset:
        sizes = {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers}
        cfg = build_config(args.student_preset, tok, **{k: v for k, v in sizes.items() if v > 0})
        student = MiniMind(cfg, ops=ops).to(rt.device)
        source = f"fresh {args.student_preset} ({cfg.hidden_size} x {cfg.num_hidden_layers})"
    else:
        student = load_base_model(args.from_weight, ops, rt.device)
        source = args.from_weight
    teacher = frozen_model(args.teacher, ops, rt)
    check_same_vocab(student, teacher, tok, args.teacher)

    data = open_dataset(SFTDataset, args, tok, rt)
    plan = step.Plan.of(args, len(data), rt, "conversations")

    wrapped = wrap_model(student, rt, fsdp=args.fsdp)
    optimizer = step.build_optimizer(student, args.learning_rate, args.weight_decay)
    start_step, _ = restore_resume(
        args, rt, plan.rows_per_step, student, optimizer, tokenizer=tok, start="none" if args.student_preset else None
    )
    train_model = torch.compile(wrapped) if args.compile else wrapped
    teacher_fwd = torch.compile(teacher) if args.compile else teacher
    summary = (
        f"distill: student {source}, {student.num_params():,} params; teacher {args.teacher}, "
        f"{teacher.num_params():,} params ({teacher.config.hidden_size} x {teacher.config.num_hidden_layers}); "
        f"on {describe_runtime(rt, args)}; {len(data)} conversations; batch {args.batch_size} x accum "
        f"{args.accumulation_steps}; {plan.total_steps} steps, lr {args.learning_rate:g}, alpha {args.alpha:g}, "
        f"T {args.temperature:g}"
    )
    metrics, guard = common.start_run(args, rt, start_step, summary)
    # A step without a labelled token has a zero gradient and is skipped (skip_zero).
    stepper = step.Stepper(student, wrapped, optimizer, rt, guard, args.accumulation_steps, args.grad_clip, True)
    t2 = args.temperature**2
    sums = torch.zeros(3, device=rt.device)  # loss, ce, kl summed over this rank's micro-batches
    counts = {"micro": 0, "tokens": 0}

    def micro_batches(s: int):
        for rows in plan.micro_rows(s):
            batch = collate_sft([data[i] for i in rows], tok.pad_id)
            counts["micro"] += 1
            counts["tokens"] += (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # on the CPU: no device sync
            yield batch["input_ids"].to(rt.device, non_blocking=True), batch["labels"].to(rt.device, non_blocking=True)

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        nonlocal sums
        ids, labels = batch
        # Row t predicts labels[t + 1]: the KL counts on the rows whose next token is trained.
        mask_N = F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False).reshape(-1)
        with torch.no_grad():
            t_hidden = teacher_fwd(ids, return_logits=False, return_hidden=True).hidden
        out = train_model(ids, labels=labels, return_hidden=True)
        dt = compute_dtype(out.hidden)
        # The head's weight is read after the forward: under FSDP2 the root (embedding = tied head) stays gathered
        # until its backward, so this is the full matrix.
        kl = chunked_distill_kl(
            out.hidden.reshape(-1, out.hidden.shape[-1]).to(dt),
            student.lm_head.weight.to(dt),
            t_hidden.reshape(-1, t_hidden.shape[-1]),
            teacher.lm_head.weight,
            args.temperature,
            mask_N,
            args.kl_chunk,
        )
        loss = args.alpha * out.loss + (1 - args.alpha) * t2 * kl
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        sums += torch.stack([loss.detach(), out.loss.detach(), kl.detach()]).float()
        return loss

    student.train()
    last_loss = float("nan")
    timer = Timer(rt.device)
    bar = common.progress(start_step, plan.total_steps, "distill", rt)
    with common.StopFlag() as stop:
        for s in bar:
            lr = plan.set_lr(optimizer, s)
            _, grad_norm = step.train_step(stepper, micro_batches(s), loss_fn)
            done = s + 1
            if plan.logs(done):
                guard.read(done)
                dt_s = timer.lap()
                # The mean of the ranks' losses, each the token mean over its own conversations.
                loss_m, ce_m, kl_m = all_reduce_mean(sums / max(counts["micro"], 1), rt).tolist()
                last_loss = loss_m
                metrics.write(
                    {
                        "step": done,
                        "epoch": plan.epoch(s),
                        "loss": round(loss_m, 5),
                        "ce": round(ce_m, 5),
                        "kl": round(kl_m, 5),
                        "lr": lr,
                        "grad_norm": round(float(grad_norm), 4),
                        "trained_tokens_per_s": round(int(counts["tokens"]) * rt.world_size / dt_s, 1),
                        "skipped_steps": guard.skipped,
                    }
                )
                bar.set_postfix(loss=f"{loss_m:.3f}", ce=f"{ce_m:.3f}", kl=f"{kl_m:.3f}", lr=f"{lr:.1e}")
                sums.zero_()
                counts.update(micro=0, tokens=0)
            stopping = plan.stopping(stop.requested, done, rt)
            if plan.saves(done) or stopping:
                guard.read(done)
                save_step(args, rt, done, plan.rows_per_step, student, optimizer, tok)
            if stopping:
                break
    bar.close()
    common.finish(args, rt, metrics, "distillation", last_loss)
    return {"loss": last_loss, "steps": plan.total_steps, "out": str(Path(args.out_dir) / args.save_weight)}


if __name__ == "__main__":
    main()
