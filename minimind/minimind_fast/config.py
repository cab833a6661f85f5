"""MiniMindConfig and the presets of the MiniMind2 and MiniMind-3 families.

Field names are MiniMind's own (they map onto Hugging Face Llama / Qwen3 configs). Presets:
  tiny     4.5M-parameter dense model for tests and CPU runs (not a MiniMind release)
  small    MiniMind2-small, 25,829,888 parameters
  base     MiniMind2, 104,030,976 parameters
  moe      MiniMind2-MoE, 145,029,760 parameters in total, 91,945,600 active per token
  m3       MiniMind-3 (Qwen3-style: QK-norm, 4 key/value heads, FFN width ceil(hidden * pi / 64) * 64, eps 1e-6),
           63,912,192 parameters
  m3-moe   MiniMind-3-MoE: m3 with 4 routed experts, top-1, no shared expert, batch-level balance loss 5e-4,
           198,416,640 parameters in total, 63,912,192 active
  m3-tiny  a MiniMind-3-shaped model at tiny's size for tests and CPU runs (--use_moe 1: its MoE form)
The MiniMind-3 presets carry MiniMind-3's MoE fields also when dense, so `--use_moe 1` gives its MoE variant.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A model configuration that cannot be built."""


def ffn_width(hidden_size: int) -> int:
    """MiniMind2's SwiGLU width rule: 64 * ceil(int(hidden * 8 / 3) / 64) (512 -> 1408, 640 -> 1728, 768 -> 2048)."""
    return 64 * math.ceil(int(hidden_size * 8 / 3) / 64)


def ffn_width_m3(hidden_size: int) -> int:
    """MiniMind-3's rule: ceil(hidden * pi / 64) * 64 (768 -> 2432, 256 -> 832)."""
    return math.ceil(hidden_size * math.pi / 64) * 64


@dataclass
class MiniMindConfig:
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    # None = hidden_size / num_attention_heads (MiniMind2 always; MiniMind-3 makes it a field of its own).
    head_dim: int | None = None
    intermediate_size: int | None = None
    vocab_size: int = 6400
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    dropout: float = 0.0
    # MiniMind-3 / Qwen3: a learned RMSNorm over head_dim on every query and key head, before RoPE
    # (self_attn.q_norm.weight, self_attn.k_norm.weight).
    qk_norm: bool = False
    inference_rope_scaling: bool = False
    # YaRN parameters used when inference_rope_scaling is on (MiniMind2's values).
    rope_scaling: dict[str, Any] = field(
        default_factory=lambda: {
            "factor": 16.0,
            "original_max_position_embeddings": 2048,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "attention_factor": 1.0,
        }
    )
    use_moe: bool = False
    num_experts_per_tok: int = 2
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.01
    seq_aux: bool = True
    norm_topk_prob: bool = True
    # Renormalise also at num_experts_per_tok = 1, where the one weight becomes 1 (MiniMind-3, Qwen3-MoE); MiniMind2
    # renormalises only for top-k > 1 and keeps the router's score as the weight.
    norm_topk_k1: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = ffn_width(self.hidden_size)
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    def validate(self) -> None:
        if self.num_hidden_layers < 1:
            raise ConfigError(f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        if self.num_attention_heads < 1:
            raise ConfigError(f"num_attention_heads must be >= 1, got {self.num_attention_heads}")
        if self.hidden_size % self.num_attention_heads and not self.qk_norm:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim * self.num_attention_heads != self.hidden_size and not self.qk_norm:
            # MiniMind2 (and Llama exports) derive head_dim from the hidden size; MiniMind-3 may set its own.
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not num_attention_heads {self.num_attention_heads} x head_dim "
                f"{self.head_dim} (a head_dim of its own needs qk_norm, as in MiniMind-3)"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads {self.num_key_value_heads} does not divide "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim < 2 or self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ConfigError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in [1, n_routed_experts "
                f"{self.n_routed_experts}]"
            )
        if self.scoring_func != "softmax":
            raise ConfigError(f"scoring_func {self.scoring_func!r} is not supported (only 'softmax')")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MiniMindConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**d)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2),
    "base": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2),
    "moe": dict(
        hidden_size=640,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        use_moe=True,
        num_experts_per_tok=2,
        n_routed_experts=4,
        n_shared_experts=1,
    ),
}

# MiniMind-3 (its model_minimind.py at the 2026-04 release): everything but the sizes is shared by the family.
_M3 = dict(
    num_attention_heads=8,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    qk_norm=True,
    num_experts_per_tok=1,
    n_routed_experts=4,
    n_shared_experts=0,
    aux_loss_alpha=5e-4,
    seq_aux=False,
    norm_topk_prob=True,
    norm_topk_k1=True,
)
PRESETS["m3"] = dict(_M3, hidden_size=768, num_hidden_layers=8)
PRESETS["m3-moe"] = dict(_M3, hidden_size=768, num_hidden_layers=8, use_moe=True)
PRESETS["m3-tiny"] = dict(_M3, hidden_size=256, num_hidden_layers=4)
M3_PRESETS = ("m3", "m3-moe", "m3-tiny")


def from_preset(name: str, **overrides: Any) -> MiniMindConfig:
    """Build a preset's config, with field overrides (e.g. use_moe=True on 'tiny'). A MiniMind-3 preset's FFN width
    follows its own rule from the (possibly overridden) hidden size unless intermediate_size is given."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
    fields = {**PRESETS[name], **overrides}
    if name in M3_PRESETS and fields.get("intermediate_size") is None:
        fields["intermediate_size"] = ffn_width_m3(fields["hidden_size"])
    return MiniMindConfig(**fields)
