"""Every family equals its HuggingFace `transformers` reference.

For each case: build the HF model from a small random config, save it, import it with samovar, and
compare float32 logits (1e-4) and 32 greedy tokens decoded with samovar's KV cache against HF's
`generate`; then export it back and load the export with `transformers`, and compare again.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from samovar.api import generate  # noqa: E402
from samovar.checkpoint import save_checkpoint  # noqa: E402
from samovar.engine import Engine, SamplingParams  # noqa: E402
from samovar.interop.hf import FAMILIES, HFError, config_from_hf, export_hf, import_hf  # noqa: E402
from samovar.tokenizer import Tokenizer  # noqa: E402

LLAMA_BASE = dict(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
DEEPSEEK_BASE = dict(LLAMA_BASE, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                     topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=12, qk_rope_head_dim=8,
                     qk_nope_head_dim=6, v_head_dim=10, moe_intermediate_size=20, n_shared_experts=1,
                     routed_scaling_factor=2.5, num_hidden_layers=3)

CASES = {
    "gpt1": ("OpenAIGPTConfig", dict(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4)),
    "gpt1-relu": ("OpenAIGPTConfig", dict(vocab_size=320, n_positions=64, n_embd=24, n_layer=3, n_head=2, afn="relu")),
    "gpt2": ("GPT2Config", dict(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4)),
    "gpt2-untied-odd-mlp": ("GPT2Config", dict(vocab_size=320, n_positions=64, n_embd=24, n_layer=3, n_head=3,
                                               n_inner=40, tie_word_embeddings=False)),
    "llama-gqa": ("LlamaConfig", LLAMA_BASE),
    "llama-mqa-bias-head-dim": ("LlamaConfig", dict(LLAMA_BASE, num_key_value_heads=1, head_dim=12,
                                                    attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "llama3-rope-scaling": ("LlamaConfig", dict(LLAMA_BASE, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-linear-rope": ("LlamaConfig", dict(LLAMA_BASE, num_key_value_heads=4, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral-sliding-window": ("MistralConfig", dict(LLAMA_BASE, sliding_window=5)),
    "mistral-no-window": ("MistralConfig", dict(LLAMA_BASE, sliding_window=None, num_key_value_heads=1)),
    "mixtral": ("MixtralConfig", dict(LLAMA_BASE, num_local_experts=4, num_experts_per_tok=2)),
    "mixtral-window-top1": ("MixtralConfig", dict(LLAMA_BASE, num_local_experts=3, num_experts_per_tok=1,
                                                  sliding_window=6)),
    "gemma": ("GemmaConfig", dict(LLAMA_BASE, head_dim=16)),
    "gemma-mha-head-dim": ("GemmaConfig", dict(LLAMA_BASE, num_key_value_heads=4, head_dim=6)),
    "qwen3": ("Qwen3Config", dict(LLAMA_BASE, head_dim=12, tie_word_embeddings=True)),
    "qwen3-untied-mqa": ("Qwen3Config", dict(LLAMA_BASE, num_key_value_heads=1, tie_word_embeddings=False)),
    "deepseek-v3": ("DeepseekV3Config", DEEPSEEK_BASE),
    "deepseek-v3-not-interleaved": ("DeepseekV3Config", dict(DEEPSEEK_BASE, rope_interleave=False,
                                                             attention_bias=True)),
    "gpt1-untied": ("OpenAIGPTConfig", dict(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                            tie_word_embeddings=False)),
    "gemma-legacy-gelu": ("GemmaConfig", dict(LLAMA_BASE, head_dim=8, hidden_act="gelu", attention_bias=True)),
    "deepseek-v3-no-q-lora-yarn": ("DeepseekV3Config", dict(DEEPSEEK_BASE, q_lora_rank=None, norm_topk_prob=False,
                                                            n_group=1, topk_group=1, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})),
}
CAUSAL_LM = {"OpenAIGPTConfig": "OpenAIGPTLMHeadModel", "GPT2Config": "GPT2LMHeadModel",
             "LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
             "MixtralConfig": "MixtralForCausalLM", "GemmaConfig": "GemmaForCausalLM",
             "Qwen3Config": "Qwen3ForCausalLM", "DeepseekV3Config": "DeepseekV3ForCausalLM"}
SYLLABLES = ["ka", "ro", "mi", "te", "su", "no", "la", "vi", "po", "de", "мо", "ро", "зи", "сол"]
TOKENIZER_TEXT = "the quick brown fox jumps over the lazy dog; Мороз и солнце. " * 20 + " ".join(
    SYLLABLES[i % 14] + SYLLABLES[(i * 7) % 13] + SYLLABLES[(i * 5) % 11] for i in range(3000))


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from init (gains near 1, biases and routing biases near 0, matrices N(0, 0.1)), so that
    every part, including norms and biases, is exercised and greedy choices are rarely near ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or "rotary" in name or "inv_freq" in name or "embed_scale" in name \
                    or name.endswith(".bias") and p.dim() == 4 or "masked_bias" in name:
                continue
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise * 0.1 if p.dim() == 2 else noise * 0.1)
            else:
                p.add_(noise * 0.1)


def hf_reference(name: str, tmp_path):
    cfg_cls, kwargs = CASES[name]
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, CAUSAL_LM[cfg_cls])(cfg).eval()
    randomize(model, seed=len(name))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    tok = Tokenizer.train("bpe", [TOKENIZER_TEXT], vocab_size=cfg.vocab_size)
    assert tok.vocab_size == cfg.vocab_size
    tok.save(folder / "tokenizer.json")
    return model, folder


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def samovar_greedy(model, prompt: list[int], n: int) -> list[int]:
    return list(Engine(model).generate(prompt, SamplingParams(max_tokens=n, temperature=0)))


def assert_same_model(ours, theirs, vocab: int) -> None:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(vocab, (2, 20), generator=g)
    with torch.no_grad():
        expected = theirs(idx).logits
        actual = ours(idx)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    prompt = idx[0, :6].tolist()
    assert samovar_greedy(ours, prompt, 32) == hf_greedy(theirs, prompt, 32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_import_then_export_equals_transformers(name, tmp_path):
    reference, folder = hf_reference(name, tmp_path)
    ours, tokenizer = import_hf(folder)
    assert tokenizer is not None
    assert ours.num_params() == sum(p.numel() for p in reference.parameters())
    assert_same_model(ours, reference, reference.config.vocab_size)

    exported = export_hf(ours, tokenizer, tmp_path / "export")
    again = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(again).__name__ == type(reference).__name__
    assert_same_model(ours, again, reference.config.vocab_size)


def test_every_family_is_covered():
    covered = {getattr(transformers, CASES[c][0]).model_type for c in CASES}
    assert covered == set(FAMILIES)


def test_pipeline_generates_the_same_greedy_text(tmp_path):
    reference, folder = hf_reference("llama-gqa", tmp_path)
    ours, tokenizer = import_hf(folder)
    save_checkpoint(tmp_path / "ckpt", ours, tokenizer)
    export_hf(ours, tokenizer, tmp_path / "export")
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "export"), device="cpu")
    prompt = "the quick brown"
    theirs = pipe(prompt, max_new_tokens=20, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert theirs == generate(ours, tokenizer, prompt, max_tokens=20, temperature=0)
    auto_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert auto_tok("Мороз и солнце")["input_ids"] == tokenizer.encode("Мороз и солнце")


def test_sharded_export_loads(tmp_path):
    reference, folder = hf_reference("gpt2", tmp_path)
    ours, tokenizer = import_hf(folder)
    out = export_hf(ours, tokenizer, tmp_path / "export", max_shard_bytes=20_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert_same_model(ours, again, reference.config.vocab_size)


def test_pytorch_bin_checkpoints_import(tmp_path):
    reference, folder = hf_reference("gpt2", tmp_path)
    state = {k: v for k, v in reference.state_dict().items()}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    ours, _ = import_hf(folder)
    assert_same_model(ours, reference, reference.config.vocab_size)


def test_padded_vocabulary_imports_generates_and_exports(tmp_path):
    """nanoGPT pads GPT-2's 50,257 tokens to 50,304; here here 384 over a 300-token tokenizer."""
    cfg = transformers.GPT2Config(vocab_size=384, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    reference = transformers.GPT2LMHeadModel(cfg).eval()
    randomize(reference, 3)
    with torch.no_grad():  # make the padding ids the most likely ones, which generation must still skip
        reference.transformer.wte.weight[330:] *= 50
    reference.save_pretrained(tmp_path / "hf")
    Tokenizer.train("bpe", [TOKENIZER_TEXT], vocab_size=300).save(tmp_path / "hf" / "tokenizer.json")
    ours, tokenizer = import_hf(tmp_path / "hf")
    assert ours.config.vocab_size == 384 and tokenizer.vocab_size <= 300
    ids = tokenizer.encode(generate(ours, tokenizer, "the quick", max_tokens=20, temperature=0, ignore_eos=True))
    assert ids and max(ids) < tokenizer.vocab_size
    export_hf(ours, tokenizer, tmp_path / "export")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert again.config.vocab_size == 384


def test_unsupported_configs_are_refused_by_name(tmp_path):
    base = json.loads(transformers.LlamaConfig(**LLAMA_BASE).to_json_string())
    with pytest.raises(HFError, match="rope type 'dynamic'"):
        config_from_hf({**base, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}})
    with pytest.raises(HFError, match="model_type 'bert'"):
        config_from_hf({**base, "model_type": "bert"})
    with pytest.raises(HFError, match="activation hidden_act='tanh'"):
        config_from_hf({**base, "hidden_act": "tanh"})
    qwen = json.loads(transformers.Qwen3Config(**LLAMA_BASE, use_sliding_window=True, max_window_layers=1,
                                               sliding_window=4).to_json_string())
    with pytest.raises(HFError, match="sliding-window"):
        config_from_hf(qwen)
    gpt2 = json.loads(transformers.GPT2Config(scale_attn_by_inverse_layer_idx=True).to_json_string())
    with pytest.raises(HFError, match="scale_attn_by_inverse_layer_idx"):
        config_from_hf(gpt2)
    mixtral = json.loads(transformers.MixtralConfig(**LLAMA_BASE, router_jitter_noise=0.1).to_json_string())
    with pytest.raises(HFError, match="router_jitter_noise"):
        config_from_hf(mixtral)


def test_missing_tensors_are_named(tmp_path):
    reference, folder = hf_reference("llama-gqa", tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(HFError, match="model.layers.1.mlp.down_proj.weight"):
        import_hf(folder)
    with pytest.raises(HFError, match="no config.json"):
        import_hf(tmp_path)
