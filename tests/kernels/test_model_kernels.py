"""Model level: the same model and batch through resolve("torch") and resolve("triton") give the same loss and
gradients (dense and MoE). On CPU the Triton kernels run in Triton's interpreter (fp32); on a GPU natively."""

import pytest
import torch

import minimind_kernels as kernels
from minimind_fast.config import from_preset
from minimind_fast.model import MiniMind

# Small enough for the interpreter: every Triton op of the model still runs at odd sizes (hidden 80, FFN 256,
# head_dim 20, vocab 500: not multiples of the kernels' blocks).
SHAPE = dict(hidden_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=500)


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels)
    loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_torch_and_triton_ops_agree_on_loss_and_gradients(use_moe):
    torch.manual_seed(0)
    cfg = from_preset("tiny", use_moe=use_moe, **SHAPE)
    ref = MiniMind(cfg, ops=kernels.resolve("torch"))
    tri = MiniMind(cfg, ops=kernels.resolve("triton"))
    tri.load_state_dict(ref.state_dict())
    assert set(tri.ops.impl[op] for op in kernels.OP_NAMES if op != "attention") == {"triton"}
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    labels = ids.clone()
    labels[0, :5] = -100
    loss_ref, grads_ref = _loss_and_grads(ref, ids, labels)
    loss_tri, grads_tri = _loss_and_grads(tri, ids, labels)
    torch.testing.assert_close(loss_tri, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads_tri.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        scale = g.abs().max().item() + 1e-12
        err = (grads_tri[name] - g).abs().max().item()
        assert err <= 1e-4 * scale + 1e-7, f"{name}: max error {err:.3g} vs gradient scale {scale:.3g}"


def test_per_token_loss_and_weights_agree():
    torch.manual_seed(1)
    cfg = from_preset("tiny", **SHAPE)
    ref = MiniMind(cfg, ops=kernels.resolve("torch"))
    tri = MiniMind(cfg, ops=kernels.resolve("triton"))
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (3, 9))
    w = torch.rand(3, 9) * 10
    for kw in (dict(loss_reduction="none"), dict(token_weight=w), dict(loss_reduction="sum")):
        a, b = ref(ids, labels=ids, **kw).loss, tri(ids, labels=ids, **kw).loss
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
