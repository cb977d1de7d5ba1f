"""Int8 weights: smaller, close to float32, and refused where they cannot run."""

import pytest
import torch
import torch.nn as nn

from samovar.config import get_preset
from samovar.engine import Engine, GenerationError, SamplingParams
from samovar.model import Transformer
from samovar.quantize import QuantizationError, is_quantized, quantize, quantize_int8

from conftest import memorize


def linear_weight_bytes(model):
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
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
    assert is_quantized(q) and not is_quantized(model)  # a copy; the float model is untouched
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
    with pytest.raises(GenerationError, match="do not combine"):
        Engine(q, compile=True)
