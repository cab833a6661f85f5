"""tools/export.py for the MiniMind-3 family (QK-norm, head_dim of its own, top-1 MoE without shared experts).

Hugging Face: a dense MiniMind-3 exports as Qwen3ForCausalLM, its MoE as Qwen3MoeForCausalLM; transformers loads each
offline with no missing or unexpected keys, and its logits and greedy generations equal ours (transformers' Qwen3
code shares nothing with ours: it is the independent reference). import-hf brings both back bit for bit, and reads
folders that transformers itself wrote (per-expert and fused expert tensors).

GGUF: dense -> llama.cpp's `qwen3`, MoE -> `qwen3moe`. The file is read back field by field and tensor by tensor, and
its logits are recomputed here from the file alone with llama.cpp's semantics for those graphs (src/models/qwen3.cpp,
qwen3moe.cpp: per-head RMSNorm by attn_q_norm / attn_k_norm, then NEOX RoPE on the pairs (i, i + Dh/2); qwen3moe's
softmax router with its top-k weights always renormalised). Where llama-cpp-python is installed, llama.cpp's greedy
tokens are compared with ours too (skipped otherwise).

Shapes are tiny (hidden 64, 2 layers, head_dim 24 != 64 / 8 heads) with the tokenizer's 6400-token vocabulary;
norm gains are drawn away from 1 so that every norm weight, q_norm and k_norm included, matters.
"""

import importlib.util
import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file
from test_export_gguf import (  # llama.cpp semantics in torch (tests/tools is on sys.path)
    assert_llama_cpp_greedy_equals_ours,
    our_logits,
    rms,
    rope_adjacent_pairs,
    swiglu,
    write_ggufs,
)

from minimind_fast.checkpoint import load_model, load_model_state, model_state_dict, save_checkpoint
from minimind_fast.config import from_preset
from minimind_fast.generate import generate
from minimind_fast.model import MiniMind
from tools import export

ATOL = 1e-4  # fp32, |logits| ~ 5: what remains is summation order between two implementations
KINDS = ["dense", "moe"]

pytestmark = pytest.mark.usefixtures("one_thread_module")


