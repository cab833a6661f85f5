"""MiniMindConfig and the presets of the MiniMind2 family.

Field names are MiniMind's own (they map onto Hugging Face Llama configs). Presets:
  tiny   4.5M-parameter dense model for tests and CPU runs (not a MiniMind release)
  small  MiniMind2-small, 25,829,888 parameters
  base   MiniMind2, 104,030,976 parameters
  moe    MiniMind2-MoE, 145,029,760 parameters in total, 91,945,600 active per token
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
    """MiniMind's SwiGLU width rule: 64 * ceil(int(hidden * 8 / 3) / 64) (512 -> 1408, 640 -> 1728, 768 -> 2048)."""
    return 64 * math.ceil(int(hidden_size * 8 / 3) / 64)


@dataclass
class MiniMindConfig:
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    intermediate_size: int | None = None
    vocab_size: int = 6400
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    dropout: float = 0.0
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
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = ffn_width(self.hidden_size)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.num_hidden_layers < 1:
            raise ConfigError(f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads {self.num_key_value_heads} does not divide "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim % 2:
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


def from_preset(name: str, **overrides: Any) -> MiniMindConfig:
    """Build a preset's config, with field overrides (e.g. use_moe=True on 'tiny')."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
    return MiniMindConfig(**{**PRESETS[name], **overrides})
