"""HuggingFace interop: the families, and local HF folders read and written.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import CheckpointError, atomic_path, atomic_write_text
from ..config import ModelConfig
from .hf_config import (HFError, check, deepseek_from_hf, deepseek_to_hf, gemma_from_hf, gemma_to_hf, gpt1_from_hf,
                        gpt1_to_hf, gpt2_from_hf, gpt2_to_hf, llama_from_hf, llama_to_hf, mistral_from_hf,
                        mistral_to_hf, mixtral_from_hf, mixtral_to_hf, qwen3_from_hf, qwen3_to_hf)
from .hf_weights import DEEPSEEK_NAMES, GPT1_NAMES, GPT2_NAMES, LLAMA_NAMES, MIXTRAL_NAMES, state_from_hf, state_to_hf


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
    Family("openai-gpt", "OpenAIGPTLMHeadModel", GPT1_NAMES, gpt1_from_hf, gpt1_to_hf, conv1d=True),
    Family("gpt2", "GPT2LMHeadModel", GPT2_NAMES, gpt2_from_hf, gpt2_to_hf, conv1d=True),
    Family("llama", "LlamaForCausalLM", LLAMA_NAMES, llama_from_hf, llama_to_hf),
    Family("mistral", "MistralForCausalLM", LLAMA_NAMES, mistral_from_hf, mistral_to_hf),
    Family("mixtral", "MixtralForCausalLM", MIXTRAL_NAMES, mixtral_from_hf, mixtral_to_hf),
    Family("gemma", "GemmaForCausalLM", LLAMA_NAMES, gemma_from_hf, gemma_to_hf),
    Family("qwen3", "Qwen3ForCausalLM", LLAMA_NAMES, qwen3_from_hf, qwen3_to_hf),
    Family("deepseek_v3", "DeepseekV3ForCausalLM", DEEPSEEK_NAMES, deepseek_from_hf, deepseek_to_hf,
           rope_interleaved=True),
]}


def config_from_hf(hf: dict) -> tuple[ModelConfig, Family]:
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise HFError(f"model_type {kind!r} is not supported; samovar imports {', '.join(FAMILIES)}")
    family = FAMILIES[kind]
    try:
        cfg = family.from_hf(hf)
    except KeyError as e:
        raise HFError(f"{kind} config.json lacks the field {e.args[0]}") from None
    label = kind.replace("_", "-").replace("openai-gpt", "gpt1")
    return cfg.replace(family=label, name="imported", export_as=kind), family


def config_to_hf(cfg: ModelConfig) -> tuple[dict, Family]:
    """The HF config.json of `cfg`: of the family `cfg.export_as` names, else of the first family
    (in FAMILIES' order) that expresses the model exactly. A refusal names what stops the nearest."""
    if cfg.arch != "transformer":
        raise HFError(f"a {cfg.arch} model has no HuggingFace counterpart to export to")
    wrong = {kind: check(cfg, kind) for kind in ([cfg.export_as] if cfg.export_as else FAMILIES)}
    kind = min(wrong, key=lambda k: len(wrong[k]))  # the first that fits, or the nearest
    if wrong[kind]:
        more = f" and {len(wrong[kind]) - 2} more" if len(wrong[kind]) > 2 else ""
        which = "the nearest HF family" if len(wrong) > 1 else "HF family"
        raise HFError(f"{which}, {kind}, needs {', '.join(wrong[kind][:2])}{more}")
    family = FAMILIES[kind]
    return {"architectures": [family.architecture], "model_type": kind, **family.to_hf(cfg)}, family


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
    from ..checkpoint import load_state_into
    from ..model import Transformer
    from ..tokenizer import Tokenizer, TokenizerError

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
    """Write an HF model folder that `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load.
    Of a model with LoRA adapters, the base is written (interop/peft.py writes the adapters)."""
    from ..checkpoint import model_state
    from ..lora import adapter_state

    out = Path(out)
    cfg = model.config
    hf_cfg, family = config_to_hf(cfg)
    adapters = adapter_state(model)
    state = state_to_hf({k: v.float().cpu() for k, v in model_state(model).items() if k not in adapters}, cfg, family)
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
        _save_shard(shards[0], out / "model.safetensors")
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            _save_shard(shard, out / fname)
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
        tok_cfg = {**tokenizer.hf_config(), "model_max_length": cfg.context_len}
        atomic_write_text(out / "tokenizer_config.json", json.dumps(tok_cfg, indent=2) + "\n")
    return out


def _save_shard(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
