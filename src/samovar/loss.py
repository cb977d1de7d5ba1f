"""The loss over the output head, computed a chunk of rows at a time (no full logits held)."""

from __future__ import annotations

import torch
import torch.nn as nn


def head_cross_entropy(x, head: nn.Module, targets, softcap: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits head(x) (soft-capped if asked) against targets, skipping
    targets of -100: F.cross_entropy(head(x), targets) without ever holding all (N, V) logits.
    x (N, C), head: the output Linear (or a quantized one, for inference), targets (N,). Rows go
    through in chunks of about 4 MB of logits; when gradients are wanted, each chunk's are computed
    right away (the logits' gradient is softmax - one-hot), so the backward pass only scales them
    (as Liger-Kernel's fused linear cross-entropy does). Full logits and their gradient would be
    2 x 34 MB for a batch of 8 x 256 and a 4,096-token vocabulary, 2 x 1.6 GB for 8 x 1024 and
    GPT-2's 50,257."""
    if isinstance(head, nn.Linear) and torch.is_grad_enabled() and (x.requires_grad or head.weight.requires_grad):
        return _HeadCrossEntropy.apply(x, head.weight, targets, softcap)
    return _chunked_head_cross_entropy(x, head, head.out_features, targets, softcap)[0]


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, softcap):
        loss, grad_x, grad_weight = _chunked_head_cross_entropy(
            x, lambda rows: rows @ weight.t(), weight.size(0), targets, softcap, weight=weight)
        ctx.save_for_backward(grad_x, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None


def _chunked_head_cross_entropy(x, logits_of, vocab_size: int, targets, softcap, weight=None):
    """(loss, grad_x, grad_weight): the loss over logits_of(rows), a chunk of rows at a time, and,
    given the head's weight, the gradients (else None)."""
    rows = max(128, 2**20 // vocab_size)  # fewer rows starve the matrix products
    valid = targets != -100
    n_valid = valid.sum().clamp(min=1)
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_x = []
    grad_weight = None if weight is None else torch.zeros_like(weight, dtype=torch.float32)
    for start in range(0, x.size(0), rows):
        xs, ts, vs = x[start:start + rows], targets[start:start + rows], valid[start:start + rows]
        z = logits_of(xs).float()  # (rows, V)
        if softcap is not None:
            capped = torch.tanh(z / softcap)
            z = softcap * capped
        lse = torch.logsumexp(z, dim=-1)
        target = ts.clamp(min=0).unsqueeze(1)  # -100 rows pick any logit; vs zeroes them
        loss = loss + ((lse - z.gather(1, target).squeeze(1)) * vs).sum()
        if weight is None:
            continue
        g = (z - lse.unsqueeze(1)).exp_()  # softmax
        g.scatter_add_(1, target, torch.full_like(target, -1, dtype=g.dtype))  # minus the one-hot target
        g = g * (vs / n_valid).unsqueeze(1)
        if softcap is not None:
            g = g * (1 - capped * capped)
        g = g.to(x.dtype)
        grad_x.append(g @ weight)
        if grad_weight.dtype == g.dtype == xs.dtype:
            grad_weight.addmm_(g.t(), xs)
        else:  # lower-precision products (bf16, autocast), summed in float32
            grad_weight += g.t() @ xs
    if weight is None:
        return loss / n_valid, None, None
    return loss / n_valid, torch.cat(grad_x).to(x.dtype), grad_weight.to(weight.dtype)
