"""HuggingFace config.json <-> ModelConfig, per family: how to read each family's config (refusing,
by name, every field that changes the computation and that samovar does not support), and how to
write one. The Family records that tie these to the weight tables are in hf.py."""

from __future__ import annotations

import json
from typing import Callable

from ..config import ModelConfig


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
    act = {"swiglu": "silu", "geglu": {"tanh": "gelu_pytorch_tanh", "none": "gelu"}[cfg.gelu_approx]}
    return {
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_len,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "hidden_size": cfg.n_embd, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff, "rms_norm_eps": cfg.norm_eps, "attention_bias": cfg.attn_bias,
        "hidden_act": act[cfg.mlp], "tie_word_embeddings": cfg.tie_embeddings,
        **_rope_to_hf(cfg),
    }


# ---- what each family's HF class computes ------------------------------------------------------------
# A family expresses a model exactly when each field listed for it has an allowed value: a tuple of
# values, or a function of the config giving the one value allowed. Fields not listed are free.
def _same(field: str) -> Callable[[ModelConfig], object]:
    return lambda cfg: getattr(cfg, field)


PLAIN = dict(arch=("transformer",), attention=("mha",), qk_norm=(False,), sliding_window=(None,),
             norm_unit_offset=(False,), embed_scale=(False,), n_expert=(0,), logit_softcap=(None,))
