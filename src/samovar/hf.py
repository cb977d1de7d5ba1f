"""HuggingFace interop: ModelConfig <-> HF config.json per family, and weight rename tables.

HF parameter names live only here. Each family is a `Family`: how to read its config.json (refusing,
by name, every field that changes the computation and that samovar does not support), how to write
one, and a rename table from our names to HF's, with {i} for the layer and {e} for the expert.
Three layouts need more than renaming, and are handled around the tables:

- GPT-1/GPT-2 store linear weights as Conv1D, (in, out): transposed; and q, k, v fused in c_attn.
- DeepSeek-V3 rotates interleaved pairs (x0, x1), (x2, x3), ...; our Rotary rotates halves, so the
  rotated rows of q and k are permuted on the way in (and back on the way out). q.k is unchanged.
- MoE experts: read from per-expert tensors or from transformers 5's stacked `gate_up_proj`;
  written per expert, the layout that transformers 4 and 5 both load.

No network access: only local folders are read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import CheckpointError, atomic_write_text
from .config import ModelConfig


class HFError(ValueError):
    """An HF checkpoint or config that samovar cannot read or write; the message names the problem."""


# ---- reading HF config fields ---------------------------------------------------------------------
def _rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling) from transformers 5's rope_parameters or 4's rope_scaling."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    params = {**legacy, **params}
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFError("partial_rotary_factor != 1 is not supported")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": params["factor"]}
    if kind == "llama3":
        return theta, {"type": "llama3", "factor": params["factor"], "low_freq_factor": params["low_freq_factor"],
                       "high_freq_factor": params["high_freq_factor"],
                       "original_context_len": params["original_max_position_embeddings"]}
    if kind == "yarn":
        keep = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor")
        out = {"type": "yarn", "factor": params["factor"],
               "original_context_len": params["original_max_position_embeddings"]}
        out.update({k: params[k] for k in keep if params.get(k) is not None})
        if params.get("truncate", True) is not True:
            raise HFError("yarn rope scaling with truncate=false is not supported")
        return theta, out
    raise HFError(f"rope type {kind!r} is not supported (default, linear, llama3 and yarn are)")


def _rope_to_hf(cfg: ModelConfig) -> dict:
    params = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    s = cfg.rope_scaling
    if s is not None:
        params = {"rope_theta": cfg.rope_theta, "rope_type": s["type"], "factor": s["factor"]}
        if "original_context_len" in s:
            params["original_max_position_embeddings"] = s["original_context_len"]
        params.update({k: v for k, v in s.items() if k not in ("type", "factor", "original_context_len")})
    return {"rope_parameters": params}


def _require(hf: dict, checks: dict[str, Callable[[object], bool]]) -> None:
    for key, ok in checks.items():
        if key in hf and not ok(hf[key]):
            raise HFError(f"config field {key}={hf[key]!r} is not supported")


def _act(hf: dict, key: str) -> tuple[str, str]:
    """(mlp, gelu_approx) of a gated MLP from an HF activation name."""
    act = hf.get(key, "silu")
    if act in ("silu", "swish"):
        return "swiglu", "none"
    if act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return "geglu", "tanh"
    if act == "gelu":
        return "geglu", "none"
    raise HFError(f"activation {key}={act!r} is not supported")


def _llama_like(hf: dict, **extra) -> ModelConfig:
    """The fields every LLaMA-descended family shares."""
    _require(hf, {"use_bidirectional_attention": lambda v: not v})
    theta, scaling = _rope(hf)
    mlp, approx = _act(hf, "hidden_act")
    n_head = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"], context_len=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=hf["hidden_size"], head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
        d_ff=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        position="rope", rope_theta=theta, rope_scaling=scaling, mlp=mlp, gelu_approx=approx,
        attn_bias=bool(hf.get("attention_bias", False)), attn_out_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    fields.update(extra)
    return ModelConfig(**fields)


def _llama_like_to_hf(cfg: ModelConfig) -> dict:
    if cfg.position != "rope" or cfg.norm != "rmsnorm" or cfg.norm_placement != "pre":
        raise HFError("this family needs pre-norm RMSNorm blocks with rotary positions")
    if cfg.attn_bias != cfg.attn_out_bias:
        raise HFError("HF has one attention_bias for q, k, v and the output projection")
    act = {("swiglu", "none"): "silu", ("geglu", "tanh"): "gelu_pytorch_tanh", ("geglu", "none"): "gelu"}
    if (cfg.mlp, cfg.gelu_approx) not in act:
        raise HFError(f"mlp={cfg.mlp} cannot be written for this family")
    return {
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_len,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads, "hidden_size": cfg.n_embd, "head_dim": cfg.head_size,
        "intermediate_size": cfg.ff_size, "rms_norm_eps": cfg.norm_eps, "attention_bias": cfg.attn_bias,
        "hidden_act": act[(cfg.mlp, cfg.gelu_approx)], "tie_word_embeddings": cfg.tie_embeddings,
        **_rope_to_hf(cfg),
    }


def _unsupported(cfg: ModelConfig, **allowed) -> None:
    """Refuse config features a family's HF class cannot express (each allowed one named True)."""
    features = {"qk_norm": cfg.qk_norm, "sliding_window": cfg.sliding_window is not None,
                "norm_unit_offset": cfg.norm_unit_offset, "embed_scale": cfg.embed_scale,
                "n_expert": cfg.n_expert > 0, "mla": cfg.attention == "mla", "mlp_bias": cfg.mlp_bias,
                "logit_softcap": cfg.logit_softcap is not None}
    bad = [name for name, on in features.items() if on and not allowed.get(name)]
    if bad:
        raise HFError(f"this family cannot express {', '.join(bad)}")


