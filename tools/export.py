"""Move MiniMind weights between our checkpoints, Hugging Face folders and MiniMind2 .pth files.

    python tools/export.py hf --load out/full_sft --out out/hf/full_sft           # -> a transformers folder
         [--dtype float32|bfloat16|float16] [--lora out/lora_identity] [--yarn]
         [--moe_format qwen2_moe|qwen3_moe|minimind]
    python tools/export.py gguf --load out/full_sft --out out/minimind.gguf      # -> one file for llama.cpp / ollama
         [--dtype f16|bf16|f32] [--lora out/lora_identity]
    python tools/export.py import-pth --pth MiniMind2.pth --out out/minimind2    # MiniMind2 release -> checkpoint
         [--num_attention_heads 8] [--num_experts_per_tok 2] [--tokenizer DIR]
    python tools/export.py import-hf --hf out/hf/full_sft --out out/back          # transformers folder -> checkpoint

Exported folders (`hf`)
  Dense models become a LlamaForCausalLM folder: config.json (hidden/intermediate sizes, heads, num_key_value_heads,
  head_dim, rms_norm_eps, rope_theta, tie_word_embeddings=true, no biases, silu, bos 1 / eos 2 / pad 0, and
  rope_scaling {"rope_type": "yarn", factor 16, original_max_position_embeddings 2048, beta_fast 32, beta_slow 1,
  attention_factor 1.0} when the checkpoint has inference_rope_scaling on, or with --yarn), model.safetensors (our
  parameter names are Llama's, so the tensors are written as they are; the tied head is stored once, as the
  embedding), generation_config.json, and the tokenizer (tokenizer.json, tokenizer_config.json with the ChatML
  chat template). Load it offline with
      AutoModelForCausalLM.from_pretrained(folder); AutoTokenizer.from_pretrained(folder)
  MiniMind's RoPE is Llama's non-interleaved rotate-half layout, and HF's YaRN computes the same frequencies as ours
  (same correction range, ramp and blend; HF clamps the range's top at head_dim-1 where MiniMind clamps at
  head_dim/2-1, which only differs for contexts far beyond the ones used here).

  MiniMind-3 models (qk_norm) become Qwen3: a dense one a Qwen3ForCausalLM folder, config.json as above plus
  attention_bias false, no sliding window and head_dim its own field (it may differ from hidden / heads); the
  parameter names are Qwen3's (self_attn.q_norm.weight / k_norm.weight [head_dim], RMSNorm of each query and key head
  before the same rotate-half RoPE), so the tensors are written as they are. A MiniMind-3 MoE becomes a
  Qwen3MoeForCausalLM folder (--moe_format qwen3_moe, its default): moe_intermediate_size, num_experts,
  num_experts_per_tok, decoder_sparse_step 1, mlp_only_layers [], router_aux_loss_coef = aux_loss_alpha, and
  norm_topk_prob set when our router renormalises its top-k weights (Qwen3-MoE then renormalises at every k, so
  MiniMind-3's top-1 weight is 1 in both). The expert tensors keep our per-expert names, which are Qwen3-MoE's
  checkpoint names; transformers 5 stacks them into its fused experts on load. Refused, with the reason: a model
  without QK-norm as Qwen3 or Qwen3-MoE, a QK-norm model as Llama or Qwen2-MoE, a QK-norm MoE with shared experts
  as Qwen3-MoE (it has none; --moe_format minimind keeps them).

  MiniMind2 MoE models, --moe_format qwen2_moe (their default): a Qwen2MoeForCausalLM folder that transformers loads
  the same way.
  Qwen2-MoE has MiniMind's router (softmax in fp32, top-k, renormalised at every k when norm_topk_prob, which is
  written as whether ours renormalises: MiniMind2's top-1 keeps its score) and one shared expert whose
  output is scaled by sigmoid(shared_expert_gate(x)). MiniMind adds its shared experts unscaled, so the gate's
  weight is written as zeros (sigmoid(0) = 1/2) and the shared down projection doubled: exact in every float format,
  being a power of two. Several shared experts become one wider shared expert (a sum of SwiGLUs over disjoint
  intermediate units is one SwiGLU over their concatenation).
  --moe_format minimind: config.json is our MiniMindConfig's fields flat plus "model_type": "minimind" and
  "architectures": ["MiniMindForCausalLM"], model.safetensors holds the state dict under our own names. Load it with
      from tools.export import load_exported; model = load_exported(folder)
  or turn it back into a checkpoint with `import-hf`.

GGUF (`gguf`, written with the gguf package, llama.cpp's gguf-py)
  One file that llama.cpp's llama-cli / llama-server and ollama run: hyperparameters, tensors under llama.cpp's
  names, tokenizer and chat template. Dense models are llama.cpp's `llama` architecture. MoE models are its
  `bailingmoe` (Ling): its graph (src/models/bailingmoe.cpp) is MiniMind's MoE exactly (softmax router, top-k,
  weights renormalised by the expert_weights_norm flag, shared experts added without a gate) around standard GQA
  attention. qwen2moe is not: it gates its shared expert by a sigmoid and ignores norm_topk_prob; deepseek never
  renormalises; qwen3moe has no shared expert and adds QK-norm. Both architectures use llama.cpp's "normal" RoPE on
  adjacent pairs, so q and k rows are permuted from our rotate-half order (rope_halves_to_pairs), as llama.cpp's own
  converter does for HF Llama. MiniMind-3 models (qk_norm) are llama.cpp's `qwen3` (dense) and `qwen3moe` (MoE):
  attn_q_norm / attn_k_norm RMSNorm each query and key head before RoPE, and their RoPE is NEOX (llama_model_rope_type:
  pairs offset by n_rot/2), our rotate-half, so q and k are written unpermuted; key/value length and rope dimension
  are head_dim; the tied head is left out (both fall back to token_embd). qwen3moe is MiniMind-3's MoE: softmax
  router, top-k weights always renormalised (hard-coded in src/models/qwen3moe.cpp, no GGUF key), no shared expert;
  so a QK-norm MoE with shared experts, or one that does not renormalise, has no GGUF architecture (an error).
  The tokenizer is llama.cpp's "gpt2" BPE with the "gpt-2" pre-tokenizer, which runs
  the same regex as our byte-level pre-tokenizer. Matrices are f16 by default (--dtype), norms and router f32.
  YaRN is not exported (an error). tests/tools/test_export_gguf.py checks the file field by field, recomputes our
  logits from the file alone with llama.cpp's semantics, and, where llama-cpp-python is installed, compares
  llama.cpp's tokenization and greedy tokens with ours; tests/tools/test_export_m3.py does the same for qwen3 and
  qwen3moe.

Imports
  import-pth: a MiniMind2 .pth is a plain fp16 state dict under the same names; it is read with
  torch.load(weights_only=True) (no code can run) through checkpoint.load_minimind_pth, in fp32. Its config
  is inferred from the tensor shapes (vocab, hidden, layers, kv heads, FFN width, experts); the number of query heads
  cannot be read off the shapes and is --num_attention_heads (8 for every MiniMind2 model), likewise top-k
  (--num_experts_per_tok, 2). Keys prefixed by DDP ("module.") or torch.compile ("_orig_mod.") are accepted.
  import-hf: a Llama, Qwen2-MoE, Qwen3, Qwen3-MoE (as exported above, per-expert or transformers 5's fused expert
  tensors) or minimind-format folder -> our checkpoint. Qwen3 and Qwen3-MoE become MiniMind-3 models: qk_norm,
  head_dim as given, norm_topk_k1 (Qwen3-MoE renormalises at every k), MiniMind-3's MoE fields (a dense one carries
  them as the m3 presets do), aux_loss_alpha = router_aux_loss_coef with the batch-level loss. Anything our model
  cannot express (biases, an untied head, another activation or rope type, sliding-window layers, dense layers in a
  MoE, a non-zero shared-expert gate) is refused with the reason. The folder's tokenizer is kept when it has
  MiniMind's special tokens at ids 0-2.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python tools/export.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from minimind_fast.checkpoint import (  # noqa: E402
    EMBED_KEY,
    TIED_KEY,
    CheckpointError,
    StateDictError,
    clean_state_keys,
    infer_config,
    load_minimind_pth,
    load_model,
    model_state_dict,
    save_checkpoint,
)
from minimind_fast.config import PRESETS, ConfigError, MiniMindConfig  # noqa: E402
from minimind_fast.model import MiniMind  # noqa: E402
from minimind_fast.tokenizer import Tokenizer, TokenizerError  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """Weights or a folder that cannot be converted: the message says why."""


# ----------------------------------------------------------------------------------------------------------------
# Export


def yarn_rope_scaling(cfg: MiniMindConfig) -> dict[str, Any]:
    rs = cfg.rope_scaling
    out = {
        "rope_type": "yarn",
        "factor": float(rs["factor"]),
        "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
        "beta_fast": float(rs["beta_fast"]),
        "beta_slow": float(rs["beta_slow"]),
        # Given explicitly: HF's default would be 0.1 * ln(factor) + 1, MiniMind uses 1.0.
        "attention_factor": float(rs.get("attention_factor", 1.0)),
    }
    return out


def _common_hf_fields(cfg: MiniMindConfig, dtype: torch.dtype) -> dict[str, Any]:
    name = {v: k for k, v in DTYPES.items()}[dtype]
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": yarn_rope_scaling(cfg) if cfg.inference_rope_scaling else None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": name,
    }


def llama_config(cfg: MiniMindConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json of the LlamaForCausalLM equivalent of a dense MiniMind."""
    if cfg.use_moe:
        raise ExportError("a MoE model has no Llama equivalent (use the qwen2_moe or minimind format)")
    if cfg.qk_norm:
        raise ExportError("a QK-norm (MiniMind-3) model has no Llama equivalent: it is exported as Qwen3")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_common_hf_fields(cfg, dtype),
        "intermediate_size": cfg.intermediate_size,
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
    }


