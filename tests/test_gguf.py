"""GGUF export (interop/gguf.py): the file's structure read back with the `gguf` package, and the
model and tokenizer loaded from it by `transformers` (which reads GGUF as llama.cpp writes it),
giving samovar's logits and ids."""

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from samovar.chat import add_chat_tokens  # noqa: E402
from samovar.checkpoint import save_checkpoint  # noqa: E402
from samovar.config import get_preset  # noqa: E402
from samovar.interop.gguf import GGUFError, export_gguf, plain_template  # noqa: E402
from samovar.model import Transformer  # noqa: E402
from samovar.tokenizer import Tokenizer  # noqa: E402

from conftest import run_cli  # noqa: E402

TEXTS = ["Мороз и солнце; день чудесный! Ещё ты дремлешь, друг прелестный", "The quick brown fox, 42 times.",
         "def f(x):\n    return x ** 2  # code", "emoji 😀🚀 and   runs of    spaces\n\n\ttabs", "числа 12345 и 3.14"]


@pytest.fixture(scope="module")
def tokenizer():
    return add_chat_tokens(Tokenizer.train("bpe", [" ".join(TEXTS) * 20], vocab_size=400))


def model_of(preset: str, tokenizer, **changes):
    torch.manual_seed(0)
    changes = {"vocab_size": tokenizer.vocab_size + 3, "context_len": 64, **changes}  # a padded vocabulary
    cfg = get_preset(preset).replace(**changes)
    return with_balancing_bias(Transformer(cfg).eval())


def with_balancing_bias(model):
    """DeepSeek-V3's routers with a balancing bias as training leaves it (it starts at zero), so that
    what reads the model must apply it to choose the same experts."""
    for block in model.blocks:
        router = getattr(block.mlp, "router", None)
        if router is not None and router.bias is not None:
            router.bias.copy_(torch.randn(router.bias.shape) * 0.1)
    return model


# transformers does not read a qwen3 GGUF's attention.key_length nor a gpt2 GGUF's context_length
# (llama.cpp does): it takes Qwen3Config's default head size, 128, and GPT2Config's 1024 positions,
# so the models here have those
@pytest.mark.parametrize("preset, arch, changes", [("llama-tiny", "llama", {}), ("qwen3-tiny", "qwen3", {"head_dim": 128}),
                                                   ("gpt2-tiny", "gpt2", {"context_len": 1024})])
