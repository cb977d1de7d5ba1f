"""Continuous batching (serve/scheduler.py): many sequences at once, each getting what it gets alone."""

import pytest
import torch

from samovar.config import get_preset
from samovar.engine import Engine, GenerationError, SamplingParams
from samovar.model import Transformer
from samovar.serve.scheduler import Busy, Scheduler


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny", "mistral-tiny"])
def test_sequences_decoded_together_get_what_they_get_alone(preset):
    """Prompts of every length, greedy and seeded sampling, more requests than slots, prompts
    prefilled in chunks across steps: each sequence's tokens equal Engine.generate's."""
    torch.manual_seed(1)
    model = Transformer(get_preset(preset).replace(context_len=128)).eval()
    prompts = [[(7 * i + j) % 200 + 3 for j in range(1 + (i * 5) % 23)] for i in range(12)]
    params = [SamplingParams(max_tokens=20 + i, temperature=0 if i % 2 == 0 else 0.8, seed=i, top_k=40,
                             repetition_penalty=1.0 if i % 3 else 1.3) for i in range(12)]
    alone = [list(Engine(model).generate(p, sp)) for p, sp in zip(prompts, params)]
    scheduler = Scheduler(model, slots=5, prefill_chunk=7)
    try:
        seqs = [scheduler.submit(p, sp) for p, sp in zip(prompts, params)]
        assert [[t.id for t in s] for s in seqs] == alone
        assert all(s.finish_reason == "length" for s in seqs) and scheduler.active == 0
    finally:
        scheduler.close()


def test_a_cancelled_sequence_frees_its_row_within_a_step():
    torch.manual_seed(2)
    model = Transformer(get_preset("llama-tiny").replace(context_len=2048)).eval()
    scheduler = Scheduler(model, slots=2, max_waiting=1)
    try:
        seq = scheduler.submit([1, 2, 3], SamplingParams(max_tokens=2000, temperature=0))
        tokens = iter(seq)
        next(tokens)
        tokens.close()  # the reader goes away
        at_cancel = scheduler.steps
        while scheduler.active:
            pass
        assert scheduler.steps - at_cancel <= 2 and seq.generated < 2000
        with pytest.raises(GenerationError, match="context"):
            scheduler.submit([1] * 100, SamplingParams(max_tokens=2000))
        hold = [scheduler.submit([1, 2], SamplingParams(max_tokens=1500, temperature=0)) for _ in range(2)]
        while scheduler.active < 2:
            pass
        hold.append(scheduler.submit([1, 2], SamplingParams(max_tokens=5)))
        with pytest.raises(Busy):  # two slots taken, one waiting: the queue is full
            scheduler.submit([1, 2], SamplingParams(max_tokens=5))
        for s in hold:
            s.cancel()
    finally:
        scheduler.close()