# ---- the families ----------------------------------------------------------------------------------
LLAMA_NAMES = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "blocks.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.attn.q_proj.{wb}": "model.layers.{i}.self_attn.q_proj.{wb}",
    "blocks.{i}.attn.k_proj.{wb}": "model.layers.{i}.self_attn.k_proj.{wb}",
    "blocks.{i}.attn.v_proj.{wb}": "model.layers.{i}.self_attn.v_proj.{wb}",
    "blocks.{i}.attn.out_proj.{wb}": "model.layers.{i}.self_attn.o_proj.{wb}",
    "blocks.{i}.attn.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blocks.{i}.attn.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blocks.{i}.mlp.gate_proj.{wb}": "model.layers.{i}.mlp.gate_proj.{wb}",
    "blocks.{i}.mlp.up_proj.{wb}": "model.layers.{i}.mlp.up_proj.{wb}",
    "blocks.{i}.mlp.down_proj.{wb}": "model.layers.{i}.mlp.down_proj.{wb}",
}
MIXTRAL_NAMES = {
    **{k: v for k, v in LLAMA_NAMES.items() if ".mlp." not in k},
    "blocks.{i}.mlp.router.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
    "blocks.{i}.mlp.experts.{e}.gate_proj.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
    "blocks.{i}.mlp.experts.{e}.down_proj.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
    "blocks.{i}.mlp.experts.{e}.up_proj.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
}
DEEPSEEK_NAMES = {
    **{k: v for k, v in LLAMA_NAMES.items() if ".attn." not in k},
    "blocks.{i}.attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blocks.{i}.attn.q_down.{wb}": "model.layers.{i}.self_attn.q_a_proj.{wb}",
    "blocks.{i}.attn.q_norm.weight": "model.layers.{i}.self_attn.q_a_layernorm.weight",
    "blocks.{i}.attn.q_up.weight": "model.layers.{i}.self_attn.q_b_proj.weight",
    "blocks.{i}.attn.kv_down.{wb}": "model.layers.{i}.self_attn.kv_a_proj_with_mqa.{wb}",
    "blocks.{i}.attn.kv_norm.weight": "model.layers.{i}.self_attn.kv_a_layernorm.weight",
    "blocks.{i}.attn.kv_up.weight": "model.layers.{i}.self_attn.kv_b_proj.weight",
    "blocks.{i}.attn.out_proj.{wb}": "model.layers.{i}.self_attn.o_proj.{wb}",
    "blocks.{i}.mlp.router.weight": "model.layers.{i}.mlp.gate.weight",
    "blocks.{i}.mlp.router.bias": "model.layers.{i}.mlp.gate.e_score_correction_bias",
    "blocks.{i}.mlp.experts.{e}.gate_proj.weight": "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
    "blocks.{i}.mlp.experts.{e}.up_proj.weight": "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
    "blocks.{i}.mlp.experts.{e}.down_proj.weight": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
    "blocks.{i}.mlp.shared.gate_proj.weight": "model.layers.{i}.mlp.shared_experts.gate_proj.weight",
    "blocks.{i}.mlp.shared.up_proj.weight": "model.layers.{i}.mlp.shared_experts.up_proj.weight",
    "blocks.{i}.mlp.shared.down_proj.weight": "model.layers.{i}.mlp.shared_experts.down_proj.weight",
}
GPT2_NAMES = {
    "tok_emb.weight": "transformer.wte.weight",
    "pos_emb.weight": "transformer.wpe.weight",
    "final_norm.{wb}": "transformer.ln_f.{wb}",
    "lm_head.weight": "lm_head.weight",
    "blocks.{i}.attn_norm.{wb}": "transformer.h.{i}.ln_1.{wb}",
    "blocks.{i}.mlp_norm.{wb}": "transformer.h.{i}.ln_2.{wb}",
    "blocks.{i}.attn.q_proj.{wb}": "transformer.h.{i}.attn.c_attn.{wb}#q",
    "blocks.{i}.attn.k_proj.{wb}": "transformer.h.{i}.attn.c_attn.{wb}#k",
    "blocks.{i}.attn.v_proj.{wb}": "transformer.h.{i}.attn.c_attn.{wb}#v",
    "blocks.{i}.attn.out_proj.{wb}": "transformer.h.{i}.attn.c_proj.{wb}",
    "blocks.{i}.mlp.up_proj.{wb}": "transformer.h.{i}.mlp.c_fc.{wb}",
    "blocks.{i}.mlp.down_proj.{wb}": "transformer.h.{i}.mlp.c_proj.{wb}",
}
GPT1_NAMES = {
    **{k: v.replace("transformer.wte", "transformer.tokens_embed").replace("transformer.wpe",
                                                                          "transformer.positions_embed")
       for k, v in GPT2_NAMES.items() if not k.startswith("final_norm")},
}


