"""Run state: the counters a run carries (step, tokens, time, best val loss), the run folder it
writes, and what a resume needs back exactly (weights, optimizer state, each rank's RNG).

The batch of step s is drawn from a generator seeded by (seed, s), so a resumed run sees exactly the
batches an uninterrupted run would have seen; the dropout RNG is saved with the optimizer state.
Only rank 0 writes; every rank takes part in gathering what it holds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import ConfigError, ModelConfig
from ..lora import ADAPTER_CONFIG, LoRAConfig, adapter_record, apply_lora, is_adapter_checkpoint
from ..runtime import Dist
from ..tokenizer import Tokenizer
from .config import TrainConfig, TrainingError


@dataclass
class RunState:
    """The counters of a run, saved in each checkpoint's trainer_state.json."""

    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0  # training seconds of the sessions before this one
    best_val: float = math.inf
    bad_evals: int = 0  # evaluations in a row without a better val loss
    last_eval: dict = field(default_factory=dict)  # {"step", "train_loss", "val_loss"} of the latest evaluation

    def to_json(self, world_size: int) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed,
                "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
                "bad_evals": self.bad_evals, "world_size": world_size,
                **{k: v for k, v in self.last_eval.items() if k != "step"},
                **({"eval_step": self.last_eval["step"]} if self.last_eval else {})}

    @classmethod
    def from_json(cls, d: dict) -> "RunState":
        last_eval = ({"step": d["eval_step"], "train_loss": d["train_loss"], "val_loss": d["val_loss"]}
                     if "eval_step" in d else {})
        return cls(step=d["step"], tokens_seen=d["tokens_seen"], elapsed=d["elapsed_s"],
                   best_val=math.inf if d["best_val_loss"] is None else d["best_val_loss"],
                   bad_evals=d["bad_evals"], last_eval=last_eval)


class RunFolder:
    """RUN/: config.json, train_config.json, tokenizer.json, checkpoints/, best.txt (see checkpoint.py)."""

    def __init__(self, out: str | Path, dist: Dist):
        self.out = Path(out)
        self.dist = dist

    def has_checkpoints(self) -> bool:
        return bool(ckpt.list_checkpoints(self.out))

    def start(self, model_cfg: ModelConfig, cfg: TrainConfig, data: Path, tokenizer: Tokenizer, fresh: bool,
              init_from: str | Path | None = None) -> None:
        """Write the run's config files (rank 0); a fresh run refuses a folder that holds checkpoints."""
        if self.dist.is_main:
            if fresh and self.has_checkpoints():
                raise TrainingError(f"{self.out} already holds checkpoints: add --resume {self.out} to "
                                    "continue it, or choose another --out")
            self.out.mkdir(parents=True, exist_ok=True)
            model_cfg.save(self.out / "config.json")
            self.save_train_config(cfg, data, init_from)
            tokenizer.save(self.out / "tokenizer.json")
        self.dist.barrier()

    def save_train_config(self, cfg: TrainConfig, data: Path, init_from: str | Path | None) -> None:
        record = {**cfg.to_dict(), "data": str(data),
                  **({"init_from": str(Path(init_from).resolve())} if init_from is not None else {})}
        ckpt.atomic_write_text(self.out / "train_config.json", json.dumps(record, indent=2) + "\n")

    def saved_init_from(self) -> str | None:
        """The --init-from the run was started with (DPO's reference), from its train_config.json."""
        file = self.out / "train_config.json"
        return json.loads(file.read_text(encoding="utf-8")).get("init_from") if file.exists() else None

    def resume(self, model, device, lora: LoRAConfig | None = None) -> tuple[RunState, dict, dict | None]:
        """Weights into `model` (a LoRA run's: its base's, then the adapters) and the counters from the
        latest complete checkpoint; returns them with its optimizer.pt contents (optimizer and RNG
        states) and, for a LoRA run, its adapter record."""
        folder = ckpt.resolve_checkpoint(self.out)
        saved = ModelConfig.load(folder / "config.json")
        if saved != model.config:
            raise ConfigError(f"the model config differs from the one of {folder}; resume with the same "
                              "preset and --set values")
        adapter = ckpt.read_json(folder / ADAPTER_CONFIG, "adapter config") if is_adapter_checkpoint(folder) else None
        if (adapter is None) != (lora is None) or (lora is not None and LoRAConfig.from_dict(adapter["lora"]) != lora):
            raise ConfigError(f"--resume: the LoRA settings (lora_*) cannot change from those of {folder}")
        ckpt.load_checkpoint_into(model, folder, device)
        state = RunState.from_json(ckpt.read_json(folder / "trainer_state.json", "trainer state"))
        extra = ckpt.load_optimizer_state(folder)
        if extra is None:
            raise ckpt.CheckpointError(f"{folder} has no optimizer.pt: it cannot be resumed exactly")
        if self.dist.is_main:
            ckpt.remove_stale_temp_folders(self.out)
        return state, extra, adapter

    def save(self, state: RunState, model, tokenizer: Tokenizer, optimizer, fsdp: bool, keep_last: int,
             adapter: dict | None = None) -> Path:
        """Write a checkpoint of `state` (rank 0), name it in best.txt when its val loss is the best,
        and prune the older ones. `adapter`: a LoRA run's record; the checkpoint holds the adapters only."""
        model_state, opt_state = full_states(model, optimizer, fsdp)
        rng = capture_rng(self.dist, next(model.parameters()).device)
        folder = self.out / ckpt.CHECKPOINTS / f"step-{state.step:07d}"
        if self.dist.is_main:
            ckpt.save_checkpoint(folder, model, tokenizer, state.to_json(self.dist.world_size),
                                 {"optimizer": opt_state, "rng": rng}, model_state=model_state, adapter=adapter)
            if state.last_eval.get("step") == state.step and state.last_eval["val_loss"] <= state.best_val:
                ckpt.atomic_write_text(self.out / "best.txt", folder.name + "\n")
            self.prune(keep_last)
        self.dist.barrier()
        return folder

    def prune(self, keep_last: int) -> None:
        """Keep the last keep_last checkpoints and the best one."""
        best_file = self.out / "best.txt"
        best = best_file.read_text().strip() if best_file.exists() else None
        for folder in ckpt.list_checkpoints(self.out)[:-max(1, keep_last)]:
            if folder.name != best:
                ckpt.remove_checkpoint(folder)


