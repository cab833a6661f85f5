"""tools/export.py gguf: our checkpoints -> one GGUF file for llama.cpp / ollama (dense as `llama`, MoE as
`bailingmoe`).

Always (CI): the file read back with gguf.GGUFReader (architecture, every hyperparameter, every tensor's name, shape,
dtype and values against our state dict with the q/k permutation undone by an independent index computation, the
tokenizer fields), plus a forward pass written here from llama.cpp's semantics (normal RoPE on adjacent pairs, the
bailingmoe MoE of src/models/bailingmoe.cpp) over the file's tensors alone, whose logits must equal our model's.

Where llama-cpp-python is installed (`pip install llama-cpp-python`; CI does not build it): llama.cpp itself loads
each f32 file, tokenizes a table of strings as we do, and its greedy tokens on a table of prompts equal ours.
"""

import importlib.util
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from minimind_fast.checkpoint import model_state_dict, save_checkpoint
from minimind_fast.config import from_preset
from minimind_fast.generate import generate
from minimind_fast.model import MiniMind
from minimind_fast.tokenizer import Tokenizer
from tools import export

gguf = pytest.importorskip(
    "gguf", reason="the gguf package is not installed (pip install gguf; it is in the dev extra)"
)

pytestmark = pytest.mark.usefixtures("one_thread_module")

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp)"
)

KINDS = {"dense": {}, "moe": {"use_moe": True}}


def tiny(kind: str = "dense", seed: int = 0, **overrides) -> MiniMind:
    torch.manual_seed(seed)
    cfg = from_preset("tiny", **{"num_hidden_layers": 2, "max_position_embeddings": 2048, **KINDS[kind], **overrides})
    model = MiniMind(cfg)
    model.reset_parameters(std=0.1)  # large enough weights that greedy outputs depend on the context
    return model.eval()


def write_ggufs(root, model, tokenizer) -> dict:
    """{dtype: path}: the model saved as a checkpoint under root, exported through the command line in every dtype."""
    ckpt = save_checkpoint(root / "ckpt", model, model.config, tokenizer=tokenizer)
    paths = {}
    for dtype in export.GGUF_DTYPES:
        paths[dtype] = root / f"model-{dtype}.gguf"
        export.main(["gguf", "--load", str(ckpt), "--out", str(paths[dtype]), "--dtype", dtype])
    return paths


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (model, {dtype: path}) for the dense and MoE tiny models, written through the command line."""
    tok = Tokenizer.load()
    out = {}
    for kind in KINDS:
        model = tiny(kind, seed=1 if kind == "moe" else 0)
        out[kind] = (model, write_ggufs(tmp_path_factory.mktemp(f"gguf_{kind}"), model, tok))
    return out


def fields_of(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def tensor_values(t) -> torch.Tensor:
    """A GGUF tensor as fp32 torch, in torch's layout (numpy's order is the reverse of ggml's ne)."""
    kind = t.tensor_type
    data = np.asarray(t.data)
    if kind == gguf.GGMLQuantizationType.F32:
        return torch.from_numpy(data.astype(np.float32))
    if kind == gguf.GGMLQuantizationType.F16:
        return torch.from_numpy(data.astype(np.float32))
    assert kind == gguf.GGMLQuantizationType.BF16, kind
    raw = np.array(data).view(np.int16)  # the reader hands bf16 over as bytes
    return torch.from_numpy(raw).view(torch.bfloat16).float()