def m3(kind: str = "dense", seed: int = 0, **overrides) -> MiniMind:
    """A MiniMind-3-shaped model (m3-tiny's fields at hidden 64, 2 layers, head_dim 24) with random weights."""
    torch.manual_seed(seed)
    fields = dict(hidden_size=64, num_hidden_layers=2, head_dim=24, max_position_embeddings=2048)
    cfg = from_preset("m3-tiny", **{**fields, "use_moe": kind == "moe", **overrides})
    model = MiniMind(cfg)
    model.reset_parameters(std=0.1)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # every RMSNorm gain (input, post-attention, final, q_norm, k_norm)
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def hf_load(folder):
    """transformers' model for folder, fp32, offline; asserts that every weight came from the file."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


IDS = torch.randint(0, 6400, (2, 29), generator=torch.Generator().manual_seed(1))
HF = {
    "dense": ("Qwen3ForCausalLM", "qwen3", transformers.Qwen3Config),
    "moe": ("Qwen3MoeForCausalLM", "qwen3_moe", transformers.Qwen3MoeConfig),
}


# ------------------------------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("kind", KINDS)
def test_exports_as_qwen3_with_the_same_logits_and_generations(tmp_path, tokenizer, kind):
    model = m3(kind, seed=1 if kind == "moe" else 0)
    cfg = model.config
    ckpt = save_checkpoint(tmp_path / "ckpt", model, cfg, tokenizer=tokenizer)
    export.main(["hf", "--load", str(ckpt), "--out", str(tmp_path / "hf")])  # the default format for either kind
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    arch, model_type, config_class = HF[kind]
    assert config["architectures"] == [arch] and config["model_type"] == model_type
    assert (config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]) == (24, 8, 4)
    assert config["hidden_size"] == 64 and config["intermediate_size"] == cfg.intermediate_size == 256
    assert config["tie_word_embeddings"] is True and config["attention_bias"] is False
    assert config["use_sliding_window"] is False and config["sliding_window"] is None
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == 1e6 and config["rope_scaling"] is None
    if kind == "moe":
        assert (config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (4, 1, 256)
        assert config["norm_topk_prob"] is True and config["router_aux_loss_coef"] == 5e-4
        assert config["decoder_sparse_step"] == 1 and config["mlp_only_layers"] == []
        assert not any("shared" in k for k in config)

    hf = hf_load(tmp_path / "hf")
    assert type(hf).__name__ == arch and type(hf.config) is config_class
    assert hf.config.head_dim == 24 and hf.config.rope_parameters["rope_type"] == "default"
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied on load
    attn = hf.model.layers[1].self_attn
    assert torch.equal(attn.q_norm.weight, model.model.layers[1].self_attn.q_norm.weight)
    assert torch.equal(attn.k_norm.weight, model.model.layers[1].self_attn.k_norm.weight)
    want = logits(model, IDS)
    assert torch.allclose(logits(hf, IDS), want, atol=ATOL, rtol=0)

    if kind == "moe":  # Qwen3-MoE's router at top-1 with norm_topk_prob gives the one expert the weight 1, as ours
        experts = hf.model.layers[0].mlp.experts
        e, f = cfg.n_routed_experts, cfg.intermediate_size
        assert experts.gate_up_proj.shape == (e, 2 * f, 64)  # the per-expert tensors stacked on load
        theirs_gate = experts.gate_up_proj[2, :f]
        assert torch.equal(theirs_gate, model.state_dict()["model.layers.0.mlp.experts.2.gate_proj.weight"])
        x = torch.randn(7, 64, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            _, weights, chosen = hf.model.layers[0].mlp.gate(x)
            _, ours_w, ours_i = model.model.layers[0].mlp.route(x)
        assert torch.equal(weights, torch.ones(7, 1)) and torch.equal(ours_w, weights)
        assert torch.equal(chosen, ours_i) and len(set(chosen.flatten().tolist())) > 1  # routing varies by token

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好, what is rain?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    hf_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok(hf_text, add_special_tokens=False)["input_ids"] == prompt
    ours = generate(model, [prompt], 12, greedy=True)[0]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
    theirs = out[0, len(prompt) :].tolist()
    if 2 in theirs:  # HF pads after eos; ours stops there
        theirs = theirs[: theirs.index(2) + 1]
    assert theirs == ours and len(ours) > 4


@pytest.mark.parametrize("kind", KINDS)
def test_import_hf_round_trip_is_bit_exact(tmp_path, tokenizer, kind):
    model = m3(kind, seed=3)
    export.export_hf(model, tokenizer, tmp_path / "hf")
    export.main(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    back, cfg, payload = load_model(tmp_path / "back")
    assert cfg == model.config and payload["meta"]["format"] == HF[kind][1]
    assert cfg.qk_norm and cfg.head_dim == 24 and cfg.rms_norm_eps == 1e-6
    ours, theirs = model_state_dict(model), load_model_state(tmp_path / "back")
    theirs.pop("lm_head.weight", None)
    assert sorted(ours) == sorted(theirs)
    assert all(theirs[k].dtype == torch.float32 and torch.equal(theirs[k], ours[k]) for k in ours)
    assert torch.equal(logits(back.eval(), IDS), logits(model, IDS))


def test_yarn_is_exported_as_rope_scaling(tmp_path, tokenizer):
    model = m3(seed=4)
    plain = logits(model, IDS)
    model.set_yarn(True)
    out = export.export_hf(model, tokenizer, tmp_path / "hf")
    rs = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert rs["rope_type"] == "yarn" and rs["factor"] == 16 and rs["attention_factor"] == 1.0
    yarn = logits(model, IDS)
    assert (yarn - plain).abs().max() > 100 * ATOL  # YaRN changes the model, so matching below is a real check
    hf = hf_load(out)
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    assert torch.allclose(logits(hf, IDS), yarn, atol=ATOL, rtol=0)
    back = export.load_exported(out)
    assert back.config.inference_rope_scaling and torch.equal(logits(back, IDS), yarn)


def test_minimind2_top1_rule_exports_as_norm_topk_prob_false(tmp_path, tokenizer):
    """A QK-norm MoE that keeps the router's score at top-1 (MiniMind2's rule, norm_topk_k1 off) is still Qwen3-MoE:
    norm_topk_prob false gives transformers the same weights; a MiniMind2 top-1 MoE likewise as Qwen2-MoE."""
    for model, arch in [
        (m3("moe", seed=5, norm_topk_k1=False), "Qwen3MoeForCausalLM"),
        (m3("moe", seed=5, norm_topk_k1=False, qk_norm=False, head_dim=8), "Qwen2MoeForCausalLM"),
    ]:
        out = export.export_hf(model, tokenizer, tmp_path / arch)
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == [arch] and config["norm_topk_prob"] is False
        _, w, _ = model.model.layers[0].mlp.route(torch.randn(5, 64))
        assert (w < 1).all()  # the weight is the router's score: the export must keep it
        hf = hf_load(out)
        assert type(hf).__name__ == arch and torch.allclose(logits(hf, IDS), logits(model, IDS), atol=ATOL, rtol=0)
        back = export.load_exported(out)
        assert torch.equal(logits(back, IDS), logits(model, IDS))


def _random_norms(hf_model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("layout", ["dense", "moe-per-expert", "moe-fused"])
def test_import_of_a_folder_transformers_wrote(tmp_path, tokenizer, layout):
    """transformers' own Qwen3 / Qwen3-MoE, saved by save_pretrained (per-expert names) or as its in-memory state
    dict (transformers 5's fused experts), imports to the same logits; here top-2 with renormalisation."""
    torch.manual_seed(6)
    common = dict(vocab_size=6400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  initializer_range=0.1)  # fmt: skip
    if layout == "dense":
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(intermediate_size=160, **common))
    else:
        moe = dict(moe_intermediate_size=96, intermediate_size=160, num_experts=4, num_experts_per_tok=2)
        hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(norm_topk_prob=True, **moe, **common))
    _random_norms(hf, 7)
    hf.eval().save_pretrained(tmp_path / "hf")
    if layout == "moe-fused":
        sd = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
        assert "model.layers.0.mlp.experts.gate_up_proj" in sd
        save_file(sd, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(tmp_path / "hf")
    export.main(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")])
    ours, cfg, _ = load_model(tmp_path / "ckpt")
    assert cfg.qk_norm and cfg.head_dim == 32 and cfg.use_moe == (layout != "dense")
    if cfg.use_moe:
        assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.intermediate_size) == (4, 2, 96)
        assert cfg.n_shared_experts == 0 and cfg.norm_topk_prob and not cfg.seq_aux
    assert torch.allclose(logits(ours.eval(), IDS), logits(hf, IDS), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------- refusals
def test_inexpressible_combinations_are_refused(tmp_path, tokenizer):
    shared = m3("moe", n_shared_experts=1)
    with pytest.raises(export.ExportError, match="no shared expert"):
        export.export_hf(shared, tokenizer, tmp_path / "a")
    out = export.export_hf(shared, tokenizer, tmp_path / "b", moe_format="minimind")  # keeps them
    assert torch.equal(logits(export.load_exported(out), IDS), logits(shared, IDS))
    with pytest.raises(export.ExportError, match="Qwen2-MoE has no QK-norm"):
        export.export_hf(m3("moe"), tokenizer, tmp_path / "c", moe_format="qwen2_moe")
    with pytest.raises(export.ExportError, match="no Llama equivalent"):
        export.llama_config(m3().config)
    minimind2 = MiniMind(from_preset("tiny", num_hidden_layers=1, use_moe=True))
    ckpt = save_checkpoint(tmp_path / "mm2", minimind2, minimind2.config, tokenizer=tokenizer)
    with pytest.raises(SystemExit, match=r"^error: Qwen3 normalises every query and key head"):
        export.main(["hf", "--load", str(ckpt), "--out", str(tmp_path / "d"), "--moe_format", "qwen3_moe"])
    assert not (tmp_path / "d").exists()
    # GGUF: qwen3moe has no shared expert and always renormalises.
    with pytest.raises(export.ExportError, match="shared expert"):
        export.export_gguf(shared, tokenizer, tmp_path / "s.gguf")
    with pytest.raises(export.ExportError, match="always renormalises"):
        export.export_gguf(m3("moe", norm_topk_k1=False), tokenizer, tmp_path / "k1.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_import_refuses_what_minimind_cannot_express(tmp_path, tokenizer):
    model = m3(seed=8)
    out = export.export_hf(model, tokenizer, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    sd = export._read_hf_weights(out)
    cases = [
        ({"use_sliding_window": True, "sliding_window": 16}, "sliding-window"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
        ({"attention_bias": True}, "bias"),
        ({"tie_word_embeddings": False}, "no lm_head"),
        ({"hidden_act": "gelu"}, "silu"),
    ]
    for change, reason in cases:
        with pytest.raises(export.ExportError, match=reason):
            export.config_from_hf({**config, **change}, sd)
    moe = json.loads((export.export_hf(m3("moe"), tokenizer, tmp_path / "moe") / "config.json").read_text())
    with pytest.raises(export.ExportError, match="every layer must be a MoE layer"):
        export.config_from_hf({**moe, "mlp_only_layers": [1]}, export._read_hf_weights(tmp_path / "moe"))


# ---------------------------------------------------------------------------------------------------------- GGUF
try:
    import gguf
except ImportError:  # the Hugging Face tests above still run
    gguf = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="the gguf package is not installed (pip install gguf)")
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
ARCH = {"dense": "qwen3", "moe": "qwen3moe"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """kind -> (model, {dtype: path}), written through the command line."""
    out = {}
    for kind in KINDS:
        model = m3(kind, seed=11)
        out[kind] = (model, write_ggufs(tmp_path_factory.mktemp(f"m3_gguf_{kind}"), model, tokenizer))
    return out


def fields_of(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def tensor_values(t) -> torch.Tensor:
    """A GGUF tensor as fp32 torch in torch's layout (numpy's order is the reverse of ggml's ne)."""
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:  # handed over as raw 16-bit words
        return torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).float()
    assert t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16), t.tensor_type
    return torch.from_numpy(np.asarray(t.data).astype(np.float32))


def expected_tensors(model: MiniMind) -> dict[str, torch.Tensor]:
    """What a qwen3 / qwen3moe file must hold, from our state dict: q and k as they are (NEOX RoPE is rotate-half),
    the per-head norms, no output.weight (tied: llama.cpp falls back to token_embd), experts stacked [E, out, in]."""
    cfg = model.config
    sd = {k: v.float() for k, v in model_state_dict(model).items()}
    want = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    names.update({f"self_attn.{x}_proj": f"attn_{x}" for x in "qkv"}, **{"self_attn.o_proj": "attn_output"})
    names.update({"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})
    if cfg.use_moe:
        names["mlp.gate"] = "ffn_gate_inp"
    else:
        names.update({f"mlp.{x}_proj": f"ffn_{x}" for x in ("gate", "up", "down")})
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in names.items():
            want[f"blk.{i}.{theirs}.weight"] = sd[f"model.layers.{i}.{ours}.weight"]
        if cfg.use_moe:
            for x in ("gate", "up", "down"):
                stack = [sd[f"model.layers.{i}.mlp.experts.{e}.{x}_proj.weight"] for e in range(cfg.n_routed_experts)]
                want[f"blk.{i}.ffn_{x}_exps.weight"] = torch.stack(stack)
    return want


@needs_gguf
@pytest.mark.parametrize("kind", KINDS)
def test_gguf_hyperparameters(exported, kind):
    model, paths = exported[kind]
    cfg = model.config
    f = fields_of(paths["f32"])
    arch = ARCH[kind]
    assert f["general.architecture"] == arch and f["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    want = {
        "vocab_size": 6400,
        "context_length": 2048,
        "embedding_length": 64,
        "block_count": 2,
        "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": 8,
        "attention.head_count_kv": 4,
        "attention.key_length": 24,  # head_dim, not 64 / 8
        "attention.value_length": 24,
        "rope.dimension_count": 24,
    }
    if kind == "moe":
        want.update({"expert_count": 4, "expert_used_count": 1, "expert_feed_forward_length": cfg.intermediate_size})
    for key, value in want.items():
        assert f[f"{arch}.{key}"] == value, key
    assert f[f"{arch}.rope.freq_base"] == pytest.approx(1e6)
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)
    checked = set(want) | {"rope.freq_base", "attention.layer_norm_rms_epsilon"}
    assert {k for k in f if k.startswith(arch + ".")} == {f"{arch}.{k}" for k in checked}  # nothing unchecked
    assert f["tokenizer.ggml.model"] == "gpt2" and len(f["tokenizer.ggml.tokens"]) == 6400


@needs_gguf
@pytest.mark.parametrize("dtype", export.GGUF_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_gguf_tensors_match_our_state_dict(exported, kind, dtype):
    model, paths = exported[kind]
    got = {t.name: t for t in gguf.GGUFReader(paths[dtype]).tensors}
    want = expected_tensors(model)
    assert sorted(got) == sorted(want)
    cast = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for name, w in want.items():
        t = got[name]
        assert list(t.shape) == list(reversed(w.shape)), name  # ggml's ne: fastest dimension first
        keeps_f32 = w.dim() == 1 or name.endswith("ffn_gate_inp.weight")  # norms and router
        assert t.tensor_type.name == ("F32" if keeps_f32 else dtype.upper()), name
        assert torch.equal(tensor_values(t), w if keeps_f32 else w.to(cast).float()), name


def rope_neox(x_THD, base):
    """ggml's NEOX RoPE (LLAMA_ROPE_TYPE_NEOX): pair (x[i], x[i + Dh/2]) rotated by p * base^(-2i/Dh)."""
    t, _, dh = x_THD.shape
    half = dh // 2
    out = x_THD.clone()
    for i in range(half):
        ang = torch.arange(t, dtype=torch.float64) * base ** (-2 * i / dh)
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        a, b = x_THD[..., i], x_THD[..., i + half]
        out[..., i], out[..., i + half] = a * c - b * s, a * s + b * c
    return out


def gguf_forward(path, ids: list[int], rope=rope_neox) -> torch.Tensor:
    """Logits [T, V] in fp64 from the file's keys and tensors alone, as llama.cpp's qwen3 / qwen3moe graphs compute
    them: per-head RMSNorm of q and k (attn_q_norm / attn_k_norm, the file's eps), NEOX RoPE, kq_scale 1/sqrt(Dh),
    SwiGLU FFN, or build_moe_ffn with softmax gating, top-k and the weights divided by their sum (hard-coded
    norm_w in qwen3moe.cpp); output.weight absent -> token_embd."""
    reader = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in reader.fields.items()}
    arch = f["general.architecture"]
    assert arch in ("qwen3", "qwen3moe")
    hp = {k[len(arch) + 1 :]: v for k, v in f.items() if k.startswith(arch + ".")}
    w = {t.name: tensor_values(t).double() for t in reader.tensors}
    eps, base = hp["attention.layer_norm_rms_epsilon"], hp["rope.freq_base"]
    nh, nkv, dh = hp["attention.head_count"], hp["attention.head_count_kv"], hp["attention.key_length"]
    x = w["token_embd.weight"][ids]
    t = len(ids)
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(hp["block_count"]):
        b = f"blk.{i}."
        h = rms(x, w[b + "attn_norm.weight"], eps)
        q = rms((h @ w[b + "attn_q.weight"].T).view(t, nh, dh), w[b + "attn_q_norm.weight"], eps)
        k = rms((h @ w[b + "attn_k.weight"].T).view(t, nkv, dh), w[b + "attn_k_norm.weight"], eps)
        q, k = rope(q, base), rope(k, base)
        v = (h @ w[b + "attn_v.weight"].T).view(t, nkv, dh)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        att = (torch.einsum("qhd,khd->hqk", q, k) / dh**0.5 + mask).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(t, -1) @ w[b + "attn_output.weight"].T
        h = rms(x, w[b + "ffn_norm.weight"], eps)
        if arch == "qwen3":
            x = x + swiglu(h, w[b + "ffn_gate.weight"], w[b + "ffn_up.weight"], w[b + "ffn_down.weight"])
            continue
        probs = (h @ w[b + "ffn_gate_inp.weight"].T).softmax(-1)
        top_w, top_i = probs.topk(hp["expert_used_count"], dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True).clamp(min=6.103515625e-5)
        y = torch.zeros_like(h)
        for tok in range(t):
            for wt, e in zip(top_w[tok], top_i[tok].tolist()):
                gate, up = w[b + "ffn_gate_exps.weight"][e], w[b + "ffn_up_exps.weight"][e]
                y[tok] += wt * swiglu(h[tok], gate, up, w[b + "ffn_down_exps.weight"][e])
        x = x + y
    head = w.get("output.weight", w["token_embd.weight"])
    return rms(x, w["output_norm.weight"], eps) @ head.T


@needs_gguf
@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_semantics_over_the_file_give_our_logits(exported, kind, tokenizer):
    model, paths = exported[kind]
    ids = tokenizer.encode("The quick brown fox 跳过了 the lazy dog, 42 times.")[:20]
    want = our_logits(model, ids)
    assert torch.allclose(gguf_forward(paths["f32"], ids), want, atol=1e-4, rtol=0)
    # Read with llama's adjacent-pair RoPE the same file gives other logits: unpermuted q/k rows are a real choice.
    assert (gguf_forward(paths["f32"], ids, rope=rope_adjacent_pairs) - want).abs().max() > 1e-2


@needs_gguf
@pytest.mark.parametrize("overrides", [{"num_experts_per_tok": 2}, {"num_experts_per_tok": 3, "n_routed_experts": 6}])
def test_qwen3moe_top_k_variants(tmp_path, tokenizer, overrides):
    model = m3("moe", seed=12, **overrides)
    path = export.export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32")
    f = fields_of(path)
    assert f["general.architecture"] == "qwen3moe"
    assert (f["qwen3moe.expert_count"], f["qwen3moe.expert_used_count"]) == (
        model.config.n_routed_experts,
        model.config.num_experts_per_tok,
    )
    ids = tokenizer.encode("Mixture of experts, 专家混合。")
    assert torch.allclose(gguf_forward(path, ids), our_logits(model, ids), atol=1e-4, rtol=0)
    if HAS_LLAMA_CPP:
        assert_llama_cpp_greedy_equals_ours(path, model, tokenizer, PROMPTS[:2], 12, distinct=False)


# ------------------------------------------------------------------------------------ llama.cpp itself (optional)
PROMPTS = [
    "The capital of France is",
    "你好，请介绍一下你自己。",
    "<|im_start|>user\n为什么天空是蓝色的？<|im_end|>\n<|im_start|>assistant\n",
]


@needs_gguf
@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_greedy_generation_equals_ours(exported, kind, tokenizer):
    model, paths = exported[kind]
    assert_llama_cpp_greedy_equals_ours(paths["f32"], model, tokenizer, PROMPTS, 12, distinct=False)
