"""TrainConfig and the Trainer: one loop for pretraining (and, with a loss mask, fine-tuning).

One optimizer step:
    lr = warmup, then cosine decay (by steps, or by elapsed time when max_seconds is set)
    grad_accum x (batch -> forward under autocast -> loss / grad_accum -> backward)
    clip the gradient norm -> AdamW step (no weight decay on norms, biases and embeddings' gains)

Under torchrun the model is wrapped in DistributedDataParallel (or sharded with FSDP2) and each rank
takes its share of every step's rows (whole micro-batches when grad_accum divides by the world size,
else a slice of each micro-batch's rows), so the global batch, and the loss curve, are those of one
process with the same config. Only rank 0 writes checkpoints, metrics and plots.

Every eval_interval steps the loss is estimated on train and val; early stopping looks at those
numbers. Every checkpoint_interval steps (and at the end) a checkpoint folder is written atomically.
The batch of step s is drawn from a generator seeded by (seed, s), so a resumed run sees exactly the
batches an uninterrupted run would have seen; the dropout RNG is saved with the optimizer state.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import ConfigError, ModelConfig, from_known_fields
from .data import TokenData, pair_batch
from .model import build_model
from .runtime import Dist, autocast, init_distributed, resolve_dtype, seed_everything
from .tokenizer import Tokenizer

METRIC_COLUMNS = ["step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens", "elapsed_s",
                  "expert_balance"]


@dataclass
class TrainConfig:
    batch_size: int = 12
    grad_accum: int = 1  # micro-batches per optimizer step; the step sees batch_size * grad_accum rows
    max_steps: int = 2000
    max_seconds: float | None = None  # a wall-clock budget; the schedule then follows elapsed time
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine: decay over the whole run; wsd: hold lr, then decay over cooldown_frac
    cooldown_frac: float = 0.3  # wsd: the final share of the run spent decaying lr linearly to min_lr
    optimizer: str = "adamw"  # adamw; or muon: Muon for the blocks' matrices, AdamW for the rest
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_steps: int = 20  # batches per split for each loss estimate
    checkpoint_interval: int | None = None  # None: every eval_interval
    keep_last: int = 2  # checkpoints kept besides the best one
    log_interval: int = 10
    early_stop_patience: int | None = None  # stop after this many evaluations without a better val loss
    early_stop_gap: float | None = None  # stop when val loss - train loss exceeds this
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto: fp32 on CPU (bf16 there is ~100x slower without native support), bf16 on CUDA
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more time
    strategy: str = "ddp"  # under torchrun: ddp (replicate) or fsdp (FSDP2: shard parameters and state)
    peak_flops: float | None = None  # for MFU; None: measured with a matmul at start-up; 0: no MFU
    full_val_eval: bool = False  # val loss over the whole val split (exact), not eval_steps batches
    objective: str = "lm"  # lm: next token everywhere; sft: only the answers of the data's prompt/answer pairs
    plot: bool = True  # draw loss.png at the end

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_steps", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.objective not in ("lm", "sft"):
            raise ConfigError(f"objective must be lm or sft, got {self.objective!r}")
        if self.schedule not in ("cosine", "wsd"):
            raise ConfigError(f"schedule must be cosine or wsd, got {self.schedule!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if not 0.0 <= self.cooldown_frac <= 1.0:
            raise ConfigError(f"cooldown_frac must be in [0, 1], got {self.cooldown_frac}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return from_known_fields(cls, d)


class TrainingError(RuntimeError):
    pass


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then, as progress goes 0 -> 1, either cosine decay from lr
    to min_lr, or (wsd: warmup-stable-decay) lr held until the last cooldown_frac, then a linear decay."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "wsd":
        into_cooldown = (progress - (1.0 - cfg.cooldown_frac)) / max(cfg.cooldown_frac, 1e-9)
        return cfg.lr - min(max(into_cooldown, 0.0), 1.0) * (cfg.lr - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


class Optimizers:
    """Several optimizers stepped as one (Muon for matrices with AdamW for the rest)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW with weight decay on matrices only (not on norms, biases or 1-D gains); with
    optimizer=muon, Muon (torch.optim.Muon) takes the blocks' 2-D matrices and AdamW the embeddings,
    the head and every 1-D parameter. Each group remembers its base lr for the schedule."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fused = device.type in ("cpu", "cuda", "mps")  # one kernel for all parameters (5x foreach's speed on CPU)
    adamw_kw = dict(betas=(cfg.beta1, cfg.beta2), fused=fused, foreach=None if fused else True)
    muon = {n: p for n, p in params.items() if cfg.optimizer == "muon" and p.dim() == 2 and n.startswith("blocks.")}
    rest = {n: p for n, p in params.items() if n not in muon}
    adamw = torch.optim.AdamW([
        {"params": [p for p in rest.values() if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr": cfg.lr},
        {"params": [p for p in rest.values() if p.dim() < 2], "weight_decay": 0.0, "lr": cfg.lr},
    ], lr=cfg.lr, **adamw_kw)
    optimizers = [adamw]
    if muon:
        optimizers.append(torch.optim.Muon(list(muon.values()), lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                                           momentum=cfg.muon_momentum))
    for o in optimizers:
        for group in o.param_groups:
            group["base_lr"] = group["lr"]
    return adamw if len(optimizers) == 1 else Optimizers(*optimizers)


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """The machine's matmul throughput (FLOP/s) in `dtype`: the denominator of MFU."""
    n = 1024
    g = torch.Generator(device=device).manual_seed(0)  # leave the global RNG (dropout) untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b  # warm up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def split_batch(cfg: TrainConfig, world: Dist) -> tuple[list[int], slice]:
    """This rank's micro-batch indices and rows of each step's batch_size x grad_accum rows."""
    W, r = world.world_size, world.rank
    if cfg.grad_accum % W == 0:
        return list(range(r, cfg.grad_accum, W)), slice(None)
    if cfg.batch_size % W == 0:
        share = cfg.batch_size // W
        return list(range(cfg.grad_accum)), slice(r * share, (r + 1) * share)
    raise ConfigError(f"a step of batch_size={cfg.batch_size} x grad_accum={cfg.grad_accum} cannot be split "
                      f"evenly over {W} processes: make one of them a multiple of {W}")


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, data: str | Path, out: str | Path,
                 resume: bool = False, progress: bool | None = None, init_from: str | Path | None = None):
        self.cfg = cfg
        self.out = Path(out)
        self.data = TokenData.open(data)
        self.data.check_context(model_cfg.context_len)
        if cfg.objective == "sft" and not self.data.has_pairs:
            raise ConfigError(f"objective=sft needs prompt/answer pairs: prepare {data} with --pairs qa or dialogue")
        if model_cfg.arch == "lstm-seq2seq" and cfg.objective != "sft":
            raise ConfigError("the lstm-seq2seq baseline trains on prompt/answer pairs: set objective=sft")
        self.tokenizer = self.data.tokenizer()
        if self.tokenizer.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tokenizer.vocab_size} tokens, more than the "
                              f"model's vocab_size={model_cfg.vocab_size}")
        self.dist, self.device = init_distributed(cfg.device)
        self.micros, self.rows = split_batch(cfg, self.dist)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.progress = progress if self.dist.is_main else False
        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.model = build_model(model_cfg).to(self.device)
        self.model.activation_checkpointing = cfg.activation_checkpointing
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0  # training seconds of earlier sessions of this run
        self.best_val = math.inf
        self.bad_evals = 0
        self.last_eval: dict = {}
        saved = None  # optimizer and RNG states of the checkpoint being resumed
        if resume and ckpt.list_checkpoints(self.out):
            saved = self._resume()
        else:
            if resume and not self.out.is_dir():
                raise ckpt.CheckpointError(f"{self.out} does not exist: nothing to resume")
            # (a run killed before its first checkpoint starts again from step 0)
            if init_from is not None:
                self._init_from(init_from)
            if self.dist.is_main:
                self._start_run_folder(model_cfg, fresh=not resume)
            self.dist.barrier()
        self.forward = self._parallelize(self.model)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        if saved is not None:
            self._restore_optimizer_and_rng(saved)
        else:
            torch.manual_seed(cfg.seed + self.dist.rank)  # dropout differs between ranks, as it should
        self.peak_flops = cfg.peak_flops
        self.writer = self._tensorboard()
        self.eval_hook = None  # called as eval_hook(step, {"train": ..., "val": ...}) after each evaluation

    def _parallelize(self, model):
        """DDP or FSDP2 under torchrun (applied from outside: the model stays plain), then compile."""
        if self.dist.enabled and self.cfg.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            if not hasattr(model, "blocks"):
                raise ConfigError("strategy=fsdp shards Transformer blocks; use ddp for this model")
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        forward = model
        if self.dist.enabled and self.cfg.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                              else None)
        return torch.compile(forward) if self.cfg.compile else forward

    def _tensorboard(self):
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the tensorboard extra is not installed
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    # ---- run folder ----------------------------------------------------------------------------------
    def _start_run_folder(self, model_cfg: ModelConfig, fresh: bool) -> None:
        if fresh and ckpt.list_checkpoints(self.out):
            raise TrainingError(f"{self.out} already holds checkpoints: add --resume {self.out} to continue "
                                "it, or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        model_cfg.save(self.out / "config.json")
        self._save_train_config()
        self.tokenizer.save(self.out / "tokenizer.json")
        ckpt.atomic_write_text(self.out / "metrics.csv", ",".join(METRIC_COLUMNS) + "\n")

    def _save_train_config(self) -> None:
        record = {**self.cfg.to_dict(), "data": str(self.data.folder)}
        ckpt.atomic_write_text(self.out / "train_config.json", json.dumps(record, indent=2) + "\n")

    def _init_from(self, run: str | Path) -> None:
        """Start from another run's (or an imported model's) weights: fine-tuning."""
        folder = ckpt.resolve_checkpoint(run)
        saved = ModelConfig.load(folder / "config.json")
        free = ("dropout", "name", "family", "aux_loss_coef")
        shape_fields = [f for f in ModelConfig.__dataclass_fields__ if f not in free]
        changed = [f for f in shape_fields if getattr(saved, f) != getattr(self.model.config, f)]
        if changed:
            raise ConfigError(f"--init-from {run}: the model's {', '.join(changed)} cannot change "
                              "(only dropout can)")
        if (folder / "tokenizer.json").exists() and \
                Tokenizer.load(folder).hf.to_str() != self.tokenizer.hf.to_str():
            raise ConfigError(f"the data was tokenized with another tokenizer than {folder}'s; prepare it "
                              f"with --tokenizer {folder / 'tokenizer.json'}")
        ckpt.load_state_into(self.model, ckpt.load_weights(folder, self.device), str(folder))

    def _resume(self) -> dict:
        """Model and counters from the latest complete checkpoint; returns its optimizer.pt contents."""
        folder = ckpt.resolve_checkpoint(self.out)
        saved = ModelConfig.load(folder / "config.json")
        if saved != self.model.config:
            raise ConfigError(f"the model config differs from the one of {folder}; resume with the same "
                              "preset and --set values")
        ckpt.load_state_into(self.model, ckpt.load_weights(folder, self.device), str(folder))
        state = ckpt.read_json(folder / "trainer_state.json", "trainer state")
        saved = ckpt.load_optimizer_state(folder)
        if saved is None:
            raise ckpt.CheckpointError(f"{folder} has no optimizer.pt: it cannot be resumed exactly")
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.elapsed = state["elapsed_s"]
        self.best_val = state["best_val_loss"] if state["best_val_loss"] is not None else math.inf
        self.bad_evals = state["bad_evals"]
        if self.dist.is_main:
            ckpt.remove_stale_temp_folders(self.out)
            self._save_train_config()
            self._truncate_metrics(self.step)
        self.dist.barrier()
        return saved

    def _restore_optimizer_and_rng(self, saved: dict) -> None:
        opt_state, rng = saved["optimizer"], saved["rng"]
        if self.dist.enabled and self.cfg.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, opt_state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(opt_state)
        states = rng["torch"]  # one per rank of the run that saved it
        # (resumed on another number of processes, every rank continues rank 0's dropout stream)
        torch.set_rng_state(states[self.dist.rank] if len(states) == self.dist.world_size else states[0])
        if self.device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _truncate_metrics(self, step: int) -> None:
        """Keep the complete rows up to `step`, in step order; the resumed run logs the rest again
        (a SIGKILL may have cut the last line in half, or logged steps past the checkpoint)."""
        file = self.out / "metrics.csv"
        rows = list(csv.DictReader(file.open())) if file.exists() else []
        kept, last = [], 0
        for r in rows:
            try:
                n = int(r.get("step") or "")
            except ValueError:
                continue
            if None in r.values() or n <= last or n > step:
                continue
            kept.append(r)
            last = n
        buf = io.StringIO()
        writer = csv.DictWriter(buf, METRIC_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        ckpt.atomic_write_text(file, buf.getvalue())

    def _log(self, row: dict) -> None:
        if not self.dist.is_main:
            return
        with (self.out / "metrics.csv").open("a", newline="") as f:
            csv.DictWriter(f, METRIC_COLUMNS, lineterminator="\n").writerow(
                {k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
        if self.writer is not None:
            for k in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "expert_balance"):
                if row.get(k) not in (None, ""):
                    self.writer.add_scalar(k, float(row[k]), row["step"])
            self.writer.flush()

    # ---- the loop ------------------------------------------------------------------------------------
    def batch(self, split: str, step: int, micro: int = 0, offset: int = 0, rows: slice = slice(None)):
        """(x, y, loss_mask) of one micro-batch: random windows of the token stream (loss_mask None),
        or random prompt/answer pairs with objective=sft."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 1_009 + micro + offset)
        T = self.model.config.context_len
        if self.cfg.objective == "sft":
            which = torch.randint(self.data.n_pairs(split), (self.cfg.batch_size,), generator=g)[rows].tolist()
            x, y, mask = pair_batch(*self.data.pairs(split), which, T)
            return x.to(self.device), y.to(self.device), mask.to(self.device)
        x, y = self.data.batch(split, self.cfg.batch_size, T, g, rows)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), None

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over eval_steps fixed batches of each split (the same batches every time),
        shared out over the ranks."""
        self.model.eval()
        out = {}
        for split in ("train", "val"):
            if split == "val" and self.cfg.full_val_eval:
                out[split] = self.full_val_loss()
                continue
            total = 0.0
            for i in range(self.cfg.eval_steps):
                x, y, mask = self.batch(split, -1 - i, offset=7, rows=self.rows)  # this rank's share of the rows
                with autocast(self.device, self.dtype):
                    total += self.forward(x, y, loss_mask=mask).item()
            out[split] = self.dist.all_mean([total / self.cfg.eval_steps], self.device)[0]
        self.model.train()
        return out

    @torch.no_grad()
    def full_val_loss(self) -> float:
        """The mean loss over every token of the val split (non-overlapping context windows), or over
        every answer of the val pairs with objective=sft."""
        from .evaluation import answer_metrics, lm_metrics

        with autocast(self.device, self.dtype):
            if self.cfg.objective == "sft":
                loss = answer_metrics(self.model, *self.data.pairs("val"))["answer_loss"]
            else:
                loss = lm_metrics(self.model, self.data.val, batch_size=64)["loss"]
        self.model.train()
        return loss

    def _micro_step(self, micro: int, last: bool) -> float:
        x, y, mask = self.batch("train", self.step, micro, rows=self.rows)
        sync = contextlib.nullcontext()
        if not last and hasattr(self.forward, "no_sync"):
            sync = self.forward.no_sync()  # DDP: all-reduce gradients once, after the last micro-batch
        with sync:
            with autocast(self.device, self.dtype):
                loss = self.forward(x, y, loss_mask=mask) / len(self.micros)
            loss.backward()
        return loss.item()

    def train(self) -> dict:
        cfg = self.cfg
        from tqdm.auto import tqdm

        if self.peak_flops is None:
            self.peak_flops = measure_peak_flops(self.device, self.dtype) * self.dist.world_size
        if cfg.optimizer == "muon" and self.dist.enabled and cfg.strategy == "fsdp":
            raise ConfigError("optimizer=muon is not supported with strategy=fsdp; use ddp")
        flops_per_token = self.model.flops_per_token()
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.model.config.context_len
        ckpt_every = cfg.checkpoint_interval or cfg.eval_interval
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable={True: False, False: True, None: None}[self.progress],
                   unit="step", dynamic_ncols=True, mininterval=0.5)
        self.model.train()
        session_start = time.time()
        window_start, window_tokens = time.time(), 0
        bad_steps, stop_reason = 0, "max_steps"
        while self.step < cfg.max_steps:
            elapsed = self.elapsed + time.time() - session_start
            if cfg.max_seconds is not None and self.dist.any(elapsed >= cfg.max_seconds, self.device):
                stop_reason = "max_seconds"
                break
            progress = (self.step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
            if cfg.max_seconds is not None:
                progress = max(progress, elapsed / cfg.max_seconds)
            lr = lr_at(cfg, self.step, progress)
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr / cfg.lr
            local = sum(self._micro_step(m, i == len(self.micros) - 1) for i, m in enumerate(self.micros))
            loss = self.dist.all_mean([local], self.device)[0]
            if not math.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
                warnings.warn(f"step {self.step + 1}: loss is {loss}; the step is skipped")
                if bad_steps >= cfg.max_bad_steps:
                    bar.close()
                    raise TrainingError(f"{bad_steps} non-finite losses in a row at step {self.step + 1}; "
                                        "the last good checkpoint is kept. Lower lr or check the data.")
                continue
            bad_steps = 0
            grad_norm = (float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
                         if cfg.grad_clip > 0 else None)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            bar.update(1)

            row = None
            if self.step % cfg.log_interval == 0 or self.step % cfg.eval_interval == 0 \
                    or self.step == cfg.max_steps:
                now = time.time()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                mfu = flops_per_token * tps / self.peak_flops if self.peak_flops else None
                row = {"step": self.step, "loss": round(loss, 5), "lr": f"{lr:.3e}",
                       "grad_norm": None if grad_norm is None else round(grad_norm, 4),
                       "tokens_per_s": round(tps, 1), "mfu": None if mfu is None else round(mfu, 4),
                       "tokens": self.tokens_seen,
                       "elapsed_s": round(self.elapsed + now - session_start, 2),
                       "expert_balance": self.expert_balance()}
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False,
                                **({} if mfu is None else {"mfu": f"{mfu:.0%}"}))
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                stop = self._evaluate(row, bar)
                if stop:
                    stop_reason = stop
            if row is not None:
                self._log(row)
            if stop_reason.startswith("early"):
                break
            if self.step % ckpt_every == 0 and self.step < cfg.max_steps:
                self.elapsed += time.time() - session_start
                session_start = time.time()
                self.save()
        bar.close()
        self.elapsed += time.time() - session_start
        if not self.last_eval or self.last_eval.get("step") != self.step:
            self._evaluate(None, None)
        self.save()
        if self.dist.is_main and cfg.plot:
            self.plot()
        if self.writer is not None:
            self.writer.close()
        return {"step": self.step, "stop_reason": stop_reason, "best_val_loss": self.best_val,
                "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed, **self.last_eval}

    def expert_balance(self) -> float | None:
        """For a mixture of experts: the busiest expert's share of the last batch's routing slots over
        the mean share, averaged over MoE layers (1.0 is perfectly balanced; n_expert means collapse)."""
        layers = self.model.moe_layers()
        if not layers:
            return None
        ratios = [(m.expert_load.max() / m.expert_load.float().mean()).item() for m in layers]
        return round(sum(ratios) / len(ratios), 3)

    def _evaluate(self, row: dict | None, bar) -> str | None:
        losses = self.estimate_loss()
        self.last_eval = {"step": self.step, "train_loss": losses["train"], "val_loss": losses["val"]}
        if self.eval_hook is not None:
            self.eval_hook(self.step, losses)
        if row is not None:
            row["val_loss"] = round(losses["val"], 5)
        if self.dist.is_main:
            msg = f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            (bar.write if bar is not None else print)(msg)
            sys.stdout.flush()
        improved = losses["val"] < self.best_val
        if improved:
            self.best_val = losses["val"]
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        cfg = self.cfg
        if cfg.early_stop_gap is not None and losses["val"] - losses["train"] > cfg.early_stop_gap:
            return "early_stop_gap"
        if cfg.early_stop_patience is not None and self.bad_evals >= cfg.early_stop_patience:
            return "early_stop_patience"
        return None

    # ---- checkpoints ---------------------------------------------------------------------------------
    def _full_states(self) -> tuple[dict, dict]:
        """Model and optimizer state, whole, on the CPU (gathered from the shards under FSDP)."""
        if self.dist.enabled and self.cfg.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.model, options=options),
                    get_optimizer_state_dict(self.model, self.optimizer, options=options))
        return self.model.state_dict(), self.optimizer.state_dict()

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0; every rank takes part in gathering what it holds)."""
        model_state, opt_state = self._full_states()
        rng = {"torch": [torch.get_rng_state()]}
        if self.dist.enabled:
            import torch.distributed as dist

            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, torch.get_rng_state())
            rng["torch"] = gathered
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        folder = self.out / ckpt.CHECKPOINTS / f"step-{self.step:07d}"
        if self.dist.is_main:
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed,
                     "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
                     "bad_evals": self.bad_evals, "world_size": self.dist.world_size,
                     **{k: v for k, v in self.last_eval.items() if k != "step"}}
            ckpt.save_checkpoint(folder, self.model, self.tokenizer, state,
                                 {"optimizer": opt_state, "rng": rng}, model_state=model_state)
            if self.last_eval.get("step") == self.step and self.last_eval["val_loss"] <= self.best_val:
                ckpt.atomic_write_text(self.out / "best.txt", folder.name + "\n")
            self._prune()
        self.dist.barrier()
        return folder

    def _prune(self) -> None:
        """Keep the last keep_last checkpoints and the best one."""
        best_file = self.out / "best.txt"
        best = best_file.read_text().strip() if best_file.exists() else None
        found = ckpt.list_checkpoints(self.out)
        for folder in found[:-max(1, self.cfg.keep_last)]:
            if folder.name != best:
                ckpt.remove_checkpoint(folder)

    def plot(self) -> None:
        plot_runs([self.out], self.out / "loss.png")


def read_metrics(run: str | Path) -> list[dict]:
    file = Path(run) / "metrics.csv"
    if not file.exists():
        return []
    return list(csv.DictReader(file.open()))


def plot_runs(runs: list[str | Path], out: str | Path) -> None:
    """Loss and val loss, learning rate, and gradient norm against step, one line per run; written
    atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr, ax_grad) = plt.subplots(3, 1, figsize=(8, 7), sharex=True,
                                                  gridspec_kw={"height_ratios": [3, 1, 1]})
    for run in runs:
        rows = read_metrics(run)
        name = Path(run).name
        steps = [int(r["step"]) for r in rows]
        ax_loss.plot(steps, [float(r["loss"]) for r in rows], label=f"{name} train", alpha=0.7)
        val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
        if val:
            ax_loss.plot(*zip(*val), marker="o", label=f"{name} val")
        ax_lr.plot(steps, [float(r["lr"]) for r in rows], label=name)
        grad = [(int(r["step"]), float(r["grad_norm"])) for r in rows if r.get("grad_norm")]
        if grad:
            ax_grad.plot(*zip(*grad), label=name, alpha=0.7)
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.set_ylabel("lr")
    ax_grad.set_ylabel("grad norm")
    ax_grad.set_xlabel("step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    ckpt.atomic_write_bytes(out, buf.getvalue())


def run_summary(run: str | Path) -> dict:
    """Best val loss, steps and tokens of a run folder, from its metrics."""
    rows = read_metrics(run)
    vals = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    last = rows[-1] if rows else {}
    return {"run": str(run), "steps": int(last.get("step") or 0), "tokens": int(last.get("tokens") or 0),
            "best_val_loss": min(vals) if vals else None, "last_loss": float(last["loss"]) if last else None,
            "elapsed_s": float(last.get("elapsed_s") or 0)}
