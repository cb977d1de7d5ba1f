"""Int8 weights (FBGEMM's dynamic kind and weight-only): smaller, close to float32, compiled where
they can be, refused where they cannot run."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from samovar.config import get_preset
from samovar.engine import Engine, GenerationError, SamplingParams
from samovar.model import Transformer
from samovar.quantize import (Int8Linear, QuantizationError, is_dynamic_int8, quantize, quantize_int8,
                              quantize_int8_weight_only)

from conftest import memorize


def linear_weight_bytes(model):
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, Int8Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            w, _ = m._weight_bias()
            total += w.int_repr().numel() * w.int_repr().element_size()
    return total


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny", "mixtral-tiny", "deepseek-v3-tiny"])
def test_int8_logits_stay_close_and_weights_shrink(preset):
    torch.manual_seed(0)
    model = Transformer(get_preset(preset)).eval()
    q = quantize_int8(model)
    assert is_dynamic_int8(q) and not is_dynamic_int8(model)  # a copy; the float model is untouched
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    assert linear_weight_bytes(q) * 4 == linear_weight_bytes(model)
    idx = torch.randint(model.config.vocab_size, (2, 24))
    with torch.inference_mode():
        ref, out = model(idx), q(idx)
    err = (out - ref).norm() / ref.norm()
    assert 0 < err < 0.05, err  # rounded, but close


def test_int8_model_still_recites_what_it_learned():
    torch.manual_seed(0)
    text = list(range(2, 40)) * 8
    cfg = get_preset("llama-tiny").replace(vocab_size=64, context_len=48)
    model = memorize(Transformer(cfg), text, steps=120)
    params = SamplingParams(max_tokens=20, temperature=0)
    out = list(Engine(quantize_int8(model)).generate([10, 11, 12], params))
    assert out == list(range(13, 33))


def test_refusals():
    model = Transformer(get_preset("llama-tiny")).eval()
    with pytest.raises(QuantizationError, match="float32"):
        quantize_int8(model.to(torch.bfloat16))
    with pytest.raises(QuantizationError, match="unknown quantization 'int4'"):
        quantize(model, "int4")
    q = quantize_int8(Transformer(get_preset("llama-tiny")).eval())
    with pytest.raises(GenerationError, match="int8wo .weight-only int8. compiles"):
        Engine(q, compile=True)


@pytest.mark.parametrize("preset,words", [("llama-tiny", False), ("llama-tiny", True), ("gpt2-tiny", None),
                                          ("mixtral-tiny", None), ("deepseek-v3-tiny", True)])
def test_weight_only_int8_logits_stay_close_and_weights_shrink(preset, words):
    torch.manual_seed(0)
    model = Transformer(get_preset(preset)).eval()
    q = quantize_int8_weight_only(model, words)
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    assert all(m.weight.dtype == torch.int8 for m in q.modules() if isinstance(m, Int8Linear))
    assert linear_weight_bytes(q) * 4 == linear_weight_bytes(model)  # a tied head counts once in each
    assert q.tok_emb.weight.dtype == torch.float32 and isinstance(q.lm_head, Int8Linear)
    assert isinstance(model.lm_head, nn.Linear)  # a copy: the float model keeps its layers
    idx = torch.randint(model.config.vocab_size, (2, 24))
    with torch.inference_mode():
        ref, out = model(idx), q(idx)
        one_row = q(idx[:1, :1])  # the multiply-and-sum path of a decoding step
    err = (out - ref).norm() / ref.norm()
    assert 0 < err < 0.05, err
    torch.testing.assert_close(one_row[0, 0], out[0, 0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("in_features", [12, 10, 7])  # a multiple of 4, and widths padded to one
def test_int8_weights_four_to_a_word_are_the_same_weights(in_features):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 9)
    plain, words = Int8Linear(linear, words=False), Int8Linear(linear, words=True)
    assert words.weight.shape == (9, in_features + -in_features % 4) and words.weight.dtype == torch.int8
    assert torch.equal(words.int8_weight(), plain.weight)
    x = torch.randn(1, in_features)
    expected = F.linear(x, plain.weight.float()) * plain.scale + linear.bias.detach()
    for q in (plain, words):
        torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)  # one row: the decoding step's sum
        torch.testing.assert_close(q(x.expand(3, -1))[1], expected[0], rtol=1e-5, atol=1e-5)  # rows: F.linear


@pytest.mark.parametrize("words", [False, True])  # the int8 rows as they are, and four to a 32-bit word (AVX2)
def test_weight_only_int8_compiles_and_recites(words):
    torch.manual_seed(0)
    text = list(range(2, 40)) * 8
    cfg = get_preset("llama-tiny").replace(vocab_size=64, context_len=48)
    q = quantize_int8_weight_only(memorize(Transformer(cfg), text, steps=120), words)
    assert all(m.words == words for m in q.modules() if isinstance(m, Int8Linear))
    params = SamplingParams(max_tokens=20, temperature=0)
    compiled = list(Engine(q, compile=True).generate([10, 11, 12], params))
    assert compiled == list(Engine(q).generate([10, 11, 12], params)) == list(range(13, 33))


@pytest.mark.parametrize("kind", ["int8", "int8wo"])
def test_loss_of_a_quantized_model(kind):
    """Answer metrics call model(x, targets) on quantized models: the chunked loss uses their head."""
    torch.manual_seed(0)
    q = quantize(Transformer(get_preset("llama-tiny")).eval(), kind)
    idx, targets = torch.randint(q.config.vocab_size, (2, 12)), torch.randint(q.config.vocab_size, (2, 12))
    with torch.inference_mode():
        expected = F.cross_entropy(q(idx).flatten(0, 1), targets.flatten())
        torch.testing.assert_close(q(idx, targets), expected)


@pytest.mark.parametrize("kind", ["int8", "int8wo"])
def test_a_quantized_model_is_not_saved_as_a_checkpoint(tmp_path, kind):
    from samovar.checkpoint import CheckpointError, save_checkpoint

    q = quantize(Transformer(get_preset("llama-tiny")).eval(), kind)
    with pytest.raises(CheckpointError, match="int8 weights, for inference only"):
        save_checkpoint(tmp_path / "ckpt", q, None)
    assert not (tmp_path / "ckpt").exists()
