"""The MiniMind model, whole, in one file.

A decoder-only, LLaMA-style transformer: pre-norm blocks of grouped-query attention with rotary embeddings and a
SwiGLU feed-forward (or a DeepSeek-style mixture of experts), RMSNorm, no biases, embeddings tied to the output head.
MiniMind-3 (Qwen3-style) is the same model with two switches of its config: qk_norm (a learned RMSNorm over head_dim
on each query and key head before RoPE, see Attention) and MiniMind-3's MoE form (top-1 without shared experts, the
one weight renormalised to 1, a batch-level balance loss: fields of the config read by MoEFeedForward).

Every numeric op goes through `self.ops` (kernels.resolve(...)): the same module runs the pure-PyTorch reference on a
CPU and the Triton kernels on a GPU, and parameter names never change, so checkpoints move between them. Parameter
names are Hugging Face Llama's (model.layers.{i}.self_attn.q_proj.weight, ...), so a MiniMind2 .pth state dict loads
with strict=True.

Shape legend: B batch, T new tokens, S keys (cache + new), D hidden, H query heads, Hkv key/value heads,
Dh head_dim, E routed experts, K experts per token, F FFN width, N = B*T tokens, V vocab.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import minimind_kernels as kernels
from minimind_fast.config import MiniMindConfig


def rope_frequencies(cfg: MiniMindConfig, yarn: bool | None = None) -> torch.Tensor:
    """Per-pair rotary frequencies f_i = theta^(-2i/Dh), i < Dh/2, optionally YaRN-scaled.

    YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of LLMs", sec. 3.2 "NTK-by-parts"), with
    MiniMind2's constants: inv_dim(b) = Dh * ln(orig / (2 pi b)) / (2 ln theta);
    low = max(floor(inv_dim(beta_fast)), 0); high = min(ceil(inv_dim(beta_slow)), Dh/2 - 1);
    ramp g_i = clamp((i - low) / max(high - low, 1e-3), 0, 1);
    f_i <- f_i * ((1 - g_i) + g_i / factor). Head_dim 64 gives low 5, high 14.
    """
    dh, theta = cfg.head_dim, cfg.rope_theta
    freqs = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    use_yarn = cfg.inference_rope_scaling if yarn is None else yarn
    if use_yarn:
        rs = cfg.rope_scaling
        orig, factor = rs["original_max_position_embeddings"], rs["factor"]

        def inv_dim(b: float) -> float:
            return dh * math.log(orig / (2 * math.pi * b)) / (2 * math.log(theta))

        low = max(math.floor(inv_dim(rs["beta_fast"])), 0)
        high = min(math.ceil(inv_dim(rs["beta_slow"])), dh // 2 - 1)
        ramp = ((torch.arange(dh // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        freqs = freqs * ((1 - ramp) + ramp / factor)
    return freqs


def rope_tables(cfg: MiniMindConfig, yarn: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_position_embeddings, Dh/2] in fp32 (times YaRN's attention factor when on)."""
    freqs = rope_frequencies(cfg, yarn)
    angles = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float64), freqs)
    use_yarn = cfg.inference_rope_scaling if yarn is None else yarn
    scale = cfg.rope_scaling.get("attention_factor", 1.0) if use_yarn else 1.0
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class KVCache:
    """Preallocated key/value cache for generation: [layers, B, Hkv, max_len, Dh], written in place, never grown.

    `length` is the number of positions already filled (shared by the batch; left padding is expressed with an
    attention mask, not with per-row lengths).
    """

    def __init__(self, cfg: MiniMindConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def write(self, layer: int, k_BHkvTD: torch.Tensor, v_BHkvTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k_BHkvTD.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, start:end] = k_BHkvTD.to(self.k.dtype)
        self.v[layer, :, :, start:end] = v_BHkvTD.to(self.v.dtype)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class RowKVCache:
    """Per-row KV cache for continuous batching: [layers, slots, Hkv, width, Dh], written in place, never grown.

    Each row holds its own sequence from column 0, at its own length, so rows can join and leave a running batch.
    Only one-token decode steps use it: before each step the caller names the active rows' write columns with
    set_rows(); the step writes row i's new key/value at column pos[i] and row i attends to columns 0..pos[i]. Rows
    0..n-1 are the active ones (the caller keeps them contiguous with move()). Prompts are filled by copying rows of
    an ordinary KVCache in (load_row): prefill runs as the plain causal forward it is for a request alone.
    """

    def __init__(self, cfg: MiniMindConfig, slots: int, width: int, device=None, dtype=torch.float32):
        shape = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads, width, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slots, self.max_len = slots, width
        self.rows = 0
        self.length = 0  # the widest row's length before this step (what the model's `start` reads)
        self.pos_N: torch.Tensor | None = None
        self.mask = None

    def set_rows(self, positions: list[int]) -> None:
        """The write column of each active row for the next step (= its current length)."""
        n, span = len(positions), max(positions) + 1
        if n > self.slots or span > self.max_len:
            raise ValueError(f"RowKVCache: {n} rows up to column {span - 1} do not fit {self.slots}x{self.max_len}")
        self.rows, self.length = n, span - 1
        self.pos_N = torch.tensor(positions, dtype=torch.long, device=self.k.device)
        self.idx_N = torch.arange(n, device=self.k.device)
        # Rows of equal length need no mask (SDPA's unmasked path, as for a request alone), and their new keys and
        # values go into one column, `length`: a plain strided copy instead of an indexed write (see write()).
        same = min(positions) == span - 1
        cols_S = torch.arange(span, device=self.k.device)
        self.mask = None if same else (cols_S[None, :] <= self.pos_N[:, None])[:, None, None, :]

    def write(self, layer: int, k_BHkvTD: torch.Tensor, v_BHkvTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if k_BHkvTD.shape[0] != self.rows or k_BHkvTD.shape[2] != 1:
            raise ValueError(f"RowKVCache takes one new token for each of its {self.rows} rows")
        n, span = self.rows, self.length + 1
        # (Not under torch.compile: the column would be baked into the graph, one recompile per step.)
        if not torch.compiler.is_compiling() and self.mask is None:
            self.k[layer, :n, :, self.length] = k_BHkvTD[:, :, 0]
            self.v[layer, :n, :, self.length] = v_BHkvTD[:, :, 0]
        else:  # advanced indices split by a slice: the indexed view is [n, Hkv, Dh], row i at column pos[i]
            self.k[layer][self.idx_N, :, self.pos_N] = k_BHkvTD[:, :, 0].to(self.k.dtype)
            self.v[layer][self.idx_N, :, self.pos_N] = v_BHkvTD[:, :, 0].to(self.v.dtype)
        return self.k[layer, :n, :, :span], self.v[layer, :n, :, :span]

    def load_row(self, row: int, cache: KVCache, src_row: int = 0, length: int | None = None) -> None:
        """Copy row src_row of a KVCache (its first `length` positions, default all filled) into row `row`."""
        t = cache.length if length is None else length
        self.k[:, row, :, :t] = cache.k[:, src_row, :, :t]
        self.v[:, row, :, :t] = cache.v[:, src_row, :, :t]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` columns into row dst (to keep the active rows contiguous)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class Attention(nn.Module):
    def __init__(self, cfg: MiniMindConfig, ops: kernels.Ops, layer_idx: int):
        super().__init__()
        self.ops, self.layer_idx = ops, layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.eps = cfg.rms_norm_eps
        if cfg.qk_norm:  # MiniMind-3 / Qwen3: one gain over head_dim for all query heads, one for all key heads
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops)

    def forward(self, x_BTD, cos, sin, attn_mask=None, kv_cache: KVCache | RowKVCache | None = None) -> torch.Tensor:
        b, t, _ = x_BTD.shape
        q_BTHD = self.q_proj(x_BTD).view(b, t, self.n_heads, self.head_dim)
        k_BTHD = self.k_proj(x_BTD).view(b, t, self.n_kv, self.head_dim)
        v_BTHD = self.v_proj(x_BTD).view(b, t, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):  # norm each head, then rotate: one fused op
            qw, kw = self.q_norm.weight, self.k_norm.weight
            q_BTHD, k_BTHD = self.ops.qk_norm_rope(q_BTHD, k_BTHD, qw, kw, self.eps, cos, sin)
        else:
            q_BTHD, k_BTHD = self.ops.rope(q_BTHD, k_BTHD, cos, sin)
        q, k, v = q_BTHD.transpose(1, 2), k_BTHD.transpose(1, 2), v_BTHD.transpose(1, 2)
        is_causal = True
        if kv_cache is not None:
            is_causal = kv_cache.length == 0 and attn_mask is None
            k, v = kv_cache.write(self.layer_idx, k, v)
            if t == 1 and attn_mask is None:
                is_causal = False  # one new query attends to every cached key
            k, v = k.to(q.dtype), v.to(q.dtype)
        o_BHTD = self.ops.attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.resid_dropout(self.o_proj(o_BHTD.transpose(1, 2).reshape(b, t, -1)))


class FeedForward(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: MiniMindConfig, ops: kernels.Ops):
        super().__init__()
        self.ops = ops
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(self.ops.swiglu(self.gate_proj(x), self.up_proj(x))))


class ExpertBank(nn.Module):
    """The routed experts' weights, stacked for grouped GEMMs: gate/up [E, F, D], down [E, D, F].

    In a state dict they appear under MiniMind's per-expert names (experts.{e}.gate_proj.weight, ...), so checkpoints
    interchange with MiniMind2-MoE and with implementations that keep one Linear per expert. Those names are not
    attribute paths: code that maps state-dict keys back to parameters (torch.distributed.checkpoint.state_dict walks
    every key with getattr and shards or gathers a value under its parameter's own name) must run inside
    stacked_expert_names(model) and convert at the file boundary with split_expert_state / stack_expert_state.
    """

    def __init__(self, n_experts: int, hidden: int, ffn: int):
        super().__init__()
        self.n_experts = n_experts
        self.per_expert_names = True
        self.w_gate = nn.Parameter(torch.empty(n_experts, ffn, hidden))
        self.w_up = nn.Parameter(torch.empty(n_experts, ffn, hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, ffn))
        self.register_state_dict_post_hook(ExpertBank._split_state_dict)
        self.register_load_state_dict_pre_hook(ExpertBank._stack_state_dict)

    @staticmethod
    def _split_state_dict(module, state_dict, prefix, local_metadata):
        if module.per_expert_names:
            _split_bank(state_dict, prefix, module.n_experts)

    @staticmethod
    def _stack_state_dict(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        _stack_bank(state_dict, prefix, module.n_experts)


# ExpertBank parameter -> MiniMind's per-expert Linear name.
_BANK_NAMES = (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))
# "<prefix>experts.w_gate" (not shared_experts): a bank's stacked key, as torch.distributed.checkpoint names it.
_STACKED_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?experts\.)(?:w_gate|w_up|w_down)$")
_PER_EXPERT_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?experts\.)(?P<e>\d+)\.(?:gate|up|down)_proj\.weight$")


def _split_bank(state_dict: dict, prefix: str, n_experts: int) -> None:
    """In place: prefix+w_gate [E, ...] -> prefix+{e}.gate_proj.weight for e < E (likewise up, down)."""
    for stacked, name in _BANK_NAMES:
        if prefix + stacked not in state_dict:
            continue
        w = state_dict.pop(prefix + stacked)
        for e in range(n_experts):
            # A state dict without keep_vars holds detached tensors: clone so that no entry pins the whole stack.
            state_dict[f"{prefix}{e}.{name}.weight"] = w[e] if w.requires_grad else w[e].detach().clone()


def _stack_bank(state_dict: dict, prefix: str, n_experts: int) -> None:
    """In place, the inverse of _split_bank, for each projection whose E per-expert keys are all present."""
    for stacked, name in _BANK_NAMES:
        keys = [f"{prefix}{e}.{name}.weight" for e in range(n_experts)]
        if all(k in state_dict for k in keys):
            state_dict[prefix + stacked] = torch.stack([state_dict.pop(k) for k in keys])


def split_expert_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a full state dict taken inside stacked_expert_names, with every bank under MiniMind's per-expert
    names (what model.state_dict() gives): what a checkpoint file stores."""
    out = dict(state_dict)
    for key, value in state_dict.items():
        m = _STACKED_KEY.match(key)
        if m:
            _split_bank(out, m["prefix"], value.shape[0])
    return out


def stack_expert_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a full state dict with per-expert keys stacked back under the banks' parameter names: what
    torch.distributed.checkpoint.state_dict's loaders match against the model's parameters."""
    out = dict(state_dict)
    counts: dict[str, int] = {}
    for key in state_dict:
        m = _PER_EXPERT_KEY.match(key)
        if m:
            counts[m["prefix"]] = max(counts.get(m["prefix"], 0), int(m["e"]) + 1)
    for prefix, n_experts in counts.items():
        _stack_bank(out, prefix, n_experts)
    return out


@contextlib.contextmanager
def stacked_expert_names(model: nn.Module):
    """Within the block, every ExpertBank in model (plain, DDP-, FSDP2- or compile-wrapped) states its parameters
    under their own names (experts.w_gate [E, F, D], ...), so each state-dict key is an attribute path."""
    banks = [m for m in model.modules() if isinstance(m, ExpertBank)]
    for bank in banks:
        bank.per_expert_names = False
    try:
        yield model
    finally:
        for bank in banks:
            bank.per_expert_names = True


class MoEFeedForward(nn.Module):
    """DeepSeek-style MoE: softmax router over E experts, top-K with renormalised weights, plus shared experts.

    The router runs in fp32. The auxiliary balance loss (DeepSeek-V2, Dai et al. 2024, sec. 2.1.2 / eq. 23-25,
    sequence-level as in MiniMind2): for each sequence b, ce[b,e] = count of e among its top-K picks / (T*K/E);
    aux = alpha * mean_b sum_e ce[b,e] * mean_t score[b,t,e]. With seq_aux off, the batch-level variant
    aux = alpha * sum_e (E * frac_e) * mean score_e, frac_e = the share of the N*K picks that went to e (MiniMind-3's
    `coef * E * sum_e load_e * mean_score_e` at its top-1; with no shared experts, n_shared_experts = 0).
    """

    def __init__(self, cfg: MiniMindConfig, ops: kernels.Ops):
        super().__init__()
        self.ops, self.cfg = ops, cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.n_routed_experts, bias=False)
        self.experts = ExpertBank(cfg.n_routed_experts, cfg.hidden_size, cfg.intermediate_size)
        self.shared_experts = nn.ModuleList([FeedForward(cfg, ops) for _ in range(cfg.n_shared_experts)])

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns router scores [N, E] (fp32), top-K weights [N, K] (fp32) and expert ids [N, K]."""
        with torch.autocast(x_ND.device.type, enabled=False):
            scores_NE = F.linear(x_ND.float(), self.gate.weight.float()).softmax(dim=-1)
        topk_w, topk_idx = scores_NE.topk(self.cfg.num_experts_per_tok, dim=-1)
        if self.cfg.norm_topk_prob and (self.cfg.num_experts_per_tok > 1 or self.cfg.norm_topk_k1):
            topk_w = topk_w / (topk_w.sum(dim=-1, keepdim=True) + 1e-20)
        return scores_NE, topk_w, topk_idx

    def aux_loss(self, scores_NE: torch.Tensor, topk_idx: torch.Tensor, b: int, t: int) -> torch.Tensor:
        e, k, alpha = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok, self.cfg.aux_loss_alpha
        if self.cfg.seq_aux:
            counts_BE = torch.zeros(b, e, device=scores_NE.device, dtype=torch.float32)
            counts_BE.scatter_add_(1, topk_idx.view(b, t * k), torch.ones(b, t * k, device=scores_NE.device))
            ce_BE = counts_BE / (t * k / e)
            return alpha * (ce_BE * scores_NE.view(b, t, e).mean(dim=1)).sum(dim=1).mean()
        frac_E = F.one_hot(topk_idx.reshape(-1), e).float().mean(dim=0)
        return alpha * (scores_NE.mean(dim=0) * frac_E * e).sum()

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d)
        scores_NE, topk_w, topk_idx = self.route(x_ND)
        dt = compute_dtype(x_ND)
        bank = self.experts
        y_ND = self.ops.moe_experts(
            x_ND.to(dt), topk_idx, topk_w.to(dt), bank.w_gate.to(dt), bank.w_up.to(dt), bank.w_down.to(dt)
        )
        y_BTD = y_ND.view(b, t, d)
        for shared in self.shared_experts:
            y_BTD = y_BTD + shared(x_BTD)
        aux = None
        if self.training and self.cfg.aux_loss_alpha > 0:
            aux = self.aux_loss(scores_NE, topk_idx, b, t)
        return y_BTD, aux


class Block(nn.Module):
    """One pre-norm block: MiniMind's `h = x + attn(norm1(x)); out = h + ffn(norm2(h))`, written around fused
    add+norm ops. The block receives the residual x and the previous block's FFN output f_prev that has not been
    added yet, and returns its own residual h and FFN output f, so every residual add is fused with the norm that
    follows it:

        x, n1 = add_rmsnorm(x, f_prev)      (plain rmsnorm in the first block, where nothing is pending)
        h, n2 = add_rmsnorm(x, attn(n1))
        return h, ffn(n2)                   (the next block, or the final norm, adds it)

    Each block touches only its own parameters, so FSDP can shard blocks one by one.
    """

    def __init__(self, cfg: MiniMindConfig, ops: kernels.Ops, layer_idx: int):
        super().__init__()
        self.ops, self.eps = ops, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, ops, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MoEFeedForward(cfg, ops) if cfg.use_moe else FeedForward(cfg, ops)

    def forward(self, x, f_prev, cos, sin, attn_mask=None, kv_cache=None):
        if f_prev is None:
            n1 = self.ops.rmsnorm(x, self.input_layernorm.weight, self.eps)
        else:
            x, n1 = self.ops.add_rmsnorm(x, f_prev, self.input_layernorm.weight, self.eps)
        a = self.self_attn(n1, cos, sin, attn_mask=attn_mask, kv_cache=kv_cache)
        h, n2 = self.ops.add_rmsnorm(x, a, self.post_attention_layernorm.weight, self.eps)
        f, aux = self.mlp(n2) if isinstance(self.mlp, MoEFeedForward) else (self.mlp(n2), None)
        return h, f, aux


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: kernels.Ops):
        super().__init__()
        self.ops, self.eps = ops, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.ops.rmsnorm(x, self.weight, self.eps)


class MiniMindModel(nn.Module):
    def __init__(self, cfg: MiniMindConfig, ops: kernels.Ops):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([Block(cfg, ops, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)


@dataclass
class CausalLMOutput:
    """loss: scalar (reduction mean/sum) or [B, T] per-token loss aligned with the labels (column t is
    -log p(labels[t] | tokens < t); column 0 is 0). aux_loss: summed MoE balance loss (None for dense or eval).
    logits: [B, T, V] (or [B, 1, V] with last_only), only when asked for. hidden: final-norm hidden states [B, T, D]
    with return_hidden=True."""

    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


class MiniMind(nn.Module):
    """MiniMind for causal LM: `MiniMind(cfg, ops=kernels.resolve("torch"))`."""

    def __init__(self, cfg: MiniMindConfig, ops: kernels.Ops | None = None):
        super().__init__()
        self.config = cfg
        self.ops = ops if ops is not None else kernels.resolve("torch")
        self.model = MiniMindModel(cfg, self.ops)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """N(0, 0.02) for every matrix, with the residual-output projections scaled by 1/sqrt(2 * layers)
        (GPT-2, Radford et al. 2019, sec. 2.3); norms at 1. MiniMind keeps PyTorch's default init; this one keeps the
        tied head's initial logits small, so the first loss is near ln(vocab)."""
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def set_yarn(self, enabled: bool) -> None:
        """Switch YaRN rotary scaling on or off (inference only): rebuilds the cos/sin tables."""
        self.config.inference_rope_scaling = enabled
        cos, sin = rope_tables(self.config)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    def num_params(self) -> int:
        """Parameters counted once (the tied head is the embedding)."""
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters used per token: routed experts count K of E."""
        total = self.num_params()
        cfg = self.config
        if cfg.use_moe:
            per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
            total -= cfg.num_hidden_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
        return total

    def _attn_mask(self, attention_mask, b, t, s, start, device):
        """Bool mask [B, 1, T, S]: causal over absolute positions, keys masked where attention_mask is 0; every query
        may see itself so that left-padding rows never softmax over nothing (which would give NaN)."""
        q_pos = torch.arange(start, start + t, device=device)[:, None]
        k_pos = torch.arange(s, device=device)[None, :]
        mask = (k_pos <= q_pos)[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :s].bool()
        return mask | (k_pos == q_pos)[None, None]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | RowKVCache | None = None,
        loss_reduction: str = "mean",
        token_weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        return_logits: bool | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> CausalLMOutput:
        """input_ids [B, T]. With labels [B, T] (not pre-shifted: position t predicts labels[t+1]) returns the loss
        through ops.linear_cross_entropy without materialising logits, unless return_logits=True. Without labels,
        returns logits. attention_mask [B, S] (1 real, 0 pad) covers cache + new tokens; position_ids [B, T]
        default to cache.length + arange(T). token_weight [B, T] weighs each label's loss. return_hidden=True also
        returns the final-norm hidden states [B, T, D] (what lm_head sees), e.g. for chunked distillation."""
        b, t = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            cos = self.rope_cos[start : start + t]
            sin = self.rope_sin[start : start + t]
        else:
            cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        attn_mask = None
        if isinstance(kv_cache, RowKVCache):
            if position_ids is None:
                raise ValueError("a RowKVCache step needs position_ids (each row's own position)")
            attn_mask = kv_cache.mask  # each row sees its own columns only (None when all rows are equally long)
        elif attention_mask is not None or (kv_cache is not None and start > 0 and t > 1):
            attn_mask = self._attn_mask(attention_mask, b, t, start + t, start, input_ids.device)

        inner = self.model
        x = inner.dropout(inner.embed_tokens(input_ids))
        f, aux_total = None, None
        for layer in inner.layers:
            x, f, aux = layer(x, f, cos, sin, attn_mask=attn_mask, kv_cache=kv_cache)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        _, hidden_BTD = self.ops.add_rmsnorm(x, f, inner.norm.weight, self.config.rms_norm_eps)
        if kv_cache is not None:
            kv_cache.length += t

        out = CausalLMOutput(aux_loss=aux_total, hidden=hidden_BTD if return_hidden else None)
        want_logits = labels is None if return_logits is None else return_logits
        if want_logits:
            h = hidden_BTD[:, -1:] if last_only else hidden_BTD
            out.logits = F.linear(h, self.lm_head.weight)
        if labels is not None:
            out.loss = self._loss(hidden_BTD, labels, loss_reduction, token_weight, ignore_index)
            if aux_total is not None:
                # A batch without one labelled target trains nothing, the routers' balance included: a step made of
                # such batches then has a zero gradient, which the SFT-type stages skip. A tensor factor, no sync.
                out.aux_loss = aux_total * (labels[:, 1:] != ignore_index).any()
        return out

    def _loss(self, hidden_BTD, labels_BT, reduction, token_weight_BT, ignore_index):
        b, t, d = hidden_BTD.shape
        # Shift the targets, not the hidden states: row t is scored against labels[t+1]; the last row is ignored.
        target_BT = F.pad(labels_BT[:, 1:], (0, 1), value=ignore_index)
        weight_N = None
        if token_weight_BT is not None:
            weight_N = F.pad(token_weight_BT[:, 1:], (0, 1), value=0.0).reshape(-1)
        dt = compute_dtype(hidden_BTD)
        loss = self.ops.linear_cross_entropy(
            hidden_BTD.reshape(b * t, d).to(dt),
            self.lm_head.weight.to(dt),
            target_BT.reshape(-1),
            ignore_index,
            weight_N,
            reduction,
        )
        if reduction == "none":
            # Re-align so that column t holds the loss of labels[t] (column 0: nothing predicts it).
            loss = F.pad(loss.view(b, t)[:, :-1], (1, 0), value=0.0)
        return loss
