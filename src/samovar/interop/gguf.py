"""GGUF files, what llama.cpp (and Ollama and LM Studio through it) load: export and import.

A model goes out the way llama.cpp's own converter takes an HF folder: the HF state dict of the
family that expresses it (hf.py), renamed by the `gguf` package's tensor map for llama.cpp's
architecture of that family, with llama.cpp's hyperparameter keys and the tokenizer inside the file
(byte-level BPE: tokens, merges, token types, bos/eos/pad, the chat template, and the pre-tokenizer
name that tells llama.cpp which split regex the vocabulary was trained with).

    export_gguf(model, tokenizer, "model.gguf", kind="f32")     # or f16, bf16, q8_0
    model, tokenizer = import_gguf("model.gguf")                 # f32/f16/bf16, q8_0, k-quants: dequantized

Import is the same way back: llama.cpp's hyperparameters become the HF config, the tensors are
dequantized with the `gguf` package's own code and renamed to HF's names, and the vocabulary and
merges become a byte-level BPE tokenizer again (or a char tokenizer, when every token is one character).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import atomic_path
from .hf import Family, config_from_hf, config_to_hf
from .hf_config import HFError
from .hf_weights import _permute_rope_rows, state_from_hf, state_to_hf


@dataclass(frozen=True)
class Arch:
    """How an HF family's tensors become llama.cpp's, as llama.cpp's converter does it."""

    name: str  # llama.cpp's architecture
    pairs: bool = False  # llama.cpp's LLaMA rotates neighbouring pairs, HF's the halves: q, k rows reordered
    norm_plus_one: bool = False  # HF's Gemma scales by 1 + a norm's weight; llama.cpp by the weight as stored
    conv1d: bool = False  # HF's GPT-2 stores matrices (in, out); llama.cpp (out, in)
    rope: bool = True


# (DeepSeek-V3's HF files keep its rotated rows in pairs already: rope_interleave)
ARCHITECTURES = {"llama": Arch("llama", pairs=True), "mistral": Arch("llama", pairs=True),
                 "mixtral": Arch("llama", pairs=True), "qwen3": Arch("qwen3"),
                 "gemma": Arch("gemma", norm_plus_one=True), "gpt2": Arch("gpt2", conv1d=True, rope=False),
                 "deepseek_v3": Arch("deepseek2")}

# the split regex of a byte-level BPE -> the tokenizer.ggml.pre name llama.cpp knows it by
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {GPT2_SPLIT: "gpt-2", LLAMA3_SPLIT: "llama-bpe"}
KINDS = ("f32", "f16", "bf16", "q8_0")


class GGUFError(HFError):
    pass


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFError("GGUF files need the gguf package: pip install 'samovar[gguf]'") from None
    return gguf


