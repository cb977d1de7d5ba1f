"""The parts a Transformer is assembled from: norms, positions, attention, feed-forward, KV cache.

Each part is small and named after what it computes; `ModelConfig` picks among them through the
registries at the bottom (`NORMS`, `MLPS`). Shapes use B (batch), T (new positions), S (positions
attended to), H (query heads), K (key/value heads), D (head size), C (model width).

References: Vaswani et al. 2017 (attention), Zhang & Sennrich 2019 (RMSNorm), Su et al. 2021 (RoPE),
Shazeer 2020 (GLU variants), Ainslie et al. 2023 (grouped-query attention).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


# ---- normalisation ---------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / rms(x) * g, computed in float32. With unit_offset (Gemma) g = 1 + weight, weight starts at 0."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        gain = 1.0 + self.weight.float() if self.unit_offset else self.weight.float()
        return (x32 * gain).type_as(x)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = cfg.n_embd if dim is None else dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, cfg.norm_unit_offset)
    return LayerNorm(dim, cfg.norm_eps, cfg.norm_bias)


# ---- rotary positions ------------------------------------------------------------------------------
class Rotary(nn.Module):
    """Rotary position embedding tables (Su et al.), in the "rotate half" layout of HF LLaMA.

    The head is split into two halves [x1, x2]; pair i is (x1[i], x2[i]) and is rotated by the angle
    position * theta^(-2i/D). (The original paper pairs neighbours (x[2i], x[2i+1]); the two layouts
    differ only by a permutation of the q and k weights.)
    """

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (max_len, D), the same angle for both halves
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start: int, length: int):
        return self.cos[start:start + length], self.sin[start:start + length]


def apply_rotary(x, cos, sin):
    # x: (B, heads, T, D); cos, sin: (T, D)
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated_half * sin).type_as(x)


# ---- KV cache ----------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of every layer, preallocated for `batch_size` sequences of up to `max_len`.

    Passed into `Transformer.forward`, never stored on the model. `pos` is the number of positions
    already written; the model advances it after the last layer of each forward pass.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k, v):
        """Write k, v (B, K, T, D) at positions [pos, pos + T) and return all keys and values so far."""
        T = k.size(2)
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self):
        self.pos = 0


# ---- attention -------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Causal self-attention with H query heads sharing K key/value heads (MHA: K=H, MQA: K=1)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_size
        self.sliding_window = cfg.sliding_window
        self.dropout = cfg.dropout
        C, H, K, D = cfg.n_embd, self.n_head, self.n_kv_head, self.head_dim
        self.q_proj = nn.Linear(C, H * D, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(C, K * D, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(C, K * D, bias=cfg.attn_bias)
        self.out_proj = nn.Linear(H * D, C, bias=cfg.attn_out_bias)
        self.q_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else None
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        start = 0
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(self.layer, k, v)  # (B, K, S, D) with S = start + T
        mask = self._mask(T, start, k.size(2), x.device)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=K != H)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H * D)
        return self.resid_dropout(self.out_proj(y))

    def _mask(self, T: int, start: int, S: int, device):
        """None when plain causal attention does (SDPA's fast path); else a (T, S) boolean mask."""
        window = self.sliding_window
        if start == 0 and (window is None or window >= S):
            return None  # no cache history: is_causal (or nothing at all for T == 1)
        if T == 1 and (window is None or window >= S):
            return None  # one new token sees every cached position
        q_pos = torch.arange(start, start + T, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= q_pos - k_pos < window
        return allowed


# ---- feed-forward ----------------------------------------------------------------------------------
def _activation(cfg: ModelConfig):
    if cfg.mlp in ("gelu", "geglu"):
        return lambda x: F.gelu(x, approximate=cfg.gelu_approx)
    if cfg.mlp == "relu":
        return F.relu
    if cfg.mlp == "relu2":
        return lambda x: F.relu(x).square()
    return F.silu  # swiglu


class MLP(nn.Module):
    """down(act(up(x))): GPT's feed-forward with GELU, ReLU or ReLU^2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ff_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ff_size, cfg.n_embd, bias=cfg.mlp_bias)
        self.act = _activation(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(self.act(self.up_proj(x))))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (act = SiLU) and GeGLU (act = GELU), Shazeer 2020."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ff_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ff_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ff_size, cfg.n_embd, bias=cfg.mlp_bias)
        self.act = _activation(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))


MLPS = {"gelu": MLP, "relu": MLP, "relu2": MLP, "swiglu": GatedMLP, "geglu": GatedMLP}


def make_mlp(cfg: ModelConfig) -> nn.Module:
    return MLPS[cfg.mlp](cfg)


def init_std_for_residual(cfg: ModelConfig) -> float:
    """GPT-2's scaled init for projections that write into the residual stream: std / sqrt(2 * n_layer)."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layer)
