"""The Trainer: one loop for pretraining and fine-tuning, delegating every concern to a component.

One optimizer step:
    lr from the schedule (schedule.py)
    grad_accum x (objective's batch -> forward under autocast -> loss / grad_accum -> backward)
    clip the gradient norm -> optimizer step (optim.py)

Under torchrun the model is wrapped in DistributedDataParallel (or sharded with FSDP2; parallelize.py)
and each rank takes its share of every step's rows (whole micro-batches when grad_accum divides by
the world size, else a slice of each micro-batch's rows), so the global batch, and the loss curve,
are those of one process with the same config. Only rank 0 writes checkpoints, metrics and plots.

Every eval_interval steps the loss is estimated on train and val; early stopping looks at those
numbers. Every checkpoint_interval steps (and at the end) a checkpoint folder is written atomically
(state.py); metrics.csv gets a row every log_interval steps (metrics.py).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from ..config import ConfigError, ModelConfig
from ..data import TokenData
from ..layers import RouterStats
from ..model import build_model
from ..runtime import Dist, autocast, init_distributed, resolve_dtype, seed_everything
from .config import TrainConfig, TrainingError
from .metrics import MetricsLog, Throughput, measure_peak_flops, plot_runs
from .objectives import OBJECTIVES, Batch
from .optim import make_optimizer
from .parallelize import parallelize
from .schedule import lr_at, set_lr
from .state import RunFolder, RunState, init_from, restore_optimizer, restore_rng, start_lora


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
        self.data = TokenData.open(data)
        self.data.check_context(model_cfg.context_len)
        self.objective = OBJECTIVES[cfg.objective](cfg)
        self.tokenizer = self.data.tokenizer()
        if self.tokenizer.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tokenizer.vocab_size} tokens, more than the "
                              f"model's vocab_size={model_cfg.vocab_size}")
        self.dist, self.device = init_distributed(cfg.device)
        self.fsdp = self.dist.enabled and cfg.strategy == "fsdp"
        if cfg.optimizer == "muon" and self.fsdp:
            raise ConfigError("optimizer=muon is not supported with strategy=fsdp; use ddp")
        self.micros, self.rows = split_batch(cfg, self.dist)
        # (auto stays fp32 on the CPU: bf16 autocast trains 2.35x faster there, but cost +0.53% perplexity
        #  at equal steps, over the 0.5% that auto allows: RESULTS.md)
        self.dtype = resolve_dtype(cfg.dtype, self.device, bf16_on_cpu=False)
        self.progress = progress if self.dist.is_main else False
        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.model = build_model(model_cfg).to(self.device)
        self.objective.check(self.model, self.data)
        self.run = RunFolder(out, self.dist)
        self.out = self.run.out
        self.metrics = MetricsLog(self.out, self.dist.is_main, self.objective.columns)
        self.init_from = init_from if init_from is not None or not resume else self.run.saved_init_from()
        self.adapter = None  # a LoRA run's adapter record (lora.adapter_record): its checkpoints hold adapters only
        self.state, saved = self._start(resume, self.init_from)
        self.objective.start(self.model, self.data, self.init_from, self.device, self.dtype)
        self.forward = parallelize(self.model, cfg, self.dist, self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        if saved is not None:
            restore_optimizer(self.model, self.optimizer, saved["optimizer"], self.fsdp)
            restore_rng(saved["rng"], self.dist, self.device)
        else:
            torch.manual_seed(cfg.seed + self.dist.rank)  # dropout differs between ranks, as it should
        self.eval_hook = None  # called as eval_hook(step, {"train": ..., "val": ...}) after each evaluation
        self.bar = None  # the progress bar, while train() runs

    def _start(self, resume: bool, init_run) -> tuple[RunState, dict | None]:
        """The run's state: resumed from its latest checkpoint, or new (from init_run's weights when
        given). A run killed before its first checkpoint starts again from step 0."""
        if resume and self.run.has_checkpoints():
            state, saved, self.adapter = self.run.resume(self.model, self.device, self.cfg.lora())
            budget = self.cfg.max_seconds
            if budget is not None and state.elapsed >= budget:
                raise TrainingError(f"{self.out} has already trained {state.elapsed:.1f} s, beyond max_seconds="
                                    f"{budget:g} (the budget of the whole run): for {budget:g} s more, give "
                                    f"--set max_seconds={state.elapsed + budget:.0f}")
            if self.dist.is_main:
                self.run.save_train_config(self.cfg, self.data.folder, self.init_from)
                self.metrics.truncate(state.step)
            self.dist.barrier()
            return state, saved
        if resume and not self.out.is_dir():
            raise CheckpointError(f"{self.out} does not exist: nothing to resume")
        if init_run is not None:
            init_from(init_run, self.model, self.tokenizer, self.device)
        lora = self.cfg.lora()
        if lora is not None:
            self.adapter = start_lora(self.model, lora, init_run)
        self.run.start(self.model.config, self.cfg, self.data.folder, self.tokenizer, fresh=not resume,
                       init_from=init_run)
        self.metrics.start()
        return RunState(), None

    @property
    def step(self) -> int:
        return self.state.step

    def budget_note(self) -> str | None:
        """The time budget in words (max_seconds counts the whole run, earlier sessions included)."""
        budget, spent = self.cfg.max_seconds, self.state.elapsed
        if budget is None:
            return None
        return (f"time budget {budget:g} s of training for the whole run"
                + (f" ({spent:.1f} s spent, {budget - spent:.1f} s left)" if spent else ""))

    # ---- the loop ------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, state = self.cfg, self.state
        self._begin()
        stop = None
        while stop is None and state.step < cfg.max_steps:
            if cfg.max_seconds is not None and self.dist.any(self.elapsed() >= cfg.max_seconds, self.device):
                stop = "max_seconds"
                break
            if not self.train_step():
                continue  # a non-finite loss: the step is skipped
            row = self._log_row() if self._at(cfg.log_interval) or self._at(cfg.eval_interval) else None
            if self._at(cfg.eval_interval):
                stop = self.evaluate(row)
            if row is not None:
                self.metrics.log(row)
            if stop is None and self._at(cfg.checkpoint_interval or cfg.eval_interval) \
                    and state.step < cfg.max_steps:
                self.save()
        return self._finish(stop or "max_steps")

    def _at(self, interval: int) -> bool:
        """Whether this step is one of every `interval` steps, or the last step."""
        return self.state.step % interval == 0 or self.state.step == self.cfg.max_steps

    def _begin(self) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        peak = cfg.peak_flops
        if peak is None:
            peak = measure_peak_flops(self.device, self.dtype) * self.dist.world_size
        self.throughput = Throughput(self.model.flops_per_token(), peak)
        self.bar = tqdm(total=cfg.max_steps, initial=self.state.step, unit="step", dynamic_ncols=True,
                        mininterval=0.5, disable={True: False, False: True, None: None}[self.progress])
        self.model.train()
        self.session_start, self.bad_steps, self.last = time.time(), 0, {}

    def elapsed(self) -> float:
        """Training seconds of this run: earlier sessions' and this one's."""
        return self.state.elapsed + time.time() - self.session_start

    def train_step(self) -> bool:
        """One optimizer step; False when its loss was not finite (the step is then skipped)."""
        cfg, state = self.cfg, self.state
        lr = lr_at(cfg, state.step, self.elapsed())
        set_lr(self.optimizer, cfg, lr)
        loss, tokens, stats, metrics = self._accumulate(state.step)
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            warnings.warn(f"step {state.step + 1}: loss is {loss}; the step is skipped")
            if self.bad_steps >= cfg.max_bad_steps:
                self.bar.close()
                raise TrainingError(f"{self.bad_steps} non-finite losses in a row at step {state.step + 1}; "
                                    "the last good checkpoint is kept. Lower lr or check the data.")
            return False
        self.bad_steps = 0
        grad_norm = (float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
                     if cfg.grad_clip > 0 else None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += tokens
        self.throughput.add(tokens)
        self.bar.update(1)
        self.last = {"loss": loss, "lr": lr, "grad_norm": grad_norm,
                     "expert_balance": None if stats is None else stats.balance(), **metrics}
        return True

    def _accumulate(self, step: int) -> tuple[float, int, RouterStats | None, dict[str, float]]:
        """Gradients of the step's micro-batches, each weighted by its share of the step's scored
        positions (over every rank), so that the step's loss and gradients are those of one batch of
        them all, however the positions fall. Returns the loss, the real tokens, the last routing and
        the objective's metrics (weighted as the loss is)."""
        batches = [self.batch("train", step, micro, rows=self.rows) for micro in self.micros]
        scored, tokens = self.dist.all_mean([sum(b.scored for b in batches), sum(b.tokens for b in batches)],
                                            self.device)  # each rank's mean
        local, stats, metrics = 0.0, None, dict.fromkeys(self.objective.columns, 0.0)
        for i, batch in enumerate(batches):
            stats = RouterStats() if self.model.config.n_expert else None  # routing, for expert_balance
            weight = batch.scored / max(scored, 1e-9)
            loss, logged = self._micro_step(batch, weight, i == len(batches) - 1, stats)
            local += loss
            for k in metrics:
                metrics[k] += logged[k] * weight
        # each rank's backward is world_size times its share, which DDP's gradient average divides back
        means = self.dist.all_mean([local, *metrics.values()], self.device)
        return means[0], round(tokens * self.dist.world_size), stats, dict(zip(metrics, means[1:]))

    def _micro_step(self, batch: Batch, weight: float, last: bool, stats: RouterStats | None
                    ) -> tuple[float, dict[str, float]]:
        """Backward of one micro-batch's mean loss times `weight`, its share of the step's scored
        positions; returns that weighted loss and the objective's metrics of the micro-batch."""
        sync = contextlib.nullcontext()
        if not last and hasattr(self.forward, "no_sync"):
            sync = self.forward.no_sync()  # DDP: all-reduce gradients once, after the last micro-batch
        with sync:
            with autocast(self.device, self.dtype):
                loss, logged = self.objective.loss(self.forward, batch, stats)
                loss = loss * weight
            loss.backward()
        return loss.item(), logged

    def batch(self, split: str, step: int, micro: int = 0, offset: int = 0, rows: slice = slice(None)) -> Batch:
        """One micro-batch of the objective's kind, drawn from a generator seeded by (seed, step, micro)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 1_009 + micro + offset)
        return self.objective.batch(self.data, split, g, self.cfg.batch_size, self.model.config.context_len,
                                    rows).to(self.device)

    def _log_row(self) -> dict:
        tps, mfu = self.throughput.read()
        last = self.last
        self.bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False,
                             **({} if mfu is None else {"mfu": f"{mfu:.0%}"}))
        return {"step": self.state.step, "loss": round(last["loss"], 5), "lr": f"{last['lr']:.3e}",
                "grad_norm": None if last["grad_norm"] is None else round(last["grad_norm"], 4),
                "tokens_per_s": round(tps, 1), "mfu": None if mfu is None else round(mfu, 4),
                "tokens": self.state.tokens_seen, "elapsed_s": round(self.elapsed(), 2),
                "expert_balance": last["expert_balance"],
                **{k: round(last[k], 5) for k in self.objective.columns}}

    def _finish(self, stop_reason: str) -> dict:
        state = self.state
        if state.last_eval.get("step") != state.step:  # the final evaluation, in metrics.csv too
            row = self._log_row() if self.last else None
            self.evaluate(row)
            if row is not None:
                self.metrics.log(row)
        self.bar.close()
        self.bar = None
        self.save()
        if self.dist.is_main and self.cfg.plot:
            self.plot()
        self.metrics.close()
        return {"step": state.step, "stop_reason": stop_reason, "best_val_loss": state.best_val,
                "tokens_seen": state.tokens_seen, "elapsed_s": state.elapsed, **state.last_eval}

    # ---- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over eval_steps fixed batches of each split (the same batches every time),
        shared out over the ranks; or, with full_val_eval, the exact loss over the whole val split."""
        self.model.eval()
        out = {}
        for split in ("train", "val"):
            if split == "val" and self.cfg.full_val_eval:
                with autocast(self.device, self.dtype):
                    out[split] = self.objective.full_val_loss(self.model, self.data)
                continue
            total = 0.0
            for i in range(self.cfg.eval_steps):
                batch = self.batch(split, -1 - i, offset=7, rows=self.rows)  # this rank's share of the rows
                with autocast(self.device, self.dtype):
                    total += self.objective.loss(self.forward, batch)[0].item()
            out[split] = self.dist.all_mean([total / self.cfg.eval_steps], self.device)[0]
        self.model.train()
        return out

    def evaluate(self, row: dict | None) -> str | None:
        """Estimate the losses, report them (into `row` when given), and say why to stop early, if so."""
        losses = self.estimate_loss()
        state, cfg = self.state, self.cfg
        state.last_eval = {"step": state.step, "train_loss": losses["train"], "val_loss": losses["val"]}
        if self.eval_hook is not None:
            self.eval_hook(state.step, losses)
        if row is not None:
            row["val_loss"] = round(losses["val"], 5)
        if self.dist.is_main:
            msg = f"step {state.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            (self.bar.write if self.bar is not None else print)(msg)
            sys.stdout.flush()
        if losses["val"] < state.best_val:
            state.best_val, state.bad_evals = losses["val"], 0
        else:
            state.bad_evals += 1
        if cfg.early_stop_gap is not None and losses["val"] - losses["train"] > cfg.early_stop_gap:
            return "early_stop_gap"
        if cfg.early_stop_patience is not None and state.bad_evals >= cfg.early_stop_patience:
            return "early_stop_patience"
        return None

    # ---- checkpoints ---------------------------------------------------------------------------------
    def save(self) -> Path:
        self.state.elapsed = self.elapsed()  # the time so far goes into the checkpoint
        self.session_start = time.time()
        return self.run.save(self.state, self.model, self.tokenizer, self.optimizer, self.fsdp, self.cfg.keep_last,
                             self.adapter)

    def plot(self) -> None:
        plot_runs([self.out], self.out / "loss.png")