def split_regex(tokenizer) -> str | None:
    """The regex a byte-level BPE tokenizer splits text with before merging (None: not one we know)."""
    pre = json.loads(tokenizer.hf.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for part in parts:
        if part.get("type") == "ByteLevel" and part.get("use_regex", True):
            return GPT2_SPLIT
        if part.get("type") == "Split":
            return part.get("pattern", {}).get("Regex")
    return None


def check_exportable(cfg, tokenizer, weights_only: bool = False) -> tuple[Family, str | None]:
    """(the HF family that goes out, the pre-tokenizer's name), or a one-line GGUFError saying what stops it."""
    _, family = config_to_hf(cfg)
    if family.model_type not in ARCHITECTURES:
        raise GGUFError(f"GGUF export covers the {', '.join(ARCHITECTURES)} families so far; this model is "
                        f"{family.model_type} (export it with --format hf instead)")
    if (why := _unwritten_rope_scaling(cfg, ARCHITECTURES[family.model_type])) is not None:
        raise GGUFError(f"llama.cpp would rotate this model's positions otherwise: {why}")
    if cfg.attention == "mla" and (cfg.attn_bias or cfg.attn_out_bias):
        raise GGUFError("llama.cpp's deepseek2 has no attention biases; this model has them")
    if cfg.attention == "mla" and cfg.q_lora_rank and cfg.n_layer in (26, 27):
        raise GGUFError(f"llama.cpp takes a deepseek2 of {cfg.n_layer} layers for DeepSeek-V2-Lite, which has "
                        "no query compression, and would not load this model's (q_lora_rank)")
    if weights_only:
        return family, None
    if tokenizer is None:
        raise GGUFError("a GGUF file carries its tokenizer: this checkpoint has no tokenizer.json")
    if tokenizer.kind == "char":  # written as byte-level BPE whose merges build each character (see below)
        return family, PRE_TOKENIZERS[GPT2_SPLIT]
    if tokenizer.kind != "bpe":
        raise GGUFError(f"GGUF export needs a byte-level BPE or char tokenizer; this model's is {tokenizer.kind} "
                        "(prepare the data with --tokenizer bpe, or export with --format hf)")
    regex = split_regex(tokenizer)
    if regex not in PRE_TOKENIZERS:
        raise GGUFError("this tokenizer splits text with a regex llama.cpp does not know by name, so "
                        "llama.cpp would tokenize differently")
    return family, PRE_TOKENIZERS[regex]


def _unwritten_rope_scaling(cfg, arch: Arch) -> str | None:
    """Why llama.cpp would not scale this model's rotary positions as samovar does (None: it would).
    It reads linear scaling; Llama 3.1's as per-frequency factors (a tensor only its llama has); yarn
    with HF's ramp at its defaults, beta_fast 32 and beta_slow 1, and attention factors that follow
    DeepSeek's mscale == mscale_all_dim in deepseek2 and HF's default everywhere else."""
    s = cfg.rope_scaling
    if s is None or s["type"] == "linear":
        return None
    if s["type"] == "llama3":
        return None if arch.name == "llama" else f"its {arch.name} has no llama3 rope scaling"
    if s.get("attention_factor") is not None or (s.get("beta_fast") or 32) != 32 or (s.get("beta_slow") or 1) != 1:
        return "its yarn takes no attention_factor and ramps between beta_fast 32 and beta_slow 1"
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    if arch.name == "deepseek2" and not (mscale and mscale == mscale_all_dim):
        return "its deepseek2 yarn needs mscale == mscale_all_dim, as DeepSeek's configs have"
    if arch.name != "deepseek2" and (mscale or mscale_all_dim):
        return f"its {arch.name} yarn has no mscale"
    return None


def llamacpp_context(cfg) -> int:
    """The context a GGUF file declares: the model's, or its sliding window when that is shorter.
    llama.cpp's llama attends to every position (its converter writes Mistral so too), so llama.cpp
    and samovar agree within the window; the file says that much."""
    return min(cfg.context_len, cfg.sliding_window or cfg.context_len)


def export_gguf(model, tokenizer, out: str | Path, kind: str = "f32", weights_only: bool = False) -> Path:
    """Write `model` and `tokenizer` as one GGUF file (f32, f16, bf16 or q8_0 for the matrices; norms stay
    f32). weights_only: no vocabulary (what llama-bench needs, which feeds random ids)."""
    from ..checkpoint import model_state

    gguf = _gguf()
    if kind not in KINDS:
        raise GGUFError(f"unknown GGUF type {kind!r}; choose one of {', '.join(KINDS)}")
    cfg = model.config
    family, pre = check_exportable(cfg, tokenizer, weights_only)
    arch = ARCHITECTURES[family.model_type]
    state = _llamacpp_layout(state_to_hf({k: v.float().cpu() for k, v in model_state(model).items()}, cfg, family),
                             cfg, arch)
    names = _tensor_names(gguf, arch.name, cfg.n_layer)
    out = Path(out)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch.name)
        w.add_name(out.stem)
        _add_hyperparameters(w, cfg, arch)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if weights_only:
            w.add_tokenizer_model("none")
        else:
            _add_tokenizer(w, gguf, tokenizer, cfg.vocab_size, pre)
        for hf_name, tensor in state.items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise GGUFError(f"llama.cpp's {arch.name} has no place for {hf_name}")
            _add_tensor(w, gguf, name, tensor, kind)
        if cfg.rope_scaling is not None and cfg.rope_scaling["type"] == "llama3":
            w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _rope_freqs(cfg).numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def _add_hyperparameters(w, cfg, arch: Arch) -> None:
    """llama.cpp's keys for the model's sizes, as its converter writes them for the architecture."""
    w.add_context_length(llamacpp_context(cfg))
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    # Mixtral's experts (llama.cpp's llama) are the width it reads here; DeepSeek's have a key of their own
    w.add_feed_forward_length(cfg.expert_d_ff if cfg.n_expert and cfg.router == "softmax" else cfg.d_ff)
    w.add_head_count(cfg.n_head)
    if not arch.rope:
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_layer_norm_eps(cfg.norm_eps)
    elif cfg.attention == "mla":
        # llama.cpp runs latent attention as one shared head of the compressed keys and values
        # (multi-query), then expands it per head: the sizes of both views
        w.add_head_count_kv(1)
        w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.kv_lora_rank)
        w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        w.add_value_length_mla(cfg.v_head_dim)
        w.add_q_lora_rank(cfg.q_lora_rank or 0)  # 0: queries by one full projection
        w.add_kv_lora_rank(cfg.kv_lora_rank)
    else:
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if arch.rope:
        w.add_rope_dimension_count(cfg.rope_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
    if (s := cfg.rope_scaling) is not None and s["type"] in ("linear", "yarn"):  # llama3's: a tensor (_rope_freqs)
        w.add_rope_scaling_type(_gguf().RopeScalingType(s["type"]))
        w.add_rope_scaling_factor(s["factor"])
    if s is not None and s["type"] == "yarn":
        w.add_rope_scaling_orig_ctx_len(s["original_context_len"])
        if s.get("mscale_all_dim"):  # llama.cpp's deepseek2 divides it by 0.1 again
            w.add_rope_scaling_yarn_log_mul(0.1 * s["mscale_all_dim"])
    if cfg.n_expert:
        w.add_expert_count(cfg.n_expert)
        w.add_expert_used_count(cfg.n_expert_active)
    if cfg.router == "sigmoid":  # DeepSeek-V3's routing: the leading dense layers, shared experts, groups
        gguf = _gguf()
        w.add_leading_dense_block_count(cfg.n_dense_layers)
        w.add_expert_feed_forward_length(cfg.expert_d_ff)
        w.add_expert_shared_count(cfg.n_shared_expert)
        w.add_expert_weights_scale(cfg.routed_scale)
        w.add_expert_weights_norm(cfg.router_norm_topk)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_group_count(cfg.n_expert_group)
        w.add_expert_group_used_count(cfg.n_expert_group_active)


def _rope_freqs(cfg) -> torch.Tensor:
    """Llama 3.1's rope scaling as llama.cpp's llama applies it: each frequency divided by a factor."""
    from ..layers import rope_frequencies

    plain, _ = rope_frequencies(cfg.rope_dim, cfg.rope_theta)
    scaled, _ = rope_frequencies(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)
    return plain / scaled


EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def _llamacpp_layout(state: dict[str, torch.Tensor], cfg, arch: Arch) -> dict[str, torch.Tensor]:
    """An HF state dict laid out as llama.cpp's converter lays it out (names still HF's): q and k rows in
    pairs, Gemma's norms as 1 + weight, GPT-2's matrices (out, in), each layer's experts stacked, and
    latent attention's key-value expansion split into its key part (transposed: llama.cpp multiplies
    the queries by it, "absorbed") and its value part."""
    out, experts = {}, {}
    for name, t in state.items():
        if arch.pairs and name.endswith(("q_proj.weight", "k_proj.weight")):  # halves -> pairs
            heads = cfg.n_head if name.endswith("q_proj.weight") else cfg.n_kv_head
            t = _permute_rope_rows(t, heads, 0, cfg.head_dim, inverse=True)
        if arch.norm_plus_one and name.endswith("norm.weight"):
            t = t + 1
        if arch.conv1d and t.dim() == 2 and ".h." in name:
            t = t.t().contiguous()
        if m := EXPERT.match(name):
            experts.setdefault(f"{m[1]}.{m[3]}.weight", {})[int(m[2])] = t
            continue
        if name.endswith("kv_b_proj.weight"):
            k, v = t.view(cfg.n_head, -1, cfg.kv_lora_rank).split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            out[name.replace("kv_b_proj", "k_b_proj")] = k.transpose(1, 2).contiguous()
            out[name.replace("kv_b_proj", "v_b_proj")] = v.contiguous()
            continue
        out[name.replace("e_score_correction_bias", "e_score_correction.bias")] = t  # as gguf's map spells it
    for name, by_index in experts.items():
        out[name] = torch.stack([by_index[e] for e in sorted(by_index)])
    return out


def _hf_layout(state: dict[str, torch.Tensor], cfg, arch: Arch) -> dict[str, torch.Tensor]:
    """The inverse of _llamacpp_layout: an HF state dict as HF's own files hold it (a file may also
    hold latent attention's expansion whole, as llama.cpp's converter wrote it before 2025)."""
    out = {}
    for name, t in state.items():
        if arch.pairs and name.endswith(("q_proj.weight", "k_proj.weight")):  # pairs -> halves
            heads = cfg.n_head if name.endswith("q_proj.weight") else cfg.n_kv_head
            t = _permute_rope_rows(t, heads, 0, cfg.head_dim, inverse=False)
        if arch.norm_plus_one and name.endswith("norm.weight"):
            t = t - 1
        if arch.conv1d and t.dim() == 2 and ".h." in name:
            t = t.t().contiguous()
        if name.endswith(".v_b_proj.weight"):
            continue  # joined with its key part
        if name.endswith(".k_b_proj.weight"):
            v = state[name.replace("k_b_proj", "v_b_proj")]
            out[name.replace("k_b_proj", "kv_b_proj")] = torch.cat([t.transpose(1, 2), v], dim=1).flatten(0, 1)
            continue
        if t.dim() == 3:  # a layer's experts, stacked
            base, w = name.removesuffix(".weight").rsplit(".", 1)
            out.update({f"{base}.{e}.{w}.weight": t[e] for e in range(t.size(0))})
            continue
        out[name.replace("e_score_correction.bias", "e_score_correction_bias")] = t
    return out


def _hf_config(field, arch: str, tensors: dict, path: Path) -> dict:
    """The HF config.json of a GGUF file's model, from llama.cpp's keys."""
    experts = field(f"{arch}.expert_count", 0)
    kind = {"llama": "mixtral" if experts else "llama", "qwen3": "qwen3", "gemma": "gemma", "gpt2": "gpt2",
            "deepseek2": "deepseek_v3"}.get(arch)
    if kind is None:
        raise GGUFError(f"{path}: samovar reads GGUF files of the llama, qwen3, gemma, gpt2 and deepseek2 "
                        f"architectures, not {arch}")
    heads, hidden = field(f"{arch}.attention.head_count"), field(f"{arch}.embedding_length")
    common = {"model_type": kind, "vocab_size": int(tensors["token_embd.weight"].shape[1]),
              "tie_word_embeddings": "output.weight" not in tensors}
    if kind == "gpt2":
        return {**common, "n_positions": field("gpt2.context_length"), "n_layer": field("gpt2.block_count"),
                "n_head": heads, "n_embd": hidden, "n_inner": field("gpt2.feed_forward_length"),
                "layer_norm_epsilon": field("gpt2.attention.layer_norm_epsilon", 1e-5),
                "activation_function": "gelu_new"}
    hf = {**common, "max_position_embeddings": field(f"{arch}.context_length"), "hidden_size": hidden,
          "num_hidden_layers": field(f"{arch}.block_count"), "num_attention_heads": heads,
          "num_key_value_heads": field(f"{arch}.attention.head_count_kv", heads),
          "head_dim": field(f"{arch}.attention.key_length", hidden // heads),
          "intermediate_size": field(f"{arch}.feed_forward_length"),
          "rms_norm_eps": field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
          "rope_theta": field(f"{arch}.rope.freq_base", 10000.0),
          "hidden_act": "gelu_pytorch_tanh" if kind == "gemma" else "silu"}
    scaling = field(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear", "yarn"):
        raise GGUFError(f"{path}: {scaling} rope scaling is not read yet")
    if scaling != "none":
        hf["rope_scaling"] = {"rope_type": scaling, "factor": field(f"{arch}.rope.scaling.factor")}
    if scaling == "yarn":
        hf["rope_scaling"]["original_max_position_embeddings"] = field(f"{arch}.rope.scaling.original_context_length")
        if log_mul := field(f"{arch}.rope.scaling.yarn_log_multiplier"):  # DeepSeek's: mscale == mscale_all_dim
            mscale = round(log_mul / 0.1, 6)  # (stored as float32)
            hf["rope_scaling"].update(mscale=mscale, mscale_all_dim=mscale)
    if kind == "deepseek_v3":
        hf.update(_deepseek_config(field, heads))
    elif experts:
        hf.update(num_local_experts=experts, num_experts_per_tok=field(f"{arch}.expert_used_count"))
    return hf


def _deepseek_config(field, heads: int) -> dict:
    """DeepSeek-V3's HF fields from a deepseek2 file (files written before 2025 lack the _mla sizes:
    there key_length and value_length are the per-head ones)."""
    gguf = _gguf()
    rope = field("deepseek2.rope.dimension_count")
    key = field("deepseek2.attention.key_length_mla", field("deepseek2.attention.key_length"))
    gating = field("deepseek2.expert_gating_func", int(gguf.ExpertGatingFuncType.SOFTMAX))  # llama.cpp's default
    return {"num_key_value_heads": heads, "head_dim": rope, "qk_rope_head_dim": rope, "qk_nope_head_dim": key - rope,
            "v_head_dim": field("deepseek2.attention.value_length_mla", field("deepseek2.attention.value_length")),
            "q_lora_rank": field("deepseek2.attention.q_lora_rank", 0) or None,
            "kv_lora_rank": field("deepseek2.attention.kv_lora_rank"),
            "n_routed_experts": field("deepseek2.expert_count"), "num_experts_per_tok": field("deepseek2.expert_used_count"),
            "n_shared_experts": field("deepseek2.expert_shared_count", 0),
            "moe_intermediate_size": field("deepseek2.expert_feed_forward_length"),
            "first_k_dense_replace": field("deepseek2.leading_dense_block_count", 0),
            "norm_topk_prob": field("deepseek2.expert_weights_norm", False),
            "routed_scaling_factor": field("deepseek2.expert_weights_scale", 1.0),
            "n_group": field("deepseek2.expert_group_count", 1), "topk_group": field("deepseek2.expert_group_used_count", 1),
            "scoring_func": "sigmoid" if gating == gguf.ExpertGatingFuncType.SIGMOID else "softmax"}


def _tensor_names(gguf, arch: str, n_layer: int):
    """gguf's map from HF tensor names to llama.cpp's, for an architecture named as in a file."""
    by_name = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(by_name[arch], n_layer)


def _add_tensor(w, gguf, name: str, tensor: torch.Tensor, kind: str) -> None:
    data = tensor.contiguous().numpy()
    if data.ndim == 1 or kind == "f32":  # norms and biases stay float32, as llama.cpp's converter keeps them
        w.add_tensor(name, data)
    elif kind == "bf16" or kind == "q8_0" and data.shape[-1] % 32 == 0:
        qtype = gguf.GGMLQuantizationType[kind.upper()]
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    else:  # f16, or a row too short for q8_0's blocks of 32
        w.add_tensor(name, data.astype("float16"))


def _add_tokenizer(w, gguf, tokenizer, vocab_size: int, pre: str) -> None:
    """Byte-level BPE as llama.cpp reads it ("gpt2" model): every id up to the model's vocabulary
    (padding ids past the tokenizer's as unused tokens), the merges, token types, special ids."""
    by_id = {i: t for t, i in tokenizer.hf.get_vocab(with_added_tokens=True).items()}
    special = set(tokenizer.special_tokens)
    if tokenizer.kind == "char":
        by_id, merges = _char_vocabulary(by_id, special)
    else:
        merges = json.loads(tokenizer.hf.to_str())["model"].get("merges", [])
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED if token is None else
                     gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for role, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        i = tokenizer.token_id(tokenizer.roles.get(role))
        if i is not None:
            add(i)
    eos = tokenizer.eos_id
    if eos is not None and tokenizer.chat_template is not None:
        w.add_eot_token_id(eos)  # every turn ends with it: where llama.cpp's chat stops
    w.add_add_bos_token(False)  # samovar adds no bos to a prompt; the chat template writes its own
    w.add_add_eos_token(False)
    if tokenizer.chat_template is not None:
        w.add_chat_template(plain_template(tokenizer.chat_template))


def _char_vocabulary(by_id: dict[int, str], special: set[str]) -> tuple[dict[int, str], list[str]]:
    """A char tokenizer as byte-level BPE with the same ids: each character's token is the byte-level
    spelling of its UTF-8 bytes, and merges compose the characters of more than one byte from their
    bytes (byte by byte, left to right). llama.cpp looks only the merged result up in the vocabulary,
    and no merge joins two characters, so every character stays one token: samovar's."""
    from ..tokenizer import byte_to_unicode

    spell = byte_to_unicode()
    tokens, merges = {}, []
    for i, t in by_id.items():
        if t in special:
            tokens[i] = t
            continue
        pieces = [spell[b] for b in t.encode("utf-8")]
        tokens[i] = "".join(pieces)
        for k in range(1, len(pieces)):
            merges.append(f"{''.join(pieces[:k])} {pieces[k]}")
    return tokens, list(dict.fromkeys(merges))


def plain_template(template: str) -> str:
    """The chat template without HF's {% generation %} markers (they mark the assistant's tokens for
    training and change no text; llama.cpp's Jinja does not know them)."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


# ---- import ---------------------------------------------------------------------------------------------
def import_gguf(path: str | Path):
    """(Transformer, Tokenizer or None) from a GGUF file of a family samovar reads."""
    import numpy as np

    from ..checkpoint import CheckpointError, load_state_into
    from ..model import Transformer

    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "no such file", str(path))
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct errors, ... on a damaged file
        raise GGUFError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})")

    def field(key: str, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    arch = field("general.architecture")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise GGUFError(f"{path}: per-frequency rope factors (Llama 3.1's rope scaling) are not read yet")
    cfg, family = config_from_hf(_hf_config(field, arch, tensors, path))
    names = _tensor_names(gguf, arch, cfg.n_layer)
    layout = ARCHITECTURES[family.model_type]
    with torch.device("meta"):  # the HF names of this config's tensors, before and after llama.cpp's layout
        hf_state = state_to_hf(Transformer(cfg).state_dict(), cfg, family)
    hf_name = {names.get_name(h, try_suffixes=(".weight", ".bias")): h  # llama.cpp's name -> HF's
               for h in [*hf_state, *_llamacpp_layout(hf_state, cfg, layout)]}
    hf_state = {}
    for name, t in tensors.items():
        if name not in hf_name:
            raise GGUFError(f"{path}: samovar's {family.model_type} has no place for the tensor {name}")
        shape = [int(d) for d in reversed(t.shape)]
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        hf_state[hf_name[name]] = torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a copy
    hf_state = _hf_layout(hf_state, cfg, layout)
    model = Transformer(cfg)
    try:
        load_state_into(model, state_from_hf(hf_state, cfg, family), str(path))
    except CheckpointError as e:
        raise GGUFError(str(e)) from None
    return model.eval(), _tokenizer_from(field, path)


def _tokenizer_from(field, path: Path):
    """The byte-level BPE tokenizer a GGUF file carries (None when it carries none)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from ..tokenizer import Tokenizer

    kind = field("tokenizer.ggml.model", "none")
    if kind == "none":
        return None
    pre = field("tokenizer.ggml.pre", "default")
    splits = {name: regex for regex, name in PRE_TOKENIZERS.items()}
    if kind != "gpt2" or pre not in splits:
        raise GGUFError(f"{path}: samovar reads byte-level BPE vocabularies split as {', '.join(splits)}; this "
                        f"one is {kind} / {pre}")
    gguf = _gguf()
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    unused, control = int(gguf.TokenType.UNUSED), int(gguf.TokenType.CONTROL)
    vocab = {t: i for i, (t, kind_) in enumerate(zip(tokens, types)) if kind_ != unused}
    specials = [t for t, kind_ in zip(tokens, types) if kind_ == control]
    roles = {role: tokens[i] for role in ("bos", "eos", "pad")
             if (i := field(f"tokenizer.ggml.{role}_token_id")) is not None and i < len(tokens)}
    template = field("tokenizer.chat_template")
    text = _byte_level_text(t for t in vocab if t not in specials)
    if all(len(c) == 1 for c in text.values()):  # one character a token: a char tokenizer (samovar's export)
        chars = {text.get(t, t): i for t, i in vocab.items()}
        return Tokenizer.from_chars(chars, specials, roles=roles, chat_template=template)
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
    hf = HFTokenizer(models.BPE(vocab, merges))
    if splits[pre] == GPT2_SPLIT:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(splits[pre]), "isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(specials)
    return Tokenizer(hf, roles=roles, chat_template=template)


def _byte_level_text(tokens) -> dict[str, str]:
    """The text each byte-level token spells ("" where its bytes are not whole UTF-8 characters)."""
    from ..tokenizer import byte_to_unicode

    byte_of = {c: b for b, c in byte_to_unicode().items()}
    text = {}
    for token in tokens:
        try:
            text[token] = bytes(byte_of[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            text[token] = ""
    return text