def rows_to_adjacent_pairs(n_heads: int, head_dim: int) -> list[int]:
    """Source row of every row of a permuted q/k projection, spelled out: within head h, row 2i is our row i and row
    2i+1 is our row i + head_dim/2 (llama.cpp's normal RoPE rotates consecutive pairs)."""
    idx = []
    for h in range(n_heads):
        for j in range(head_dim):
            i, second = divmod(j, 2)
            idx.append(h * head_dim + i + second * (head_dim // 2))
    return idx


def expected_tensors(model: MiniMind) -> dict[str, torch.Tensor]:
    """What the file must hold, from our state dict, written independently of the exporter."""
    cfg = model.config
    sd = {k: v.float() for k, v in model_state_dict(model).items()}
    q_idx = rows_to_adjacent_pairs(cfg.num_attention_heads, cfg.head_dim)
    k_idx = rows_to_adjacent_pairs(cfg.num_key_value_heads, cfg.head_dim)
    want = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if cfg.use_moe:
        want["output.weight"] = model.lm_head.weight.detach().float()  # tied: the embedding again
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        want[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        want[b + "attn_q.weight"] = sd[p + "self_attn.q_proj.weight"][q_idx]
        want[b + "attn_k.weight"] = sd[p + "self_attn.k_proj.weight"][k_idx]
        want[b + "attn_v.weight"] = sd[p + "self_attn.v_proj.weight"]
        want[b + "attn_output.weight"] = sd[p + "self_attn.o_proj.weight"]
        want[b + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        if not cfg.use_moe:
            for proj in ("gate", "up", "down"):
                want[b + f"ffn_{proj}.weight"] = sd[p + f"mlp.{proj}_proj.weight"]
            continue
        want[b + "ffn_gate_inp.weight"] = sd[p + "mlp.gate.weight"]
        for proj in ("gate", "up", "down"):
            want[b + f"ffn_{proj}_exps.weight"] = torch.stack(
                [sd[p + f"mlp.experts.{e}.{proj}_proj.weight"] for e in range(cfg.n_routed_experts)]
            )
        n, f, d = cfg.n_shared_experts, cfg.intermediate_size, cfg.hidden_size
        gate, up, down = torch.zeros(n * f, d), torch.zeros(n * f, d), torch.zeros(d, n * f)
        for j in range(n):
            gate[j * f : (j + 1) * f] = sd[p + f"mlp.shared_experts.{j}.gate_proj.weight"]
            up[j * f : (j + 1) * f] = sd[p + f"mlp.shared_experts.{j}.up_proj.weight"]
            down[:, j * f : (j + 1) * f] = sd[p + f"mlp.shared_experts.{j}.down_proj.weight"]
        want[b + "ffn_gate_shexp.weight"], want[b + "ffn_up_shexp.weight"] = gate, up
        want[b + "ffn_down_shexp.weight"] = down
    return want


# ------------------------------------------------------------------------------------------------- the file's fields
@pytest.mark.parametrize("kind", list(KINDS))
def test_hyperparameters(exported, kind):
    model, paths = exported[kind]
    cfg = model.config
    f = fields_of(gguf.GGUFReader(paths["f32"]))
    arch = {"dense": "llama", "moe": "bailingmoe"}[kind]
    assert f["general.architecture"] == arch
    assert f["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    want = {
        "vocab_size": 6400,
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "block_count": 2,
        "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_attention_heads,
        "attention.head_count_kv": cfg.num_key_value_heads,
        "attention.key_length": cfg.head_dim,
        "attention.value_length": cfg.head_dim,
        "rope.dimension_count": cfg.head_dim,
    }
    if kind == "moe":
        want.update(
            {
                "expert_count": 4,
                "expert_used_count": 2,
                "expert_feed_forward_length": cfg.intermediate_size,
                "expert_shared_count": 1,
                "expert_weights_norm": True,
                "leading_dense_block_count": 0,
            }
        )
    for key, value in want.items():
        assert f[f"{arch}.{key}"] == value, key
    assert f[f"{arch}.rope.freq_base"] == pytest.approx(1e6)
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5, rel=1e-6)
    if kind == "moe":
        assert f[f"{arch}.expert_weights_scale"] == 1.0
    checked = set(want) | {"rope.freq_base", "attention.layer_norm_rms_epsilon"}
    if kind == "moe":
        checked.add("expert_weights_scale")
    assert {k for k in f if k.startswith(arch + ".")} == {f"{arch}.{k}" for k in checked}  # nothing unchecked


@pytest.mark.parametrize("dtype", export.GGUF_DTYPES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_tensor_matches_our_state_dict(exported, kind, dtype):
    model, paths = exported[kind]
    reader = gguf.GGUFReader(paths[dtype])
    got = {t.name: t for t in reader.tensors}
    want = expected_tensors(model)
    assert sorted(got) == sorted(want)
    cast = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    ggml_type = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[dtype]
    for name, w in want.items():
        t = got[name]
        assert list(t.shape) == list(reversed(w.shape)), name  # ggml's ne: fastest dimension first
        keeps_f32 = w.dim() == 1 or name.endswith("ffn_gate_inp.weight")  # norms and router
        assert t.tensor_type.name == ("F32" if keeps_f32 else ggml_type), name
        expect = w if keeps_f32 else w.to(cast).float()
        assert torch.equal(tensor_values(t), expect), name


def test_tokenizer_fields(exported, tokenizer):
    _, paths = exported["dense"]
    f = fields_of(gguf.GGUFReader(paths["f16"]))
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    spec = json.loads(tokenizer.hf.to_str())
    by_id = {i: t for t, i in tokenizer.hf.get_vocab(with_added_tokens=True).items()}
    assert f["tokenizer.ggml.tokens"] == [by_id[i] for i in range(6400)]
    control, normal = int(gguf.TokenType.CONTROL), int(gguf.TokenType.NORMAL)
    assert f["tokenizer.ggml.token_type"] == [control] * 3 + [normal] * (6400 - 3)
    assert f["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    assert len(f["tokenizer.ggml.merges"]) == len(spec["model"]["merges"]) > 6000
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.ggml.padding_token_id"] == 0
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.chat_template"] == tokenizer.chat_template


# --------------------------------------------------------------------- llama.cpp's semantics over the file, in torch
def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_adjacent_pairs(x_THD, base):
    """llama.cpp's LLAMA_ROPE_TYPE_NORM (ggml rope_f32, mode 0): pair (x[2i], x[2i+1]) rotated by p * base^(-2i/Dh)."""
    t, _, dh = x_THD.shape
    out = x_THD.clone()
    for i in range(dh // 2):
        ang = torch.arange(t, dtype=torch.float64) * base ** (-2 * i / dh)
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        a, b = x_THD[..., 2 * i], x_THD[..., 2 * i + 1]
        out[..., 2 * i], out[..., 2 * i + 1] = a * c - b * s, a * s + b * c
    return out


def swiglu(x, gate, up, down):
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def gguf_forward(path, ids: list[int]) -> torch.Tensor:
    """Logits [T, V] of the GGUF file at path, computed in fp64 from its tensors and keys as llama.cpp's graphs
    compute them: src/models/llama.cpp (build_attn with kq_scale 1/sqrt(Dh), build_ffn SwiGLU) and
    src/models/bailingmoe.cpp (build_moe_ffn: softmax gating, top-k, renormalised when expert_weights_norm, times
    expert_weights_scale; plus the ungated shared expert)."""
    reader = gguf.GGUFReader(path)
    f = fields_of(reader)
    arch = f["general.architecture"]
    hp = {k[len(arch) + 1 :]: v for k, v in f.items() if k.startswith(arch + ".")}
    w = {t.name: tensor_values(t).double() for t in reader.tensors}
    eps, base = hp["attention.layer_norm_rms_epsilon"], hp["rope.freq_base"]
    nh, nkv = hp["attention.head_count"], hp["attention.head_count_kv"]
    x = w["token_embd.weight"][ids]
    t = len(ids)
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(hp["block_count"]):
        b = f"blk.{i}."
        h = rms(x, w[b + "attn_norm.weight"], eps)
        q = rope_adjacent_pairs((h @ w[b + "attn_q.weight"].T).view(t, nh, -1), base)
        k = rope_adjacent_pairs((h @ w[b + "attn_k.weight"].T).view(t, nkv, -1), base)
        v = (h @ w[b + "attn_v.weight"].T).view(t, nkv, -1)
        dh = q.shape[-1]
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        att = (torch.einsum("qhd,khd->hqk", q, k) / dh**0.5 + mask).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(t, -1) @ w[b + "attn_output.weight"].T
        h = rms(x, w[b + "ffn_norm.weight"], eps)
        if arch == "llama":
            x = x + swiglu(h, w[b + "ffn_gate.weight"], w[b + "ffn_up.weight"], w[b + "ffn_down.weight"])
            continue
        probs = (h @ w[b + "ffn_gate_inp.weight"].T).softmax(-1)
        top_w, top_i = probs.topk(hp["expert_used_count"], dim=-1)
        if hp["expert_weights_norm"]:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        top_w = top_w * hp["expert_weights_scale"]
        y = torch.zeros_like(h)
        for tok in range(t):
            for wt, e in zip(top_w[tok], top_i[tok].tolist()):
                gate, up = w[b + "ffn_gate_exps.weight"][e], w[b + "ffn_up_exps.weight"][e]
                y[tok] += wt * swiglu(h[tok], gate, up, w[b + "ffn_down_exps.weight"][e])
        shared = swiglu(h, w[b + "ffn_gate_shexp.weight"], w[b + "ffn_up_shexp.weight"], w[b + "ffn_down_shexp.weight"])
        x = x + y + shared
    head = w.get("output.weight", w["token_embd.weight"])  # llama: absent output falls back to the embedding
    return rms(x, w["output_norm.weight"], eps) @ head.T


def our_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


@pytest.mark.parametrize("kind", list(KINDS))
def test_llama_cpp_semantics_over_the_file_give_our_logits(exported, kind, tokenizer):
    model, paths = exported[kind]
    ids = tokenizer.encode("The quick brown fox 跳过了 the lazy dog, 42 times.")[:20]
    assert torch.allclose(gguf_forward(paths["f32"], ids), our_logits(model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"n_shared_experts": 2},  # two shared experts fused into one twice as wide
        {"n_shared_experts": 0},  # none: a zero shared expert (bailingmoe requires one)
        {"num_experts_per_tok": 1},  # MiniMind does not renormalise one expert's weight: the flag is written off
        {"norm_topk_prob": False},
    ],
    ids=["two-shared", "no-shared", "top1", "no-renorm"],
)
def test_moe_variants(tmp_path, tokenizer, overrides):
    model = tiny("moe", seed=3, **overrides)
    path = export.export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32")
    f = fields_of(gguf.GGUFReader(path))
    cfg = model.config
    assert f["bailingmoe.expert_shared_count"] == max(cfg.n_shared_experts, 1)
    assert f["bailingmoe.expert_weights_norm"] == (cfg.norm_topk_prob and cfg.num_experts_per_tok > 1)
    ids = tokenizer.encode("Mixture of experts, 专家混合。")
    assert torch.allclose(gguf_forward(path, ids), our_logits(model, ids), atol=1e-4, rtol=0)
    if HAS_LLAMA_CPP:  # and llama.cpp's bailingmoe agrees on each variant
        assert_llama_cpp_greedy_equals_ours(path, model, tokenizer, PROMPTS[:3])


def test_gguf_merges_a_lora_adapter(tmp_path, tokenizer):
    from minimind_fast import lora

    model = tiny(seed=7)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer=tokenizer)
    lora.apply_lora(model, rank=4)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    lora.save_adapter(tmp_path / "adapter", model)
    out = tmp_path / "m.gguf"
    export.main(["gguf", "--load", str(ckpt), "--lora", str(tmp_path / "adapter"), "--out", str(out), "--dtype", "f32"])
    ids = tokenizer.encode("adapter merged")
    assert torch.allclose(gguf_forward(out, ids), our_logits(model.eval(), ids), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------- refusals
def _with_pre_tokenizer(tokenizer, pre) -> Tokenizer:
    spec = json.loads(tokenizer.hf.to_str())
    spec["pre_tokenizer"] = pre
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)), "edited", tokenizer.config)


@pytest.mark.parametrize(
    "pre",
    [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        {"type": "Whitespace"},
    ],
    ids=["prefix-space", "whitespace"],
)
def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(tmp_path, tokenizer, pre):
    with pytest.raises(export.ExportError, match="pre-tokenizer"):
        export.export_gguf(tiny(), _with_pre_tokenizer(tokenizer, pre), tmp_path / "m.gguf")


def test_command_line_errors_are_one_line(tmp_path, tokenizer, capsys):
    with pytest.raises(SystemExit, match=r"^error: .*no-such-folder"):
        export.main(["gguf", "--load", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "m.gguf")])
    model = tiny()
    model.set_yarn(True)
    ckpt = save_checkpoint(tmp_path / "yarn", model, model.config, tokenizer=tokenizer)
    with pytest.raises(SystemExit, match=r"^error: YaRN"):
        export.main(["gguf", "--load", str(ckpt), "--out", str(tmp_path / "m.gguf")])


# ------------------------------------------------------------------------------------------------ llama.cpp itself
TEXTS = [
    "Hello, world!",
    "你好，世界！今天天气怎么样？",
    "The year 2024 had 366 days; 3.14159 ≈ π and 1,000,000 > 999999.",
    "  two leading spaces, three trailing   ",
    "line one\nline two\n\n\tindented\r\nwindows line\n",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "mixed 中文 and English123 数字４５６ (full-width) ①②③ ²³",
    "emoji 😀👍🏽 and symbols @#$%^&*()_+-=[]{}|;:'\",.<>/?~`",
    "don't won't it's we're I'll they've I'd 'quoted'",
    "日本語のテキスト、한국어 텍스트, русский текст, العربية, ελληνικά",
    "a\u00a0non-breaking space,\u3000ideographic space and\u2009thin space",
    "   \n   \n\n",
    '<think>\n\n</think>\n\n<tool_call>{"name": "f"}</tool_call>',
    "",
]

PROMPTS = [
    "The capital of France is",
    "你好，请介绍一下你自己。",
    "1 + 1 = 2, 2 + 2 =",
    "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n为什么天空是蓝色的？<|im_end|>\n"
    "<|im_start|>assistant\n",
    "def fibonacci(n):\n    ",
    "   Once upon a time",
]


def llama(path, **kw):
    from llama_cpp import Llama

    # f32 keys and values in the cache (llama.cpp's default is f16) so that an f32 file computes in f32 throughout.
    return Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=1, verbose=False, type_k=0, type_v=0, **kw)


