"""Fixtures shared by the stage tests: a stage script run under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def torchrun():
    """run(script, args) -> the finished process: train/<script> under `torchrun --nproc_per_node 2` on CPU (gloo, one
    thread per rank). A non-zero exit fails the test with the tail of the output."""

    def run(script, args, nproc=2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "0"]
        cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", str(REPO / "train" / script)]
        proc = subprocess.run(cmd + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"x {nproc} ranks" in proc.stdout
        return proc

    return run


@pytest.fixture(scope="session")
def tiny_start(tmp_path_factory, tokenizer):
    """A freshly initialised tiny model (seed 0) saved as a checkpoint: where the stage tests that need no trained
    weights start (it stands in for out/pretrain, out/full_sft, ...). Read-only: runs write to their own out_dir."""
    import torch

    from minimind_fast import checkpoint as ckpt
    from minimind_fast.config import from_preset
    from minimind_fast.model import MiniMind

    torch.manual_seed(0)
    model = MiniMind(from_preset("tiny"))
    return ckpt.save_checkpoint(tmp_path_factory.mktemp("tiny_start") / "start", model, model.config, tokenizer)


@pytest.fixture(scope="session")
def rl_prompts(tmp_path_factory):
    """A small RL prompt file of its own (two-digit sums with their answers), so the RL tests' premises do not move
    when data/sample is regenerated."""
    path = tmp_path_factory.mktemp("rl") / "prompts.jsonl"
    lines = []
    for i in range(16):
        a, b = 11 + 7 * i % 80, 13 + 5 * i % 70
        q = {"role": "user", "content": f"What is {a} + {b}?"}
        lines.append(
            json.dumps({"conversations": [q, {"role": "assistant", "content": f"{a + b}."}], "answer": str(a + b)})
        )
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def rank_rollouts(tokenizer, rl_prompts):
    """find(start, reward, num_samples, batch_size, premise) -> ((max_gen_len, seed), policy, [rollout of rank 0, of
    rank 1]): the first rollout of each rank of a 2-rank RL run on rl_prompts from checkpoint `start`, sampled again
    in this process (rank r's prompts are the r-th batch of the epoch-0 order, its RNG rollout number r), for the
    first seed (42, 7, 123) and shortest max_gen_len from 3 to 10 whose rollouts satisfy premise(rollouts). Sampling
    from a random model depends on the tokenizer and the sampler, so both are searched rather than fixed. Completion
    masks and rewards only."""
    import torch

    from minimind_fast import checkpoint as ckpt
    from minimind_fast.data import RLPromptDataset
    from train import rewards, rollout, step

    def find(start, reward, num_samples, batch_size, premise, max_seq_len=40):
        policy, _, _ = ckpt.load_model(start)
        data = RLPromptDataset(rl_prompts, tokenizer, max_seq_len)
        reward_fn = rewards.build_rewards(reward, "none", torch.device("cpu"), False, 16)
        for seed in (42, 7, 123):
            order = step.epoch_order(len(data), seed, 0)
            for max_gen_len in range(3, 11):
                kw = dict(num_samples=num_samples, max_new_tokens=max_gen_len, device=torch.device("cpu"))
                out = []
                for r in (0, 1):
                    b = rollout.prompt_batch(data, order, r, batch_size)
                    g = rollout.rollout_generator(torch.device("cpu"), seed, r)
                    args = (policy, None, b["ids"], b["texts"], b["records"], reward_fn, tokenizer)
                    out.append(rollout.collect(*args, with_old_logp=False, generator=g, **kw))
                if premise(out):
                    return (max_gen_len, seed), policy, out
        pytest.fail("no seed and completion length from 3 to 10 give rollouts that satisfy the test's premise")

    return find


@pytest.fixture(scope="session")
def rl_two_ranks(torchrun, rank_rollouts, rl_prompts):
    """run(script, start, out, flags, num_samples, batch_size, premise) -> (policy, [rollout of rank 0, of rank 1]):
    a 2-step run of an RL stage on 2 ranks (rule+shaping reward, batch_size prompts per rank) whose first rollouts
    are those rank_rollouts finds for the premise, and the policy they were sampled from."""

    def run(script, start, out, flags, num_samples, batch_size, premise):
        (gen, seed), policy, ros = rank_rollouts(start, "rule+shaping", num_samples, batch_size, premise)
        argv = ["--from_weight", start, "--data_path", rl_prompts, "--out_dir", out, "--reward", "rule+shaping"]
        argv += ["--seed", seed]
        torchrun(script, flags + argv + ["--max_steps", 2, "--batch_size", batch_size, "--max_gen_len", gen])
        return policy, ros

    return run


@pytest.fixture(scope="session")
def completion_logp():
    """logp(model, rollout) -> per-token log-probs [N, R] of the rollout's completion tokens from a full log-softmax
    over the model's logits (with grad when the model has it)."""

    def logp(model, ro):
        p = ro.prompt_width
        out = model(ro.input_ids, attention_mask=ro.attention_mask, position_ids=ro.position_ids, return_logits=True)
        return out.logits[:, p - 1 : -1].log_softmax(-1).gather(2, ro.input_ids[:, p:, None])[..., 0]

    return logp
