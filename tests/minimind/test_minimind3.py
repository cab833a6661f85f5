"""The MiniMind-3 family (Qwen3-style): presets, and logits equal to an independent implementation of MiniMind-3's
architecture written here from its description (QK-norm before RoPE, head_dim a field of its own, top-1 MoE without
shared experts, the single routing weight renormalised, balance loss coef * E * sum_e load_e * mean_score_e), on a
state dict built under MiniMind-3's parameter names; and a MiniMind-3 .pth file imported with its config read off
the shapes."""

import math

import pytest
import torch
import torch.nn.functional as F

from minimind_fast import checkpoint as ckpt
from minimind_fast.config import PRESETS, ffn_width_m3, from_preset
from minimind_fast.model import MiniMind


def test_presets_have_minimind3s_exact_parameter_counts_and_fields():
    dense, moe = MiniMind(from_preset("m3")), MiniMind(from_preset("m3-moe"))
    assert dense.num_params() == 63_912_192
    assert moe.num_params() == 198_416_640
    # Active per token: the dense model plus the routers (top-1 of 4 experts, each as wide as the dense FFN).
    assert moe.num_active_params() == 63_912_192 + 8 * 768 * 4
    cfg = dense.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (768, 8, 8, 4)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.rms_norm_eps, cfg.rope_theta) == (96, 2432, 1e-6, 1e6)
    assert cfg.qk_norm and cfg.vocab_size == 6400 and ffn_width_m3(768) == math.ceil(768 * math.pi / 64) * 64
    m = moe.config
    assert (m.n_routed_experts, m.num_experts_per_tok, m.n_shared_experts, m.aux_loss_alpha) == (4, 1, 0, 5e-4)
    assert not m.seq_aux and m.norm_topk_prob and m.norm_topk_k1
    names = set(dense.state_dict())
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.7.self_attn.k_norm.weight"} <= names
    # MiniMind2's presets are untouched by the new fields.
    assert MiniMind(from_preset("small")).num_params() == 25_829_888
    assert not from_preset("moe").qk_norm and "qk_norm" not in PRESETS["small"]


def test_an_overridden_hidden_size_takes_minimind3s_ffn_rule():
    assert from_preset("m3-tiny").intermediate_size == ffn_width_m3(256) == 832
    assert from_preset("m3", hidden_size=512).intermediate_size == ffn_width_m3(512) == 1664
    assert from_preset("m3", intermediate_size=1000).intermediate_size == 1000


# --------------------------------------------------------------------- an independent MiniMind-3, from its description
def _norm(x, w, eps):  # RMSNorm in fp32, times the gain, back to the input dtype
    xf = x.float()
    return (w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).type_as(x)


