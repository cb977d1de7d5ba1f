"""ModelConfig: every architectural choice of the one Transformer, as typed fields, plus PRESETS.

A family is a preset, never a class or a branch on a name: GPT-2 differs from LLaMA only in the
values of the fields below (norm, position, mlp, tie_embeddings, ...). Each preset cites the
published configuration it copies, so its shape can be checked against the original.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Norm = Literal["layernorm", "rmsnorm"]
NormPlacement = Literal["pre", "post"]  # post: GPT-1's x = norm(x + f(x)), and no final norm
Position = Literal["learned", "rope", "none"]
Mlp = Literal["gelu", "relu", "relu2", "swiglu", "geglu"]  # swiglu and geglu are gated: three matrices
GeluApprox = Literal["none", "tanh"]
Arch = Literal["transformer", "lstm-seq2seq"]  # lstm-seq2seq: the LSTM encoder-decoder baseline (lstm.py)
Attention = Literal["mha", "mla"]  # mha covers multi-head, grouped-query and multi-query attention
Router = Literal["softmax", "sigmoid"]
# the HuggingFace model types `samovar export` writes (interop/hf_families.py)
HFModelType = Literal["openai-gpt", "gpt2", "llama", "mistral", "mixtral", "gemma", "qwen3", "deepseek_v3"]
# rope_scaling: {"type": ..., and that type's keys}
ROPE_SCALING_KEYS = {
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_context_len"},
    "yarn": {"factor", "original_context_len", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor"},
}
# A size left as None follows from the others, resolved once in __post_init__ (in this order):
DERIVED_SIZES = {
    "n_kv_head": lambda c: c.n_head,  # multi-head attention
    "head_dim": lambda c: c.n_embd // c.n_head,
    "d_ff": lambda c: 4 * c.n_embd,
    "expert_d_ff": lambda c: c.d_ff,
}


class ConfigError(ValueError):
    """A configuration that cannot describe a model or a run; the message is one line for the user."""


@dataclass
class ModelConfig:
    name: str = "custom"
    family: str = "custom"  # a label shown by `samovar presets`; never used to choose behaviour
    arch: Arch = "transformer"
    vocab_size: int = 256
    context_len: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: n_head (multi-head); 1: multi-query; else grouped-query
    n_embd: int = 128
    head_dim: int | None = None  # None: n_embd // n_head
    d_ff: int | None = None  # None: 4 * n_embd
    # normalisation
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm only
    norm_unit_offset: bool = False  # Gemma: scale by (1 + weight), weight initialised at 0
    norm_placement: NormPlacement = "pre"
    qk_norm: bool = False  # RMSNorm over each head of q and k (Qwen3)
    # positions
    position: Position = "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"type": "llama3", "factor": 32.0, ...}; see ROPE_SCALING_KEYS
    # attention
    attention: Attention = "mha"
    attn_bias: bool = False  # biases of the q, k, v projections
    attn_out_bias: bool = False  # bias of the output projection
    sliding_window: int | None = None  # attend to at most this many most recent positions
    # multi-head latent attention (attention="mla", DeepSeek-V2/V3)
    q_lora_rank: int | None = None  # None: queries by one full projection
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64  # the part of each query/key head that is rotated
    qk_nope_head_dim: int = 128  # the part that is not
    v_head_dim: int = 128
    latent_norm_eps: float = 1e-6
    # feed-forward
    mlp: Mlp = "gelu"
    gelu_approx: GeluApprox = "none"
    mlp_bias: bool = False
    # mixture of experts (n_expert > 0): every layer from n_dense_layers on routes each token to
    # n_expert_active of n_expert gated MLPs of width expert_d_ff, plus n_shared_expert always-on ones
    n_expert: int = 0
    n_expert_active: int = 2
    n_shared_expert: int = 0
    expert_d_ff: int | None = None  # None: d_ff
    n_dense_layers: int = 0
    router: Router = "softmax"  # softmax: Mixtral; sigmoid: DeepSeek-V3 (scores + balancing bias, groups)
    router_norm_topk: bool = True  # renormalise the chosen experts' weights to sum to 1
    routed_scale: float = 1.0
    n_expert_group: int = 1  # sigmoid router: experts come from the n_expert_group_active best groups
    n_expert_group_active: int = 1
    aux_loss_coef: float = 0.0  # weight of the load-balancing loss added to the training loss
    # embeddings and head
    tie_embeddings: bool = False
    embed_scale: bool = False  # multiply token embeddings by sqrt(n_embd) (Gemma)
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma 2, modded-nanogpt)
    # training-time
    dropout: float = 0.0
    init_std: float = 0.02
    zero_init_out: bool = False  # start the projections that write into the residual stream at zero
    # interop
    export_as: HFModelType | None = None  # the HF class `samovar export` writes (import sets it);
    # None: the first HF family that expresses the model exactly

    def __post_init__(self):
        check_choices(self)
        for name in ("vocab_size", "context_len", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                              "set head_dim to use heads of another size")
        self._derived = tuple(name for name in DERIVED_SIZES if getattr(self, name) is None)
        for name in self._derived:
            setattr(self, name, DERIVED_SIZES[name](self))
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def rope_dim(self) -> int:
        """How many dimensions of each query/key head are rotated."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        """(heads, key size, value size) of one position in the KV cache."""
        if self.attention == "mla":
            return self.n_head, self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim
        return self.n_kv_head, self.head_dim, self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_expert > 0 and layer >= self.n_dense_layers

    def validate(self) -> None:
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.position == "rope" and self.rope_dim % 2:
            raise ConfigError(f"rotary positions need an even head size, got {self.rope_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type") if isinstance(self.rope_scaling, dict) else None
            if kind not in ROPE_SCALING_KEYS:
                raise ConfigError(f"rope_scaling type {kind!r} is not one of {', '.join(ROPE_SCALING_KEYS)}")
            extra = set(self.rope_scaling) - ROPE_SCALING_KEYS[kind] - {"type"}
            if extra:
                raise ConfigError(f"rope_scaling of type {kind} has unknown keys: {', '.join(sorted(extra))}")
        if self.n_expert:
            if not 1 <= self.n_expert_active <= self.n_expert:
                raise ConfigError(f"n_expert_active={self.n_expert_active} must be in 1..n_expert={self.n_expert}")
            if self.n_expert % self.n_expert_group or self.n_expert_group_active > self.n_expert_group:
                raise ConfigError(f"{self.n_expert} experts cannot form {self.n_expert_group} groups "
                                  f"of which {self.n_expert_group_active} are chosen")
            if self.mlp not in ("swiglu", "geglu"):
                raise ConfigError(f"experts are gated MLPs: use mlp=swiglu or geglu, not {self.mlp}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ConfigError(f"logit_softcap must be positive, got {self.logit_softcap}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be positive, got {self.sliding_window}")

    # ---- JSON round trip -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The fields as given: a size that was derived is written as None, so it follows its inputs
        again when the config is loaded or replaced."""
        d = dataclasses.asdict(self)
        d.update({name: None for name in self._derived})
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return from_known_fields(cls, d)

    def save(self, path: str | Path) -> None:
        from .checkpoint import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}") from None

    def replace(self, **changes) -> "ModelConfig":
        """A copy with `changes`; sizes that were derived follow the changed fields (a wider n_embd
        widens d_ff too, unless d_ff was given)."""
        return ModelConfig(**{**self.to_dict(), **changes})


