import json

import pytest
import torch

from samovar.config import PRESETS, ConfigError, ModelConfig, get_preset, parse_field_value
from samovar.model import build_model, count_parameters

# Published parameter counts (HF model cards / the models' own reports).
PUBLISHED = {
    "gpt2-124m": 124_439_808,
    "gpt2-medium": 354_823_168,
    "llama-2-7b": 6_738_415_616,
    "llama-3.2-1b": 1_235_814_400,
    "llama": 1_100_048_384,  # TinyLlama-1.1B
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "gemma-2b": 2_506_172_416,
    "qwen3-0.6b": 596_049_920,
    # DeepSeek-V3's 671,026,419,200 tensors' elements without the MTP layer include 58 x 256 routing
    # biases, which are buffers (not trained by gradients), not parameters
    "deepseek-v3": 671_026_419_200 - 58 * 256,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_large_presets_have_published_parameter_counts(name):
    assert count_parameters(PRESETS[name]) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if count_parameters(PRESETS[n]) < 20e9))
def test_counted_parameters_equal_the_built_model(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.num_params() == count_parameters(cfg)


def test_required_presets_and_their_parts():
    assert PRESETS["gpt1"].norm_placement == "post" and PRESETS["gpt1"].position == "learned"
    gpt2 = PRESETS["gpt2"]
    assert gpt2.norm_placement == "pre" and gpt2.tie_embeddings and gpt2.mlp == "gelu"
    llama = PRESETS["llama"]
    assert (llama.norm, llama.position, llama.mlp) == ("rmsnorm", "rope", "swiglu")
    assert llama.n_kv_head < llama.n_head  # grouped-query attention
    ds = PRESETS["deepseek-60m"]
    assert (ds.vocab_size, ds.context_len, ds.norm, ds.position, ds.mlp) == (50257, 1024, "rmsnorm", "rope", "swiglu")
    assert 55e6 < count_parameters(ds) < 65e6
    mini = PRESETS["gpt-mini-char"]
    assert (mini.n_layer, mini.n_embd, mini.n_head, mini.context_len, mini.dropout) == (6, 384, 6, 256, 0.15)
    assert 10.6e6 < count_parameters(mini) < 10.9e6


def test_json_round_trip(tmp_path):
    cfg = get_preset("llama-tiny").replace(sliding_window=16, qk_norm=True)
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == cfg
    assert json.loads((tmp_path / "config.json").read_text())["sliding_window"] == 16


@pytest.mark.parametrize("changes, message", [
    ({"norm": "batchnorm"}, "norm="),
    ({"n_embd": 100, "n_head": 3}, "not divisible"),
    ({"n_head": 4, "n_kv_head": 3}, "multiple of n_kv_head"),
    ({"dropout": 1.5}, "dropout"),
    ({"n_layer": 0}, "n_layer"),
])
def test_invalid_configs_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("gpt2-tiny").replace(**changes)


def test_unknown_fields_and_presets_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="n_layers"):
        ModelConfig.from_dict({"n_layers": 2})
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("gpt5")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        ModelConfig.load(tmp_path / "bad.json")


def test_field_parsing_follows_types():
    assert parse_field_value(ModelConfig, "n_layer", "6") == 6
    assert parse_field_value(ModelConfig, "dropout", "0.1") == 0.1
    assert parse_field_value(ModelConfig, "tie_embeddings", "false") is False
    assert parse_field_value(ModelConfig, "n_kv_head", "none") is None
    with pytest.raises(ConfigError, match="not a valid int"):
        parse_field_value(ModelConfig, "n_layer", "six")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_field_value(ModelConfig, "layers", "6")


def test_each_size_has_one_name_resolved_once():
    cfg = ModelConfig(n_embd=64, n_head=4)
    assert (cfg.n_kv_head, cfg.head_dim, cfg.d_ff, cfg.expert_d_ff) == (4, 16, 256, 256)
    wider = cfg.replace(n_embd=128)  # derived sizes follow the fields they come from ...
    assert (wider.head_dim, wider.d_ff) == (32, 512)
    given = ModelConfig(n_embd=64, n_head=4, d_ff=100).replace(n_embd=128)  # ... given ones stay
    assert given.d_ff == 100 and given.head_dim == 32
    assert cfg.to_dict()["d_ff"] is None and given.to_dict()["d_ff"] == 100  # config.json as before
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("field, value", [("norm", "batchnorm"), ("mlp", "swish"), ("position", "alibi"),
                                          ("arch", "rnn"), ("export_as", "bert")])
def test_choice_fields_refuse_other_values_on_one_line(field, value):
    with pytest.raises(ConfigError, match=f"^{field}='{value}' is not one of "):
        ModelConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"^{field}='{value}' is not one of "):
        parse_field_value(ModelConfig, field, value)
