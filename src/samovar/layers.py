"""The parts a Transformer is assembled from: norms, positions, attention, feed-forward, experts.

Each part is small and named after what it computes; the typed fields of `ModelConfig` pick among
them in the `make_*` functions (`make_norm`, `make_attention`, `make_mlp`). Shapes use B (batch), T (new positions), S (positions
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
from .kv_cache import KVCache
from .runtime import cpu_vectors_are_avx2


# ---- linear maps -----------------------------------------------------------------------------------
class Linear(nn.Linear):
    """nn.Linear, whose inference on the CPU runs through oneDNN's matrix product.

    The same parameters and result; only the kernel differs. PyTorch's F.linear calls MKL, which on
    our 2-core AMD EPYC multiplies one row (a decoding step) on one core at 16-25 GB/s; oneDNN streams
    the weights from both at 40 GB/s (1.7-2.2x tokens/s decoding, RESULTS.md). Training (gradients)
    and other devices keep F.linear. In a compiled step, one row times a weight of at most 2,048 rows
    and columns is left to inductor's own kernel (decompose_mm_pass), and on an AVX2 CPU one float32
    row times any weight; the head and batches of rows take oneDNN. Eager, on an AVX2 CPU, one
    float32 row takes `one_row_product`: oneDNN's one-row product streams at half memory's speed there.
    """

    packed: torch.Tensor | None = None  # the weight in oneDNN's blocked layout, when pack() made it

    def forward(self, x):
        # one float32 row on an AVX2 CPU (in bf16 these were slower than F.linear: RESULTS.md)
        one_row = _AVX2 and x.is_cpu and x.dtype == torch.float32 and x.shape[:-1].numel() == 1
        if one_row and torch.compiler.is_compiling():
            # inductor's kernel over the weight's rows, for a weight of any size (on our AVX2 EPYC it
            # reads the head faster than oneDNN)
            y = (x.unsqueeze(-2) * self.weight).sum(-1)
            return y if self.bias is None else y + self.bias
        if one_row and self.packed is None:  # (a packed weight keeps oneDNN: a row's result the same in any batch)
            return one_row_product(x, self.weight, self.bias)
        if not _onednn_suits(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        weight = self.weight if self.packed is None else self.packed
        if torch.compiler.is_compiling():  # an opaque call in the graph (inductor's lowering wants frozen weights)
            return onednn_linear(x, weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")

    def pack(self) -> int:
        """Keep a copy of the weight in oneDNN's blocked layout for inference, beside the weight (which
        one-row compiled steps, training and saving still read); returns its bytes. Batches of rows
        multiply with it 1.4-2x faster on our EPYC (a step of 2-16 rows), one row as fast, and a
        row's result no longer depends on how many rows are in the batch. Call it once the weights
        are final: a later change to the weight is not seen by the copy."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 16)  # laid out for ~16 rows
        return self.weight.numel() * self.weight.element_size()


