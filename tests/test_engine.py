import os
import subprocess
import sys

import pytest
import torch

from samovar import layers
from samovar.api import LLM, generate, load, stream_text
from samovar.checkpoint import save_checkpoint
from samovar.config import get_preset
from samovar.engine import Engine, GenerationError, SamplingParams, ahead_of_time_step, sample
from samovar.model import Transformer
from samovar.tokenizer import Tokenizer

from conftest import memorize

TEXT = "the quick brown fox jumps over the lazy dog. " * 30


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train("char", [TEXT])


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny model that has learned the sentence, so its greedy output is meaningful."""
    torch.manual_seed(0)
    cfg = get_preset("llama-tiny").replace(vocab_size=tokenizer.vocab_size, context_len=48)
    return memorize(Transformer(cfg), tokenizer.encode(TEXT), steps=150)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "gpt1-tiny"])
def test_cached_and_uncached_greedy_agree(preset):
    torch.manual_seed(1)
    cfg = get_preset(preset)
    model = Transformer(cfg).eval()
    engine = Engine(model)
    params = SamplingParams(max_tokens=40, temperature=0)
    prompt = [3, 14, 15, 92, 65]
    cached = list(engine.generate(prompt, params))
    uncached = list(engine.generate(prompt, params, use_cache=False))
    assert len(cached) == 40 and cached == uncached



def test_packed_weights_give_every_row_the_same_result_whatever_the_batch():
    """Linear.pack(): oneDNN's blocked copy of the weight, for servers. A row's product is the same
    bits in a batch of 1, 2 or 16 rows (the plain weight's product of one row differs in the last
    bits from that of two), equal to the plain weight's for a batch, and close for one row; training
    (gradients) still reads the weight."""
    from samovar.layers import Linear

    torch.manual_seed(0)
    layer = Linear(96, 200)
    x = torch.randn(16, 96)
    with torch.no_grad():
        plain = layer(x)
        assert layer.pack() == 200 * 96 * 4
        packed = [layer(x[:n]) for n in (1, 2, 16)]
    assert all(torch.equal(p, packed[-1][:len(p)]) for p in packed)
    assert torch.equal(packed[-1], plain) and torch.allclose(packed[0], plain[:1], atol=1e-5)
    layer.weight.data.mul_(2)  # with gradients: the weight itself
    assert torch.allclose(layer(x), 2 * (plain - layer.bias) + layer.bias, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_row_product_is_the_row_times_the_weight(threads, monkeypatch):
    """layers.one_row_product: the weight's rows in a run per thread (the last overlapping the one
    before it where the threads do not divide the rows), each row's result once and in its place;
    an AVX2 CPU's eager Linear takes it for one float32 row (its weight not packed), bias and all."""
    from samovar.layers import Linear, one_row_product

    monkeypatch.setattr(layers, "_AVX2", True)
    torch.manual_seed(threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows, width in [(1, 5), (2, 3), (7, 5), (64, 48), (101, 33)]:
            weight, x = torch.randn(rows, width), torch.randn(1, 1, width)
            y = one_row_product(x, weight)
            assert y.shape == (1, 1, rows)
            assert torch.allclose(y, torch.nn.functional.linear(x, weight), atol=1e-5), (rows, width)
        layer = Linear(33, 101)
        with torch.no_grad():
            layer.bias.normal_()
            x = torch.randn(1, 33)
            assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("preset,window,avx2", [("gpt2-tiny", None, None), ("mistral-tiny", 6, None),  # learned positions; rotary
                                                ("gpt2-tiny", None, not layers._AVX2)])  # the other CPU kind's products
def test_the_compiled_step_agrees(preset, window, avx2, monkeypatch):
    """The compiled one-token step (on the CPU compiled ahead of time: one program, the attended
    length dynamic, also past a sliding window), also across the context's refill. avx2: the products
    as an AVX2 CPU writes them (every one-row product inductor's kernel), or as the others do."""
    if avx2 is not None:
        monkeypatch.setattr(layers, "_AVX2", avx2)
    torch.manual_seed(4)
    model = Transformer(get_preset(preset).replace(context_len=16, sliding_window=window)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # biases start at zero; a product that dropped one would pass
                p.normal_(0, 0.1)
    params = SamplingParams(max_tokens=40, temperature=0)
    engine = Engine(model, compile=True)
    compiled = list(engine.generate([5, 6, 7], params))
    assert compiled == list(Engine(model).generate([5, 6, 7], params))
    step = ahead_of_time_step(model, 17)  # made by the first step; every position and prompt reuse it
    assert list(engine.generate([9, 8], params)) == list(Engine(model).generate([9, 8], params))
    sampled = SamplingParams(max_tokens=20, temperature=0.9, top_k=20, seed=3)
    assert list(Engine(model, compile=True).generate([1], sampled)) == list(Engine(model).generate([1], sampled))
    assert ahead_of_time_step(model, 17) is step
    # recomputing agrees while the context holds everything (past it, it crops instead of refilling)
    assert compiled[:13] == list(Engine(model).generate([5, 6, 7], params, use_cache=False))[:13]


def test_the_step_ahead_of_time_is_kept_on_disk_and_reads_the_model_s_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch.manual_seed(6)
    model = Transformer(get_preset("llama-tiny").replace(context_len=24)).eval()
    params = SamplingParams(max_tokens=12, temperature=0)

    def agrees(m):
        return list(Engine(m, compile=True).generate([4, 2], params)) == list(Engine(m).generate([4, 2], params))

    assert agrees(model)
    packages = list((tmp_path / "samovar" / "aot").glob("*.pt2"))
    assert len(packages) == 1 and not list((tmp_path / "samovar" / "aot").glob("*partial*"))
    made = packages[0].stat().st_mtime_ns
    with torch.no_grad():  # new values in the same tensors: the step reads them
        for p in model.parameters():
            p.mul_(-1.5)
    step = ahead_of_time_step(model, 17)  # caches of 16 positions (a power of two) and one to spare
    assert agrees(model) and ahead_of_time_step(model, 17) is step
    model.blocks[0].attn.q_proj.weight = torch.nn.Parameter(torch.randn_like(model.blocks[0].attn.q_proj.weight))
    assert agrees(model)  # a replaced tensor: a new step, from the same package on disk
    assert ahead_of_time_step(model, 17) is not step and packages[0].stat().st_mtime_ns == made
    assert len(list(packages[0].parent.glob("*.pt2"))) == 1
    longer = SamplingParams(max_tokens=20, temperature=0)  # 22 positions: a cache of the context's 24 (and one)
    assert list(Engine(model, compile=True).generate([4, 2], longer)) == list(Engine(model).generate([4, 2], longer))
    assert len(list(packages[0].parent.glob("*.pt2"))) == 2  # another length: a program of its own
    # a package that does not load (a full disk, a crash outside samovar) is compiled again, here in a
    # process that has not loaded it (this one keeps what it loaded): a model of the same shape
    packages[0].write_bytes(b"not a package")
    script = ("import torch; from samovar.config import get_preset; from samovar.model import Transformer; "
              "from samovar.engine import Engine, SamplingParams; torch.manual_seed(0); "
              "m = Transformer(get_preset('llama-tiny').replace(context_len=24)).eval(); "
              "p = SamplingParams(max_tokens=12, temperature=0); "
              "print(list(Engine(m, compile=True).generate([4, 2], p)) == list(Engine(m).generate([4, 2], p)))")
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert again.returncode == 0 and again.stdout.strip() == "True", again.stderr
    assert packages[0].stat().st_size > 1000


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])  # a tied head and an untied one, biases or none
def test_inference_on_the_cpu_multiplies_through_onednn_with_training_s_results(preset):
    torch.manual_seed(5)
    model = Transformer(get_preset(preset)).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 12))

    def kernels(run):
        with torch.profiler.profile() as prof:
            out = run()
        return out, {e.key for e in prof.key_averages()}

    trained, used = kernels(lambda: model(idx))  # gradients wanted: F.linear, as in training
    assert trained.requires_grad and "mkldnn::_linear_pointwise" not in used
    with torch.inference_mode():
        inferred, used = kernels(lambda: model(idx))
    assert "mkldnn::_linear_pointwise" in used
    torch.testing.assert_close(inferred, trained.detach(), rtol=1e-5, atol=1e-5)
    # greedy decoding gives the tokens of recomputing with training's kernels (compiled: the tests
    # of the compiled step, whose batched graph calls oneDNN through samovar::onednn_linear)
    prompt, params = [3, 1, 4], SamplingParams(max_tokens=20, temperature=0)
    expected = list(prompt)
    for _ in range(params.max_tokens):
        expected.append(int(model(torch.tensor([expected]))[0, -1].argmax()))
    assert list(Engine(model).generate(prompt, params)) == expected[3:]


