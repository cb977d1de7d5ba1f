"""HuggingFace weights <-> ours: a rename table per family (our names -> HF's, with {i} for the
layer, {e} for the expert and {wb} for weight/bias), and the three layouts that need more than a
rename (see hf.py's docstring): Conv1D and fused c_attn (GPT-1/2), interleaved rotary pairs
(DeepSeek-V3), stacked experts (transformers 5)."""

from __future__ import annotations

import re

import torch

from ..config import ModelConfig
from .hf_config import HFError


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
    from ..model import Transformer

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
