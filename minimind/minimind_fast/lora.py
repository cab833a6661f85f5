"""LoRA adapters for MiniMind: low-rank updates wrapped around nn.Linear layers in place.

    from minimind_fast import lora
    names = lora.apply_lora(model, rank=16)          # q_proj and o_proj of every layer (MiniMind's "square" rule)
    ...train: only the adapter parameters require grad...
    lora.save_adapter("out/lora_identity", model)    # adapter.safetensors + adapter_config.json (+ manifest.json)
    lora.load_adapter(base_model, "out/lora_identity")   # wraps the same layers and loads the weights
    lora.merge_lora(model); lora.unmerge_lora(model)     # fold B @ A * scale into W and back

The update (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3 and sec. 4.1):

    y = W x + (alpha / r) * B A x,     A [r, in] ~ N(0, 0.02),  B [out, r] = 0

so a freshly wrapped model computes exactly what the base model computed. MiniMind's defaults: rank 16, adapters on
the square Linear layers (in_features == out_features: q_proj and o_proj with these head layouts), and no alpha
scaling, i.e. alpha defaults to the rank (scale 1.0) and merging is W + B @ A. Hu et al. draw A from a Kaiming-uniform
distribution; MiniMind's N(0, 0.02) is kept here.

A wrapped layer keeps the base Linear's own `weight` (and `bias`) Parameter under the same attribute name, so the
model's forward is untouched and the state_dict names of the base weights do not change; the adapter adds
`<layer>.lora_A` and `<layer>.lora_B` next to them. Layers whose weight the model reads directly instead of calling
the module (the tied lm_head, a MoE router's `mlp.gate`) cannot take an adapter and are refused.

An adapter folder is self-describing: adapter_config.json records rank, alpha, the wrapped layer names, and a
fingerprint of the base architecture; loading it onto a model of another architecture, or a file whose tensors do not
match the layers, is an AdapterError that says what differs. Folders are written atomically (temporary sibling folder,
then rename) and carry the same manifest.json as model checkpoints, so minimind_fast.checkpoint.verify_checkpoint checks
them too. An optional train_state.pt makes an adapter folder a resumable training checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minimind_fast import checkpoint as ckpt
from minimind_fast.config import MiniMindConfig

ADAPTER_FILE, ADAPTER_CONFIG_FILE, STATE_FILE, MANIFEST_FILE = (
    "adapter.safetensors",
    "adapter_config.json",
    "train_state.pt",
    "manifest.json",
)
DEFAULT_RANK = 16
DEFAULT_INIT_STD = 0.02
# Modules whose weight MiniMind reads as a tensor instead of calling the module: an adapter there would do nothing.
WEIGHT_ONLY_SUFFIXES = ("lm_head", "mlp.gate")
# The architecture fields that decide which layers exist and their shapes.
ARCH_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "use_moe",
    "n_routed_experts",
    "n_shared_experts",
)


class AdapterError(ValueError):
    """An adapter that cannot be applied: wrong base architecture, mismatching tensors, unknown targets, bad folder."""


class LoRALinear(nn.Module):
    """y = x W^T (+ bias) + scale * (x A^T) B^T, with scale = alpha / rank. Wraps (and shares the Parameters of) an
    nn.Linear, so `weight` keeps its name and identity. After merge() the forward is the plain linear again."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, init_std: float = DEFAULT_INIT_STD):
        super().__init__()
        if rank < 1:
            raise AdapterError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dt).normal_(0.0, init_std))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, [out, in], computed in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        # Two thin matmuls (x A^T, then B) instead of forming B @ A: r << in, out.
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha:g}, merged={self.merged}"
        )


@dataclass
class AdapterConfig:
    rank: int
    alpha: float
    targets: list[str]  # full module names of the wrapped layers
    base_fingerprint: str
    base_arch: dict[str, Any]
    init_std: float = DEFAULT_INIT_STD
    base_checkpoint: str = ""  # where the adapter was trained from (informative only)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def arch_of(config: MiniMindConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in ARCH_FIELDS}


def config_fingerprint(config: MiniMindConfig) -> str:
    """sha256 (first 16 hex digits) of the architecture fields: equal for models whose layers have the same shapes."""
    return hashlib.sha256(json.dumps(arch_of(config), sort_keys=True).encode()).hexdigest()[:16]


