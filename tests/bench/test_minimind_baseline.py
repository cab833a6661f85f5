"""bench/minimind_baseline.py computes what our reference ops compute, the way MiniMind2 computes it."""

import json
from pathlib import Path

import pytest
import torch

from bench import minimind_baseline
from minimind_kernels import reference


def _moe_inputs(n=37, d=16, f=24, e=5, k=2, seed=0, idle=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    if idle is not None:  # no token routed to expert `idle`
        idx = torch.where(idx == idle, (idle + 1) % e, idx)
        idx[:, 1] = torch.where(idx[:, 1] == idx[:, 0], (idx[:, 0] + 2) % e, idx[:, 1])
        assert not (idx == idle).any() and (idx[:, 0] != idx[:, 1]).all()
    w = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64), -1)
    wg = torch.randn(e, f, d, generator=g, dtype=torch.float64) / d**0.5
    wu = torch.randn(e, f, d, generator=g, dtype=torch.float64) / d**0.5
    wd = torch.randn(e, d, f, generator=g, dtype=torch.float64) / f**0.5
    return [t.requires_grad_() for t in (x, w, wg, wu, wd)], idx


@pytest.mark.parametrize("idle", [None, 3])
def test_moe_loop_matches_reference_values_and_gradients(idle):
    (x, w, wg, wu, wd), idx = _moe_inputs(idle=idle)
    ys = [fn(x, idx, w, wg, wu, wd) for fn in (minimind_baseline.moe_experts, reference.moe_experts)]
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-12, atol=1e-12)
    up = torch.randn_like(ys[0])
    grads = [torch.autograd.grad((y * up).sum(), (x, w, wg, wu, wd)) for y in ys]
    for a, b, name in zip(*grads, ("x", "weights", "w_gate", "w_up", "w_down"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    if idle is not None:  # the idle expert gets an all-zero gradient, not None
        assert grads[0][2][idle].abs().max() == 0 and grads[0][2][(idle + 1) % 5].abs().max() > 0


@pytest.mark.parametrize("masked", [False, True])
def test_attention_with_repeated_heads_matches_gqa_reference(masked):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 11, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 11, 16, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 11, 16, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 11, 11, generator=g) > 0.3 if masked else None
    if mask is not None:
        mask[..., 0] = True  # every query sees at least one key
    outs = [fn(q, k, v, attn_mask=mask) for fn in (minimind_baseline.attention, reference.attention)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    up = torch.randn_like(outs[0])
    for a, b in zip(*(torch.autograd.grad((o * up).sum(), (q, k, v)) for o in outs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_baseline_ops_swap_only_moe_and_attention():
    ops = minimind_baseline.ops()
    assert ops.moe_experts is minimind_baseline.moe_experts and ops.attention is minimind_baseline.attention
    assert ops.impl["moe_experts"] == "minimind loop" and ops.impl["rmsnorm"] == "torch"
    assert ops.rmsnorm is reference.rmsnorm


def test_cpu_compare_runs_both_paths_on_the_same_documents_and_writes_the_ratio(tmp_path):
    from bench import e2e

    small = [
        "--preset",
        "tiny",
        "--batch_size",
        "2",
        "--accumulation_steps",
        "1",
        "--max_seq_len",
        "96",
    ]  # rows 1-6: 69, 62, 56, 105, 105, 49 tokens
    result = e2e.main(["--cpu_compare", *small, "--steps", "3", "--warmup_steps", "1", "--repeats", "1",
                       "--device", "cpu", "--out_dir", str(tmp_path)])  # fmt: skip
    base, ours = result["runs"]
    assert [r["status"] for r in result["runs"]] == ["ok", "ok"], result["runs"]
    assert base["mode"] == "baseline-minimind" and base["kernels_impl"]["moe_experts"] == "minimind loop"
    assert base["precision"] == "fp32" and base["data"].startswith("data/sample/pretrain.jsonl")
    assert ours["mode"] == "packed" and ours["data"].startswith("data/sample/pretrain.jsonl")
    assert 0 < base["non_pad_fraction"] < 1 and ours["non_pad_fraction"] == 1
    assert result["pairs"] == [ours["tokens_per_s"] / base["tokens_per_s"]]
    assert result["pairs_per_position"] == [base["step_s"] / ours["step_s"]]
    json_path, md_path = map(Path, result["paths"])
    assert json.loads(json_path.read_text())["meta"]["finished"] is True
    assert f"pair by pair: {result['pairs'][0]:.2f}x" in md_path.read_text()