_AVX2 = cpu_vectors_are_avx2()
# oneDNN multiplies bf16 only where the CPU has bf16 instructions (avx512_bf16, AMX); on an AVX2-only
# CPU it has no bf16 product at all, and F.linear's bf16 runs there
_ONEDNN_DTYPES = (() if not torch.backends.mkldnn.is_available() else
                  (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else
                  (torch.float32,))


def one_row_product(x, weight, bias=None):
    """x W^T + b for one row x (..., C) and a weight (N, C), as a batch of products, one per thread: the
    weight's rows in `threads` runs, the last one overlapping the one before it when the threads do
    not divide N. MKL's batched product (SGEMM_BATCH) gives each run a core of its own; on our AVX2
    EPYC it streams the weight from memory at 40-48 GB/s, where oneDNN's one-row product reaches
    13-30 and MKL's plain one (F.linear) 10, one core's (RESULTS.md). (x goes in as a C x 1 column
    whose leading dimension is C, which MKL reads as a transposed row; with a leading dimension of
    1 the same call took 6x as long.)"""
    N, C = weight.shape
    runs = min(torch.get_num_threads(), N)
    step = N // runs
    h = N - (runs - 1) * step  # the last run's rows: step, or up to runs - 1 more
    rows = weight.unfold(0, h, step).transpose(1, 2)  # (runs, h, C): rows [i * step, i * step + h)
    y = torch.bmm(rows, x.reshape(1, C).t().expand(runs, C, 1))  # (runs, h, 1)
    if h > step:  # the last run's first rows are the run before's last: keep them once
        y = torch.cat([y[:-1, :step].flatten(), y[-1].flatten()])
    y = y.view(*x.shape[:-1], N)
    return y if bias is None else y + bias


def _onednn_suits(x, weight) -> bool:
    if not (x.is_cpu and x.dtype in _ONEDNN_DTYPES and weight.dtype == x.dtype):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if torch.compiler.is_compiling() and max(weight.shape) <= 2048 and x.shape[:-1].numel() == 1:
        return False  # one row: inductor's decompose_mm_pass writes its own kernel for these
    return True


def pack_linears(model: nn.Module) -> int:
    """Linear.pack() every Linear that runs through oneDNN (on the CPU, float32, and bfloat16 where the
    CPU has it), for a process that only decodes, many rows at a time (a server); returns the bytes
    the copies take."""
    return sum(m.pack() for m in model.modules() if isinstance(m, Linear) and m.weight.is_cpu
               and m.weight.dtype in _ONEDNN_DTYPES)


@torch.library.custom_op("samovar::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.size(0)))


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
        gain = 1.0 + self.weight.float() if self.unit_offset else self.weight.float()
        # F.rms_norm is x * rsqrt(mean(x^2) + eps) * gain in one fused kernel (and one backward)
        return F.rms_norm(x.float(), gain.shape, gain, self.eps).type_as(x)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = cfg.n_embd if dim is None else dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, cfg.norm_unit_offset)
    return LayerNorm(dim, cfg.norm_eps, cfg.norm_bias)


# ---- rotary positions ------------------------------------------------------------------------------
class Rotary(nn.Module):
    """Rotary position embedding tables (Su et al.), in the "rotate half" layout of HF LLaMA.

    The head is split into two halves [x1, x2]; pair i is (x1[i], x2[i]) and is rotated by the angle
    position * inv_freq[i], inv_freq[i] = theta^(-2i/D). (The original paper pairs neighbours
    (x[2i], x[2i+1]); the two layouts differ only by a permutation of the q and k weights, which
    hf.py applies when it imports a model that uses the other one.)
    """

    def __init__(self, dim: int, max_len: int, theta: float, scaling: dict | None = None):
        super().__init__()
        inv_freq, attention_factor = rope_frequencies(dim, theta, scaling)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, D/2)
        cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor
        self.register_buffer("cos", torch.cat([cos, cos], dim=-1), persistent=False)  # (max_len, D)
        # sin with the sign of the rotation folded in: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
        self.register_buffer("sin", torch.cat([-sin, sin], dim=-1), persistent=False)

    def forward(self, positions):
        """cos and sin (T, D) of the absolute positions (T,); or (B, 1, T, D) of positions (B, T)
        (packed rows, whose documents each start at 0), to broadcast over the heads."""
        if positions.dim() == 2:
            return self.cos[positions][:, None], self.sin[positions][:, None]
        return self.cos[positions], self.sin[positions]