# ---- field parsing shared by --set, config files and the CLI ---------------------------------------
@functools.cache
def field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def choices(hint) -> tuple | None:
    """The allowed values of a Literal type (optional or not); None for any other type."""
    for t in (hint, *typing.get_args(hint)):
        if typing.get_origin(t) is Literal:
            return typing.get_args(t)
    return None


def check_choices(obj, message=lambda name, value, allowed: f"{name}={value!r} is not one of "
                                                             f"{', '.join(allowed)}") -> None:
    """Refuse a value outside its field's Literal type, on one line."""
    for name, hint in field_types(type(obj)).items():
        allowed, value = choices(hint), getattr(obj, name)
        if allowed and value is not None and value not in allowed:
            raise ConfigError(message(name, value, allowed))


def unknown_key(key: str, known) -> ConfigError:
    """An unknown field, with the nearest known one suggested (a typo is the usual cause)."""
    near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return ConfigError(f"unknown key {key!r}" + (f": did you mean {near[0]}?" if near else ""))


def from_known_fields(cls, d: dict):
    """cls(**d), refusing keys that are not fields of the dataclass `cls` (typos) by name."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**d)


def parse_field_value(cls, key: str, value):
    """Convert `value` (a string from the command line, or a TOML/YAML value) to field `key`'s type."""
    hints = field_types(cls)
    if key not in hints:
        raise unknown_key(key, hints)
    hint = hints[key]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    target = args[0] if args and typing.get_origin(hint) is not Literal else hint
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if not optional:
            raise ConfigError(f"{key} cannot be empty")
        return None
    allowed = choices(hint)
    if allowed is not None:
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
        return value
    try:
        if target is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if target is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if target is float:
            return float(value)
        if target is str:
            return str(value)
        if target is dict:
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{key}={value!r} is not a valid {target.__name__}") from None
    return value