def test_bf16_inference_runs_on_every_cpu():
    """oneDNN has no bf16 product on a CPU without bf16 instructions (AVX2 only): there bf16 takes
    F.linear, elsewhere oneDNN; either way decoding runs and agrees with training's kernels."""
    torch.manual_seed(5)
    model = Transformer(get_preset("llama-tiny")).eval().to(torch.bfloat16)
    idx = torch.randint(0, model.config.vocab_size, (1, 12))
    trained = model(idx).detach()
    with torch.inference_mode():
        torch.testing.assert_close(model(idx), trained, rtol=2e-2, atol=2e-2)
    assert len(list(Engine(model).generate([3, 1, 4], SamplingParams(max_tokens=8, temperature=0)))) == 8


def test_compile_is_refused_for_a_mixture_of_experts():
    with pytest.raises(GenerationError, match="mixture of experts decodes eagerly"):
        Engine(Transformer(get_preset("mixtral-tiny")).eval(), compile=True)


def test_cached_and_uncached_sampling_agree_with_a_seed():
    torch.manual_seed(2)
    model = Transformer(get_preset("llama-tiny")).eval()
    engine = Engine(model)
    params = SamplingParams(max_tokens=30, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    assert list(engine.generate([1, 2, 3], params)) == list(engine.generate([1, 2, 3], params, use_cache=False))


def test_logit_bias_adds_to_the_logits_it_names():
    """+100 on a token makes greedy decoding pick it every time; -100 on the plain greedy path's first
    token keeps it out; ids outside the vocabulary and biases beyond 100 are refused."""
    torch.manual_seed(2)
    model = Transformer(get_preset("llama-tiny")).eval()
    engine = Engine(model)
    plain = list(engine.generate([1, 2, 3], SamplingParams(max_tokens=6, temperature=0)))
    assert list(engine.generate([1, 2, 3], SamplingParams(max_tokens=6, temperature=0, logit_bias={7: 100}))) == [7] * 6
    assert plain[0] not in engine.generate([1, 2, 3], SamplingParams(max_tokens=6, temperature=0,
                                                                      logit_bias={plain[0]: -100}))
    for bias in ({model.config.vocab_size: 1.0}, {7: 101.0}, {-1: 1.0}):
        with pytest.raises(GenerationError, match="logit_bias"):
            list(engine.generate([1, 2, 3], SamplingParams(max_tokens=2, logit_bias=bias)))


def test_generation_continues_past_the_context():
    torch.manual_seed(3)
    cfg = get_preset("gpt2-tiny").replace(context_len=16)
    engine = Engine(Transformer(cfg).eval())
    out = list(engine.generate([1, 2, 3], SamplingParams(max_tokens=50, temperature=0)))
    assert len(out) == 50


def test_trained_model_recites_greedily(trained, tokenizer):
    out = generate(trained, tokenizer, "the quick brown ", max_tokens=24, temperature=0)
    assert out.startswith("fox jumps over the lazy")


def test_seeds_reproduce_and_differ(trained, tokenizer):
    kw = dict(max_tokens=40, temperature=1.5)
    a = generate(trained, tokenizer, "the ", seed=1, **kw)
    assert a == generate(trained, tokenizer, "the ", seed=1, **kw)
    assert any(generate(trained, tokenizer, "the ", seed=s, **kw) != a for s in range(2, 6))


def test_streaming_yields_the_same_text(trained, tokenizer):
    kw = dict(max_tokens=30, temperature=0)
    pieces = list(generate(trained, tokenizer, "the lazy ", stream=True, **kw))
    assert len(pieces) > 1 and "".join(pieces) == generate(trained, tokenizer, "the lazy ", **kw)


def test_stream_text_waits_for_whole_utf8_characters():
    bpe = Tokenizer.train("bpe", ["plain ascii only " * 10], vocab_size=300)
    ids = bpe.encode("Ж😀")  # unseen characters: one byte token each
    assert len(ids) == 6
    pieces = list(stream_text(bpe, iter(ids)))
    assert pieces == ["Ж", "😀"]


def test_stops_at_eos_unless_told_not_to(tokenizer):
    torch.manual_seed(0)
    cfg = get_preset("llama-tiny").replace(vocab_size=tokenizer.vocab_size)
    model = Transformer(cfg).eval()
    model.lm_head = torch.nn.Linear(cfg.n_embd, cfg.vocab_size)  # a head that always prefers eos
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[tokenizer.eos_id] = 10.0
    assert generate(model, tokenizer, "the", max_tokens=10, temperature=0) == ""
    engine = Engine(model)
    prompt = tokenizer.encode("the")
    assert list(engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0), stop_ids=[tokenizer.eos_id])) == []
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    assert list(engine.generate(prompt, params, stop_ids=[tokenizer.eos_id])) == [tokenizer.eos_id] * 10