def qwen2_moe_config(cfg: MiniMindConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json of the Qwen2MoeForCausalLM equivalent of a MiniMind MoE."""
    if not cfg.use_moe:
        raise ExportError("a dense model is exported as Llama")
    if cfg.qk_norm:
        raise ExportError("Qwen2-MoE has no QK-norm: a MiniMind-3 MoE is exported with --moe_format qwen3_moe")
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        **_common_hf_fields(cfg, dtype),
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.intermediate_size,
        "shared_expert_intermediate_size": max(cfg.n_shared_experts, 1) * cfg.intermediate_size,
        "num_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "norm_topk_prob": topk_renormalised(cfg),  # Qwen2-MoE renormalises at every k when set, k = 1 included
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "qkv_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_hidden_layers,
        "output_router_logits": False,
        "router_aux_loss_coef": cfg.aux_loss_alpha,
    }


def _qwen3_fields(cfg: MiniMindConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The fields Qwen3 and Qwen3-MoE share (transformers' Qwen3Config / Qwen3MoeConfig): every layer full attention
    with QK-norm, head_dim its own field. The rope keys are the same legacy rope_theta / rope_scaling as Llama's, which
    transformers 5 folds into rope_parameters on load (PreTrainedConfig.convert_rope_params_to_dict) and 4.x reads
    as they are."""
    if not cfg.qk_norm:
        raise ExportError(
            "Qwen3 normalises every query and key head (q_norm / k_norm), which this MiniMind2-style model has not "
            "(dense: Llama; MoE: --moe_format qwen2_moe or minimind)"
        )
    return {
        **_common_hf_fields(cfg, dtype),
        "intermediate_size": cfg.intermediate_size,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_hidden_layers,
    }


def qwen3_config(cfg: MiniMindConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json of the Qwen3ForCausalLM equivalent of a dense MiniMind-3 (qk_norm)."""
    if cfg.use_moe:
        raise ExportError("a MoE model is exported as Qwen3-MoE, not Qwen3")
    fields = _qwen3_fields(cfg, dtype)
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **fields,
        "layer_types": ["full_attention"] * cfg.num_hidden_layers,
    }


def topk_renormalised(cfg: MiniMindConfig) -> bool:
    """Whether our router divides the top-k weights by their sum (MoEFeedForward.route): MiniMind2 only for k > 1,
    MiniMind-3 (norm_topk_k1) also at k = 1, where the one weight becomes 1."""
    return bool(cfg.norm_topk_prob and (cfg.num_experts_per_tok > 1 or cfg.norm_topk_k1))


def qwen3_moe_config(cfg: MiniMindConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json of the Qwen3MoeForCausalLM equivalent of a MiniMind-3 MoE (qk_norm, no shared expert).

    Qwen3-MoE's router (Qwen3MoeTopKRouter) is ours: linear, softmax in fp32, top-k, and with norm_topk_prob the
    top-k weights divided by their sum at every k, so a top-1 weight is 1, as MiniMind-3's is; our renormalisation is
    written as norm_topk_prob (topk_renormalised: a MiniMind2-rule top-1 keeps its score, norm_topk_prob false).
    Every layer is sparse (decoder_sparse_step 1, mlp_only_layers []). router_aux_loss_coef is aux_loss_alpha: HF's
    load_balancing_loss_func is the batch-level loss coef * E * sum_e frac_e * mean_score_e, MiniMind-3's at top-1."""
    if not cfg.use_moe:
        raise ExportError("a dense model is exported as Qwen3, not Qwen3-MoE")
    fields = _qwen3_fields(cfg, dtype)
    if cfg.n_shared_experts:
        raise ExportError(
            f"Qwen3-MoE has no shared expert and this model has {cfg.n_shared_experts} (use --moe_format minimind)"
        )
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        **fields,
        "moe_intermediate_size": cfg.intermediate_size,
        "num_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "norm_topk_prob": topk_renormalised(cfg),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "output_router_logits": False,
        "router_aux_loss_coef": cfg.aux_loss_alpha,
    }


def minimind_flat_config(cfg: MiniMindConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    return {
        "architectures": ["MiniMindForCausalLM"],
        "model_type": "minimind",
        **cfg.to_dict(),
        "head_dim": cfg.head_dim,
        "tie_word_embeddings": True,
        "torch_dtype": {v: k for k, v in DTYPES.items()}[dtype],
    }


_SHARED = re.compile(r"^(model\.layers\.\d+\.mlp\.)shared_experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def to_qwen2_moe_state_dict(sd: dict[str, torch.Tensor], cfg: MiniMindConfig) -> dict[str, torch.Tensor]:
    """Our MoE names -> Qwen2-MoE's: shared experts fused into one (gate/up rows and down columns concatenated, down
    doubled) and a zero shared_expert_gate. Router and routed experts keep their names."""
    out: dict[str, torch.Tensor] = {}
    shared: dict[str, dict[str, list[torch.Tensor]]] = {}
    for k, v in sd.items():
        m = _SHARED.match(k)
        if m is None:
            out[k] = v
            continue
        prefix, j, proj = m.group(1), int(m.group(2)), m.group(3)
        slot = shared.setdefault(prefix, {"gate": [], "up": [], "down": []})[proj]
        slot.extend([None] * (j + 1 - len(slot)))
        slot[j] = v
    d, f = cfg.hidden_size, cfg.intermediate_size
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp."
        parts = shared.get(prefix)
        ref = sd[f"{prefix}gate.weight"]
        if parts is None:  # no shared expert: a zero one of width f contributes nothing
            # (two tensors: safetensors refuses one stored under two names)
            gate, up = torch.zeros(f, d, dtype=ref.dtype), torch.zeros(f, d, dtype=ref.dtype)
            down = torch.zeros(d, f, dtype=ref.dtype)
        else:
            gate, up = torch.cat(parts["gate"], dim=0), torch.cat(parts["up"], dim=0)
            down = torch.cat(parts["down"], dim=1) * 2  # undoes sigmoid(0) = 1/2 exactly
        out[f"{prefix}shared_expert.gate_proj.weight"] = gate.contiguous()
        out[f"{prefix}shared_expert.up_proj.weight"] = up.contiguous()
        out[f"{prefix}shared_expert.down_proj.weight"] = down.contiguous()
        out[f"{prefix}shared_expert_gate.weight"] = torch.zeros(1, d, dtype=ref.dtype)
    return out


def export_hf(
    model: MiniMind,
    tokenizer: Tokenizer,
    out: str | Path,
    dtype: torch.dtype | None = None,
    moe_format: str | None = None,
) -> Path:
    """Write the Hugging Face folder for model (see the module docstring). Returns the folder.

    moe_format (MoE models only): qwen2_moe, qwen3_moe or minimind; None picks qwen3_moe for a QK-norm (MiniMind-3)
    model and qwen2_moe for the others. Dense models are Qwen3 with QK-norm, else Llama."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    if dtype not in DTYPES.values():
        raise ExportError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
    sd = {k: v.to(dtype).contiguous() for k, v in model_state_dict(model).items()}
    hf_load = "AutoModelForCausalLM.from_pretrained(folder)"
    if moe_format is None:
        moe_format = "qwen3_moe" if cfg.qk_norm else "qwen2_moe"
    if not cfg.use_moe:
        config, how = (qwen3_config if cfg.qk_norm else llama_config)(cfg, dtype), hf_load
    elif moe_format == "qwen2_moe":
        config, how = qwen2_moe_config(cfg, dtype), hf_load
        sd = to_qwen2_moe_state_dict(sd, cfg)
    elif moe_format == "qwen3_moe":
        # Our names are Qwen3-MoE's checkpoint names (mlp.gate.weight, mlp.experts.{e}.{gate,up,down}_proj.weight,
        # self_attn.{q,k}_norm.weight): transformers 5 stacks the per-expert tensors into its fused experts on load
        # (conversion_mapping.py: qwen3_moe takes qwen2_moe's MergeModulelist / Concatenate converters).
        config, how = qwen3_moe_config(cfg, dtype), hf_load
    elif moe_format == "minimind":
        config, how = minimind_flat_config(cfg, dtype), "tools.export.load_exported(folder)"
    else:
        raise ExportError(f"unknown --moe_format {moe_format!r} (qwen2_moe, qwen3_moe or minimind)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tokenizer.save(out)
    (out / "README.md").write_text(
        f"# {out.name}\n\nA MiniMind model ({model.num_params():,} parameters, {config['architectures'][0]}, "
        f"{config['torch_dtype']}), exported by tools/export.py.\n\nLoad it with `{how}`; the tokenizer with "
        "`AutoTokenizer.from_pretrained(folder)` (ChatML chat template).\n"
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp, ollama)

GGUF_DTYPES = ("f32", "f16", "bf16")
GGUF_DENSE_ARCH, GGUF_MOE_ARCH = "llama", "bailingmoe"  # MiniMind2
GGUF_QWEN3_ARCH, GGUF_QWEN3MOE_ARCH = "qwen3", "qwen3moe"  # MiniMind-3 (qk_norm)


def gguf_arch(cfg: MiniMindConfig) -> str:
    """The llama.cpp architecture a model is written as, or ExportError when none computes it exactly.

    QK-norm models go to qwen3 / qwen3moe (src/models/qwen3.cpp, qwen3moe.cpp: RMSNorm of each query and key head by
    attn_q_norm / attn_k_norm, then RoPE). qwen3moe has no shared expert, and its build_moe_ffn call renormalises the
    top-k weights unconditionally (norm_w hard-coded true: no GGUF key turns it off), so only a model that
    renormalises too (topk_renormalised) is written as qwen3moe."""
    if not cfg.qk_norm:
        return GGUF_MOE_ARCH if cfg.use_moe else GGUF_DENSE_ARCH
    if not cfg.use_moe:
        return GGUF_QWEN3_ARCH
    if cfg.n_shared_experts:
        raise ExportError(
            f"a QK-norm MoE with {cfg.n_shared_experts} shared expert(s) has no llama.cpp architecture (qwen3moe has "
            "no shared expert, bailingmoe no QK-norm)"
        )
    if not topk_renormalised(cfg):
        raise ExportError(
            "llama.cpp's qwen3moe always renormalises the top-k weights, this model does not "
            f"(norm_topk_prob {cfg.norm_topk_prob}, top-{cfg.num_experts_per_tok}, norm_topk_k1 {cfg.norm_topk_k1})"
        )
    return GGUF_QWEN3MOE_ARCH


def _gguf():
    """The gguf package (llama.cpp's gguf-py, on PyPI as gguf), imported when a GGUF is written."""
    try:
        import gguf
    except ImportError as exc:
        raise ExportError("writing GGUF needs the gguf package: pip install gguf") from exc
    return gguf


def rope_halves_to_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection [n_heads * Dh, D] reordered, within every head, from rotate-half order to
    adjacent pairs: new row 2i takes row i, new row 2i+1 takes row i + Dh/2 (i < Dh/2).

    Why: our RoPE (HF Llama's) rotates the pair (x[i], x[i + Dh/2]) by angle p * theta^(-2i/Dh); llama.cpp's `llama`
    and `bailingmoe` architectures use LLAMA_ROPE_TYPE_NORM (src/llama-model.cpp, llama_model_rope_type: "normal
    RoPE, operating on pairs of consecutive head values"), which rotates (x[2i], x[2i+1]) by the same angle: Meta's
    original layout, which HF's Llama conversion had permuted into rotate-half. llama.cpp's HF converter undoes that
    permutation (convert_hf_to_gguf.py, LlamaModel.permute and BailingMoeModel.permute: reshape to
    (heads, 2, Dh/2, D), swap axes 1 and 2). Doing the same to q and k changes nothing else: the attention score
    q.k sums over the same products in another order, and v and o are untouched."""
    rows, cols = w.shape
    dh = rows // n_heads
    return w.reshape(n_heads, 2, dh // 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_tensors(model: MiniMind) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> fp32 tensor (torch layout [out, in]; gguf lists the dims reversed) for model.

    Names are llama.cpp's (gguf-py constants.py TENSOR_NAMES). Dense: LLM_ARCH_LLAMA's tensors; the tied head is
    left out (llama.cpp's llama loader falls back to token_embd when output.weight is absent). MoE:
    LLM_ARCH_BAILINGMOE's (src/models/bailingmoe.cpp, load_arch_tensors), where output.weight is required, so the tied
    embedding is written a second time; the routed experts stacked as [E, F, D] / [E, D, F] (ggml {D, F, E} and
    {F, D, E}); the shared experts fused into one of width F * n_shared (rows of gate/up, columns of down concatenated:
    a sum of SwiGLUs over disjoint hidden units is one SwiGLU over their concatenation).

    MiniMind-3 (qk_norm): LLM_ARCH_QWEN3's / QWEN3MOE's tensors, plus attn_q_norm / attn_k_norm [head_dim]. Their
    output.weight is optional (TENSOR_NOT_REQUIRED, token_embd used instead), so the tied head is left out; their RoPE
    is LLAMA_ROPE_TYPE_NEOX (llama_model_rope_type: "the pairs of head values are offset by n_rot/2"), our
    rotate-half, so q and k are written unpermuted, as llama.cpp's converter writes Qwen's (Qwen2Model: no permute)."""
    cfg = model.config
    arch = gguf_arch(cfg)
    qwen3 = arch in (GGUF_QWEN3_ARCH, GGUF_QWEN3MOE_ARCH)
    sd = {k: v.detach().float() for k, v in model_state_dict(model).items()}
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    out = {"token_embd.weight": sd[EMBED_KEY], "output_norm.weight": sd["model.norm.weight"]}
    if arch == GGUF_MOE_ARCH:
        out["output.weight"] = sd[EMBED_KEY]
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        out[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[b + "attn_q.weight"] = q if qwen3 else rope_halves_to_pairs(q, hq)
        out[b + "attn_k.weight"] = k if qwen3 else rope_halves_to_pairs(k, hkv)
        out[b + "attn_v.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[b + "attn_output.weight"] = sd[p + "self_attn.o_proj.weight"]
        if qwen3:
            out[b + "attn_q_norm.weight"] = sd[p + "self_attn.q_norm.weight"]
            out[b + "attn_k_norm.weight"] = sd[p + "self_attn.k_norm.weight"]
        out[b + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        if not cfg.use_moe:
            for proj in ("gate", "up", "down"):
                out[b + f"ffn_{proj}.weight"] = sd[p + f"mlp.{proj}_proj.weight"]
            continue
        out[b + "ffn_gate_inp.weight"] = sd[p + "mlp.gate.weight"]
        for proj in ("gate", "up", "down"):
            experts = [sd[p + f"mlp.experts.{e}.{proj}_proj.weight"] for e in range(cfg.n_routed_experts)]
            out[b + f"ffn_{proj}_exps.weight"] = torch.stack(experts)
        if arch == GGUF_QWEN3MOE_ARCH:  # no shared expert (gguf_arch refuses one)
            continue
        d, f = cfg.hidden_size, cfg.intermediate_size
        shared = [f"{p}mlp.shared_experts.{j}." for j in range(cfg.n_shared_experts)]
        if shared:
            out[b + "ffn_gate_shexp.weight"] = torch.cat([sd[s + "gate_proj.weight"] for s in shared], dim=0)
            out[b + "ffn_up_shexp.weight"] = torch.cat([sd[s + "up_proj.weight"] for s in shared], dim=0)
            out[b + "ffn_down_shexp.weight"] = torch.cat([sd[s + "down_proj.weight"] for s in shared], dim=1)
        else:  # bailingmoe requires a shared expert: a zero one adds exactly nothing
            out[b + "ffn_gate_shexp.weight"] = out[b + "ffn_up_shexp.weight"] = torch.zeros(f, d)
            out[b + "ffn_down_shexp.weight"] = torch.zeros(d, f)
    return {k: v.contiguous() for k, v in out.items()}


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    r"""(tokens by id, token types, merges "a b") for tokenizer.ggml.model "gpt2", padded to vocab_size with unused
    tokens. Refuses a tokenizer that llama.cpp's "gpt-2" pre-tokenizer would not split exactly as ours: only a BPE model
    behind HF's plain ByteLevel pre-tokenizer (GPT-2's regex, no prefix space, no normaliser) is accepted. llama.cpp's
    "gpt-2" type runs that same regex ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+,
    src/unicode.cpp unicode_regex_split_custom_gpt2) before the same byte-to-unicode mapping and merges."""
    gguf = _gguf()
    spec = json.loads(tokenizer.hf.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(
            f"tokenizer {tokenizer.source}: a byte-level BPE model is needed for GGUF, not {model.get('type')}"
        )
    if spec.get("normalizer") is not None:
        raise ExportError(f"tokenizer {tokenizer.source}: has a normalizer, which llama.cpp's gpt2 tokenizer lacks")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise ExportError(
            f"tokenizer {tokenizer.source}: pre-tokenizer {json.dumps(pre)[:120]} is not GPT-2's byte-level regex "
            "(the only one exported as llama.cpp's 'gpt-2')"
        )
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    n = len(vocab)
    if n > vocab_size:
        raise ExportError(f"tokenizer {tokenizer.source} has {n} tokens, more than the model's vocab_size {vocab_size}")
    tokens: list[str | None] = [None] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
    if any(t is None for t in tokens[:n]):
        raise ExportError(f"tokenizer {tokenizer.source}: token ids are not contiguous from 0")
    types = [int(gguf.TokenType.NORMAL)] * n + [int(gguf.TokenType.UNUSED)] * (vocab_size - n)
    for i, tok in tokenizer.hf.get_added_tokens_decoder().items():
        types[i] = int(gguf.TokenType.CONTROL if tok.special else gguf.TokenType.USER_DEFINED)
    for i in range(n, vocab_size):  # as llama.cpp's converter pads a vocabulary shorter than the embedding
        tokens[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return [t for t in tokens if t is not None], types, merges


def _gguf_array(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(numpy array, raw ggml type or None) of an fp32 tensor in the file's dtype."""
    gguf = _gguf()
    if dtype == "f32":
        return t.numpy(), None
    if dtype == "f16":
        return t.half().numpy(), None
    return t.bfloat16().view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16


def export_gguf(model: MiniMind, tokenizer: Tokenizer, out: str | Path, dtype: str = "f16", name: str | None = None):
    """Write model and tokenizer as one GGUF file that llama.cpp (and ollama) run. Returns the file's path.

    dtype applies to the matrices; norms and the MoE router stay f32 (llama.cpp's converter keeps 1-D tensors and
    ffn_gate_inp in f32 too; the router's softmax over few experts is sensitive to it)."""
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    cfg = model.config
    if cfg.inference_rope_scaling:
        raise ExportError("YaRN rope scaling is not exported to GGUF (export the checkpoint without it)")
    arch = gguf_arch(cfg)
    gguf = _gguf()
    tokens, types, merges = gguf_vocab(tokenizer, cfg.vocab_size)
    tensors = gguf_tensors(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")  # renamed into place once complete
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(name or out.stem)
    w.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        }[dtype]
    )
    # Hyperparameters under {arch}.*: the keys llama.cpp's load_hparams / load_arch_hparams read.
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    if arch == GGUF_QWEN3MOE_ARCH:
        # qwen3moe (src/models/qwen3moe.cpp): build_moe_ffn with softmax gating, top-k, norm_w true (the weights
        # divided by their sum, clamped below at 2^-14: a top-k sum of a softmax over E experts is at least k/E), no
        # shared expert. load_arch_hparams reads expert_feed_forward_length; expert_count / expert_used_count are
        # read for every architecture. No expert_weights_scale is written: 0 means no scaling.
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.intermediate_size)
    elif cfg.use_moe:
        # bailingmoe (src/models/bailingmoe.cpp): build_moe_ffn with LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX, top-k,
        # weights renormalised when expert_weights_norm, times expert_weights_scale; then the shared expert's plain
        # SwiGLU is added (ggml_add, no gate): MiniMind's MoE exactly. MiniMind2 renormalises only when k > 1 (one
        # expert keeps its softmax score); llama.cpp's norm with k = 1 would make that weight 1, so the flag is off
        # there (on where norm_topk_k1 renormalises at k = 1 too: topk_renormalised).
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.intermediate_size)
        w.add_expert_shared_count(max(cfg.n_shared_experts, 1))
        w.add_expert_weights_norm(topk_renormalised(cfg))
        w.add_expert_weights_scale(1.0)
        w.add_leading_dense_block_count(0)
    # Tokenizer: HF byte-level BPE = llama.cpp's "gpt2" model with the "gpt-2" pre-tokenizer (see gguf_vocab).
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(False)  # our prompts carry their specials in the text (the chat template writes them)
    w.add_add_eos_token(False)
    w.add_chat_template(tokenizer.config["chat_template"])
    for key, t in tensors.items():
        keep_f32 = t.dim() == 1 or key.endswith("ffn_gate_inp.weight")
        arr, raw = _gguf_array(t, "f32" if keep_f32 else dtype)
        w.add_tensor(key, arr, raw_dtype=raw)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Import


def _tokenizer_for(folder: Path | None, fallback: str | None = None) -> Tokenizer:
    for cand in (fallback, folder):
        if cand is not None and (Path(cand) / "tokenizer.json").is_file():
            try:
                return Tokenizer.load(cand)
            except TokenizerError as exc:
                print(f"warning: {exc}; using the shipped tokenizer", file=sys.stderr)
                break
    return Tokenizer.load()


def import_pth(
    pth: str | Path,
    out: str | Path,
    num_attention_heads: int | None = None,
    num_experts_per_tok: int | None = None,
    tokenizer: str | None = None,
) -> Path:
    """A MiniMind2 or MiniMind-3 .pth state dict -> our checkpoint folder (fp32)."""
    pth = Path(pth)
    if not pth.is_file():
        raise ExportError(f"{pth} is not a file")
    try:
        raw = torch.load(pth, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types: all mean "not a plain state dict"
        raise ExportError(f"{pth} is not a loadable weights-only state dict ({exc})") from exc
    if not isinstance(raw, dict):
        raise ExportError(f"{pth} holds a {type(raw).__name__}, not a state dict")
    try:
        sd = clean_state_keys(raw)
        cfg = infer_config(sd, num_attention_heads, num_experts_per_tok)
    except StateDictError as exc:
        raise ExportError(f"{pth}: {exc}") from exc
    model = MiniMind(cfg)
    try:
        if sd.keys() == raw.keys():
            load_minimind_pth(model, pth)
        else:  # prefixed keys: the same load, from the cleaned dict
            if TIED_KEY not in sd:
                sd[TIED_KEY] = sd[EMBED_KEY]
            model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{pth} does not match the inferred config: {exc}") from exc
    meta = {"imported_from": str(pth), "format": "minimind-pth"}
    return save_checkpoint(out, model, cfg, tokenizer=_tokenizer_for(None, tokenizer), meta=meta)


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(load_file(str(folder / shard)))
        return sd
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ExportError(f"{folder} has no model.safetensors, sharded safetensors index or pytorch_model.bin")


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, bool, dict[str, Any] | None]:
    """(rope_theta, inference_rope_scaling, yarn params) from a transformers 4.x or 5.x config."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    spec = {**scaling, **params}
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind == "default":
        return float(theta), False, None
    if kind != "yarn":
        raise ExportError(f"rope type {kind!r} is not supported (MiniMind has plain RoPE and YaRN)")
    yarn = {
        "factor": float(spec["factor"]),
        "original_max_position_embeddings": int(spec["original_max_position_embeddings"]),
        "beta_fast": float(spec.get("beta_fast") or 32.0),
        "beta_slow": float(spec.get("beta_slow") or 1.0),
        "attention_factor": float(spec.get("attention_factor") or 1.0),
    }
    if spec.get("attention_factor") is None:
        raise ExportError("YaRN without attention_factor (HF would derive 0.1 ln(factor) + 1; MiniMind uses 1.0)")
    return float(theta), True, yarn


def _from_qwen2_moe(sd: dict[str, torch.Tensor], hf: dict[str, Any]) -> tuple[dict[str, torch.Tensor], int]:
    """Qwen2-MoE names -> ours; returns (state dict, shared experts). The shared expert's gate must be zero (as
    export writes it): MiniMind cannot scale its shared expert by a learned gate."""
    f = hf["moe_intermediate_size"]
    fs = hf.get("shared_expert_intermediate_size", f)
    if fs % f:
        raise ExportError(f"shared_expert_intermediate_size {fs} is not a multiple of moe_intermediate_size {f}")
    n_shared = fs // f
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = re.match(r"^(model\.layers\.\d+\.mlp\.)(.*)$", k)
        if m is None:
            out[k] = v
            continue
        prefix, rest = m.groups()
        if rest == "shared_expert_gate.weight":
            if torch.count_nonzero(v):
                raise ExportError(f"{k} is not zero: MiniMind adds its shared expert without a gate")
        elif rest.startswith("shared_expert."):
            proj = rest.split(".")[1]
            for j in range(n_shared):
                part = v[:, j * f : (j + 1) * f] / 2 if proj == "down_proj" else v[j * f : (j + 1) * f]
                out[f"{prefix}shared_experts.{j}.{proj}.weight"] = part.contiguous()
        elif not _split_fused_experts(out, prefix, rest, v, f):
            out[k] = v
    return out, n_shared


def _split_fused_experts(out: dict[str, torch.Tensor], prefix: str, rest: str, v: torch.Tensor, f: int) -> bool:
    """transformers 5's fused expert tensors (its in-memory Qwen2-MoE / Qwen3-MoE layout, found in a state dict saved
    without save_pretrained's conversion back to per-expert names): experts.gate_up_proj [E, 2F, D] (gate rows first,
    then up) and experts.down_proj [E, D, F] -> our per-expert names in out. False when rest is neither."""
    if rest == "experts.gate_up_proj":
        for e in range(v.shape[0]):
            out[f"{prefix}experts.{e}.gate_proj.weight"] = v[e, :f].contiguous()
            out[f"{prefix}experts.{e}.up_proj.weight"] = v[e, f:].contiguous()
    elif rest == "experts.down_proj":
        for e in range(v.shape[0]):
            out[f"{prefix}experts.{e}.down_proj.weight"] = v[e].contiguous()
    else:
        return False
    return True


def _from_qwen3_moe(sd: dict[str, torch.Tensor], hf: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Qwen3-MoE names -> ours: the same as ours but for transformers 5's fused experts."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = re.match(r"^(model\.layers\.\d+\.mlp\.)(.*)$", k)
        if m is None or not _split_fused_experts(out, m.group(1), m.group(2), v, hf["moe_intermediate_size"]):
            out[k] = v
    return out


# MiniMind-3's MoE fields (its presets carry them also when dense, so `--use_moe 1` gives its MoE variant).
_M3_MOE_FIELDS = ("num_experts_per_tok", "n_routed_experts", "n_shared_experts", "aux_loss_alpha", "seq_aux")
_M3_MOE_FIELDS += ("norm_topk_prob", "norm_topk_k1")
HF_KINDS = ("llama", "qwen2_moe", "qwen3", "qwen3_moe", "minimind")


def config_from_hf(hf: dict[str, Any], sd: dict[str, torch.Tensor]) -> tuple[MiniMindConfig, dict[str, torch.Tensor]]:
    """(our config, state dict under our names) for a Llama / Qwen2-MoE / Qwen3 / Qwen3-MoE / minimind folder's
    config and weights. Qwen3 and Qwen3-MoE become MiniMind-3 models (qk_norm, head_dim their own)."""
    kind = hf.get("model_type")
    if kind == "minimind":
        fields = {k: v for k, v in hf.items() if k in MiniMindConfig.__dataclass_fields__}
        return MiniMindConfig(**fields), sd
    if kind not in HF_KINDS:
        raise ExportError(f"model_type {kind!r} is not supported ({', '.join(HF_KINDS)})")
    qwen3 = kind in ("qwen3", "qwen3_moe")
    if hf.get("hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act {hf['hidden_act']!r}: MiniMind's FFN is SwiGLU (silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias") or any(k.endswith(".bias") for k in sd):
        raise ExportError("the model has bias terms; MiniMind's projections have none")
    if not hf.get("tie_word_embeddings", False) and TIED_KEY not in sd:  # transformers would initialise a new head
        raise ExportError("tie_word_embeddings is false and the folder has no lm_head.weight")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if qwen3:
        # Qwen3Config's head_dim defaults to 128; Qwen3MoeAttention falls back to hidden / heads.
        head_dim = hf.get("head_dim") or (128 if kind == "qwen3" else hidden // heads)
        if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
            raise ExportError("sliding-window attention layers: MiniMind attends to the whole context")
    elif hf.get("head_dim") not in (None, hidden // heads):
        raise ExportError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads = {hidden // heads}")
    theta, yarn_on, yarn = _rope_from_hf(hf)
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6 if qwen3 else 1e-5),
        rope_theta=theta,
        inference_rope_scaling=yarn_on,
    )
    if qwen3:
        fields.update({k: PRESETS["m3"][k] for k in _M3_MOE_FIELDS}, qk_norm=True, head_dim=head_dim)
    if yarn is not None:
        fields["rope_scaling"] = yarn
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(hf.get(name), int):
            fields[name] = hf[name]
    if kind in ("llama", "qwen3"):
        fields["intermediate_size"] = hf["intermediate_size"]
    else:
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise ExportError("every layer must be a MoE layer (mlp_only_layers empty, decoder_sparse_step 1)")
        k, norm = hf["num_experts_per_tok"], bool(hf.get("norm_topk_prob", False))
        if kind == "qwen2_moe":
            sd, n_shared = _from_qwen2_moe(sd, hf)
            # Qwen2-MoE renormalises at every k when norm_topk_prob is set; MiniMind2's rule skips k = 1.
            fields["norm_topk_k1"] = norm and k == 1
        else:
            sd, n_shared = _from_qwen3_moe(sd, hf), 0
            fields.update(aux_loss_alpha=float(hf.get("router_aux_loss_coef", 0.001)), seq_aux=False)
        fields.update(
            use_moe=True,
            intermediate_size=hf["moe_intermediate_size"],
            # transformers 5 saves num_experts as num_local_experts (its attribute_map); 4.x and Qwen's own files
            # say num_experts.
            n_routed_experts=hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"],
            num_experts_per_tok=k,
            n_shared_experts=n_shared,
            norm_topk_prob=norm,
        )
    if TIED_KEY in sd and EMBED_KEY in sd and not torch.equal(sd[TIED_KEY], sd[EMBED_KEY]):
        raise ExportError("lm_head.weight differs from the embedding: MiniMind ties them")
    try:
        return MiniMindConfig(**fields), sd
    except ConfigError as exc:
        raise ExportError(f"config not supported: {exc}") from exc


def load_exported(folder: str | Path, ops=None) -> MiniMind:
    """Our model from an exported folder (any format export writes; fp32)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder} has no config.json")
    hf = json.loads((folder / "config.json").read_text())
    cfg, sd = config_from_hf(hf, _read_hf_weights(folder))
    sd = {k: v.float() for k, v in sd.items()}
    sd.setdefault(TIED_KEY, sd[EMBED_KEY])
    model = MiniMind(cfg, ops=ops)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{folder}: weights do not match config.json: {exc}") from exc
    return model


def import_hf(folder: str | Path, out: str | Path, tokenizer: str | None = None) -> Path:
    """A Hugging Face folder (Llama, Qwen2-MoE, Qwen3, Qwen3-MoE or minimind format) -> our checkpoint folder (fp32)."""
    folder = Path(folder)
    model = load_exported(folder)
    meta = {"imported_from": str(folder), "format": json.loads((folder / "config.json").read_text())["model_type"]}
    return save_checkpoint(out, model, model.config, tokenizer=_tokenizer_for(folder, tokenizer), meta=meta)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("hf", help="checkpoint -> Hugging Face folder")
    e.add_argument("--load", required=True, help="our checkpoint folder")
    e.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    e.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="weights dtype (default: the checkpoint's)")
    e.add_argument("--lora", default=None, help="a LoRA adapter folder to merge into the weights first")
    e.add_argument("--yarn", action="store_true", help="export with YaRN rope scaling on")
    e.add_argument(
        "--moe_format",
        choices=("qwen2_moe", "qwen3_moe", "minimind"),
        default=None,
        help="MoE models: default qwen3_moe for MiniMind-3 (QK-norm), qwen2_moe for MiniMind2",
    )
    g = sub.add_parser("gguf", help="checkpoint -> one GGUF file for llama.cpp / ollama")
    g.add_argument("--load", required=True, help="our checkpoint folder")
    g.add_argument("--out", required=True, help="the .gguf file to write (replaced if it exists)")
    g.add_argument("--dtype", choices=GGUF_DTYPES, default="f16", help="matrix weights (norms and router stay f32)")
    g.add_argument("--lora", default=None, help="a LoRA adapter folder to merge into the weights first")
    i = sub.add_parser("import-pth", help="MiniMind2 .pth state dict -> checkpoint")
    i.add_argument("--pth", required=True)
    i.add_argument("--out", required=True)
    i.add_argument("--num_attention_heads", type=int, default=None, help="MiniMind2: 8; MiniMind-3 reads it off q_norm")
    i.add_argument("--num_experts_per_tok", type=int, default=None, help="top-k of a MoE: MiniMind2 2, MiniMind-3 1")
    i.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the shipped one)")
    h = sub.add_parser("import-hf", help="Hugging Face folder -> checkpoint")
    h.add_argument("--hf", required=True)
    h.add_argument("--out", required=True)
    h.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the HF folder's, else shipped)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.command in ("hf", "gguf"):
            model, _, _ = load_model(args.load)
            if args.lora:
                from minimind_fast import lora

                lora.load_adapter(model, args.lora)
                lora.remove_lora(model, merge=True)
            folder = Path(args.load)
            tok = Tokenizer.load(folder if (folder / "tokenizer.json").is_file() else None)
        if args.command == "hf":
            if args.yarn:
                model.set_yarn(True)
            out = export_hf(model, tok, args.out, DTYPES.get(args.dtype), args.moe_format)
            print(f"exported {args.load} -> {out} ({json.loads((out / 'config.json').read_text())['model_type']})")
        elif args.command == "gguf":
            out = export_gguf(model, tok, args.out, args.dtype, name=folder.name)
            arch = gguf_arch(model.config)
            print(f"exported {args.load} -> {out} (GGUF, llama.cpp architecture {arch}, {args.dtype})")
        elif args.command == "import-pth":
            out = import_pth(args.pth, args.out, args.num_attention_heads, args.num_experts_per_tok, args.tokenizer)
            print(f"imported {args.pth} -> {out}")
        else:
            out = import_hf(args.hf, args.out, args.tokenizer)
            print(f"imported {args.hf} -> {out}")
    except (ValueError, CheckpointError, OSError) as exc:  # ExportError, ConfigError, TokenizerError, AdapterError
        raise SystemExit(f"error: {' '.join(str(exc).split())[:400]}") from None


if __name__ == "__main__":
    main()