# ---- presets ---------------------------------------------------------------------------------------
def _gpt2(**kw) -> ModelConfig:
    # https://huggingface.co/openai-community/gpt2/blob/main/config.json
    base = dict(family="gpt2", vocab_size=50257, context_len=1024, n_layer=12, n_head=12, n_embd=768,
                norm="layernorm", position="learned", mlp="gelu", gelu_approx="tanh", attn_bias=True,
                attn_out_bias=True, mlp_bias=True, tie_embeddings=True, dropout=0.0)
    return ModelConfig(**{**base, **kw})


def _gpt1(**kw) -> ModelConfig:
    # https://huggingface.co/openai-community/openai-gpt/blob/main/config.json
    base = dict(family="gpt1", vocab_size=40478, context_len=512, n_layer=12, n_head=12, n_embd=768,
                norm="layernorm", norm_placement="post", position="learned", mlp="gelu",
                gelu_approx="tanh",  # GPT-1's GELU is the tanh approximation (HF openai-gpt's "gelu")
                attn_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True, dropout=0.1)
    return ModelConfig(**{**base, **kw})


def _llama(**kw) -> ModelConfig:
    # https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json (the shared parts)
    base = dict(family="llama", norm="rmsnorm", norm_eps=1e-5, position="rope", rope_theta=10000.0,
                mlp="swiglu", tie_embeddings=False)
    return ModelConfig(**{**base, **kw})