def test_top_k_and_top_p_restrict_the_choices():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    top2 = {int(sample(logits, SamplingParams(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert top2 == {0, 1}
    # probabilities ~ [0.64, 0.24, 0.09, ...]: top_p=0.8 keeps the first two tokens
    nucleus = {int(sample(logits, SamplingParams(temperature=1.0, top_p=0.8), g)) for _ in range(300)}
    assert nucleus == {0, 1}
    assert {int(sample(logits, SamplingParams(temperature=1.0, top_p=0.5), g)) for _ in range(50)} == {0}
    assert int(sample(logits, SamplingParams(temperature=0))) == 0
    wide = {int(sample(logits, SamplingParams(temperature=5.0), g)) for _ in range(300)}
    assert wide == {0, 1, 2, 3, 4}


def test_extreme_but_valid_settings_still_draw_a_token():
    """Values a fuzzer sends: a top_p or a temperature below float32's smallest number (they once
    left no token, or overflowed the logits into NaN)."""
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]) * 30
    g = torch.Generator().manual_seed(0)
    for params in (SamplingParams(temperature=1.0, top_p=5e-324), SamplingParams(temperature=1e-300),
                   SamplingParams(temperature=1e-6, top_k=2), SamplingParams(temperature=3.0, top_p=1e-45)):
        assert int(sample(logits, params, g)) == 0


@pytest.mark.parametrize("kw, message", [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"top_p": 1.5}, "top_p must be in"),
    ({"max_tokens": -1}, "max_tokens must be >= 0"),
    ({"min_p": 1.5}, "min_p must be in"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be in"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty must be in"),
    ({"repetition_penalty": 1e9}, "repetition_penalty must be in"),
    ({"frequency_penalty": 3.0}, "frequency_penalty must be in"),
    ({"stop": [""]}, "stop string must be non-empty"),
    ({"top_q": 0.5}, "unknown sampling option 'top_q'"),
])
def test_bad_sampling_parameters(trained, tokenizer, kw, message):
    with pytest.raises(GenerationError, match=message):
        generate(trained, tokenizer, "the", **kw)