def rope_frequencies(dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """inv_freq (dim/2,) and the factor cos and sin are multiplied by, for plain RoPE and its
    context-extension variants: linear (position interpolation), llama3 (Llama 3.1's piecewise
    rescaling of low frequencies) and yarn (Peng et al. 2023, used by DeepSeek-V3)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["type"], scaling["factor"]
    if kind == "linear":
        return inv_freq / factor, 1.0
    old_len = scaling["original_context_len"]
    if kind == "llama3":
        low_wavelen = old_len / scaling["low_freq_factor"]
        high_wavelen = old_len / scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # long waves: / factor
        smooth = (old_len / wavelen - scaling["low_freq_factor"]) / (
            scaling["high_freq_factor"] - scaling["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)  # in between: interpolate
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn: interpolate low frequencies, keep high ones, ramp between the dims that turn
    # beta_slow and beta_fast times over the original context
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.get("beta_fast") or 32)), 0)
    high = min(math.ceil(correction_dim(scaling.get("beta_slow") or 1)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention_factor)


def softmax_scale(cfg: ModelConfig, head_dim: int) -> float:
    """1/sqrt(head_dim), times yarn's mscale^2 where DeepSeek applies it to the attention logits."""
    scale = head_dim ** -0.5
    s = cfg.rope_scaling
    if s is not None and s["type"] == "yarn" and s.get("mscale_all_dim"):
        m = 0.1 * s["mscale_all_dim"] * math.log(s["factor"]) + 1.0 if s["factor"] > 1 else 1.0
        scale *= m * m
    return scale


def apply_rotary(x, cos, sin):
    """x: (B, heads, T, D); cos, sin: (T, D) from Rotary, whose sin carries the rotation's signs.
    Rolling x by D/2 swaps its halves: [x1, x2] -> [x2, x1]; times [-sin, sin] gives [-x2 sin, x1 sin]."""
    return (x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin).type_as(x)


# ---- attention -------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Causal self-attention with H query heads sharing K key/value heads (MHA: K=H, MQA: K=1)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.sliding_window = cfg.sliding_window
        self.dropout = cfg.dropout
        self.scale = softmax_scale(cfg, cfg.head_dim)
        C, H, K, D = cfg.n_embd, self.n_head, self.n_kv_head, self.head_dim
        self.q_proj = Linear(C, H * D, bias=cfg.attn_bias)
        self.k_proj = Linear(C, K * D, bias=cfg.attn_bias)
        self.v_proj = Linear(C, K * D, bias=cfg.attn_bias)
        self.out_proj = Linear(H * D, C, bias=cfg.attn_out_bias)
        self.q_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else None
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, kv_cache: KVCache | None = None, attn_mask=None):
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
        y = attend(self, q, k, v, kv_cache, attn_mask)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H * D)
        return self.resid_dropout(self.out_proj(y))


def attend(attn: nn.Module, q, k, v, kv_cache: KVCache | None, attn_mask=None):
    """Causal (optionally sliding-window) attention of q (B, H, T, D) over k, v (B, K, T, D) and,
    when a cache is given, every position cached before them; or, given attn_mask (B, 1, T, T), over
    the keys it allows (packed documents: model.document_positions)."""
    T, start = q.size(2), 0
    if kv_cache is not None:
        start = kv_cache.pos  # an int; or (B, 1), a position per row, in a SlotCache
        k, v = kv_cache.update(attn.layer, k, v)  # (B, K, S, D) with S = start + T (the longest row's)
    rows = torch.is_tensor(start) and start.size(0) > 1  # rows at positions of their own: masks always
    mask = attn_mask if attn_mask is not None else \
        causal_mask(T, start, k.size(2), attn.sliding_window, q.device, always=rows)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=attn.scale,
        dropout_p=attn.dropout if attn.training else 0.0, enable_gqa=k.size(1) != q.size(1))