def assert_llama_cpp_greedy_equals_ours(path, model, tokenizer, texts, new_tokens=16, distinct=True):
    """llama.cpp's greedy continuation of each text (argmax of its logits, token by token) equals ours, token for
    token; its first-step logits are within 1e-3 of ours (f32 weights and cache: what remains is summation order).
    distinct: also require the texts' continuations to differ (so that the comparison means something)."""
    llm = llama(path, logits_all=True)
    prompts = [tokenizer.encode(t) for t in texts]
    ours = generate(model, prompts, new_tokens, greedy=True, eos_id=None)
    for text, prompt, want in zip(texts, prompts, ours):
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == prompt, text
        llm.reset()
        llm.eval(prompt)
        got = []
        for step in range(new_tokens):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            if step == 0:
                assert np.allclose(logits, our_logits(model, prompt)[-1].numpy(), atol=1e-3, rtol=0), text
            got.append(int(logits.argmax()))
            llm.eval([got[-1]])
        assert got == want, text
    if distinct:
        assert len({tuple(o) for o in ours}) == len(ours)  # context-dependent outputs: the comparison means something


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_us(exported, tokenizer):
    llm = llama(exported["dense"][1]["f16"], vocab_only=True)
    for text in TEXTS + PROMPTS:
        ids = tokenizer.encode(text)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids, text
        assert llm.detokenize(ids, special=True).decode("utf-8") == text, text
    # Every character of the Basic Multilingual Plane between letters, digits, spaces and a newline: llama.cpp's
    # Unicode categories (\p{L}, \p{N}, \s) must split as the tokenizers library's regex does.
    texts = [f"a{c}1 {c}x {c}{c} 2{c}\n{c}" for c in map(chr, range(0x20, 0x10000)) if not 0xD800 <= ord(c) < 0xE000]
    for text, ids in zip(texts, tokenizer.encode_batch(texts)):
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids, ascii(text)


@needs_llama_cpp
def test_llama_cpp_reads_the_chat_template(exported, tokenizer):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama(exported["moe"][1]["f16"], vocab_only=True)
    template = llm.metadata["tokenizer.chat_template"]
    assert template == tokenizer.chat_template
    render = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>", add_generation_prompt=True)
    chats = [
        [{"role": "user", "content": "你好"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "?"},
        ],
    ]
    for chat in chats:
        assert render(messages=chat).prompt == tokenizer.apply_chat_template(chat, add_generation_prompt=True)


@needs_llama_cpp
@pytest.mark.parametrize("kind", list(KINDS))
def test_llama_cpp_greedy_generation_equals_ours(exported, kind, tokenizer):
    model, paths = exported[kind]
    assert_llama_cpp_greedy_equals_ours(paths["f32"], model, tokenizer, PROMPTS)