def test_prompt_longer_than_context(trained, tokenizer):
    with pytest.raises(GenerationError, match="more than the model's context of 48"):
        generate(trained, tokenizer, "x" * 49 if "x" in TEXT else "the " * 13)


def test_llm_object(tmp_path, trained, tokenizer):
    llm = LLM(trained, tokenizer)
    folder = llm.save(tmp_path / "ckpt")
    again = LLM.from_path(folder, device="cpu")
    kw = dict(max_tokens=20, temperature=0)
    assert again.generate("the quick ", **kw) == llm.generate("the quick ", **kw)
    assert "".join(again.stream("the quick ", **kw)) == llm.generate("the quick ", **kw)


# ---- the sampling chat needs --------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_repetition_penalty_equals_transformers_generate(preset, tmp_path):
    """Greedy decoding with HF's repetition penalty, on the export, token for token."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from samovar.interop.hf import export_hf

    torch.manual_seed(0)
    model = Transformer(get_preset(preset).replace(vocab_size=60, context_len=64)).eval()
    export_hf(model, None, tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt, decoded = [5, 9, 9, 17, 3, 5], {}
    for penalty in (1.0, 1.3, 0.8):
        params = SamplingParams(max_tokens=30, temperature=0, repetition_penalty=penalty, ignore_eos=True)
        ours = decoded[penalty] = list(Engine(model).generate(prompt, params))
        config = GenerationConfig(do_sample=False, repetition_penalty=penalty, max_new_tokens=30, min_new_tokens=30,
                                  eos_token_id=None, pad_token_id=0)
        reference = theirs.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()
        assert ours == reference, penalty
    assert decoded[1.3] != decoded[1.0]  # the penalty changed the text


def test_frequency_and_presence_penalties_count_the_reply():
    from samovar.engine import Penalties

    penalties = Penalties([1], vocab_size=4, device="cpu")  # the prompt's ids count for HF's penalty only
    for token in (2, 2, 3):
        penalties.add(token)
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    shifted = penalties.apply(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=0.25))
    torch.testing.assert_close(shifted, torch.tensor([[1.0, 1.0, 1.0 - 1.0 - 0.25, 1.0 - 0.5 - 0.25]]))
    hf = penalties.apply(torch.tensor([[2.0, -2.0, 2.0, 0.5]]), SamplingParams(repetition_penalty=2.0))
    torch.testing.assert_close(hf, torch.tensor([[2.0, -4.0, 1.0, 0.25]]))  # seen: 1 (prompt), 2, 3


def test_min_p_keeps_the_tokens_near_the_likeliest():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    g = torch.Generator().manual_seed(0)
    kept = {int(sample(logits, SamplingParams(temperature=1.0, min_p=0.5), g)) for _ in range(300)}
    assert kept == {0, 1}  # 0.3 >= 0.5 * 0.5 > 0.15
    assert {int(sample(logits, SamplingParams(temperature=1.0, min_p=0.0), g)) for _ in range(500)} == {0, 1, 2, 3}


def test_stop_strings_end_the_text_even_across_tokens_and_never_leak_into_a_stream(tokenizer):
    closed = []

    def ids(text):
        try:
            yield from tokenizer.encode(text)
        finally:
            closed.append(True)

    for stop in (("dog",), ("fox", "dog"), ("the lazy",)):
        pieces = list(stream_text(tokenizer, ids("the quick brown fox jumps over the lazy dog. the end"), stop))
        text = "".join(pieces)
        first = min(i for i in ("the quick brown fox jumps over the lazy dog".find(s) for s in stop) if i >= 0)
        # (a piece once given out cannot be taken back: had one held part of a stop string, the text would too)
        assert text == "the quick brown fox jumps over the lazy dog"[:first] and closed.pop()
    assert "".join(stream_text(tokenizer, iter(tokenizer.encode("the lazy do")), ("dog",))) == "the lazy do"
    bpe = Tokenizer.train("bpe", [TEXT], vocab_size=300)
    assert len(bpe.encode("jumps over")) > 1
    assert "".join(stream_text(bpe, iter(bpe.encode(TEXT)), ("jumps over",))) == "the quick brown fox "


def test_stop_strings_from_generate_and_the_command_line(trained, tokenizer, tmp_path):
    full = generate(trained, tokenizer, "the quick ", max_tokens=30, temperature=0)
    assert "lazy" in full
    assert generate(trained, tokenizer, "the quick ", max_tokens=30, temperature=0, stop=["lazy"]) == \
        full[:full.index("lazy")]
    save_checkpoint(tmp_path / "ckpt", trained, tokenizer)
    from conftest import run_cli

    out = run_cli("generate", tmp_path / "ckpt", "--prompt", "the quick ", "--max-tokens", "30", "--temperature", "0",
                  "--stop", "lazy", "--repetition-penalty", "1.0", "--min-p", "0.1")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "the quick " + full[:full.index("lazy")] + "\n"


def test_streaming_decodes_each_token_a_bounded_number_of_times(tokenizer):
    """Linear in the length of the answer: the ids decoded over a stream grow with it, not its square."""
    decoded = []

    class Counting(Tokenizer):
        def decode(self, ids, skip_special=False):
            ids = list(ids)
            decoded.append(len(ids))
            return super().decode(ids, skip_special)

    counting = Counting(tokenizer.hf, tokenizer.roles)
    text = "the quick brown fox jumps over the lazy dog. " * 40
    assert "".join(stream_text(counting, iter(tokenizer.encode(text)))) == text
    assert sum(decoded) < 6 * len(text)  # quadratic would be ~len(text)**2 / 2 = 1.6M


def test_a_kept_prefix_is_not_prefilled_again_and_changes_nothing(trained, tokenizer):
    """A chat's next turn reuses the keys and values of the conversation so far (PrefixCache): only
    the new ids are prefilled, and the tokens and logits are those of a full recompute."""
    from samovar.engine import PrefixCache

    params = SamplingParams(max_tokens=8, temperature=0)
    prefix = PrefixCache()
    first = tokenizer.encode("the quick brown ")
    a = list(Engine(trained).generate(first, params, prefix=prefix))
    assert prefix.prefilled == len(first) and prefix.ids == first + a
    second = first + a + tokenizer.encode(" over the")
    b = list(Engine(trained).generate(second, params, prefix=prefix))
    assert prefix.prefilled == len(tokenizer.encode(" over the"))
    assert b == list(Engine(trained).generate(second, params))
    for ids in (second + b, first[:5] + tokenizer.encode("lazy dog")):  # all of it cached; a prefix of it
        with torch.inference_mode():  # (as in the Engine, where the cache was made)
            keep = prefix.keep(ids)
            cached = trained(torch.tensor([ids[keep:]]), kv_cache=prefix.cache.rows(0, 1, len(ids) - keep))[:, -1]
            full = trained(torch.tensor([ids]))[:, -1]
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
        prefix.ids = ids  # (as the Engine records what it prefilled)
    assert keep == 5
