"""TrainConfig and the Trainer: one loop for pretraining (and, with a loss mask, fine-tuning).

One optimizer step:
    lr = warmup, then cosine decay (by steps, or by elapsed time when max_seconds is set)
    grad_accum x (batch -> forward under autocast -> loss / grad_accum -> backward)
    clip the gradient norm -> AdamW step (no weight decay on norms, biases and embeddings' gains)

Every eval_interval steps the loss is estimated on train and val; early stopping looks at those
numbers. Every checkpoint_interval steps (and at the end) a checkpoint folder is written atomically.
The batch of step s is drawn from a generator seeded by (seed, s), so a resumed run sees exactly the
batches an uninterrupted run would have seen; the dropout RNG is saved with the optimizer state.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import ConfigError, ModelConfig
from .data import TokenData
from .model import Transformer
from .runtime import autocast, resolve_device, resolve_dtype, seed_everything
from .tokenizer import Tokenizer

METRIC_COLUMNS = ["step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "tokens", "elapsed_s",
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
    dtype: str = "auto"
    compile: bool = False

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_steps", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**d)


class TrainingError(RuntimeError):
    pass


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr as progress goes 0 -> 1."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW with weight decay on matrices only (not on norms, biases or 1-D gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused,
                             foreach=None if fused else True)


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, data: str | Path, out: str | Path,
                 resume: bool = False, progress: bool | None = None, init_from: str | Path | None = None):
        self.cfg = cfg
        self.out = Path(out)
        self.data = TokenData.open(data)
        self.data.check_context(model_cfg.context_len)
        self.tokenizer = self.data.tokenizer()
        if self.tokenizer.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tokenizer.vocab_size} tokens, more than the "
                              f"model's vocab_size={model_cfg.vocab_size}")
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.progress = progress
        seed_everything(cfg.seed)
        self.model = Transformer(model_cfg).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0  # training seconds of earlier sessions of this run
        self.best_val = math.inf
        self.bad_evals = 0
        self.last_eval: dict = {}
        if resume:
            self._resume()
        else:
            if init_from is not None:
                self._init_from(init_from)
            self._start_run_folder(model_cfg)
        self.forward = torch.compile(self.model) if cfg.compile else self.model

    # ---- run folder ----------------------------------------------------------------------------------
    def _start_run_folder(self, model_cfg: ModelConfig) -> None:
        if ckpt.list_checkpoints(self.out):
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

    def _resume(self) -> None:
        folder = ckpt.resolve_checkpoint(self.out)
        saved = ModelConfig.load(folder / "config.json")
        if saved != self.model.config:
            raise ConfigError(f"the model config differs from the one of {folder}; resume with the same "
                              "preset and --set values")
        ckpt.load_state_into(self.model, ckpt.load_weights(folder, self.device), str(folder))
        state = ckpt.read_json(folder / "trainer_state.json", "trainer state")
        opt = ckpt.load_optimizer_state(folder)
        if opt is None:
            raise ckpt.CheckpointError(f"{folder} has no optimizer.pt: it cannot be resumed exactly")
        self.optimizer.load_state_dict(opt["optimizer"])
        torch.set_rng_state(opt["rng"]["torch"])
        if torch.cuda.is_available() and opt["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(opt["rng"]["cuda"])
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.elapsed = state["elapsed_s"]
        self.best_val = state["best_val_loss"] if state["best_val_loss"] is not None else math.inf
        self.bad_evals = state["bad_evals"]
        self._save_train_config()
        self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop the rows logged after `step`, which the resumed run will log again."""
        file = self.out / "metrics.csv"
        rows = list(csv.DictReader(file.open())) if file.exists() else []
        buf = io.StringIO()
        writer = csv.DictWriter(buf, METRIC_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(r for r in rows if r.get("step") and int(r["step"]) <= step)
        ckpt.atomic_write_text(file, buf.getvalue())

    def _log(self, row: dict) -> None:
        with (self.out / "metrics.csv").open("a", newline="") as f:
            csv.DictWriter(f, METRIC_COLUMNS, lineterminator="\n").writerow(
                {k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})

    # ---- the loop ------------------------------------------------------------------------------------
    def batch(self, split: str, step: int, micro: int = 0, offset: int = 0):
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 1_009 + micro + offset)
        x, y = self.data.batch(split, self.cfg.batch_size, self.model.config.context_len, g)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over eval_steps fixed batches of each split (the same batches every time)."""
        self.model.eval()
        out = {}
        for split in ("train", "val"):
            losses = []
            for i in range(self.cfg.eval_steps):
                x, y = self.batch(split, -1 - i, offset=7)
                with autocast(self.device, self.dtype):
                    losses.append(self.forward(x, y).item())
            out[split] = sum(losses) / len(losses)
        self.model.train()
        return out

    def train(self) -> dict:
        cfg = self.cfg
        from tqdm.auto import tqdm

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
            if cfg.max_seconds is not None and elapsed >= cfg.max_seconds:
                stop_reason = "max_seconds"
                break
            progress = (self.step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
            if cfg.max_seconds is not None:
                progress = max(progress, elapsed / cfg.max_seconds)
            lr = lr_at(cfg, self.step, progress)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x, y = self.batch("train", self.step, micro)
                with autocast(self.device, self.dtype):
                    loss = self.forward(x, y) / cfg.grad_accum
                loss.backward()
                loss_sum += loss.item()
            if not math.isfinite(loss_sum):
                self.optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
                warnings.warn(f"step {self.step + 1}: loss is {loss_sum}; the step is skipped")
                if bad_steps >= cfg.max_bad_steps:
                    bar.close()
                    raise TrainingError(f"{bad_steps} non-finite losses in a row at step {self.step + 1}; "
                                        "the last good checkpoint is kept. Lower lr or check the data.")
                continue
            bad_steps = 0
            grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip).item()
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
                row = {"step": self.step, "loss": round(loss_sum, 5), "lr": f"{lr:.3e}",
                       "grad_norm": None if grad_norm is None else round(grad_norm, 4),
                       "tokens_per_s": round(tps, 1), "tokens": self.tokens_seen,
                       "elapsed_s": round(self.elapsed + now - session_start, 2),
                       "expert_balance": self.expert_balance()}
                bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
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
        self.plot()
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
        if row is not None:
            row["val_loss"] = round(losses["val"], 5)
        msg = f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        (bar.write if bar is not None else print)(msg)
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
    def save(self) -> Path:
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed,
                 "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
                 "bad_evals": self.bad_evals, **{k: v for k, v in self.last_eval.items() if k != "step"}}
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        folder = self.out / ckpt.CHECKPOINTS / f"step-{self.step:07d}"
        ckpt.save_checkpoint(folder, self.model, self.tokenizer, state,
                             {"optimizer": self.optimizer.state_dict(), "rng": rng})
        if self.last_eval.get("step") == self.step and self.last_eval["val_loss"] <= self.best_val:
            ckpt.atomic_write_text(self.out / "best.txt", folder.name + "\n")
        self._prune()
        return folder

    def _prune(self) -> None:
        """Keep the last keep_last checkpoints and the best one."""
        best_file = self.out / "best.txt"
        best = best_file.read_text().strip() if best_file.exists() else None
        found = ckpt.list_checkpoints(self.out)
        for folder in found[:-max(1, self.cfg.keep_last)]:
            if folder.name != best:
                shutil.rmtree(folder, ignore_errors=True)

    def plot(self) -> None:
        plot_runs([self.out], self.out / "loss.png")


def read_metrics(run: str | Path) -> list[dict]:
    file = Path(run) / "metrics.csv"
    if not file.exists():
        return []
    return list(csv.DictReader(file.open()))


def plot_runs(runs: list[str | Path], out: str | Path) -> None:
    """Loss (and val loss) against step for each run, learning rate below; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    for run in runs:
        rows = read_metrics(run)
        name = Path(run).name
        steps = [int(r["step"]) for r in rows]
        ax_loss.plot(steps, [float(r["loss"]) for r in rows], label=f"{name} train", alpha=0.7)
        val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
        if val:
            ax_loss.plot(*zip(*val), marker="o", label=f"{name} val")
        ax_lr.plot(steps, [float(r["lr"]) for r in rows], label=name)
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    ckpt.atomic_write_bytes(out, buf.getvalue())
