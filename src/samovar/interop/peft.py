"""LoRA adapters in peft's format: adapter_config.json and adapter_model.safetensors, whose tensors are
named `base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight` after the modules of our HF
export (hf.py's rename tables name them; no HF name is typed here).

Two layouts need more than a rename, as for the weights (hf_weights.py):
- GPT-1/2 fuse q, k, v into one c_attn. Adapters of q, k and v become one adapter of c_attn whose A
  stacks theirs and whose B is block-diagonal (rank: the sum of theirs; its alpha keeps the scaling),
  written with peft's rank_pattern / alpha_pattern. Read back, an adapter of c_attn splits into
  adapters of q, k and v that share its A, each with its rows of B.
- DeepSeek-V3's rotated query and key rows are interleaved in HF's layout: B's rows are permuted as
  the weight's are.
transformers 5 stacks the routed experts into 3-D tensors, which peft's LoRA cannot target: adapters
of experts are refused on export.

Reading an adapter into samovar keeps its rank and alpha when every adapted layer shares them and
every layer of a target is adapted; otherwise (rank_pattern, layers_to_transform, a split c_attn)
each adapter is padded with zeros to the largest rank and its scaling folded into B, with alpha = rank:
the same function of the input, as exactly as float arithmetic allows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..checkpoint import atomic_path, atomic_write_text
from ..config import ConfigError
from ..lora import LoRAConfig, adapted, apply_lora, linear_layers, load_adapter_state
from .hf_config import HFError
from .hf_weights import _expand, _permute_rope_rows

PREFIX = "base_model.model."


def _hf_modules(model) -> tuple[dict[str, str], object]:
    """Our Linear modules' names -> their HF module names ("...c_attn#q" for a part of a fused c_attn),
    and the model's HF family."""
    from .hf import config_to_hf

    family = config_to_hf(model.config)[1]
    table = _expand(family.names, model.config)
    return {ours[:-len(".weight")]: theirs.replace(".weight", "") for ours, theirs in table.items()
            if ours.endswith(".weight")}, family


def _rope_rows(model, name: str):
    """For DeepSeek's layout: (heads, nope, rope) of the rows a module's output interleaves, or None."""
    from ..layers import LatentAttention

    parent, _, attr = name.rpartition(".")
    if not isinstance(model.get_submodule(parent), LatentAttention):
        return None
    cfg = model.config
    if attr in ("q_proj", "q_up"):
        return cfg.n_head, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    if attr == "kv_down":
        return 1, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    return None


def _experts(model) -> set[int]:
    from ..layers import MoE

    return {id(e) for m in model.modules() if isinstance(m, MoE) for e in m.experts}


def save_peft(model, lora: LoRAConfig, out: str | Path, base_model: str | None = None) -> Path:
    """Write the model's LoRA adapters (made with settings `lora`) as a peft adapter folder for our HF
    export of the model; base_model: the folder that export was written to."""
    from safetensors.torch import save_file

    layers = adapted(model)
    if not layers:
        raise ConfigError("this model has no LoRA adapters to export")
    names, family = _hf_modules(model)
    experts = _experts(model)
    tensors, targets, rank_pattern, alpha_pattern = {}, [], {}, {}
    fused: dict[str, dict[str, tuple]] = {}  # c_attn -> {"q": (A, B), ...}
    for name, m in layers.items():
        if id(model.get_submodule(name.rpartition(".")[0])) in experts:
            raise HFError("peft cannot adapt transformers 5's stacked experts: target the attention "
                          "projections (or the shared experts) for a peft export")
        A, B = m.lora_A.weight.detach().float().cpu(), m.lora_B.weight.detach().float().cpu()
        rows = _rope_rows(model, name)
        if rows is not None:
            B = _permute_rope_rows(B, *rows, inverse=True)
        theirs = names[name]
        if "#" in theirs:  # a part of GPT's fused c_attn
            module, part = theirs.split("#")
            fused.setdefault(module, {})[part] = (A, B)
            continue
        tensors[f"{PREFIX}{theirs}.lora_A.weight"], tensors[f"{PREFIX}{theirs}.lora_B.weight"] = A, B
        targets.append(theirs)
    for module, parts in fused.items():  # A stacked, B block-diagonal over the q, k, v rows
        each = next(iter(parts.values()))[1].shape[0]
        A = torch.cat([parts[p][0] for p in "qkv" if p in parts])
        B = torch.zeros(3 * each, A.shape[0])
        col = 0
        for i, p in enumerate("qkv"):
            if p in parts:
                B[i * each:(i + 1) * each, col:col + lora.rank] = parts[p][1]
                col += lora.rank
        tensors[f"{PREFIX}{module}.lora_A.weight"], tensors[f"{PREFIX}{module}.lora_B.weight"] = A, B
        targets.append(module)
        if A.shape[0] != lora.rank:  # the same scaling at the summed rank
            rank_pattern[module] = A.shape[0]
            alpha_pattern[module] = lora.scaling * (math.sqrt(A.shape[0]) if lora.rslora else A.shape[0])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.rslora,
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": family.conv1d,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "revision": None,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "adapter_model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return out