def causal_mask(T: int, start, S: int, window: int | None, device, always: bool = False):
    """A (T, S) boolean mask of the keys each of the T queries at positions start, start + 1, ...
    may see, or (B, 1, T, S) when start (B, 1) gives each row its own; None when plain causal
    attention does (SDPA's fast path) and `always` is false."""
    if not always and (T == 1 or start == 0):  # one new token sees every cached position; no history: is_causal
        if window is None or (T > 1 and window >= S):  # or a window that holds every position (one new token
            return None  # under a window always gets a mask: a compiled step then has no branch on the length)
    q_pos = (torch.arange(T, device=device) + start)[..., None]  # (T, 1), or (B, T, 1)
    k_pos = torch.arange(S, device=device)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed if allowed.dim() == 2 else allowed[:, None]


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, V3): keys and values are expanded from a small
    latent (kv_lora_rank wide) shared by all heads; each query/key head is a part without positions
    (qk_nope_head_dim) joined to a rotated part (qk_rope_head_dim), whose key is shared by all heads.

    The cache holds the expanded per-head keys and values (simple, not the memory-saving latent).
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.sliding_window, self.dropout = cfg.n_head, cfg.sliding_window, cfg.dropout
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.scale = softmax_scale(cfg, self.nope + self.rope)
        C, H, QK = cfg.n_embd, cfg.n_head, self.nope + self.rope
        self.q_low_rank = cfg.q_lora_rank is not None
        if not self.q_low_rank:
            self.q_proj = Linear(C, H * QK, bias=False)
        else:  # queries through their own low-rank bottleneck
            self.q_down = Linear(C, cfg.q_lora_rank, bias=cfg.attn_bias)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.latent_norm_eps)
            self.q_up = Linear(cfg.q_lora_rank, H * QK, bias=False)
        self.kv_down = Linear(C, self.rank + self.rope, bias=cfg.attn_bias)
        self.kv_norm = RMSNorm(self.rank, cfg.latent_norm_eps)
        self.kv_up = Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.out_proj = Linear(H * self.v_dim, C, bias=cfg.attn_out_bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, kv_cache: KVCache | None = None, attn_mask=None):
        B, T, _ = x.shape
        H = self.n_head
        q = self.q_up(self.q_norm(self.q_down(x))) if self.q_low_rank else self.q_proj(x)
        q = q.view(B, T, H, self.nope + self.rope).transpose(1, 2)  # (B, H, T, nope + rope)
        q_nope, q_rot = q.split([self.nope, self.rope], dim=-1)
        latent, k_rot = self.kv_down(x).split([self.rank, self.rope], dim=-1)  # (B, T, rank), (B, T, rope)
        kv = self.kv_up(self.kv_norm(latent)).view(B, T, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (B, H, T, nope), (B, H, T, v_dim)
        k_rot = k_rot.view(B, 1, T, self.rope)  # one rotated key part, shared by every head
        cos, sin = rope
        q = torch.cat([q_nope, apply_rotary(q_rot, cos, sin)], dim=-1)
        k = torch.cat([k_nope, apply_rotary(k_rot, cos, sin).expand(B, H, T, self.rope)], dim=-1)
        y = attend(self, q, k, v, kv_cache, attn_mask)  # (B, H, T, v_dim)
        y = y.transpose(1, 2).reshape(B, T, H * self.v_dim)
        return self.resid_dropout(self.out_proj(y))


def make_attention(cfg: ModelConfig, layer: int) -> nn.Module:
    return LatentAttention(cfg, layer) if cfg.attention == "mla" else Attention(cfg, layer)


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

    def __init__(self, cfg: ModelConfig, d_ff: int):
        super().__init__()
        self.up_proj = Linear(cfg.n_embd, d_ff, bias=cfg.mlp_bias)
        self.down_proj = Linear(d_ff, cfg.n_embd, bias=cfg.mlp_bias)
        self.act = _activation(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(self.act(self.up_proj(x))))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (act = SiLU) and GeGLU (act = GELU), Shazeer 2020."""

    def __init__(self, cfg: ModelConfig, d_ff: int):
        super().__init__()
        self.gate_proj = Linear(cfg.n_embd, d_ff, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.n_embd, d_ff, bias=cfg.mlp_bias)
        self.down_proj = Linear(d_ff, cfg.n_embd, bias=cfg.mlp_bias)
        self.act = _activation(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))


MLPS = {"gelu": MLP, "relu": MLP, "relu2": MLP, "swiglu": GatedMLP, "geglu": GatedMLP}


# ---- mixture of experts ----------------------------------------------------------------------------
class Router(nn.Module):
    """Picks n_expert_active experts per token and their weights.

    softmax (Mixtral): the top-k of softmax(logits), renormalised to sum to 1.
    sigmoid (DeepSeek-V3): scores = sigmoid(logits); a balancing bias (not a gradient-trained
    parameter) shifts which experts are chosen, within the best n_expert_group_active groups (a group
    is ranked by its two best scores), but the weights are the unbiased scores, optionally
    renormalised, times routed_scale.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_expert, cfg.n_embd))
        self.register_buffer("bias", torch.zeros(cfg.n_expert) if cfg.router == "sigmoid" else None)

    def forward(self, x):  # x: (N, C) -> logits (N, E), weights (N, k), experts (N, k)
        cfg, k = self.cfg, self.cfg.n_expert_active
        logits = F.linear(x.float(), self.weight.float())
        if cfg.router == "softmax":
            weights, experts = logits.softmax(dim=-1).topk(k, dim=-1)
        else:
            scores = logits.sigmoid()
            choice = scores + self.bias
            if cfg.n_expert_group > 1:
                groups = choice.view(len(x), cfg.n_expert_group, -1)  # (N, G, E / G)
                best = groups.topk(2, dim=-1).values.sum(dim=-1).topk(cfg.n_expert_group_active, dim=-1).indices
                keep = torch.zeros_like(groups[..., 0]).scatter_(1, best, 1.0).bool()  # (N, G)
                choice = choice.masked_fill(~keep.repeat_interleave(groups.size(-1), dim=1), float("-inf"))
            experts = choice.topk(k, dim=-1, sorted=False).indices
            weights = scores.gather(1, experts)
        if cfg.router_norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, weights * cfg.routed_scale, experts


