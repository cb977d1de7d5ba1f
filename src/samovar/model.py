"""The Transformer: a decoder-only language model assembled from the parts in layers.py.

    idx (B, T) -> token embedding [+ learned positions] -> n_layer x Block -> [final norm] -> lm_head

Every family (GPT-1, GPT-2, LLaMA, ...) is this class with another ModelConfig. A Block is either
pre-norm, x + f(norm(x)) (GPT-2 and everything after it), or post-norm, norm(x + f(x)) (GPT-1).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import ModelConfig
from .kv_cache import KVCache
from .layers import (MLP, Attention, GatedMLP, LatentAttention, LayerNorm, Linear, MoE, RMSNorm, Rotary, Router,
                     RouterStats, init_std_for_residual, load_balancing_loss, make_attention, make_mlp, make_norm)
from .loss import head_cross_entropy
from .lstm import Seq2SeqLSTM


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.pre_norm = cfg.norm_placement == "pre"
        self.attn_norm = make_norm(cfg)
        self.attn = make_attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = make_mlp(cfg, layer)  # an MLP, or a mixture of experts
        self.routed = isinstance(self.mlp, MoE)

    def forward(self, x, rope=None, kv_cache=None, router_stats=None, attn_mask=None):
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), rope, kv_cache, attn_mask)
            x = x + self.feed_forward(self.mlp_norm(x), router_stats)
        else:
            x = self.attn_norm(x + self.attn(x, rope, kv_cache, attn_mask))
            x = self.mlp_norm(x + self.feed_forward(x, router_stats))
        return x

    def feed_forward(self, x, router_stats):
        return self.mlp(x, router_stats) if self.routed else self.mlp(x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def document_positions(documents: torch.Tensor, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed rows, documents (B, T) of document numbers: each token's position within its own
    document (B, T), and the (B, 1, T, T) mask that lets a token see the earlier tokens of its
    document only (and, with a sliding window, the last `window` of them)."""
    B, T = documents.shape
    t = torch.arange(T, device=documents.device).expand(B, T)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.cummax(torch.where(starts, t, torch.zeros_like(t)), dim=1).values  # where each document began
    positions = t - first
    q, k = t[:, :, None], t[:, None, :]
    allowed = (documents[:, :, None] == documents[:, None, :]) & (k <= q)
    if window is not None:
        allowed &= q - k < window
    return positions, allowed[:, None]