def read_peft(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a peft LoRA adapter folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFError(f"{folder} has no adapter_config.json: not a peft adapter folder") from None
    except (OSError, json.JSONDecodeError) as e:
        raise HFError(f"cannot read {folder / 'adapter_config.json'}: {e}") from None
    if config.get("peft_type") != "LORA":
        raise HFError(f"{folder} holds a {config.get('peft_type')} adapter; samovar reads LoRA adapters")
    for key, why in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save"), ("trainable_token_indices",
                                                                                    "trainable tokens")):
        if config.get(key):
            raise HFError(f"the adapter uses {why}, which samovar's LoRA does not support")
    if config.get("bias", "none") != "none":
        raise HFError(f"the adapter trains biases (bias={config['bias']!r}), which samovar's LoRA does not")
    file = folder / "adapter_model.safetensors"
    if not file.exists():
        raise HFError(f"{folder} has no adapter_model.safetensors")
    try:
        tensors = load_file(str(file))
    except Exception as e:
        raise HFError(f"cannot read {file}: {str(e).splitlines()[0]}") from None
    return config, tensors


def load_peft(model, folder: str | Path) -> LoRAConfig:
    """Put the peft adapter of `folder` on `model` (a samovar model of the adapter's base), in place;
    returns the LoRA settings it now has (see the module's docstring)."""
    config, tensors = read_peft(folder)
    names, family = _hf_modules(model)
    ours_of = {}
    for ours, theirs in names.items():
        ours_of.setdefault(theirs.split("#")[0], []).append((ours, theirs.partition("#")[2]))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora, r, alpha = bool(config.get("use_rslora")), int(config["r"]), float(config["lora_alpha"])
    found = {}  # our module -> (A, B, scaling)
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PREFIX):-len(".lora_A.weight")] if key.startswith(PREFIX) else key[:-len(".lora_A.weight")]
        if module not in ours_of:
            raise HFError(f"the adapter adapts {module}, which the model does not have")
        A, B = tensors[key].float(), tensors[key.replace(".lora_A.", ".lora_B.")].float()
        rank = _pattern(rank_pattern, module, r)
        scaling = _pattern(alpha_pattern, module, alpha) / (math.sqrt(rank) if rslora else rank)
        for ours, part in ours_of[module]:
            b = B if not part else B.chunk(3, dim=0)["qkv".index(part)]
            rows = _rope_rows(model, ours)
            if rows is not None:
                b = _permute_rope_rows(b, *rows, inverse=False)
            found[ours] = (A, b, scaling)
    if not found:
        raise HFError(f"the adapter in {folder} holds no LoRA tensors")
    targets = tuple(sorted({name.rpartition(".")[2] for name in found}))
    every = [n for n in linear_layers(model) if n.rpartition(".")[2] in targets]
    ranks = {A.shape[0] for A, _, _ in found.values()}
    scalings = {s for _, _, s in found.values()}
    uniform = len(ranks) == 1 and len(scalings) == 1 and set(every) == set(found)
    if uniform:
        lora = LoRAConfig(r, alpha, float(config.get("lora_dropout") or 0.0), targets, rslora)
    else:  # padded to the largest rank, scaling folded into B (alpha = rank: scaling 1)
        top = max(ranks)
        lora = LoRAConfig(top, float(top), float(config.get("lora_dropout") or 0.0), targets, False)
    apply_lora(model, lora)
    state = {}
    for name, m in adapted(model).items():
        A, B, scaling = found.get(name, (torch.zeros(0, m.in_features), torch.zeros(m.out_features, 0), 1.0))
        if not uniform:
            A = torch.cat([A, torch.zeros(lora.rank - A.shape[0], A.shape[1])])
            B = torch.cat([B * scaling, torch.zeros(B.shape[0], lora.rank - B.shape[1])], dim=1)
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = A, B
    load_adapter_state(model, state, str(folder))
    return lora


def _pattern(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern: the value of the first key that names the module (a full
    name, or a regular expression matching the end of it)."""
    import re

    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default