class RouterStats:
    """What the routers of one forward pass decided, collected for whoever asks (passed into the
    forward pass as the KV cache is, never kept on a module): each MoE layer's router logits (N, E),
    for the load-balancing loss, and tokens per expert (E,), for the usage statistics."""

    def __init__(self):
        self.router_logits: list[torch.Tensor] = []
        self.expert_load: list[torch.Tensor] = []

    def balance(self) -> float | None:
        """The busiest expert's share of the routing slots over the mean share, averaged over MoE
        layers: 1.0 is perfectly balanced, n_expert means collapse; None without MoE layers."""
        if not self.expert_load:
            return None
        ratios = [(load.max() / load.float().mean()).item() for load in self.expert_load]
        return round(sum(ratios) / len(ratios), 3)


class MoE(nn.Module):
    """Sparse mixture of gated-MLP experts with dropless dispatch: every token goes to its chosen
    experts, whose outputs are summed with the router's weights; shared experts see every token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = nn.ModuleList(GatedMLP(cfg, cfg.expert_d_ff) for _ in range(cfg.n_expert))
        self.shared = GatedMLP(cfg, cfg.expert_d_ff * cfg.n_shared_expert) if cfg.n_shared_expert else None

    def forward(self, x, stats: RouterStats | None = None):
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        logits, weights, chosen = self.router(flat)  # (N, E), (N, k), (N, k)
        if stats is not None:
            stats.router_logits.append(logits)
            stats.expert_load.append(torch.bincount(chosen.flatten(), minlength=len(self.experts)))
        y = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                y.index_add_(0, token, expert(flat[token]) * weights[token, slot, None].to(flat.dtype))
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(B, T, C)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss over all MoE layers, as HF Mixtral computes it:
    E * sum_e(fraction of routing slots given to e * mean router probability of e)."""
    logits = torch.cat(router_logits, dim=0)  # (layers * N, E)
    probs = logits.softmax(dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices
    slots = torch.zeros_like(probs).scatter_(1, chosen, 1.0)  # (rows, E), top_k ones per row
    return probs.size(-1) * (slots.mean(dim=0) * probs.mean(dim=0)).sum()


def make_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
    if cfg.is_moe_layer(layer):
        return MoE(cfg)
    return MLPS[cfg.mlp](cfg, cfg.d_ff)


def init_std_for_residual(cfg: ModelConfig) -> float:
    """GPT-2's scaled init for projections that write into the residual stream: std / sqrt(2 * n_layer)."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layer)