class Transformer(nn.Module):
    answers_only = False  # a language model: a loss over any text (the LSTM baseline's is True)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.context_len, cfg.n_embd) if cfg.position == "learned" else None
        self.rotary = (Rotary(cfg.rope_dim, cfg.context_len, cfg.rope_theta, cfg.rope_scaling)
                       if cfg.position == "rope" else None)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.final_norm = make_norm(cfg) if cfg.norm_placement == "pre" else nn.Identity()
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if not self.tok_emb.weight.is_meta:  # (on the meta device there are no values to set)
            self.reset_parameters()

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, loss_mask=None,
                router_stats: RouterStats | None = None, documents=None):
        """Logits (B, T, vocab_size); or, when targets (B, T) are given, the mean cross-entropy loss
        over the positions where loss_mask (B, T) is true (all positions when it is None), plus
        aux_loss_coef times the experts' load-balancing loss in a mixture-of-experts model.
        router_stats (a fresh RouterStats) collects what each MoE layer's router decided in this pass.
        documents (B, T): which document of its row each token belongs to (packed rows): a token
        attends only to its own document, whose positions start again at 0."""
        B, T = idx.shape
        balance = targets is not None and self.config.n_expert > 0 and self.config.aux_loss_coef > 0
        if balance and router_stats is None:
            router_stats = RouterStats()  # the load-balancing loss needs this pass's routing
        start = 0 if kv_cache is None else kv_cache.pos  # an int, or (B, 1): one a row (SlotCache)
        if isinstance(start, int) and start + T > self.config.context_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds context_len={self.config.context_len}")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.config.embed_scale:
            x = x * torch.tensor(math.sqrt(self.config.n_embd), dtype=x.dtype)
        positions = torch.arange(T, device=idx.device) + start  # of the new tokens, (T,) or (B, T)
        attn_mask = None
        if documents is not None:  # packed rows: positions (B, T) within each document, and its mask
            if kv_cache is not None:
                raise ValueError("packed documents are for training; decode one sequence with a cache")
            positions, attn_mask = document_positions(documents, self.config.sliding_window)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.emb_dropout(x)
        rope = self.rotary(positions) if self.rotary is not None else None
        for block in self.blocks:
            x = block(x, rope, kv_cache, router_stats, attn_mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.final_norm(x)
        cap = self.config.logit_softcap  # squashes logits smoothly into (-cap, cap)
        if targets is None:
            logits = self.lm_head(x)  # (B, T, vocab_size)
            return logits if cap is None else cap * torch.tanh(logits / cap)
        if loss_mask is not None:
            targets = targets.masked_fill(~loss_mask.bool(), -100)
        # = F.cross_entropy(logits, targets), the head's logits made and used a chunk of rows at a time
        loss = head_cross_entropy(x.flatten(0, 1), self.lm_head, targets.reshape(-1), cap)
        if balance:
            aux = load_balancing_loss(router_stats.router_logits, self.config.n_expert_active)
            loss = loss + self.config.aux_loss_coef * aux
        return loss

    # ---- initialisation --------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2's initialisation, as in nanoGPT:

        | parameter                                 | init                          |
        |-------------------------------------------|-------------------------------|
        | embeddings, linear weights                | normal(0, init_std)           |
        | attention out, MLP down (write residual)   | normal(0, init_std/sqrt(2L)), |
        |                                           | or zeros with zero_init_out   |
        | biases                                    | zeros                         |
        | norm gains                                | ones (zeros with unit offset) |
        """
        cfg = self.config
        writes_residual = {m.out_proj for m in self.modules() if isinstance(m, (Attention, LatentAttention))}
        writes_residual |= {m.down_proj for m in self.modules() if isinstance(m, (MLP, GatedMLP))}
        for module in self.modules():
            if isinstance(module, nn.Linear):
                residual = module in writes_residual
                std = init_std_for_residual(cfg) if residual else cfg.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if residual and cfg.zero_init_out:
                    nn.init.zeros_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Embedding, Router)):
                nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(0.0 if module.unit_offset else 1.0)
            elif isinstance(module, LayerNorm):
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()

    # ---- sizes -------------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H D T."""
        cfg = self.config
        n = self.num_params() - (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.context_len

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache for `batch_size` sequences, on the model's device and in its dtype."""
        p = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len or self.config.context_len, p.device, p.dtype)


ARCHS = {"transformer": Transformer, "lstm-seq2seq": Seq2SeqLSTM}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model a config describes: the Transformer, or (arch="lstm-seq2seq") the LSTM baseline."""
    return ARCHS[cfg.arch](cfg)


def count_parameters(cfg: ModelConfig) -> int:
    """The parameter count of the model `cfg` describes, built on the meta device (no memory). A
    Transformer's blocks are built once per kind (dense, mixture of experts) and counted that many
    times: DeepSeek-V3's 58 layers of 256 experts would take seconds to build even there."""
    with torch.device("meta"):
        if ARCHS[cfg.arch] is not Transformer:
            return build_model(cfg).num_params()
        first_of_kind = {}  # whether a layer routes to experts -> the first such layer
        for layer in range(cfg.n_layer):
            first_of_kind.setdefault(cfg.is_moe_layer(layer), layer)
        blocks = sum(Block(cfg, first).num_params() * sum(cfg.is_moe_layer(i) == moe for i in range(cfg.n_layer))
                     for moe, first in first_of_kind.items())
        shell = Transformer(cfg.replace(n_layer=1, n_dense_layers=1))  # one dense block
        return blocks + shell.num_params() - shell.blocks[0].num_params()