def init_from(run: str | Path, model, tokenizer: Tokenizer, device) -> None:
    """Start from another run's (or an imported model's) weights: fine-tuning. Only dropout, the
    labels and a grown vocabulary may differ from its config; the data must use its tokenizer, or that
    tokenizer with tokens added (the chat tokens): their embedding (and untied head) rows start at the
    mean of the old rows."""
    folder = ckpt.resolve_checkpoint(run)
    saved = ModelConfig.load(folder / "config.json")
    free = ("dropout", "name", "family", "aux_loss_coef", "export_as", "vocab_size")
    shape_fields = [f for f in ModelConfig.__dataclass_fields__ if f not in free]
    changed = [f for f in shape_fields if getattr(saved, f) != getattr(model.config, f)]
    if changed:
        raise ConfigError(f"--init-from {run}: the model's {', '.join(changed)} cannot change (only dropout can)")
    if (folder / "tokenizer.json").exists() and not extends(tokenizer, Tokenizer.load(folder)):
        raise ConfigError(f"the data was tokenized with another tokenizer than {folder}'s; prepare it "
                          f"with --tokenizer {folder / 'tokenizer.json'}")
    if is_adapter_checkpoint(folder):  # a LoRA run's: its base with the adapters merged in
        from ..model import build_model

        merged = build_model(saved)
        ckpt.load_merged_into(merged, folder)
        state = {k: v.to(device) for k, v in merged.state_dict().items()}
    else:
        state = ckpt.load_weights(folder, device)
    if model.config.vocab_size > saved.vocab_size:
        state = grow_vocab(state, model.config.vocab_size)
    ckpt.load_state_into(model, state, str(folder))


def start_lora(model, lora: LoRAConfig, base: str | Path | None) -> dict:
    """Put LoRA on `model` (which holds the base's weights) and return the adapter record its
    checkpoints carry. The base must be a full checkpoint of the same vocabulary: LoRA leaves the
    embeddings frozen, so rows grown for chat tokens would never learn."""
    if base is None:
        raise ConfigError("lora_rank needs a base model to adapt: give --init-from RUN")
    folder = ckpt.resolve_checkpoint(base)
    if is_adapter_checkpoint(folder):
        raise ConfigError(f"{folder} is itself a LoRA checkpoint: merge it first (samovar merge-lora {base} --out DIR) "
                          "and adapt the merged model")
    grown = model.config.vocab_size - ModelConfig.load(folder / "config.json").vocab_size
    if grown > 0:
        raise ConfigError(f"the data's tokenizer adds {grown} tokens to {folder}'s vocabulary, and LoRA keeps the "
                          "embeddings frozen, so their rows would never learn: fine-tune the whole model on the "
                          "chat data first (lora_rank=0), then adapt that run")
    apply_lora(model, lora)
    return adapter_record(lora, folder)


def extends(new: Tokenizer, old: Tokenizer) -> bool:
    """Whether `new` is `old`, or `old` with tokens added after its own (every old id unchanged)."""
    if new.hf.to_str() == old.hf.to_str():
        return True
    old_vocab, new_vocab = old.hf.get_vocab(with_added_tokens=True), new.hf.get_vocab(with_added_tokens=True)
    return new.kind == old.kind and all(new_vocab.get(t) == i for t, i in old_vocab.items())


def grow_vocab(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """The token embedding and head grown to vocab_size rows, each new row the mean of the old ones."""
    grown = dict(state)
    for name in ("tok_emb.weight", "lm_head.weight"):
        if name in state and state[name].shape[0] < vocab_size:
            old = state[name]
            mean = old.float().mean(0, keepdim=True).to(old.dtype)
            grown[name] = torch.cat([old, mean.expand(vocab_size - old.shape[0], -1)])
    return grown


def full_states(model, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Model and optimizer state, whole, on the CPU (gathered from the shards under FSDP)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(model, options=options),
                get_optimizer_state_dict(model, optimizer, options=options))
    return model.state_dict(), optimizer.state_dict()


def restore_optimizer(model, optimizer, opt_state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, opt_state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(opt_state)


def capture_rng(dist: Dist, device: torch.device) -> dict:
    """Every rank's torch RNG state (the dropout streams), and the CUDA ones."""
    rng = {"torch": [torch.get_rng_state()]}
    if dist.enabled:
        from torch.distributed import all_gather_object

        gathered = [None] * dist.world_size
        all_gather_object(gathered, torch.get_rng_state())
        rng["torch"] = gathered
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict, dist: Dist, device: torch.device) -> None:
    states = rng["torch"]  # one per rank of the run that saved it
    # (resumed on another number of processes, every rank continues rank 0's dropout stream)
    torch.set_rng_state(states[dist.rank] if len(states) == dist.world_size else states[0])
    if device.type == "cuda" and rng.get("cuda"):
        torch.cuda.set_rng_state_all(rng["cuda"])