GPT = dict(PLAIN, norm=("layernorm",), position=("learned",), attn_bias=(True,), attn_out_bias=(True,),
           mlp_bias=(True,), norm_bias=(True,), mlp=("relu", "gelu"), n_kv_head=_same("n_head"),
           head_dim=lambda c: c.n_embd // c.n_head)
LLAMA = dict(PLAIN, norm=("rmsnorm",), norm_placement=("pre",), position=("rope",), mlp=("swiglu", "geglu"),
             attn_out_bias=_same("attn_bias"))  # HF has one attention_bias for q, k, v and the output
NO_BIAS = dict(attn_bias=(False,), mlp_bias=(False,))
EXPERTS = dict(n_expert=lambda c: max(c.n_expert, 1))
REQUIREMENTS = {
    "openai-gpt": dict(GPT, norm_placement=("post",), gelu_approx=("tanh",), d_ff=lambda c: 4 * c.n_embd),
    "gpt2": dict(GPT, norm_placement=("pre",)),
    "llama": LLAMA,
    "mistral": dict(LLAMA, **NO_BIAS, sliding_window=_same("sliding_window")),
    "mixtral": dict(LLAMA, **NO_BIAS, **EXPERTS, sliding_window=_same("sliding_window"), router=("softmax",),
                    n_shared_expert=(0,), n_dense_layers=(0,), expert_d_ff=_same("d_ff"), router_norm_topk=(True,),
                    routed_scale=(1.0,)),
    "gemma": dict(LLAMA, mlp_bias=(False,), norm_unit_offset=(True,), embed_scale=(True,), tie_embeddings=(True,),
                  mlp=("geglu",), gelu_approx=("tanh",)),
    "qwen3": dict(LLAMA, mlp_bias=(False,), qk_norm=(True,)),
    "deepseek_v3": dict(LLAMA, **EXPERTS, mlp_bias=(False,), attention=("mla",), router=("sigmoid",),
                        n_shared_expert=lambda c: max(c.n_shared_expert, 1)),
}


def _shown(value) -> str:
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


def check(cfg: ModelConfig, kind: str) -> list[str]:
    """What stops family `kind` from expressing `cfg` exactly, as `field=wanted (not value)`; [] for nothing."""
    wrong = []
    for name, allowed in REQUIREMENTS[kind].items():
        wanted = (allowed(cfg),) if callable(allowed) else allowed
        if getattr(cfg, name) not in wanted:
            wrong.append(f"{name}={'/'.join(map(_shown, wanted))} (not {_shown(getattr(cfg, name))})")
    return wrong


def gpt2_from_hf(hf: dict) -> ModelConfig:
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


def gpt2_to_hf(cfg: ModelConfig) -> dict:
    return {"vocab_size": cfg.vocab_size, "n_positions": cfg.context_len, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_inner": cfg.d_ff,
            "layer_norm_epsilon": cfg.norm_eps, "activation_function": _gpt_act(cfg),
            "tie_word_embeddings": cfg.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def gpt1_from_hf(hf: dict) -> ModelConfig:
    act = hf.get("afn", "gelu")
    if act not in ("gelu", "relu"):
        raise HFError(f"afn={act!r} is not supported")
    return ModelConfig(vocab_size=hf["vocab_size"], context_len=hf["n_positions"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], norm_placement="post",
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu" if act == "gelu" else "relu",
                       gelu_approx="tanh",  # HF's GPT-1 "gelu" is the tanh approximation (gelu_new)
                       attn_bias=True, attn_out_bias=True, mlp_bias=True,
                       tie_embeddings=hf.get("tie_word_embeddings", True))


def gpt1_to_hf(cfg: ModelConfig) -> dict:
    afn = cfg.mlp  # relu, or gelu as the tanh approximation (HF GPT-1's "gelu")
    return {"vocab_size": cfg.vocab_size, "n_positions": cfg.context_len, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_embd": cfg.n_embd, "layer_norm_epsilon": cfg.norm_eps, "afn": afn,
            "tie_word_embeddings": cfg.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _gpt_act(cfg: ModelConfig) -> str:
    return {"relu": "relu", "gelu": {"tanh": "gelu_new", "none": "gelu"}[cfg.gelu_approx]}[cfg.mlp]


def llama_from_hf(hf):
    return _llama_like(hf)


def llama_to_hf(cfg):
    return {**_llama_like_to_hf(cfg), "mlp_bias": cfg.mlp_bias}


def mistral_from_hf(hf):
    return _llama_like(hf, sliding_window=hf.get("sliding_window"))


def mistral_to_hf(cfg):
    hf = _llama_like_to_hf(cfg)
    hf.pop("attention_bias")
    return {**hf, "sliding_window": cfg.sliding_window}


def qwen3_from_hf(hf):
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
        raise HFError("Qwen3 sliding-window layers (use_sliding_window / layer_types) are not supported")
    return _llama_like(hf, qk_norm=True)


def qwen3_to_hf(cfg):
    return {**_llama_like_to_hf(cfg), "use_sliding_window": False}


def gemma_from_hf(hf):
    hf = dict(hf)
    if hf.get("hidden_activation"):  # transformers 4's Gemma configs name it so
        hf["hidden_act"] = hf["hidden_activation"]
    if hf.get("hidden_act", "gelu_pytorch_tanh") == "gelu":  # as HF does: Gemma's "gelu" means the tanh one
        hf["hidden_act"] = "gelu_pytorch_tanh"
    return _llama_like(hf, norm_unit_offset=True, embed_scale=True,
                       tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def gemma_to_hf(cfg):
    return _llama_like_to_hf(cfg)


def mixtral_from_hf(hf):
    _require(hf, {"router_jitter_noise": lambda v: not v})
    return _llama_like(hf, sliding_window=hf.get("sliding_window"), n_expert=hf["num_local_experts"],
                       n_expert_active=hf["num_experts_per_tok"], router="softmax", router_norm_topk=True,
                       aux_loss_coef=hf.get("router_aux_loss_coef", 0.0))


def mixtral_to_hf(cfg):
    hf = _llama_like_to_hf(cfg)
    hf.pop("attention_bias")
    return {**hf, "sliding_window": cfg.sliding_window, "num_local_experts": cfg.n_expert,
            "num_experts_per_tok": cfg.n_expert_active, "router_aux_loss_coef": cfg.aux_loss_coef}


def deepseek_from_hf(hf):
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


def deepseek_to_hf(cfg):
    hf = _llama_like_to_hf(cfg)
    hf.update({"num_key_value_heads": cfg.n_head, "head_dim": cfg.qk_rope_head_dim,
               "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
               "qk_rope_head_dim": cfg.qk_rope_head_dim, "qk_nope_head_dim": cfg.qk_nope_head_dim,
               "v_head_dim": cfg.v_head_dim, "n_routed_experts": cfg.n_expert,
               "num_experts_per_tok": cfg.n_expert_active, "n_shared_experts": cfg.n_shared_expert,
               "moe_intermediate_size": cfg.expert_d_ff, "first_k_dense_replace": cfg.n_dense_layers,
               "norm_topk_prob": cfg.router_norm_topk, "routed_scaling_factor": cfg.routed_scale,
               "n_group": cfg.n_expert_group, "topk_group": cfg.n_expert_group_active, "rope_interleave": True})
    return hf
