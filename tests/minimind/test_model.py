"""The MiniMind model against SPEC.md's facts and against independent computations."""

import math

import pytest
import torch
import torch.nn.functional as F

import minimind_kernels as kernels
from minimind_fast.config import ConfigError, MiniMindConfig, ffn_width, from_preset
from minimind_fast.model import KVCache, MiniMind, rope_frequencies

EXPECTED_PARAMS = {
    "small": (25_829_888, 25_829_888),
    "base": (104_030_976, 104_030_976),
    "moe": (145_029_760, 91_945_600),
}


@pytest.mark.parametrize("preset", sorted(EXPECTED_PARAMS))
def test_parameter_counts(preset):
    model = MiniMind(from_preset(preset))
    total, active = model.num_params(), model.num_active_params()
    print(f"{preset}: {total:,} parameters, {active:,} active")
    assert (total, active) == EXPECTED_PARAMS[preset]


def test_ffn_width_rule():
    assert [ffn_width(h) for h in (512, 640, 768)] == [1408, 1728, 2048]


@pytest.mark.parametrize("preset", ["tiny", "small", "base", "moe"])
def test_forward_backward_every_preset(preset):
    torch.manual_seed(0)
    model = MiniMind(from_preset(preset))
    x = torch.randint(0, 6400, (2, 9))
    out = model(x, labels=x)
    loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
    # Fresh N(0, 0.02) weights predict nearly uniformly: the loss sits near ln(vocab).
    assert abs(out.loss.item() - math.log(6400)) < 0.5
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.lm_head.weight.grad is model.model.embed_tokens.weight.grad  # tied: one tensor


def test_loss_matches_logits_cross_entropy_with_shift_and_ignore():
    torch.manual_seed(1)
    model = MiniMind(from_preset("tiny", num_hidden_layers=2))
    x = torch.randint(3, 6400, (3, 11))
    labels = x.clone()
    labels[0, :4] = -100
    labels[2, 7:] = -100
    out = model(x, labels=labels, return_logits=True)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 6400), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-5)

    per_tok = model(x, labels=labels, loss_reduction="none").loss
    assert per_tok.shape == (3, 11)
    logp = out.logits.float().log_softmax(-1)
    # Column t holds -log p(labels[t] | tokens < t); column 0 and ignored labels hold 0.
    for b in range(3):
        assert per_tok[b, 0] == 0
        for t in range(1, 11):
            expect = 0.0 if labels[b, t] == -100 else -logp[b, t - 1, labels[b, t]].item()
            assert per_tok[b, t].item() == pytest.approx(expect, abs=1e-4)


def test_token_weight_mean_divides_by_label_count():
    torch.manual_seed(2)
    model = MiniMind(from_preset("tiny", num_hidden_layers=1))
    x = torch.randint(3, 6400, (2, 8))
    w = torch.ones(2, 8)
    w[:, 3] = 10.0
    per_tok = model(x, labels=x, loss_reduction="none").loss
    weighted = model(x, labels=x, token_weight=w).loss
    torch.testing.assert_close(weighted, (per_tok * w).sum() / (2 * 7), rtol=1e-5, atol=1e-6)


