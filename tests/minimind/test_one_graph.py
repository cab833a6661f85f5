"""torch.compile sees the whole training forward as one graph: no graph break (a break splits the compiled program
and sends control back to Python mid-step). Checked with torch._dynamo.explain, which traces without compiling: the
dense model with the torch ops on any machine, dense and MoE with the Triton kernels on a GPU."""

import pytest
import torch
import torch._dynamo as dynamo

import minimind_kernels as kernels
from minimind_fast.config import from_preset
from minimind_fast.model import MiniMind

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _explain(spec: str, device: str, use_moe: bool):
    torch.manual_seed(0)
    model = MiniMind(from_preset("tiny", use_moe=use_moe, **TINY), ops=kernels.resolve(spec)).to(device).train()
    x = torch.randint(3, model.config.vocab_size, (2, 16), device=device)
    dynamo.reset()
    try:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            return dynamo.explain(model)(x, labels=x)
    finally:
        dynamo.reset()


def test_the_dense_model_is_one_graph():
    out = _explain("torch", "cpu", use_moe=False)
    assert (out.graph_count, out.graph_break_count) == (1, 0), [str(b.reason)[:200] for b in out.break_reasons]


@pytest.mark.gpu
@pytest.mark.parametrize("use_moe", [False, True])
def test_the_triton_model_is_one_graph(use_moe):
    out = _explain("triton", "cuda", use_moe=use_moe)
    assert (out.graph_count, out.graph_break_count) == (1, 0), [str(b.reason)[:200] for b in out.break_reasons]
