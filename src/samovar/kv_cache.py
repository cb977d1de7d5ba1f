"""The KV cache: keys and values of every layer, preallocated, passed into the forward pass."""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """Keys and values of every layer, preallocated for `batch_size` sequences of up to `max_len`.

    Passed into `Transformer.forward`, never stored on the model. `pos` is the number of positions
    already written; the model advances it after the last layer of each forward pass.

    A static cache (for a compiled decoding step) keeps every shape fixed: `pos` is a tensor, new
    keys and values are written with index_copy_, and attention sees the whole buffer, the positions
    not yet written masked out. One graph then serves every position.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None,
                 static: bool = False):
        heads, k_dim, v_dim = cfg.cache_shape
        # one buffer per layer (B, K, max_len, D): a compiled step then updates each in place
        self.k = [torch.zeros((batch_size, heads, max_len, k_dim), device=device, dtype=dtype)
                  for _ in range(cfg.n_layer)]
        self.v = [torch.zeros((batch_size, heads, max_len, v_dim), device=device, dtype=dtype)
                  for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.static = static
        self.pos = torch.zeros((), dtype=torch.long, device=device) if static else 0

    def update(self, layer: int, k, v):
        """Write k, v (B, K, T, D) at positions [pos, pos + T) and return the keys and values attention
        sees: those so far, or (static) the whole buffer."""
        T = k.size(2)
        if self.static:  # the caller keeps pos + T <= max_len (index_copy_ checks it in eager mode)
            positions = self.pos + torch.arange(T, device=k.device)
            self.k[layer].index_copy_(2, positions, k)
            self.v[layer].index_copy_(2, positions, v)
            return self.k[layer], self.v[layer]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int):
        self.pos += T  # in place for a static cache's tensor

    def rewind(self, pos: int):
        """Forget every position from `pos` on (the next write goes there): a cached prefix kept."""
        if self.static:
            self.pos.fill_(pos)
        else:
            self.pos = pos

    def reset(self):
        if self.static:
            self.pos.zero_()  # the same tensor: a compiled step keeps reading it
        else:
            self.pos = 0