def _rotary(x, pos, theta):  # x [B, T, H, Dh]; rotate-half pairs (i, i + Dh/2) by pos * theta^(-2i/Dh)
    dh = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    ang = torch.outer(pos.float(), inv)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None, :]
    half = torch.cat([-x[..., dh // 2 :], x[..., : dh // 2]], -1)
    return x * cos + half * sin


def _swiglu(x, sd, p):
    return F.linear(F.silu(F.linear(x, sd[p + "gate_proj.weight"])) * F.linear(x, sd[p + "up_proj.weight"]),
                    sd[p + "down_proj.weight"])  # fmt: skip


def reference_forward(sd, cfg, ids):
    """-> (logits [B, T, V], summed balance loss) of MiniMind-3 on the state dict sd."""
    b, t = ids.shape
    h, hkv, dh, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    pos = torch.arange(t)
    x = sd["model.embed_tokens.weight"][ids]
    aux = torch.zeros(())
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = _norm(x, sd[p + "input_layernorm.weight"], eps)
        q = F.linear(a, sd[p + "self_attn.q_proj.weight"]).view(b, t, h, dh)
        k = F.linear(a, sd[p + "self_attn.k_proj.weight"]).view(b, t, hkv, dh)
        v = F.linear(a, sd[p + "self_attn.v_proj.weight"]).view(b, t, hkv, dh)
        q = _rotary(_norm(q, sd[p + "self_attn.q_norm.weight"], eps), pos, cfg.rope_theta)
        k = _rotary(_norm(k, sd[p + "self_attn.k_norm.weight"], eps), pos, cfg.rope_theta)
        k, v = k.repeat_interleave(h // hkv, dim=2), v.repeat_interleave(h // hkv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        o = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, t, h * dh)
        x = x + F.linear(o, sd[p + "self_attn.o_proj.weight"])
        n = _norm(x, sd[p + "post_attention_layernorm.weight"], eps).reshape(b * t, -1)
        if cfg.use_moe:
            probs = F.linear(n, sd[p + "mlp.gate.weight"]).softmax(-1)
            w, idx = probs.topk(cfg.num_experts_per_tok, dim=-1)
            w = w / (w.sum(-1, keepdim=True) + 1e-20)  # renormalised, also for a single expert
            y = torch.zeros_like(n)
            for e in range(cfg.n_routed_experts):
                rows, slot = (idx == e).nonzero(as_tuple=True)
                y[rows] += w[rows, slot, None] * _swiglu(n[rows], sd, f"{p}mlp.experts.{e}.")
            load = F.one_hot(idx, cfg.n_routed_experts).float().mean(0)  # [K, E]: picks per token slot
            aux = aux + (load * probs.mean(0)).sum() * cfg.n_routed_experts * cfg.aux_loss_alpha
        else:
            y = _swiglu(n, sd, p + "mlp.")
        x = x + y.view(b, t, -1)
    x = _norm(x, sd["model.norm.weight"], eps)
    return F.linear(x, sd["model.embed_tokens.weight"]), aux


def minimind3_state_dict(cfg, seed):
    """Random weights under MiniMind-3's names, sized from the config (norm gains away from 1 so they matter)."""
    g = torch.Generator().manual_seed(seed)
    d, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qd, kd = cfg.num_attention_heads * dh, cfg.num_key_value_heads * dh

    def r(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    def gain(n):
        return 1 + r(n, std=0.3)

    sd = {"model.embed_tokens.weight": r(cfg.vocab_size, d, std=0.5), "model.norm.weight": gain(d)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": gain(d), p + "post_attention_layernorm.weight": gain(d),
            p + "self_attn.q_proj.weight": r(qd, d), p + "self_attn.k_proj.weight": r(kd, d),
            p + "self_attn.v_proj.weight": r(kd, d), p + "self_attn.o_proj.weight": r(d, qd),
            p + "self_attn.q_norm.weight": gain(dh), p + "self_attn.k_norm.weight": gain(dh),
        })  # fmt: skip
        mlps = [f"{p}mlp.experts.{e}." for e in range(cfg.n_routed_experts)] if cfg.use_moe else [p + "mlp."]
        if cfg.use_moe:
            sd[p + "mlp.gate.weight"] = r(cfg.n_routed_experts, d, std=0.5)
        for m in mlps:
            sd.update({m + "gate_proj.weight": r(f, d), m + "up_proj.weight": r(f, d), m + "down_proj.weight": r(d, f)})
    return sd


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_logits_and_balance_loss_equal_an_independent_minimind3(use_moe):
    # head_dim 24 != hidden / heads (64 / 4 = 16): a head_dim of its own, as MiniMind-3 allows.
    cfg = from_preset("m3-tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=24, vocab_size=97, use_moe=use_moe)  # fmt: skip
    sd = minimind3_state_dict(cfg, seed=3)
    model = MiniMind(cfg)
    model.load_state_dict({**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_aux = reference_forward(sd, cfg, ids)
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    if use_moe:
        model.train()
        out = model(ids, labels=ids)
        torch.testing.assert_close(out.aux_loss, ref_aux, rtol=1e-5, atol=1e-8)
        assert out.aux_loss > 0
        # The top-1 weight is renormalised to 1: scaling every router row leaves the output unchanged only where
        # each token's choice stays the same, so check the weight directly.
        moe = model.model.layers[0].mlp
        x = torch.randn(5, cfg.hidden_size)
        _, w, _ = moe.route(x)
        torch.testing.assert_close(w, torch.ones_like(w))
        # MiniMind2's rule (norm_topk_k1 off) keeps the router's score at top-1.
        moe.cfg = from_preset("tiny", use_moe=True, num_experts_per_tok=1)
        _, w2, _ = moe.route(x)
        assert (w2 < 1).all()


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_a_minimind3_pth_imports_with_its_config_read_off_the_shapes(tmp_path, use_moe):
    from tools.export import import_pth

    cfg = from_preset("m3-tiny", hidden_size=64, num_hidden_layers=2, head_dim=16, vocab_size=97, use_moe=use_moe)
    sd = minimind3_state_dict(cfg, seed=5)
    path = tmp_path / ("minimind3_moe.pth" if use_moe else "minimind3.pth")
    torch.save({k: v.half() for k, v in sd.items()}, path)  # as MiniMind's trainers save: fp16, no lm_head copy
    got = ckpt.infer_config(torch.load(path, weights_only=True))
    assert got.qk_norm and (got.head_dim, got.num_attention_heads, got.num_key_value_heads) == (16, 8, 4)
    assert got.rms_norm_eps == 1e-6 and got.use_moe == use_moe
    if use_moe:
        assert (got.num_experts_per_tok, got.n_shared_experts, got.aux_loss_alpha, got.norm_topk_k1) == (
            1,
            0,
            5e-4,
            True,
        )
    folder = import_pth(path, tmp_path / "imported")
    model, loaded, _ = ckpt.load_model(folder)
    assert loaded.qk_norm and loaded.intermediate_size == cfg.intermediate_size
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    half = {k: v.half().float() for k, v in sd.items()}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_forward(half, cfg, ids)[0], rtol=1e-4, atol=1e-4)