def _gpt2_from_hf(hf: dict) -> ModelConfig:
    _require(hf, {"scale_attn_by_inverse_layer_idx": lambda v: not v, "reorder_and_upcast_attn": lambda v: True,
                  "scale_attn_weights": bool, "add_cross_attention": lambda v: not v})
    act = hf.get("activation_function", "gelu_new")
    approx = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(act)
    if approx is None:
        raise HFError(f"activation_function={act!r} is not supported")
    return ModelConfig(vocab_size=hf["vocab_size"], context_len=hf["n_positions"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", gelu_approx=approx,
                       attn_bias=True, attn_out_bias=True, mlp_bias=True,
                       tie_embeddings=hf.get("tie_word_embeddings", True))


def _gpt2_to_hf(cfg: ModelConfig) -> dict:
    _gpt_checks(cfg, "pre")
    return {"vocab_size": cfg.vocab_size, "n_positions": cfg.context_len, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_inner": cfg.ff_size,
            "layer_norm_epsilon": cfg.norm_eps, "activation_function": _gpt_act(cfg),
            "tie_word_embeddings": cfg.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _gpt1_from_hf(hf: dict) -> ModelConfig:
    act = hf.get("afn", "gelu")
    if act not in ("gelu", "relu"):
        raise HFError(f"afn={act!r} is not supported")
    return ModelConfig(vocab_size=hf["vocab_size"], context_len=hf["n_positions"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], norm_placement="post",
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu" if act == "gelu" else "relu",
                       gelu_approx="tanh",  # HF's GPT-1 "gelu" is the tanh approximation (gelu_new)
                       attn_bias=True, attn_out_bias=True, mlp_bias=True,
                       tie_embeddings=hf.get("tie_word_embeddings", True))


def _gpt1_to_hf(cfg: ModelConfig) -> dict:
    _gpt_checks(cfg, "post")
    if cfg.ff_size != 4 * cfg.n_embd:
        raise HFError("GPT-1 needs d_ff = 4 * n_embd")
    if cfg.mlp == "relu":
        afn = "relu"
    elif cfg.mlp == "gelu" and cfg.gelu_approx == "tanh":
        afn = "gelu"
    else:
        raise HFError("HF GPT-1 has relu, or gelu as the tanh approximation (gelu_approx=tanh)")
    return {"vocab_size": cfg.vocab_size, "n_positions": cfg.context_len, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_embd": cfg.n_embd, "layer_norm_epsilon": cfg.norm_eps, "afn": afn,
            "tie_word_embeddings": cfg.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _gpt_checks(cfg: ModelConfig, placement: str) -> None:
    _unsupported(cfg, mlp_bias=True)
    if (cfg.norm, cfg.position, cfg.norm_placement) != ("layernorm", "learned", placement) or \
            not (cfg.attn_bias and cfg.attn_out_bias and cfg.mlp_bias and cfg.norm_bias) or \
            cfg.kv_heads != cfg.n_head or cfg.head_size * cfg.n_head != cfg.n_embd:
        raise HFError("GPT-1/GPT-2 need LayerNorm, learned positions, biases everywhere and plain multi-head "
                      f"attention ({placement}-norm)")


def _gpt_act(cfg: ModelConfig) -> str:
    if cfg.mlp == "relu":
        return "relu"
    if cfg.mlp != "gelu":
        raise HFError(f"GPT-2 has no mlp={cfg.mlp}")
    return "gelu_new" if cfg.gelu_approx == "tanh" else "gelu"


def _llama_from_hf(hf):
    return _llama_like(hf)


def _llama_to_hf(cfg):
    _unsupported(cfg, mlp_bias=True)
    return {**_llama_like_to_hf(cfg), "mlp_bias": cfg.mlp_bias}


def _mistral_from_hf(hf):
    return _llama_like(hf, sliding_window=hf.get("sliding_window"))


def _mistral_to_hf(cfg):
    _unsupported(cfg, sliding_window=True)
    hf = _llama_like_to_hf(cfg)
    if cfg.attn_bias:
        raise HFError("Mistral has no attention biases")
    hf.pop("attention_bias")
    return {**hf, "sliding_window": cfg.sliding_window}


def _qwen3_from_hf(hf):
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
        raise HFError("Qwen3 sliding-window layers (use_sliding_window / layer_types) are not supported")
    return _llama_like(hf, qk_norm=True)


def _qwen3_to_hf(cfg):
    _unsupported(cfg, qk_norm=True)
    if not cfg.qk_norm:
        raise HFError("Qwen3 normalises queries and keys: qk_norm must be true")
    return {**_llama_like_to_hf(cfg), "use_sliding_window": False}


def _gemma_from_hf(hf):
    hf = dict(hf)
    if hf.get("hidden_activation"):  # transformers 4's Gemma configs name it so
        hf["hidden_act"] = hf["hidden_activation"]
    if hf.get("hidden_act", "gelu_pytorch_tanh") == "gelu":  # as HF does: Gemma's "gelu" means the tanh one
        hf["hidden_act"] = "gelu_pytorch_tanh"
    return _llama_like(hf, norm_unit_offset=True, embed_scale=True,
                       tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def _gemma_to_hf(cfg):
    _unsupported(cfg, norm_unit_offset=True, embed_scale=True)
    if not (cfg.norm_unit_offset and cfg.embed_scale and cfg.tie_embeddings):
        raise HFError("Gemma needs norm_unit_offset, embed_scale and tied embeddings")
    if (cfg.mlp, cfg.gelu_approx) != ("geglu", "tanh"):
        raise HFError("Gemma's MLP is GeGLU with the tanh approximation")
    return _llama_like_to_hf(cfg)


def _mixtral_from_hf(hf):
    _require(hf, {"router_jitter_noise": lambda v: not v})
    return _llama_like(hf, sliding_window=hf.get("sliding_window"), n_expert=hf["num_local_experts"],
                       n_expert_active=hf["num_experts_per_tok"], router="softmax", router_norm_topk=True,
                       aux_loss_coef=hf.get("router_aux_loss_coef", 0.0))


def _mixtral_to_hf(cfg):
    _unsupported(cfg, sliding_window=True, n_expert=True)
    if cfg.n_expert == 0 or cfg.router != "softmax" or cfg.n_shared_expert or cfg.n_dense_layers \
            or cfg.expert_ff_size != cfg.ff_size or not cfg.router_norm_topk or cfg.routed_scale != 1.0:
        raise HFError("Mixtral is softmax-routed experts in every layer, renormalised, with no shared experts")
    hf = _llama_like_to_hf(cfg)
    hf.pop("attention_bias")
    return {**hf, "sliding_window": cfg.sliding_window, "num_local_experts": cfg.n_expert,
            "num_experts_per_tok": cfg.n_expert_active, "router_aux_loss_coef": cfg.aux_loss_coef}


def _deepseek_from_hf(hf):
    _require(hf, {"n_routed_experts": lambda v: v > 0, "topk_method": lambda v: v == "noaux_tc",
                  "scoring_func": lambda v: v == "sigmoid", "moe_layer_freq": lambda v: v == 1})
    if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
        raise HFError("DeepSeek-V3 with num_key_value_heads != num_attention_heads is not supported")
    return _llama_like(
        hf, attention="mla", q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
        qk_rope_head_dim=hf["qk_rope_head_dim"], qk_nope_head_dim=hf["qk_nope_head_dim"],
        v_head_dim=hf["v_head_dim"], head_dim=hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"], n_kv_head=None,
        n_expert=hf["n_routed_experts"], n_expert_active=hf["num_experts_per_tok"],
        n_shared_expert=hf.get("n_shared_experts") or 0, expert_d_ff=hf["moe_intermediate_size"],
        n_dense_layers=hf.get("first_k_dense_replace", 0), router="sigmoid",
        router_norm_topk=bool(hf.get("norm_topk_prob", True)), routed_scale=hf.get("routed_scaling_factor", 1.0),
        n_expert_group=hf.get("n_group") or 1, n_expert_group_active=hf.get("topk_group") or 1)


def _deepseek_to_hf(cfg):
    _unsupported(cfg, n_expert=True, mla=True)
    if cfg.attention != "mla" or cfg.n_expert == 0 or cfg.router != "sigmoid" or cfg.n_shared_expert < 1:
        raise HFError("DeepSeek-V3 is latent attention with sigmoid-routed and shared experts")
    hf = _llama_like_to_hf(cfg)
    hf.update({"num_key_value_heads": cfg.n_head, "head_dim": cfg.qk_rope_head_dim,
               "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
               "qk_rope_head_dim": cfg.qk_rope_head_dim, "qk_nope_head_dim": cfg.qk_nope_head_dim,
               "v_head_dim": cfg.v_head_dim, "n_routed_experts": cfg.n_expert,
               "num_experts_per_tok": cfg.n_expert_active, "n_shared_experts": cfg.n_shared_expert,
               "moe_intermediate_size": cfg.expert_ff_size, "first_k_dense_replace": cfg.n_dense_layers,
               "norm_topk_prob": cfg.router_norm_topk, "routed_scaling_factor": cfg.routed_scale,
               "n_group": cfg.n_expert_group, "topk_group": cfg.n_expert_group_active, "rope_interleave": True})
    return hf


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    names: dict[str, str]
    from_hf: Callable[[dict], ModelConfig]
    to_hf: Callable[[ModelConfig], dict]
    conv1d: bool = False  # GPT-1/2: linear weights stored (in, out)
    rope_interleaved: bool = False  # DeepSeek: rotated pairs are neighbours


FAMILIES = {f.model_type: f for f in [
    Family("openai-gpt", "OpenAIGPTLMHeadModel", GPT1_NAMES, _gpt1_from_hf, _gpt1_to_hf, conv1d=True),
    Family("gpt2", "GPT2LMHeadModel", GPT2_NAMES, _gpt2_from_hf, _gpt2_to_hf, conv1d=True),
    Family("llama", "LlamaForCausalLM", LLAMA_NAMES, _llama_from_hf, _llama_to_hf),
    Family("mistral", "MistralForCausalLM", LLAMA_NAMES, _mistral_from_hf, _mistral_to_hf),
    Family("mixtral", "MixtralForCausalLM", MIXTRAL_NAMES, _mixtral_from_hf, _mixtral_to_hf),
    Family("gemma", "GemmaForCausalLM", LLAMA_NAMES, _gemma_from_hf, _gemma_to_hf),
    Family("qwen3", "Qwen3ForCausalLM", LLAMA_NAMES, _qwen3_from_hf, _qwen3_to_hf),
    Family("deepseek_v3", "DeepseekV3ForCausalLM", DEEPSEEK_NAMES, _deepseek_from_hf, _deepseek_to_hf,
           rope_interleaved=True),
]}
# which family `family` in our presets exports to; custom configs try each family in turn
EXPORT_PREFERENCE = {"gpt1": "openai-gpt", "gpt2": "gpt2", "llama": "llama", "deepseek": "llama",
                     "mistral": "mistral", "mixtral": "mixtral", "gemma": "gemma", "qwen3": "qwen3",
                     "deepseek-v3": "deepseek_v3"}


def config_from_hf(hf: dict) -> tuple[ModelConfig, Family]:
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise HFError(f"model_type {kind!r} is not supported; samovar imports {', '.join(FAMILIES)}")
    family = FAMILIES[kind]
    try:
        cfg = family.from_hf(hf)
    except KeyError as e:
        raise HFError(f"{kind} config.json lacks the field {e.args[0]}") from None
    return cfg.replace(family=kind.replace("_", "-").replace("openai-gpt", "gpt1"), name="imported"), family


def config_to_hf(cfg: ModelConfig) -> tuple[dict, Family]:
    if cfg.arch != "transformer":
        raise HFError(f"a {cfg.arch} model has no HuggingFace counterpart to export to")
    preferred = EXPORT_PREFERENCE.get(cfg.family)
    order = ([preferred] if preferred else []) + [k for k in FAMILIES if k != preferred]
    errors = []
    for kind in order:
        family = FAMILIES[kind]
        try:
            hf = family.to_hf(cfg)
        except HFError as e:
            errors.append(f"{kind}: {e}")
            continue
        return {"architectures": [family.architecture], "model_type": kind, **hf}, family
    raise HFError("no HF family can express this model (" + "; ".join(errors) + ")")


# ---- weights -----------------------------------------------------------------------------------------
def _expand(names: dict[str, str], cfg: ModelConfig) -> dict[str, str]:
    """The rename table with {i}, {e} and {wb} filled in, for the tensors this model has."""
    out = {}
    for ours, theirs in names.items():
        for wb in (("weight", "bias") if "{wb}" in ours else (None,)):
            layers = range(cfg.n_layer) if "{i}" in ours else (None,)
            for i in layers:
                experts = range(cfg.n_expert) if "{e}" in ours else (None,)
                for e in experts:
                    o, t = ours, theirs
                    for key, value in (("{i}", i), ("{e}", e), ("{wb}", wb)):
                        if value is not None:
                            o, t = o.replace(key, str(value)), t.replace(key, str(value))
                    out[o] = t
    return out


def _interleave_perm(rope: int) -> torch.Tensor:
    """Row order that turns neighbour pairs (0,1),(2,3)... into halves (0..r/2-1 | r/2..r-1)."""
    return torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])


def _permute_rope_rows(w: torch.Tensor, heads: int, nope: int, rope: int, inverse: bool) -> torch.Tensor:
    perm = _interleave_perm(rope)
    if inverse:
        perm = torch.argsort(perm)
    w = w.reshape(heads, nope + rope, *w.shape[1:]).clone()
    w[:, nope:] = w[:, nope:][:, perm]
    return w.reshape(heads * (nope + rope), *w.shape[2:])


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, family: Family,
                  interleaved: bool | None = None) -> dict[str, torch.Tensor]:
    """Our state dict from an HF one (HF names may lack the `transformer.`/`model.` prefix).
    `interleaved`: whether the checkpoint rotates neighbour pairs (DeepSeek's rope_interleave)."""
    from .model import Transformer

    with torch.device("meta"):  # which tensors this config has (the table also lists optional ones)
        expected = set(Transformer(cfg).state_dict()) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    hf_state = _normalise_hf_state(hf_state, cfg, family)
    table = _expand(family.names, cfg)
    ours, missing = {}, []
    for name, theirs in table.items():
        if theirs in hf_state:
            ours[name] = hf_state[theirs]
        elif name in expected:
            missing.append(theirs.split("#")[0])
    if missing:
        raise HFError(f"the checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. "
                      + ", ".join(sorted(set(missing))[:4]))
    if family.rope_interleaved if interleaved is None else interleaved:
        _permute_rope(ours, cfg, inverse=False)
    return ours


def _permute_rope(state: dict[str, torch.Tensor], cfg: ModelConfig, inverse: bool) -> None:
    """In place: the rows of latent attention's rotated query and key parts, interleaved <-> halves."""
    for name in list(state):
        if name.endswith(("attn.q_proj.weight", "attn.q_up.weight")):
            state[name] = _permute_rope_rows(state[name], cfg.n_head, cfg.qk_nope_head_dim,
                                             cfg.qk_rope_head_dim, inverse)
        elif name.endswith(("attn.kv_down.weight", "attn.kv_down.bias")):
            state[name] = _permute_rope_rows(state[name], 1, cfg.kv_lora_rank, cfg.qk_rope_head_dim, inverse)


def _normalise_hf_state(hf_state, cfg: ModelConfig, family: Family) -> dict[str, torch.Tensor]:
    """Bring an HF state dict to the layout of the rename table: prefixes, Conv1D, fused tensors."""
    prefix = "transformer." if family.conv1d else "model."
    out = {}
    for name, t in hf_state.items():
        if not name.startswith((prefix, "lm_head.")):
            name = prefix + name  # the original GPT-2 files have no "transformer." prefix
        out[name] = t
    if family.conv1d:  # Conv1D (in, out) -> (out, in), and c_attn split into q, k, v
        for name in list(out):
            if name.endswith(".weight") and out[name].dim() == 2 and ".h." in name:
                out[name] = out[name].t().contiguous()
            if ".attn.c_attn." in name:
                for part, chunk in zip("qkv", out.pop(name).chunk(3, dim=0)):
                    out[f"{name}#{part}"] = chunk.contiguous()
    for name in list(out):  # transformers 5's stacked experts -> one tensor per expert
        m = re.match(r"(.*\.experts)\.(gate_up_proj|down_proj)$", name)
        if not m:
            continue
        stacked = out.pop(name)
        gate, up, down = ("w1", "w3", "w2") if family.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        base = m.group(1).replace(".mlp.experts", ".block_sparse_moe.experts") \
            if family.model_type == "mixtral" else m.group(1)
        for e in range(stacked.size(0)):
            if m.group(2) == "gate_up_proj":
                g, u = stacked[e].chunk(2, dim=0)
                out[f"{base}.{e}.{gate}.weight"], out[f"{base}.{e}.{up}.weight"] = g, u
            else:
                out[f"{base}.{e}.{down}.weight"] = stacked[e]
    if family.model_type == "mixtral":
        out = {k.replace(".mlp.gate.", ".block_sparse_moe.gate."): v for k, v in out.items()}
    return out


def state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, family: Family) -> dict[str, torch.Tensor]:
    """An HF state dict (in the per-expert layout every transformers version loads) from ours."""
    state = dict(state)
    if family.rope_interleaved:
        _permute_rope(state, cfg, inverse=True)
    table = _expand(family.names, cfg)
    hf = {}
    for name, tensor in state.items():
        if name not in table:
            raise HFError(f"{family.model_type} has no place for tensor {name}")
        hf[table[name]] = tensor
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)
    if family.conv1d:
        for name in [n for n in hf if n.endswith("#q")]:
            base = name[:-2]
            hf[base] = torch.cat([hf.pop(f"{base}#{p}") for p in "qkv"], dim=0)
        for name in list(hf):
            if name.endswith(".weight") and hf[name].dim() == 2 and ".h." in name:
                hf[name] = hf[name].t()
    return {k: v.contiguous() for k, v in hf.items()}