def _is_weight_only(name: str) -> bool:
    return any(name == s or name.endswith("." + s) for s in WEIGHT_ONLY_SUFFIXES)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def parse_targets(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'square' (default), 'all-linear', or a comma-separated list of module-name suffixes such as 'q_proj,v_proj'."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise AdapterError("no LoRA targets given (use 'square', 'all-linear' or names such as 'q_proj,o_proj')")
    return items


def select_targets(model: nn.Module, spec: str | list[str] | tuple[str, ...] = "square") -> list[str]:
    """Full names of the nn.Linear modules the spec selects, in model order.

    'square': every Linear with in_features == out_features (MiniMind's rule); 'all-linear': every Linear the forward
    calls; otherwise each comma-separated item matches module names equal to it or ending in '.<item>'. An item that
    matches nothing, or names a layer that cannot take an adapter, is an error."""
    items = parse_targets(spec)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)]
    chosen: list[str] = []
    for item in items:
        if item == "square":
            hits = [n for n, m in linears if m.in_features == m.out_features and not _is_weight_only(n)]
        elif item == "all-linear":
            hits = [n for n, _ in linears if not _is_weight_only(n)]
        else:
            hits = [n for n, _ in linears if _matches(n, item)]
            bad = [n for n in hits if _is_weight_only(n)]
            if bad:
                raise AdapterError(
                    f"LoRA target {item!r} selects {bad[0]}, whose weight the model reads directly (tied head or MoE "
                    "router), so an adapter there would never be applied"
                )
            if not hits:
                names = sorted({n.rsplit(".", 1)[-1] for n, _ in linears if not _is_weight_only(n)})
                raise AdapterError(f"LoRA target {item!r} matches no Linear layer; layer names: {', '.join(names)}")
        chosen += [n for n in hits if n not in chosen]
    if not chosen:
        raise AdapterError(f"LoRA targets {spec!r} select no layer of this model")
    order = {n: i for i, (n, _) in enumerate(linears)}
    return sorted(chosen, key=order.__getitem__)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(
    model: nn.Module,
    rank: int = DEFAULT_RANK,
    alpha: float | None = None,
    targets: str | list[str] | tuple[str, ...] = "square",
    init_std: float = DEFAULT_INIT_STD,
    freeze_base: bool = True,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Wrap the selected Linear layers in place (alpha None = rank: scale 1, MiniMind's choice) and, with
    freeze_base, leave only the adapter parameters trainable. Returns the wrapped names. A model that already
    carries adapters is refused (one adapter at a time)."""
    if lora_layers(model):
        raise AdapterError("this model already has LoRA adapters; merge or remove them first")
    if alpha is None:
        alpha = float(rank)
    if not (math.isfinite(alpha) and alpha > 0):
        raise AdapterError(f"LoRA alpha must be a positive number, got {alpha}")
    names = select_targets(model, targets)
    for name in names:
        base = model.get_submodule(name)
        layer = LoRALinear(base, rank, alpha, init_std)
        if generator is not None:
            with torch.no_grad():
                a = torch.empty(layer.lora_A.shape, dtype=torch.float32).normal_(0.0, init_std, generator=generator)
                layer.lora_A.copy_(a)
        _set_module(model, name, layer)
    if freeze_base:
        mark_only_lora_trainable(model)
    return names


def mark_only_lora_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".lora_A", ".lora_B")))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, as contiguous CPU tensors: {'<layer>.lora_A': [r, in], '<layer>.lora_B': [out, r]}."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A"] = layer.lora_A.detach().to("cpu").contiguous()
        out[f"{name}.lora_B"] = layer.lora_B.detach().to("cpu").contiguous()
    return out


def adapter_config_of(model: nn.Module, base_checkpoint: str = "") -> AdapterConfig:
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA adapters")
    first = next(iter(layers.values()))
    config = model.config
    return AdapterConfig(
        rank=first.rank,
        alpha=first.alpha,
        targets=list(layers),
        base_fingerprint=config_fingerprint(config),
        base_arch=arch_of(config),
        base_checkpoint=base_checkpoint,
    )


def merge_lora(model: nn.Module) -> None:
    """W <- W + scale * B @ A in every adapted layer; the forward then skips the adapter path (inference speed)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """W <- W - scale * B @ A: the base weights back (up to one fp32 rounding per element)."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> None:
    """Replace every LoRALinear by a plain nn.Linear over the same weight: merged (merge=True, e.g. for export) or
    the base weights alone (merge=False)."""
    for name, layer in lora_layers(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = layer.weight
        if layer.bias is not None:
            plain.bias = layer.bias
        _set_module(model, name, plain)


# ------------------------------------------------------------------------------------------------- adapter folders
def save_adapter(
    folder: str | Path,
    model: nn.Module,
    base_checkpoint: str = "",
    args: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write an adapter folder atomically: adapter.safetensors, adapter_config.json (adapter config + run args +
    meta), optional train_state.pt, and manifest.json (size and sha256 of every file) last. Replaces any previous
    folder at that path. Only A and B are written, so saving a merged model saves the same adapter."""
    folder = Path(folder)
    cfg = adapter_config_of(model, base_checkpoint)
    tensors = lora_state_dict(model)
    # The same temporary-folder, manifest and publish steps as model checkpoints: every kill point leaves a complete
    # folder (or one the next save recovers), and a dead writer's leftovers are cleaned.
    tmp, tag = ckpt.new_temp_folder(folder)
    try:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt", "rank": str(cfg.rank)})
        payload = {"adapter": asdict(cfg), "args": args or {}, "meta": meta or {}}
        (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        ckpt.write_manifest(tmp)
        ckpt.publish(tmp, folder, tag)
    except BaseException:
        ckpt.discard(tmp, tag)
        raise
    return folder


def read_adapter_config(folder: str | Path) -> tuple[AdapterConfig, dict[str, Any]]:
    """(AdapterConfig, whole adapter_config.json payload) of an adapter folder."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG_FILE
    if not folder.is_dir():
        raise AdapterError(f"adapter {folder} does not exist (expected a folder with {ADAPTER_FILE})")
    if not path.is_file():
        hint = " (it looks like a model checkpoint, not an adapter)" if (folder / "model.safetensors").exists() else ""
        raise AdapterError(f"adapter {folder} has no {ADAPTER_CONFIG_FILE}{hint}")
    try:
        payload = json.loads(path.read_text())
        cfg = AdapterConfig(**payload["adapter"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AdapterError(f"{path}: not a valid adapter config ({exc})") from exc
    return cfg, payload


def load_adapter(model: nn.Module, folder: str | Path, trainable: bool = False) -> AdapterConfig:
    """Put the adapter saved in folder onto model: checks the base architecture, wraps the recorded layers (or reuses
    adapters already there when they have the same layers and rank) and loads A and B. trainable=False freezes
    everything (inference); True leaves only the adapter trainable (to continue training it)."""
    folder = Path(folder)
    cfg, _ = read_adapter_config(folder)
    want = config_fingerprint(model.config)
    if cfg.base_fingerprint != want:
        here = arch_of(model.config)
        diff = [f"{k} {cfg.base_arch.get(k)!r} vs {here[k]!r}" for k in ARCH_FIELDS if cfg.base_arch.get(k) != here[k]]
        raise AdapterError(
            f"adapter {folder} was trained on a different base architecture (adapter vs this model: "
            f"{'; '.join(diff) or 'fingerprint ' + cfg.base_fingerprint + ' vs ' + want})"
        )
    file = folder / ADAPTER_FILE
    if not file.is_file():
        raise AdapterError(f"adapter {folder} has no {ADAPTER_FILE}")
    tensors = load_file(str(file))
    existing = lora_layers(model)
    if existing:
        if sorted(existing) != sorted(cfg.targets) or any(m.rank != cfg.rank for m in existing.values()):
            raise AdapterError(f"the model already has different LoRA adapters than {folder}")
        for m in existing.values():
            m.unmerge()
            m.alpha, m.scale = float(cfg.alpha), cfg.alpha / cfg.rank
    else:
        missing = []
        for name in cfg.targets:
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                mod = None
            if not isinstance(mod, nn.Linear):
                missing.append(name)
        if missing:
            raise AdapterError(f"adapter {folder} targets layers this model does not have: {', '.join(missing[:4])}")
        apply_lora(model, cfg.rank, cfg.alpha, cfg.targets, cfg.init_std, freeze_base=True)
    layers = lora_layers(model)
    expected = {f"{n}.{p}" for n in layers for p in ("lora_A", "lora_B")}
    if set(tensors) != expected:
        extra, lacking = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise AdapterError(
            f"{file}: tensors do not match adapter_config.json targets (missing: {lacking[:3]}, unexpected: "
            f"{extra[:3]})"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            for p in ("lora_A", "lora_B"):
                t, dst = tensors[f"{name}.{p}"], getattr(layer, p)
                if t.shape != dst.shape:
                    raise AdapterError(
                        f"{file}: {name}.{p} has shape {tuple(t.shape)}, the layer needs {tuple(dst.shape)}"
                    )
                dst.copy_(t.to(dst.dtype))
    for name, p in model.named_parameters():
        p.requires_grad_(trainable and name.endswith((".lora_A", ".lora_B")))
    return cfg


def num_lora_params(model: nn.Module) -> int:
    return sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_layers(model).values())