def test_hf_llama_state_dict_names_and_strict_roundtrip():
    model = MiniMind(from_preset("moe", num_hidden_layers=1, hidden_size=64, num_attention_heads=4))
    names = set(model.state_dict())
    expected = {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.mlp.gate.weight",
    }
    expected |= {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"}
    expected |= {f"model.layers.0.mlp.experts.{e}.{p}_proj.weight" for e in range(4) for p in ("gate", "up", "down")}
    expected |= {f"model.layers.0.mlp.shared_experts.0.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert names == expected
    sd = model.state_dict()
    assert sd["model.layers.0.mlp.experts.2.down_proj.weight"].shape == (64, model.config.intermediate_size)
    other = MiniMind(model.config)
    other.load_state_dict({k: v.half() for k, v in sd.items()}, strict=True)  # a MiniMind .pth is fp16
    torch.testing.assert_close(
        other.model.layers[0].mlp.experts.w_up[3],
        sd["model.layers.0.mlp.experts.3.up_proj.weight"],
        atol=1e-3,
        rtol=1e-3,
    )


def test_moe_routing_and_seq_aux_loss_independently():
    torch.manual_seed(3)
    cfg = from_preset("tiny", use_moe=True, num_hidden_layers=1, aux_loss_alpha=0.1)
    model = MiniMind(cfg)
    moe = model.model.layers[0].mlp
    b, t, d = 2, 6, cfg.hidden_size
    x = torch.randn(b, t, d)
    scores, topk_w, topk_idx = moe.route(x.reshape(-1, d))
    probs = torch.softmax(x.reshape(-1, d) @ moe.gate.weight.t(), dim=-1)
    torch.testing.assert_close(scores, probs)
    torch.testing.assert_close(topk_w.sum(-1), torch.ones(b * t))
    aux = moe.aux_loss(scores, topk_idx, b, t)
    # Written out with Python loops: ce[b,e] = count / (T*K/E); aux = alpha * mean_b sum_e ce * mean_t score.
    e_n, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    total = 0.0
    for bi in range(b):
        picks = topk_idx.view(b, t, k)[bi].flatten().tolist()
        for e in range(e_n):
            ce = picks.count(e) / (t * k / e_n)
            total += ce * probs.view(b, t, e_n)[bi, :, e].mean().item()
    assert aux.item() == pytest.approx(0.1 * total / b, rel=1e-5)

    y, _ = moe(x)
    # Dense computation of the same mixture: every expert on every token, weighted by the routing.
    bank, xs = moe.experts, x.reshape(-1, d)
    want = torch.zeros_like(xs)
    for n in range(b * t):
        for j in range(k):
            e = topk_idx[n, j]
            h = F.silu(xs[n] @ bank.w_gate[e].t()) * (xs[n] @ bank.w_up[e].t())
            want[n] += topk_w[n, j] * (h @ bank.w_down[e].t())
    want += moe.shared_experts[0](xs)
    torch.testing.assert_close(y.reshape(-1, d), want, rtol=1e-4, atol=1e-5)


def test_yarn_ramp_bounds_for_head_dim_64():
    cfg = MiniMindConfig(inference_rope_scaling=True)
    base = rope_frequencies(cfg, yarn=False)
    scaled = rope_frequencies(cfg, yarn=True)
    ratio = base / scaled
    # SPEC: for head_dim 64, low 5 and high 14: frequencies below index 5 untouched, from 14 on divided by 16.
    torch.testing.assert_close(ratio[:6], torch.ones(6, dtype=ratio.dtype))
    torch.testing.assert_close(ratio[14:], torch.full((18,), 16.0, dtype=ratio.dtype))
    assert ((ratio[6:14] > 1) & (ratio[6:14] < 16)).all()


def test_rope_matches_complex_rotation():
    torch.manual_seed(4)
    cfg = from_preset("tiny")
    freqs = rope_frequencies(cfg).float()
    pos = torch.arange(5).float()
    ang = torch.outer(pos, freqs)
    q = torch.randn(1, 5, 2, cfg.head_dim)
    k = torch.randn(1, 5, 1, cfg.head_dim)
    q2, k2 = kernels.resolve("torch").rope(q, k, ang.cos(), ang.sin())
    d2 = cfg.head_dim // 2
    # Rotate-half pairs (i, i + D/2) as complex numbers multiplied by e^{i * pos * f_i}.
    zq = torch.complex(q[..., :d2], q[..., d2:]) * torch.polar(torch.ones_like(ang), ang)[None, :, None]
    torch.testing.assert_close(q2, torch.cat([zq.real, zq.imag], -1), rtol=1e-5, atol=1e-5)
    assert k2.shape == k.shape


def test_rmsnorm_reference():
    x = torch.randn(4, 7) * 3
    w = torch.randn(7)
    y = kernels.resolve("torch").rmsnorm(x, w, 1e-5)
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(y, want)


def test_kv_cache_decoding_equals_full_forward():
    torch.manual_seed(5)
    model = MiniMind(from_preset("tiny", num_hidden_layers=2)).eval()
    x = torch.randint(3, 6400, (2, 10))
    full = model(x).logits
    cache = KVCache(model.config, batch=2, max_len=16)
    parts = [model(x[:, :4], kv_cache=cache).logits, model(x[:, 4:7], kv_cache=cache).logits]
    parts += [model(x[:, i : i + 1], kv_cache=cache).logits for i in range(7, 10)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


def test_left_padding_with_attention_mask_matches_unpadded():
    torch.manual_seed(6)
    model = MiniMind(from_preset("tiny", num_hidden_layers=2)).eval()
    seq = torch.randint(3, 6400, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=pos).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 3:], model(seq).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(hidden_size=100, num_attention_heads=8), "not divisible"),
        (dict(num_attention_heads=8, num_key_value_heads=3), "does not divide"),
        (dict(use_moe=True, num_experts_per_tok=5), "num_experts_per_tok"),
    ],
)
def test_impossible_configs_fail_with_a_reason(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        MiniMindConfig(**kw)


def test_moe_batch_without_labels_trains_nothing():
    """The balance loss of a batch with no labelled target is zero (with its gradient), so a label-less SFT step has a
    zero gradient and is skipped; with labels it is the balance loss the model computes without them."""
    torch.manual_seed(0)
    model = MiniMind(from_preset("tiny", use_moe=True, aux_loss_alpha=0.1))
    model.train()
    ids = torch.randint(3, 200, (2, 12))
    free = model(ids).aux_loss
    assert free is not None and float(free.detach()) > 0
    with_labels = model(ids, labels=ids)
    assert torch.equal(with_labels.aux_loss, free)
    none = model(ids, labels=torch.full_like(ids, -100))
    assert float(none.aux_loss.detach()) == 0.0
    none.aux_loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    last_only = torch.full_like(ids, -100)
    last_only[:, -1] = ids[:, -1]  # one labelled target per row: the balance loss counts again
    assert torch.equal(model(ids, labels=last_only).aux_loss, free)
