"""The baseline our users' first projects used: an LSTM encoder-decoder (Sutskever et al. 2014).

    prompt ids -> embedding -> LSTM encoder ──(final h, c)──► LSTM decoder -> linear head -> answer ids
                                                              ▲
                                answer ids shifted right ─────┘ (starting from the prompt's last token)

It trains on the same question/answer (or dialogue) pairs, with the same tokenizer and Trainer, as a
decoder-only Transformer fine-tuned on them: a pair batch is (x, y, loss_mask) with x = prompt +
answer, y = x shifted by one, and loss_mask true where y is an answer token. The Transformer reads x
whole; this model splits every row where the mask begins: the prompt goes to the encoder, the rest
to the decoder. The sizes come from ModelConfig: n_embd (embedding and hidden width), n_layer (LSTM
layers each side), dropout, vocab_size, context_len (the longest prompt + answer).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from .config import ModelConfig


class Seq2SeqLSTM(nn.Module):
    answers_only = True  # reads a prompt, writes an answer: no loss over whole texts (the Transformer's is False)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        d = cfg.n_embd
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)  # shared by encoder and decoder
        self.encoder = nn.LSTM(d, d, num_layers=cfg.n_layer, batch_first=True,
                               dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.decoder = nn.LSTM(d, d, num_layers=cfg.n_layer, batch_first=True,
                               dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        with torch.no_grad():
            nn.init.normal_(self.tok_emb.weight, std=cfg.init_std)
            if not cfg.tie_embeddings:
                nn.init.normal_(self.lm_head.weight, std=cfg.init_std)

    def encode(self, src, lengths):
        """Final (h, c) of the encoder over right-padded prompts src (B, S) of the given lengths."""
        packed = pack_padded_sequence(self.dropout(self.tok_emb(src)), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, state = self.encoder(packed)
        return state  # each (n_layer, B, d)

    def decode(self, dec_in, state):
        out, state = self.decoder(self.dropout(self.tok_emb(dec_in)), state)
        return self.lm_head(self.dropout(out)), state

    def forward(self, idx, targets=None, kv_cache=None, loss_mask=None, router_stats=None, documents=None):
        """Answer logits, or (with targets) the mean cross-entropy over the answer tokens.
        Rows are split where loss_mask begins (see the module docstring). (The Transformer's
        signature: this model keeps no KV cache, has no routers, and reads one prompt a row.)"""
        if documents is not None:
            raise ValueError("the LSTM encoder-decoder reads one prompt a row: train it with pack=false")
        if loss_mask is None:
            raise ValueError("the LSTM encoder-decoder trains on prompt/answer pairs: it needs a loss_mask "
                             "(prepare the data with --pairs qa or dialogue and train with objective=sft)")
        mask = loss_mask.bool()
        starts = mask.float().argmax(dim=1)  # first answer target: the prompt's last input position
        ends = mask.long().cumsum(1).argmax(dim=1) + 1  # one past the last answer target
        T = idx.size(1)
        src = idx.masked_fill(torch.arange(T, device=idx.device) > starts[:, None], 0)  # prompts, right-padded
        positions = starts[:, None] + torch.arange(int((ends - starts).max()), device=idx.device)  # (B, W)
        inside = positions < ends[:, None]
        positions = positions.clamp(max=T - 1)
        dec_in = idx.gather(1, positions).masked_fill(~inside, 0)  # each answer, from the prompt's last token
        if targets is not None:
            dec_out = targets.gather(1, positions).masked_fill(~inside, -100)
        logits, _ = self.decode(dec_in, self.encode(src[:, :int(starts.max()) + 1], starts + 1))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), dec_out.reshape(-1), ignore_index=-100)

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_tokens: int, stop_ids=()):
        """Greedy answer ids for one prompt, one at a time."""
        self.eval()
        device = self.tok_emb.weight.device
        src = torch.tensor([prompt], device=device)
        state = self.encode(src, torch.tensor([len(prompt)]))
        token = prompt[-1]
        for _ in range(max_tokens):
            logits, state = self.decode(torch.tensor([[token]], device=device), state)
            token = int(logits[0, -1].argmax())
            if token in stop_ids:
                return
            yield token

    # the sizes the Trainer reports, as for the Transformer
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        return 6.0 * self.num_params()
