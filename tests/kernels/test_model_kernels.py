"""Model level: the same model and batch through resolve("torch") and resolve("triton") give the same loss and
gradients (dense and MoE). On CPU the Triton kernels run in Triton's interpreter (fp32); on a GPU natively."""

import pytest
import torch
import torch.nn.functional as F

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


def _autocast_loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=labels, return_hidden=True)
        loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
    loss.backward()
    return loss.detach(), out.hidden.dtype, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# The MoE model runs the Triton norms only: they are what this test is about (their outputs in bf16 feed the router,
# the experts and the shared experts), and moe_experts is checked in bf16 natively by the gpu tests of test_moe.py.
@pytest.mark.parametrize(
    "use_moe, spec", [(False, "triton"), (True, "torch,rmsnorm=triton,add_rmsnorm=triton")], ids=["dense", "moe"]
)
def test_bf16_autocast_training_agrees(use_moe, spec):
    """Under bf16 autocast the Triton norms store their outputs in bf16 (rmsnorm.AUTOCAST_OUTPUT, on by default) where
    the reference keeps fp32 ones that each linear then casts: the same loss and gradients up to bf16 rounding, and a
    few SGD steps lower the loss."""
    torch.manual_seed(2)
    cfg = from_preset("tiny", use_moe=use_moe, **SHAPE)
    ref = MiniMind(cfg, ops=kernels.resolve("torch"))
    tri = MiniMind(cfg, ops=kernels.resolve(spec))
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    labels = ids.clone()
    labels[0, :5] = -100
    loss_ref, hidden_ref, grads_ref = _autocast_loss_and_grads(ref, ids, labels)
    loss_tri, hidden_tri, grads_tri = _autocast_loss_and_grads(tri, ids, labels)
    assert hidden_ref == torch.float32 and hidden_tri == torch.bfloat16  # the final norm's output
    torch.testing.assert_close(loss_tri, loss_ref, rtol=1e-3, atol=1e-3)
    # bf16 matmuls on both sides, fed values rounded at different points (and, in Triton's interpreter, rounded toward
    # zero where a GPU rounds to nearest): elementwise errors of a few percent of a gradient's scale, so the test
    # compares directions. In the MoE a near-tie of router scores can pick another expert for a token on one side,
    # which moves whole rows of the experts' gradients: there only the whole model's gradient is compared.
    assert all(grads_tri[name].dtype == g.dtype == torch.float32 for name, g in grads_ref.items())
    flat_ref, flat_tri = (torch.cat([g[name].flatten() for name in grads_ref]) for g in (grads_ref, grads_tri))
    assert F.cosine_similarity(flat_tri, flat_ref, dim=0) >= 0.9995
    if use_moe:
        return
    for name, g in grads_ref.items():
        cos = F.cosine_similarity(grads_tri[name].flatten(), g.flatten(), dim=0).item()
        assert cos >= 0.999, f"{name}: cosine similarity {cos:.6f} with the reference gradient"
    losses = [loss_tri.item()]
    for _ in range(3):
        with torch.no_grad():
            for p in tri.parameters():
                p -= 0.1 * p.grad
        losses.append(_autocast_loss_and_grads(tri, ids, labels)[0].item())
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.05, losses
