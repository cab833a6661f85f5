"""tools/export.py: our checkpoints -> Hugging Face folders that transformers loads offline (logits and greedy
generations compared with ours), MoE round trips, MiniMind2 .pth import, HF Llama folder import.

transformers is the independent reference: its Llama and Qwen2-MoE implementations share no code with ours.
"""

import json

import pytest
import torch
import transformers

from minimind_fast.checkpoint import load_model, save_checkpoint
from minimind_fast.config import from_preset
from minimind_fast.generate import generate
from minimind_fast.model import MiniMind
from tools import export

ATOL = 1e-4  # fp32, |logits| ~ 10: what remains is summation order between two implementations


pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny(seed=0, **overrides) -> MiniMind:
    torch.manual_seed(seed)
    cfg = from_preset("tiny", **{"num_hidden_layers": 2, "max_position_embeddings": 2048, **overrides})
    model = MiniMind(cfg)
    model.reset_parameters(std=0.1)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def hf_load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()


IDS = torch.randint(0, 6400, (2, 29), generator=torch.Generator().manual_seed(1))


def test_dense_export_loads_in_transformers_with_the_same_logits_and_generations(tmp_path, tokenizer):
    model = tiny()
    ckpt = save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer=tokenizer)
    export.main(["hf", "--load", str(ckpt), "--out", str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg = model.config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 1e6 and config["rms_norm_eps"] == 1e-5 and config["rope_scaling"] is None
    assert (config["head_dim"], config["num_key_value_heads"]) == (cfg.head_dim, cfg.num_key_value_heads)

    hf = hf_load(tmp_path / "hf")
    assert isinstance(hf, transformers.LlamaForCausalLM)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied on load
    assert torch.allclose(logits(hf, IDS), logits(model, IDS), atol=ATOL, rtol=0)

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好, what is rain?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    hf_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert hf_text == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert tok(hf_text, add_special_tokens=False)["input_ids"] == prompt

    ours = generate(model, [prompt], 24, greedy=True)[0]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=0)
    theirs = out[0, len(prompt) :].tolist()
    if 2 in theirs:  # HF pads after eos; ours stops there
        theirs = theirs[: theirs.index(2) + 1]
    assert theirs == ours and len(ours) > 4


def test_yarn_is_exported_as_rope_scaling(tmp_path, tokenizer):
    model = tiny(seed=2)
    plain = logits(model, IDS)
    model.set_yarn(True)
    out = export.export_hf(model, tokenizer, tmp_path / "hf")
    rs = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert rs["rope_type"] == "yarn" and rs["factor"] == 16 and rs["original_max_position_embeddings"] == 2048
    assert (rs["beta_fast"], rs["beta_slow"], rs["attention_factor"]) == (32, 1, 1.0)
    yarn = logits(model, IDS)
    assert (yarn - plain).abs().max() > 100 * ATOL  # YaRN changes the model, so matching below is a real check
    assert torch.allclose(logits(hf_load(out), IDS), yarn, atol=ATOL, rtol=0)
    back = export.load_exported(out)
    assert back.config.inference_rope_scaling and torch.equal(logits(back, IDS), yarn)


def test_moe_exports_as_qwen2_moe_and_round_trips(tmp_path, tokenizer):
    model = tiny(seed=3, use_moe=True, n_shared_experts=2)  # two shared experts: fused into one on export
    ckpt = save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer=tokenizer)
    export.main(["hf", "--load", str(ckpt), "--out", str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["num_experts"] == 4 and config["num_experts_per_tok"] == 2
    want = logits(model, IDS)
    hf = hf_load(tmp_path / "hf")
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    assert torch.allclose(logits(hf, IDS), want, atol=ATOL, rtol=0)

    export.main(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    back, cfg, payload = load_model(tmp_path / "back")
    assert cfg == model.config and payload["meta"]["format"] == "qwen2_moe"
    assert torch.equal(logits(back.eval(), IDS), want)  # halving the doubled down projection is exact


def test_moe_minimind_format_round_trip(tmp_path, tokenizer):
    model = tiny(seed=4, use_moe=True)
    out = export.export_hf(model, tokenizer, tmp_path / "hf", moe_format="minimind")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "minimind" and config["use_moe"] is True
    want = logits(model, IDS)
    assert torch.equal(logits(export.load_exported(out), IDS), want)
    back, cfg, _ = load_model(export.import_hf(out, tmp_path / "back"))
    assert cfg == model.config and torch.equal(logits(back.eval(), IDS), want)


@pytest.mark.parametrize("moe,prefix", [(False, ""), (True, ""), (False, "_orig_mod.")])
def test_minimind_pth_import_gives_identical_logits(tmp_path, moe, prefix):
    model = tiny(seed=5, use_moe=moe, max_position_embeddings=32768)  # a .pth has no config: MiniMind2's default
    with torch.no_grad():  # the .pth holds fp16: compare with the same weights rounded to fp16
        for p in model.parameters():
            p.copy_(p.half().float())
    # A MiniMind2 .pth: model.state_dict() in fp16, tied head included under its own name.
    sd = {prefix + k: v.half() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in {k[len(prefix) :] for k in sd}
    torch.save(sd, tmp_path / "model.pth")
    export.main(["import-pth", "--pth", str(tmp_path / "model.pth"), "--out", str(tmp_path / "ckpt")])
    back, cfg, payload = load_model(tmp_path / "ckpt")
    assert cfg == model.config and payload["meta"]["format"] == "minimind-pth"
    assert torch.equal(logits(back.eval(), IDS), logits(model, IDS))


def test_pth_import_refuses_pickled_code_and_adapters(tmp_path):
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "obj": torch.nn.Linear(2, 2)}, tmp_path / "evil.pth")
    with pytest.raises(export.ExportError, match="weights-only"):
        export.import_pth(tmp_path / "evil.pth", tmp_path / "out")
    torch.save({"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(2, 2)}, tmp_path / "lora.pth")
    with pytest.raises(SystemExit, match="LoRA adapter"):
        export.main(["import-pth", "--pth", str(tmp_path / "lora.pth"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_hf_llama_folder_import(tmp_path, tokenizer):
    torch.manual_seed(6)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=6400,
        hidden_size=128,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        tie_word_embeddings=True,
        initializer_range=0.1,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    export.main(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")])
    ours, cfg, _ = load_model(tmp_path / "ckpt")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads, cfg.rope_theta) == (128, 320, 2, 1e6)
    assert torch.allclose(logits(ours.eval(), IDS), logits(hf, IDS), atol=ATOL, rtol=0)

    untied = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**hf_cfg.to_dict(), "tie_word_embeddings": False})
    )
    untied.save_pretrained(tmp_path / "untied")
    with pytest.raises(export.ExportError, match="ties"):
        export.import_hf(tmp_path / "untied", tmp_path / "bad")


def test_export_merges_a_lora_adapter(tmp_path, tokenizer):
    from minimind_fast import lora

    model = tiny(seed=7)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, model.config, tokenizer=tokenizer)
    lora.apply_lora(model, rank=4)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    lora.save_adapter(tmp_path / "adapter", model)
    export.main(["hf", "--load", str(ckpt), "--lora", str(tmp_path / "adapter"), "--out", str(tmp_path / "hf")])
    got = logits(hf_load(tmp_path / "hf"), IDS)
    assert torch.allclose(got, logits(model.eval(), IDS), atol=ATOL, rtol=0)
