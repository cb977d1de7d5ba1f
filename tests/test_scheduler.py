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


def test_compiled_decoding_gets_the_eager_tokens_with_two_graphs_for_every_batch_and_length():
    """Scheduler(compile=True) as samovar serve runs it, its weights packed for batches: after
    warm_up (one row, then two), any number of rows and any length decodes without compiling again,
    and each sequence gets the tokens Engine.generate got before the packing."""
    from samovar.layers import pack_linears

    torch.manual_seed(3)
    model = Transformer(get_preset("llama-tiny").replace(context_len=128)).eval()
    prompts = [[(5 * i + j) % 200 + 3 for j in range(2 + (i * 7) % 30)] for i in range(7)]
    params = [SamplingParams(max_tokens=15 + 3 * i, temperature=0 if i % 2 else 0.7, seed=i) for i in range(7)]
    alone = [list(Engine(model).generate(p, sp)) for p, sp in zip(prompts, params)]
    assert pack_linears(model) == 4 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    scheduler = Scheduler(model, slots=4, prefill_chunk=9, compile=True)
    try:
        scheduler.warm_up()
        with torch.compiler.set_stance("fail_on_recompile"):
            assert [t.id for t in scheduler.submit(prompts[0], params[0])] == alone[0]  # alone: one row
            seqs = [scheduler.submit(p, sp) for p, sp in zip(prompts, params)]  # 1 to 4 rows at once
            assert [[t.id for t in s] for s in seqs] == alone
    finally:
        scheduler.close()


def test_the_loop_runs_in_the_callers_thread_when_asked():
    """thread=False: run() is the loop (samovar serve runs it in the main thread); close() from
    another thread ends it."""
    import threading

    torch.manual_seed(4)
    model = Transformer(get_preset("llama-tiny")).eval()
    scheduler = Scheduler(model, thread=False)
    params = SamplingParams(max_tokens=12, temperature=0)
    got = []

    def client():
        got.extend(t.id for t in scheduler.submit([1, 2, 3], params))
        scheduler.close()

    threading.Thread(target=client).start()
    scheduler.run()  # returns once the client has closed it
    assert got == list(Engine(model).generate([1, 2, 3], params))


@pytest.mark.parametrize("preset", ["llama-tiny", "mistral-tiny"])
def test_short_prompts_that_arrive_together_are_prefilled_in_one_pass(preset):
    """Eight prompts of 1 to 15 tokens waiting at once fit one chunk: one step prefills them all
    (each padded to the longest) and each gets its first token, then one step a token for all;
    a longer prompt behind them starts its own chunks. Every sequence gets its tokens alone."""
    import threading

    torch.manual_seed(5)
    model = Transformer(get_preset(preset).replace(context_len=64)).eval()
    prompts = [[(3 * i + j) % 200 + 3 for j in range(1 + 2 * i)] for i in range(8)] + [list(range(3, 43))]
    params = SamplingParams(max_tokens=6, temperature=0)
    alone = [list(Engine(model).generate(p, params)) for p in prompts]
    scheduler = Scheduler(model, slots=9, prefill_chunk=64, thread=False)
    seqs = [scheduler.submit(p, params) for p in prompts]  # all waiting before the loop starts
    got = []

    def client():
        got.extend([t.id for t in seq] for seq in seqs)
        scheduler.close()

    threading.Thread(target=client).start()
    scheduler.run()
    assert got == alone
    # step 1: the eight short prompts at once; the 40-token one does not fit beside them: step 2, with
    # the first decoding step; then 5 more steps of decoding for it
    assert scheduler.steps == 7


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


def test_a_sessions_next_turn_prefills_only_what_is_new_and_gets_the_same_tokens():
    """A conversation: the second turn's prompt is the first's, its reply, and a new message. With a
    session it starts from the first turn's kept keys and values; its tokens are those a scheduler
    without sessions gives (greedy and seeded), and a prompt that departs early reuses only the
    common part."""
    torch.manual_seed(3)
    model = Transformer(get_preset("llama-tiny").replace(context_len=256)).eval()
    first = [5, 6, 7, 8, 9, 10]
    for params in (SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=12, temperature=0.9, seed=4)):
        with_session, fresh = Scheduler(model, slots=3, keep_sessions=2), Scheduler(model, slots=3)
        try:
            reply = [t.id for t in with_session.submit(first, params, session="chat")]
            second = first + reply + [11, 12, 13]
            seq = with_session.submit(second, params, session="chat")
            assert [t.id for t in seq] == [t.id for t in fresh.submit(second, params)]
            assert seq.reused == len(first) + len(reply) - 1  # the reply's last token was never fed back
            other = with_session.submit([5, 6, 99, 100], params, session="chat")
            assert [t.id for t in other] == [t.id for t in fresh.submit([5, 6, 99, 100], params)]
            assert other.reused == 2
            for name in ("a", "b", "c"):  # only the last keep_sessions sessions stay
                list(with_session.submit(first, params, session=name))
            assert list(with_session.kept) == ["b", "c"]
        finally:
            with_session.close()
            fresh.close()