PRESETS: dict[str, ModelConfig] = {
    p.name: p
    for p in [
        _gpt1(name="gpt1"),
        _gpt1(name="gpt1-tiny", vocab_size=512, context_len=64, n_layer=2, n_head=4, n_embd=64),
        _gpt2(name="gpt2"),
        _gpt2(name="gpt2-124m"),
        # https://huggingface.co/openai-community/gpt2-medium/blob/main/config.json
        _gpt2(name="gpt2-medium", n_layer=24, n_head=16, n_embd=1024),
        _gpt2(name="gpt2-tiny", vocab_size=512, context_len=64, n_layer=2, n_head=4, n_embd=64),
        # https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json
        _llama(name="llama-2-7b", vocab_size=32000, context_len=4096, n_layer=32, n_head=32,
               n_embd=4096, d_ff=11008),
        # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json
        _llama(name="llama-3.2-1b", vocab_size=128256, context_len=131072, n_layer=16, n_head=32,
               n_kv_head=8, n_embd=2048, head_dim=64, d_ff=8192, rope_theta=500000.0, tie_embeddings=True,
               rope_scaling={"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_context_len": 8192}),
        _llama(name="llama", vocab_size=32000, context_len=2048, n_layer=22, n_head=32, n_kv_head=4,
               n_embd=2048, d_ff=5632),  # TinyLlama-1.1B's shape
        _llama(name="llama-tiny", vocab_size=512, context_len=64, n_layer=2, n_head=4, n_kv_head=2,
               n_embd=64, d_ff=176),
        # https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json
        _llama(name="mistral-7b", family="mistral", vocab_size=32000, context_len=32768, n_layer=32,
               n_head=32, n_kv_head=8, n_embd=4096, d_ff=14336, sliding_window=4096),
        _llama(name="mistral-tiny", family="mistral", vocab_size=512, context_len=64, n_layer=2, n_head=4,
               n_kv_head=2, n_embd=64, d_ff=176, sliding_window=16),
        # https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json
        _llama(name="mixtral-8x7b", family="mixtral", vocab_size=32000, context_len=32768, n_layer=32,
               n_head=32, n_kv_head=8, n_embd=4096, d_ff=14336, rope_theta=1e6, n_expert=8,
               n_expert_active=2, aux_loss_coef=0.02),
        _llama(name="mixtral-tiny", family="mixtral", vocab_size=512, context_len=64, n_layer=2, n_head=4,
               n_kv_head=2, n_embd=64, d_ff=128, n_expert=4, n_expert_active=2, aux_loss_coef=0.02),
        # https://huggingface.co/google/gemma-2b/blob/main/config.json
        _llama(name="gemma-2b", family="gemma", vocab_size=256000, context_len=8192, n_layer=18, n_head=8,
               n_kv_head=1, n_embd=2048, head_dim=256, d_ff=16384, norm_eps=1e-6, mlp="geglu",
               gelu_approx="tanh", norm_unit_offset=True, embed_scale=True, tie_embeddings=True),
        _llama(name="gemma-tiny", family="gemma", vocab_size=512, context_len=64, n_layer=2, n_head=4,
               n_kv_head=1, n_embd=64, head_dim=32, d_ff=256, norm_eps=1e-6, mlp="geglu",
               gelu_approx="tanh", norm_unit_offset=True, embed_scale=True, tie_embeddings=True),
        # https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json
        _llama(name="qwen3-0.6b", family="qwen3", vocab_size=151936, context_len=40960, n_layer=28,
               n_head=16, n_kv_head=8, n_embd=1024, head_dim=128, d_ff=3072, norm_eps=1e-6,
               rope_theta=1e6, qk_norm=True, tie_embeddings=True),
        _llama(name="qwen3-tiny", family="qwen3", vocab_size=512, context_len=64, n_layer=2, n_head=4,
               n_kv_head=2, n_embd=64, head_dim=32, d_ff=192, norm_eps=1e-6, qk_norm=True, tie_embeddings=True),
        # https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json (without its
        # multi-token-prediction layer, which HF transformers does not run either)
        _llama(name="deepseek-v3", family="deepseek-v3", vocab_size=129280, context_len=163840, n_layer=61,
               n_head=128, n_embd=7168, head_dim=192, d_ff=18432, norm_eps=1e-6, attention="mla",
               q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
               n_expert=256, n_expert_active=8, n_shared_expert=1, expert_d_ff=2048, n_dense_layers=3,
               router="sigmoid", routed_scale=2.5, n_expert_group=8, n_expert_group_active=4,
               rope_scaling={"type": "yarn", "factor": 40.0, "original_context_len": 4096, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
        _llama(name="deepseek-v3-tiny", family="deepseek-v3", vocab_size=512, context_len=64, n_layer=3,
               n_head=4, n_embd=64, head_dim=24, d_ff=128, norm_eps=1e-6, attention="mla", q_lora_rank=32,
               kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_expert=8,
               n_expert_active=2, n_shared_expert=1, expert_d_ff=32, n_dense_layers=1, router="sigmoid",
               routed_scale=2.5, n_expert_group=4, n_expert_group_active=2),
        # A small DeepSeek-style decoder (RMSNorm + RoPE + SwiGLU) with GPT-2's vocabulary, the kind of
        # ~60M model that fits a laptop; not a published checkpoint.
        _llama(name="deepseek-60m", family="deepseek", vocab_size=50257, context_len=1024, n_layer=10,
               n_head=8, n_embd=512, d_ff=1536, tie_embeddings=True, norm_eps=1e-6),
        # nanoGPT's config/train_shakespeare_char.py with a 0.15 dropout: about 10.8M parameters
        ModelConfig(name="gpt-mini-char", family="gpt2", vocab_size=65, context_len=256, n_layer=6,
                    n_head=6, n_embd=384, norm="layernorm", position="learned", mlp="gelu",
                    attn_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True, dropout=0.15),
        # The LSTM encoder-decoder baseline (lstm.py), about the size of gpt-mini-char at 65 symbols
        ModelConfig(name="lstm-seq2seq", family="lstm", arch="lstm-seq2seq", vocab_size=65, context_len=256,
                    n_layer=2, n_head=1, n_embd=576, dropout=0.1),
        # A smaller char model that learns visibly within a few CPU minutes (the demo's default)
        ModelConfig(name="char-small", family="gpt2", vocab_size=65, context_len=128, n_layer=4,
                    n_head=4, n_embd=192, norm="layernorm", position="learned", mlp="gelu",
                    attn_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True, dropout=0.05),
    ]
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace()


def format_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{max(0, 3 - int(math.log10(n / scale)) - 1)}f}{unit}"
    return str(n)