# ---- folders -----------------------------------------------------------------------------------------
def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Tensors of a local HF checkpoint: model.safetensors, its sharded index, or pytorch_model.bin
    (read with weights_only=True: never unpickle code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = []
    if (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    elif (folder / "model.safetensors.index.json").exists():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = [folder / f for f in sorted(set(index["weight_map"].values()))]
    elif (folder / "pytorch_model.bin").exists():
        try:
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise HFError(f"cannot read {folder / 'pytorch_model.bin'} safely: {str(e).splitlines()[0]}") from None
    else:
        raise HFError(f"{folder} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise HFError(f"cannot read {f}: {str(e).splitlines()[0]}") from None
    return state


def import_hf(folder: str | Path):
    """(Transformer, Tokenizer or None) from a local HF model folder; nothing is downloaded."""
    from .checkpoint import load_state_into
    from .model import Transformer
    from .tokenizer import Tokenizer, TokenizerError

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise HFError(f"{folder} has no config.json: not a HuggingFace model folder")
    try:
        hf_cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HFError(f"cannot read {folder / 'config.json'}: {e}") from None
    cfg, family = config_from_hf(hf_cfg)
    interleaved = bool(hf_cfg.get("rope_interleave", True)) if family.rope_interleaved else False
    state = state_from_hf(read_hf_weights(folder), cfg, family, interleaved)
    model = Transformer(cfg)
    try:
        load_state_into(model, {k: v.float() for k, v in state.items()}, str(folder))
    except CheckpointError as e:
        raise HFError(str(e)) from None
    tokenizer = None
    if (folder / "tokenizer.json").exists():
        try:
            tokenizer = Tokenizer.load(folder)
        except TokenizerError as e:
            raise HFError(str(e)) from None
    return model.eval(), tokenizer


def export_hf(model, tokenizer, out: str | Path, max_shard_bytes: int = 2 << 30) -> Path:
    """Write an HF model folder that `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load."""
    from safetensors.torch import save_file

    from .checkpoint import model_state

    out = Path(out)
    cfg = model.config
    hf_cfg, family = config_to_hf(cfg)
    state = state_to_hf({k: v.float().cpu() for k, v in model_state(model).items()}, cfg, family)
    out.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = state[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        _save_atomic(save_file, shards[0], out / "model.safetensors")
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            _save_atomic(save_file, shard, out / fname)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        atomic_write_text(out / "model.safetensors.index.json",
                          json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    ids = {}
    if tokenizer is not None:
        ids = {f"{r}_token_id": tokenizer.token_id(tokenizer.roles.get(r)) for r in ("bos", "eos", "pad")}
    hf_cfg.update({"torch_dtype": "float32", **ids})
    atomic_write_text(out / "config.json", json.dumps(hf_cfg, indent=2) + "\n")
    gen = {"bos_token_id": ids.get("bos_token_id"), "eos_token_id": ids.get("eos_token_id"),
           "pad_token_id": ids.get("pad_token_id")}
    atomic_write_text(out / "generation_config.json", json.dumps({k: v for k, v in gen.items() if v is not None},
                                                                 indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(out / "tokenizer.json")
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                   "model_max_length": cfg.context_len, "add_bos_token": False, "add_eos_token": False}
        for role in ("bos", "eos", "pad", "unk"):
            if tokenizer.roles.get(role) is not None and tokenizer.token_id(tokenizer.roles[role]) is not None:
                tok_cfg[f"{role}_token"] = tokenizer.roles[role]
        atomic_write_text(out / "tokenizer_config.json", json.dumps(tok_cfg, indent=2) + "\n")
    return out


def _save_atomic(save_file, tensors: dict, path: Path) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