def test_an_export_reads_back_and_transformers_gives_our_logits_and_ids(tmp_path, tokenizer, preset, arch, changes):
    model = model_of(preset, tokenizer, **changes)
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(str(path))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == arch and field(f"{arch}.block_count") == model.config.n_layer
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert (f"{arch}.rope.freq_base" in reader.fields) == (arch != "gpt2")
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == model.config.vocab_size and tokens[tokenizer.eos_id] == "<|eos|>"
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_id
    assert field("tokenizer.chat_template") == plain_template(tokenizer.chat_template)
    assert "generation" not in plain_template(tokenizer.chat_template).replace("add_generation_prompt", "")
    types = field("tokenizer.ggml.token_type")
    assert types[tokenizer.token_id("<|user|>")] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    assert shapes["token_embd.weight"] == (model.config.vocab_size, model.config.n_embd)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval()
    ids = torch.tensor([tokenizer.encode(TEXTS[0] + TEXTS[3])[:60]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    for text in TEXTS + ["<|user|>привет<|eos|>", "  leading spaces", "ёЁ ïé ß"]:
        assert hf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text), text


def test_f16_bf16_and_q8_0_store_the_matrices_smaller_and_load_close(tmp_path, tokenizer):
    model = model_of("llama-tiny", tokenizer)
    ids = torch.tensor([tokenizer.encode(TEXTS[1])])
    for kind, qtype, tol in (("f16", gguf.GGMLQuantizationType.F16, 1e-2), ("bf16", gguf.GGMLQuantizationType.BF16, 5e-2),
                             ("q8_0", gguf.GGMLQuantizationType.Q8_0, 5e-2)):
        path = export_gguf(model, tokenizer, tmp_path / f"model-{kind}.gguf", kind=kind)
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
        assert types["blk.0.attn_q.weight"] == qtype and types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
        with torch.no_grad():
            assert (hf(ids).logits - model(ids)).abs().max() < tol, kind


def test_import_takes_an_export_back_and_refuses_a_damaged_file(tmp_path, tokenizer):
    from samovar.api import LLM
    from samovar.interop.gguf import import_gguf

    cases = [(p, "f32", 0.0) for p in ("llama-tiny", "qwen3-tiny", "gemma-tiny", "mixtral-tiny", "gpt2-tiny",
                                       "deepseek-v3-tiny")]
    for preset, kind, tol in cases + [("llama-tiny", "bf16", 2e-2), ("llama-tiny", "q8_0", 5e-2)]:
        model = model_of(preset, tokenizer)
        again, tok = import_gguf(export_gguf(model, tokenizer, tmp_path / f"{preset}.gguf", kind))
        ids = torch.tensor([tokenizer.encode(TEXTS[0])])
        with torch.no_grad():
            assert (again(ids) - model(ids)).abs().max() <= tol, (preset, kind)
        assert again.config.n_kv_head == model.config.n_kv_head and again.config.head_dim == model.config.head_dim
        for text in TEXTS + ["<|assistant|>привет<|eos|>"]:
            assert tok.encode(text) == tokenizer.encode(text)
        assert tok.eos_id == tokenizer.eos_id and tok.chat_template == plain_template(tokenizer.chat_template)
    messages = [{"role": "user", "content": "Мороз и солнце"}]
    assert LLM(again, tok).chat(messages, max_tokens=5, temperature=0) is not None  # its template renders
    r = run_cli("import", tmp_path / "llama-tiny.gguf", "--out", tmp_path / "imported")
    assert r.returncode == 0 and (tmp_path / "imported" / "tokenizer.json").exists(), r.stderr
    assert run_cli("generate", tmp_path / "imported", "--prompt", "Мороз", "--max-tokens", "3").returncode == 0
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes((tmp_path / "llama-tiny.gguf").read_bytes()[:5000])
    r = run_cli("import", damaged, "--out", tmp_path / "nothing")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a readable GGUF file" in r.stderr
    assert not (tmp_path / "nothing").exists()


def test_a_char_model_goes_out_as_byte_level_bpe_with_its_own_ids_and_comes_back(tmp_path):
    """The demo's kind of model: a char tokenizer becomes byte-level BPE whose merges build each
    multi-byte character from its bytes, so that every character is still one token, its own id."""
    from samovar.interop.gguf import import_gguf

    char = add_chat_tokens(Tokenizer.train("char", TEXTS))
    model = model_of("qwen3-tiny", char, head_dim=128)
    path = export_gguf(model, char, tmp_path / "char.gguf")
    reader = gguf.GGUFReader(str(path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    assert tokens[char.encode("д")[0]] == "Ð´" and "Ð ´" in merges  # д is D0 B4
    assert tokens[char.encode(" ")[0]] == "Ġ" and tokens[char.eos_id] == "<|eos|>"
    assert "ð Ł" in merges and "ðŁĺ Ģ" in merges  # 😀, four bytes, merged left to right
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="char.gguf").eval()
    ids = torch.tensor([char.encode(TEXTS[0])[:60]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-4)
    again, tok = import_gguf(path)
    assert tok.kind == "char" and all(tok.encode(t) == char.encode(t) for t in TEXTS)
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_gemma_and_mixtral_are_laid_out_as_llama_cpp_reads_them(tmp_path, tokenizer):
    """(transformers reads neither from GGUF: llama.cpp checks them, in make test-llamacpp.)"""
    gemma = model_of("gemma-tiny", tokenizer)
    reader = gguf.GGUFReader(str(export_gguf(gemma, tokenizer, tmp_path / "gemma.gguf")))
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == "gemma" and "output.weight" not in tensors
    norm = torch.tensor(tensors["blk.0.attn_norm.weight"].data)
    assert torch.equal(norm, gemma.blocks[0].attn_norm.weight.detach() + 1)  # HF's 1 + w, as llama.cpp applies it
    mixtral = model_of("mixtral-tiny", tokenizer)
    cfg = mixtral.config
    reader = gguf.GGUFReader(str(export_gguf(mixtral, tokenizer, tmp_path / "mixtral.gguf")))
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["llama.expert_count"].contents() == cfg.n_expert
    assert reader.fields["llama.expert_used_count"].contents() == cfg.n_expert_active
    up = tensors["blk.1.ffn_up_exps.weight"]
    assert tuple(int(d) for d in reversed(up.shape)) == (cfg.n_expert, cfg.expert_d_ff, cfg.n_embd)
    assert torch.equal(torch.tensor(up.data)[1], mixtral.blocks[1].mlp.experts[1].up_proj.weight.detach())
    assert tuple(int(d) for d in reversed(tensors["blk.0.ffn_gate_inp.weight"].shape)) == (cfg.n_expert, cfg.n_embd)


def test_deepseek_v3_is_laid_out_as_llama_cpp_reads_it(tmp_path, tokenizer):
    """llama.cpp's deepseek2: latent attention as one shared compressed head whose expansion is split
    into a key part (transposed, multiplied into the queries) and a value part; the routing's keys; the
    balancing bias. (transformers does not read deepseek2 from GGUF: llama.cpp checks it, in
    make test-llamacpp.) The same model without query compression goes out and back too."""
    from samovar.interop.gguf import import_gguf

    model = model_of("deepseek-v3-tiny", tokenizer)
    cfg = model.config
    reader = gguf.GGUFReader(str(export_gguf(model, tokenizer, tmp_path / "ds.gguf")))
    field = lambda key: reader.fields[f"deepseek2.{key}"].contents()  # noqa: E731
    assert reader.fields["general.architecture"].contents() == "deepseek2"
    assert (field("attention.head_count_kv"), field("attention.key_length"), field("attention.value_length")) == \
        (1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank)
    assert (field("attention.key_length_mla"), field("attention.value_length_mla")) == (cfg.head_dim, cfg.v_head_dim)
    assert (field("attention.q_lora_rank"), field("rope.dimension_count")) == (cfg.q_lora_rank, cfg.qk_rope_head_dim)
    assert (field("leading_dense_block_count"), field("expert_shared_count"), field("expert_feed_forward_length")) == \
        (cfg.n_dense_layers, cfg.n_shared_expert, cfg.expert_d_ff)
    assert field("expert_gating_func") == gguf.ExpertGatingFuncType.SIGMOID
    assert (field("expert_weights_scale"), field("expert_weights_norm")) == (cfg.routed_scale, True)
    assert (field("expert_group_count"), field("expert_group_used_count")) == (cfg.n_expert_group, cfg.n_expert_group_active)
    tensors = {t.name: t for t in reader.tensors}
    shape = lambda name: tuple(int(d) for d in reversed(tensors[name].shape))  # noqa: E731
    assert shape("blk.0.attn_k_b.weight") == (cfg.n_head, cfg.kv_lora_rank, cfg.qk_nope_head_dim)
    assert shape("blk.0.attn_v_b.weight") == (cfg.n_head, cfg.v_head_dim, cfg.kv_lora_rank)
    assert "blk.0.attn_kv_b.weight" not in tensors and "blk.0.ffn_gate_exps.weight" not in tensors  # layer 0: dense
    assert shape("blk.1.ffn_up_exps.weight") == (cfg.n_expert, cfg.expert_d_ff, cfg.n_embd)
    bias = model.blocks[1].mlp.router.bias.detach()
    assert torch.equal(torch.tensor(tensors["blk.1.exp_probs_b.bias"].data), bias)
    # the key part, multiplied into a query's unrotated half, gives its scores against the latent rows
    k_b = torch.tensor(tensors["blk.0.attn_k_b.weight"].data)
    kv_up = model.blocks[0].attn.kv_up.weight.detach().view(cfg.n_head, -1, cfg.kv_lora_rank)
    assert torch.equal(k_b.transpose(1, 2), kv_up[:, :cfg.qk_nope_head_dim])

    plain = model_of("deepseek-v3-tiny", tokenizer, q_lora_rank=None)
    again, _ = import_gguf(export_gguf(plain, tokenizer, tmp_path / "plain.gguf"))
    ids = torch.tensor([tokenizer.encode(TEXTS[0])])
    with torch.no_grad():
        assert again.config.q_lora_rank is None and torch.equal(again(ids), plain(ids))


def test_an_older_deepseek2_file_with_the_expansion_whole_imports(tmp_path, tokenizer):
    """llama.cpp's converter wrote DeepSeek's key-value expansion whole (attn_kv_b) and the per-head
    sizes as key_length/value_length before 2025; such a file, made here from an export, imports to
    the same model."""
    import numpy as np

    from samovar.interop.gguf import import_gguf

    model = model_of("deepseek-v3-tiny", tokenizer)
    cfg = model.config
    reader = gguf.GGUFReader(str(export_gguf(model, tokenizer, tmp_path / "new.gguf")))
    old = gguf.GGUFWriter(str(tmp_path / "old.gguf"), "deepseek2")
    newer = {"general.architecture", "deepseek2.attention.key_length_mla", "deepseek2.attention.value_length_mla",
             "deepseek2.attention.key_length", "deepseek2.attention.value_length", "deepseek2.attention.head_count_kv"}
    for key, f in reader.fields.items():
        if key not in newer and not key.startswith("GGUF."):
            old.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    old.add_key_length(cfg.head_dim)
    old.add_value_length(cfg.v_head_dim)
    old.add_head_count_kv(cfg.n_head)
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    for name, data in tensors.items():
        if ".attn_k_b." in name:  # (heads, rank, nope) and (heads, v, rank) -> (heads * (nope + v), rank)
            data = np.concatenate([data.transpose(0, 2, 1), tensors[name.replace("k_b", "v_b")]], axis=1)
            old.add_tensor(name.replace("attn_k_b", "attn_kv_b"), np.ascontiguousarray(data.reshape(-1, cfg.kv_lora_rank)))
        elif ".attn_v_b." not in name:
            old.add_tensor(name, data)
    old.write_header_to_file()
    old.write_kv_data_to_file()
    old.write_tensors_to_file()
    old.close()
    again, _ = import_gguf(tmp_path / "old.gguf")
    ids = torch.tensor([tokenizer.encode(TEXTS[0])])
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_weights_only_files_for_llama_bench(tmp_path, tokenizer):
    model = model_of("llama-tiny", tokenizer)
    reader = gguf.GGUFReader(str(export_gguf(model, None, tmp_path / "w.gguf", weights_only=True)))
    assert reader.fields["tokenizer.ggml.model"].contents() == "none"
    heads = 1 if model.config.tie_embeddings else 2  # token_embd, and output when untied
    assert "tokenizer.ggml.tokens" not in reader.fields
    assert len(reader.tensors) == heads + 1 + 9 * model.config.n_layer  # + output_norm, 9 a block


def test_what_cannot_be_exported_is_refused_in_one_line(tmp_path, tokenizer):
    word = Tokenizer.train("word", TEXTS)
    with pytest.raises(GGUFError, match="byte-level BPE or char tokenizer; this model's is word"):
        export_gguf(model_of("llama-tiny", word), word, tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="covers the llama, mistral, mixtral, qwen3, gemma, gpt2, deepseek_v3 families"):
        export_gguf(model_of("gpt1-tiny", tokenizer), tokenizer, tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="deepseek2 has no attention biases"):
        export_gguf(model_of("deepseek-v3-tiny", tokenizer, attn_bias=True, attn_out_bias=True), tokenizer, tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="rotate this model's positions otherwise: its llama yarn has no mscale"):
        export_gguf(model_of("llama-tiny", tokenizer, rope_scaling={"type": "yarn", "factor": 4.0, "mscale": 0.7,
                                                                     "original_context_len": 16}), tokenizer, tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="DeepSeek-V2-Lite, which has no query compression"):
        export_gguf(model_of("deepseek-v3-tiny", tokenizer, n_layer=27), tokenizer, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    save_checkpoint(tmp_path / "word-run", model_of("llama-tiny", word), word)
    r = run_cli("export", tmp_path / "word-run", "--format", "gguf", "--out", tmp_path / "x.gguf")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "byte-level BPE or char" in r.stderr
    save_checkpoint(tmp_path / "run", model_of("qwen3-tiny", tokenizer), tokenizer)
    r = run_cli("export", tmp_path / "run", "--format", "gguf", "--type", "f16", "--out", tmp_path / "m.gguf")
    assert r.returncode == 0 and "f16 GGUF" in r.stdout and (tmp_path / "m.gguf").exists()
    assert "sliding window" not in r.stdout


def test_a_sliding_window_model_declares_its_window_as_its_context(tmp_path, tokenizer):
    """llama.cpp's llama attends to every position: the file's context is the window, within which the
    two agree (make test-llamacpp checks that in llama.cpp)."""
    save_checkpoint(tmp_path / "run", model_of("mistral-tiny", tokenizer, sliding_window=16), tokenizer)
    r = run_cli("export", tmp_path / "run", "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert r.returncode == 0 and "declares a context of 16 positions" in r.stdout, r.stderr
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["llama.context_length"].contents() == 16


# ---- llama.cpp itself (make test-llamacpp builds it from the llama-cpp-python sdist and runs these) ----------
@pytest.fixture(scope="module")
def llamacpp():
    import os
    from pathlib import Path

    folder = os.environ.get("SAMOVAR_LLAMACPP_BIN")
    if not folder or not (Path(folder) / "llama-server").exists():
        pytest.skip("no llama.cpp build: `make test-llamacpp` builds one and runs these tests")
    return Path(folder)


CORPUS = ("Мороз и солнце; день чудесный! Ещё ты дремлешь, друг прелестный. Пора, красавица, проснись: "
          "открой сомкнуты негой взоры навстречу северной Авроры, звездою севера явись! "
          "The quick brown fox jumps over the lazy dog, 42 times in 2024. def f(x): return x ** 2 ") * 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """Models that learned CORPUS (peaked logits: greedy paths without near-ties), each exported as
    f32, f16 and q8_0: every family GGUF export covers (Mistral's file is LLaMA's) with byte-level BPE,
    and the demo's kind, Qwen3's parts with a char tokenizer. name -> (model, tokenizer, {kind: file})."""
    from conftest import memorize

    folder = tmp_path_factory.mktemp("gguf_trained")
    char = add_chat_tokens(Tokenizer.train("char", [CORPUS]))
    out = {}
    for name, preset, tok in (("llama", "llama-tiny", tokenizer), ("qwen3", "qwen3-tiny", tokenizer),
                              ("gemma", "gemma-tiny", tokenizer), ("mixtral", "mixtral-tiny", tokenizer),
                              ("gpt2", "gpt2-tiny", tokenizer), ("deepseek-v3", "deepseek-v3-tiny", tokenizer),
                              ("qwen3-char", "qwen3-tiny", char)):
        torch.manual_seed(0)
        cfg = get_preset(preset).replace(vocab_size=tok.vocab_size, context_len=160)
        model = memorize(with_balancing_bias(Transformer(cfg)), tok.encode(CORPUS), steps=150)
        out[name] = (model, tok, {kind: export_gguf(model, tok, folder / f"{name}-{kind}.gguf", kind)
                                  for kind in ("f32", "f16", "q8_0")})
    return out


class LlamaServer:
    """llama.cpp's llama-server on a free port of 127.0.0.1, started and healthy."""

    def __init__(self, binary, model, context: int = 160):
        import subprocess

        import httpx

        from conftest import free_port, wait_until_healthy

        self.url = f"http://127.0.0.1:{free_port()}"
        # float32 throughout: llama.cpp's defaults keep the KV cache in f16, and its CPU flash attention
        # works in half precision too (log-probabilities then differ by ~5e-3 instead of ~1e-5)
        self.proc = subprocess.Popen([str(binary / "llama-server"), "-m", str(model), "--host", "127.0.0.1",
                                      "--port", self.url.rsplit(":", 1)[1], "-c", str(context), "-np", "1", "--jinja",
                                      "--no-warmup", "--cache-type-k", "f32", "--cache-type-v", "f32", "--flash-attn", "off"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.http = httpx.Client(base_url=self.url, timeout=120)
        wait_until_healthy(self.url, self.proc)

    def tokenize(self, text: str) -> list[int]:
        return self.http.post("/tokenize", json={"content": text, "add_special": False,
                                                 "parse_special": True}).json()["tokens"]

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        r = self.http.post("/completion", json={"prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1,
                                               "ignore_eos": True, "cache_prompt": False, "return_tokens": True})
        return r.json()["tokens"]

    def stop(self):
        self.http.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


PIECES = ["Привет", "мир", "ёлка", "ЁЖ", "съешь", "же", "этих", "мягких", "французских", "булок", "the", "quick",
          "Fox", "don't", "we'll", "def", "f(x):", "return", "x**2", "{'a': [1, 2]}", "42", "3.14", "2024",
          "😀", "🚀🚀", "🇷🇺", "é", "ß", "中文", " ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\r\n", "!!!", "...",
          "<|user|>", "<|assistant|>", "<|eos|>", "<|system|>", "—", "«ёлки»", "naïve", "ünïcödé"]


SPECIAL_TEXT = ["<|user|>", "<|assistant|>", "<|eos|>", "<|system|>"]


def strings(n: int, alphabet: str | None = None) -> list[str]:
    """Russian, English, code, emoji, whitespace runs and special-token text, mixed at random (with
    an alphabet: only its characters, and special-token text)."""
    import random

    rng = random.Random(0)
    if alphabet is not None:
        chars = sorted(set(alphabet))
        return ["".join(rng.choice(chars) if rng.random() < 0.9 else rng.choice(SPECIAL_TEXT)
                        for _ in range(rng.randint(1, 40))) for _ in range(n)]
    return ["".join(rng.choice(PIECES) + rng.choice(["", " ", ""]) for _ in range(rng.randint(1, 12)))
            for _ in range(n)]


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma", "mixtral", "gpt2", "deepseek-v3", "qwen3-char"])
def test_llamacpp_tokenizes_and_decodes_as_samovar_does(llamacpp, trained, name):
    from samovar.chat import render_text
    from samovar.engine import Engine, SamplingParams

    model, tokenizer, files = trained[name]
    server = LlamaServer(llamacpp, files["f32"])
    try:
        texts = strings(10_000, CORPUS if tokenizer.kind == "char" else None)
        wrong = [t for t in texts if server.tokenize(t) != tokenizer.encode(t)]
        assert not wrong, f"{len(wrong)} of {len(texts)} strings tokenize differently, e.g. {wrong[:3]!r}"
        ids = tokenizer.encode(CORPUS)
        prompts = [ids[i * 7:i * 7 + 3 + i] for i in range(16)] + [tokenizer.encode(t) for t in texts[:4]]
        params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
        ours = [list(Engine(model).generate(p, params)) for p in prompts]
        assert [server.greedy(p, 64) for p in prompts] == ours  # f32: every prompt, token for token
        messages = [{"role": "system", "content": "Будь краток."}, {"role": "user", "content": "Привет!"},
                    {"role": "assistant", "content": "Здравствуй."}, {"role": "user", "content": "Как дела?"}]
        rendered = server.http.post("/apply-template", json={"messages": messages}).json()["prompt"]
        assert rendered == render_text(tokenizer, messages, add_generation_prompt=True)[0]
    finally:
        server.stop()
    agreement = {}
    for kind in ("f16", "q8_0"):
        server = LlamaServer(llamacpp, files[kind])
        try:
            agreement[kind] = sum(server.greedy(p, 64) == o for p, o in zip(prompts, ours)) / len(prompts)
        finally:
            server.stop()
    print(f"{name}: greedy continuations equal to samovar's f32: f16 {agreement['f16']:.0%}, "
          f"q8_0 {agreement['q8_0']:.0%}")
    assert agreement["f16"] >= 0.95


@pytest.mark.llamacpp
def test_llamacpp_cli_answers_as_samovar_chat_does(llamacpp, trained):
    """The README's `llama-cli -m chat.gguf`: its conversation, through the file's chat template,
    answers greedily what samovar's chat answers."""
    import subprocess

    from samovar.api import LLM

    model, tokenizer, files = trained["llama"]
    question = "Мороз и солнце"
    ours = LLM(model, tokenizer).chat([{"role": "user", "content": question}], max_tokens=24, temperature=0)
    r = subprocess.run([str(llamacpp / "llama-cli"), "-m", str(files["f32"]), "--single-turn", "--simple-io",
                        "-p", question, "-n", "24", "--temp", "0"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    answer = r.stdout.split(f"> {question}\n", 1)[1].rsplit("\n[ Prompt:", 1)[0].strip()
    ours = ours.rstrip("\ufffd").strip()  # llama-cli holds back a last character whose bytes are not all out
    assert ours and answer == ours


@pytest.mark.llamacpp
def test_llamacpp_runs_a_sliding_window_model_as_samovar_within_the_window(llamacpp, tokenizer, tmp_path):
    from conftest import memorize
    from samovar.engine import Engine, SamplingParams

    torch.manual_seed(0)
    cfg = get_preset("mistral-tiny").replace(vocab_size=tokenizer.vocab_size, context_len=160, sliding_window=48)
    model = memorize(Transformer(cfg), tokenizer.encode(CORPUS), steps=150)
    ids = tokenizer.encode(CORPUS)
    prompts = [ids[i * 13:i * 13 + 8 + i] for i in range(20)]
    params = SamplingParams(max_tokens=48 - 8 - 19, temperature=0, ignore_eos=True)
    ours = [list(Engine(model).generate(p, params)) for p in prompts]
    server = LlamaServer(llamacpp, export_gguf(model, tokenizer, tmp_path / "window.gguf"), context=48)
    try:
        assert [server.greedy(p, params.max_tokens) for p in prompts] == ours
    finally:
        server.stop()


YARN = {"type": "yarn", "factor": 4.0, "original_context_len": 32}


@pytest.mark.llamacpp
@pytest.mark.parametrize("preset, scaling", [
    ("deepseek-v3-tiny", {**YARN, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),  # DeepSeek-V3's
    ("deepseek-v3-tiny", {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),  # DeepSeek-V2's
    ("llama-tiny", YARN), ("llama-tiny", {"type": "linear", "factor": 4.0}),
    ("llama-tiny", {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_context_len": 32})])
def test_llamacpp_scales_rotary_positions_as_samovar_does(llamacpp, tokenizer, tmp_path, preset, scaling):
    """Greedy continuations well past the original context (32 positions) equal samovar's, and an
    exported file imports back to the same model."""
    from conftest import memorize
    from samovar.engine import Engine, SamplingParams
    from samovar.interop.gguf import import_gguf

    torch.manual_seed(0)
    cfg = get_preset(preset).replace(vocab_size=tokenizer.vocab_size, context_len=160, rope_scaling=scaling)
    model = memorize(with_balancing_bias(Transformer(cfg)), tokenizer.encode(CORPUS), steps=150, context=96)
    path = export_gguf(model, tokenizer, tmp_path / "scaled.gguf")
    ids = tokenizer.encode(CORPUS)
    prompts = [ids[i * 11:i * 11 + 40 + 6 * i] for i in range(8)]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    ours = [list(Engine(model).generate(p, params)) for p in prompts]
    server = LlamaServer(llamacpp, path)
    try:
        assert [server.greedy(p, 64) for p in prompts] == ours
    finally:
        server.stop()
    if scaling["type"] != "llama3":  # (its per-frequency factors are not read back)
        again, _ = import_gguf(path)
        with torch.no_grad():
            assert torch.equal(again(torch.tensor([ids[:150]])), model(torch.tensor([ids[:150]])))


@pytest.mark.llamacpp
def test_llamacpp_perplexity_equals_samovars_and_q8_0_costs_little(llamacpp, trained, tmp_path):
    """llama-perplexity's figure (second half of each window of 128 tokens) computed by samovar the same
    way, and what q8_0 costs."""
    import re
    import subprocess

    model, tokenizer, files = trained["llama"]
    text = CORPUS[::-1] + CORPUS  # half of it unseen
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    ctx = 128

    def llama_perplexity(file) -> float:
        r = subprocess.run([str(llamacpp / "llama-perplexity"), "-m", str(file), "-f", str(tmp_path / "text.txt"),
                            "-c", str(ctx), "-b", str(ctx)], capture_output=True, text=True, timeout=600)
        return float(re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr).group(1))

    ids = tokenizer.encode(text)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) // ctx * ctx, ctx):
            window = torch.tensor([ids[start:start + ctx]])
            logp = torch.log_softmax(model(window)[0].float(), -1)
            for j in range(ctx // 2, ctx - 1):
                nll -= float(logp[j, window[0, j + 1]])
                count += 1
    ours = float(torch.exp(torch.tensor(nll / count)))
    f32, q8 = llama_perplexity(files["f32"]), llama_perplexity(files["q8_0"])
    print(f"perplexity: samovar {ours:.4f}, llama.cpp f32 {f32:.4f}, q8_0 {q8:.4f} ({q8 / f32 - 1:+.2%})")
    assert abs(f32 / ours - 1) < 1e-3
    assert abs(q8 / f32 - 1) < 0.05


@pytest.mark.llamacpp
def test_a_k_quant_file_imports_with_the_weights_llama_cpp_computes_with(llamacpp, tokenizer, tmp_path):
    """llama-quantize makes a Q4_K_M file (k-quants need rows of 256); samovar imports it, dequantized by
    gguf's own code. Written back as f32, llama.cpp gives samovar's log-probabilities (1e-4): the
    weights are the ones llama.cpp dequantizes. On the Q4_K_M file itself llama.cpp also rounds the
    activations to 8 bits, so there the two agree on the likeliest token and within 0.1."""
    import subprocess

    from conftest import memorize
    from samovar.interop.gguf import import_gguf

    torch.manual_seed(0)
    cfg = get_preset("llama-tiny").replace(vocab_size=tokenizer.vocab_size, context_len=160, n_embd=256, d_ff=512)
    model = memorize(Transformer(cfg), tokenizer.encode(CORPUS), steps=100)
    q4 = tmp_path / "q4_k_m.gguf"
    subprocess.run([str(llamacpp / "llama-quantize"), str(export_gguf(model, tokenizer, tmp_path / "f32.gguf")),
                    str(q4), "Q4_K_M"], check=True, capture_output=True)
    assert gguf.GGMLQuantizationType.Q4_K in {t.tensor_type for t in gguf.GGUFReader(str(q4)).tensors}
    again, _ = import_gguf(q4)
    dequantized = export_gguf(again, tokenizer, tmp_path / "dequantized.gguf")
    ids = tokenizer.encode(CORPUS)
    prompts = [ids[start:start + 12] for start in range(0, 160, 10)]
    with torch.no_grad():
        ours = [torch.log_softmax(again(torch.tensor([p]))[0, -1].float(), -1) for p in prompts]
    for file, tolerance in ((dequantized, 1e-4), (q4, 0.1)):
        server = LlamaServer(llamacpp, file)
        try:
            compared = 0
            for prompt, lp in zip(prompts, ours):
                r = server.http.post("/completion", json={"prompt": prompt, "n_predict": 1, "n_probs": 5,
                                                         "temperature": 0, "post_sampling_probs": False}).json()
                if "completion_probabilities" not in r:  # llama-server holds back a token ending mid-character
                    continue
                compared += 1
                theirs = {t["id"]: t["logprob"] for t in r["completion_probabilities"][0]["top_logprobs"]}
                assert int(lp.argmax()) == max(theirs, key=theirs.get)
                assert all(abs(float(lp[i]) - v) < tolerance for i, v in theirs.items()), (file.name, theirs, lp.topk(5))
            assert compared >= 8
        finally:
            server.stop()
