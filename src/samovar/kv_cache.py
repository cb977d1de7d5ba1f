"""The KV cache: keys and values of every layer, preallocated, passed into the forward pass."""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """Keys and values of every layer, preallocated for `batch_size` sequences of up to `max_len`.

    Passed into `Transformer.forward`, never stored on the model. `pos` is the number of positions
    already written; the model advances it after the last layer of each forward pass. (Decoding
    uses a SlotCache, below, whose rows each keep their own position.)
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        heads, k_dim, v_dim = cfg.cache_shape
        self.k = [torch.zeros((batch_size, heads, max_len, k_dim), device=device, dtype=dtype)
                  for _ in range(cfg.n_layer)]
        self.v = [torch.zeros((batch_size, heads, max_len, v_dim), device=device, dtype=dtype)
                  for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k, v):
        """Write k, v (B, K, T, D) at positions [pos, pos + T) and return the keys and values so far."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int):
        self.pos += T


class SlotCache:
    """Keys and values of up to `slots` sequences at once, each at its own position: the cache of
    continuous batching (serve/scheduler.py). A sequence takes a slot (a row) and gives it back.

    A forward pass of T new tokens runs over a contiguous range of rows, `rows(lo, hi, T)`: a view
    that the model takes as it takes a KVCache. Its `pos` (B, 1) holds each row's own position
    (broadcasting as a single position does), new keys and values are written there, and attention
    sees the keys up to the longest row, each row's later positions masked out.
    """

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, device=None, dtype=None):
        heads, k_dim, v_dim = cfg.cache_shape
        self.k = [torch.zeros((slots, heads, max_len, k_dim), device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros((slots, heads, max_len, v_dim), device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.lengths = torch.zeros((slots, 1), dtype=torch.long, device=device)
        self.slots, self.max_len = slots, max_len

    def rows(self, lo: int, hi: int, T: int) -> "SlotRows":
        return SlotRows(self, lo, hi, T)

    def move(self, src: int, dst: int) -> None:
        """Copy row src (its positions so far) into row dst: a sequence changes rows."""
        n = int(self.lengths[src])
        for buffers in (self.k, self.v):
            for layer in buffers:
                layer[dst, :, :n] = layer[src, :, :n]
        self.lengths[dst] = n

    def clear(self, row: int) -> None:
        self.lengths[row] = 0

    def rewind(self, row: int, n: int) -> None:
        """Forget the row's positions from n on (its next write goes there): a cached prefix kept."""
        self.lengths[row] = n

    def save(self, row: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the row's keys and values so far (a conversation's, kept for its next turn)."""
        n = int(self.lengths[row])
        return [layer[row, :, :n].clone() for layer in self.k], [layer[row, :, :n].clone() for layer in self.v]

    def load(self, row: int, keys: list[torch.Tensor], values: list[torch.Tensor], n: int) -> None:
        """Put the first n positions of saved keys and values into the row."""
        for buffers, saved in ((self.k, keys), (self.v, values)):
            for layer, s in zip(buffers, saved):
                layer[row, :, :n] = s[:, :n]
        self.lengths[row] = n


class SlotRows:
    """Rows [lo, hi) of a SlotCache, for one forward pass of T new tokens: views of each layer's keys
    and values up to the longest row's end after the pass (the positions attention may read), and
    of the rows' lengths. (Views, not slices taken in the pass: a compiled step then sees their sizes
    as sizes of its inputs, which it can treat as dynamic: Scheduler(compile=True).)"""

    def __init__(self, cache: SlotCache, lo: int, hi: int, T: int):
        self.pos = cache.lengths[lo:hi]  # a view: advance() moves the cache's own lengths
        end = int(self.pos.max()) + T
        if end > cache.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={cache.max_len}")
        self.k = [layer[lo:hi, :, :end] for layer in cache.k]
        self.v = [layer[lo:hi, :, :end] for layer in cache.v]
        self.written = (torch.arange(hi - lo, device=self.pos.device)[:, None],  # where each layer writes:
                        self.pos + torch.arange(T, device=self.pos.device))      # rows (B, 1), positions (B, T)

    def update(self, layer: int, k, v):
        keys, values = self.k[layer], self.v[layer]
        keys[self.written[0], :, self.written[1]] = k.transpose(1, 2)  # (B, T, K, D) into (B, K, end, D)
        values[self.written[0], :, self.written[1]] = v.transpose(1, 2)
        return keys, values

    def advance(self, T: int):
        self.pos += T
