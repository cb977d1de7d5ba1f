"""What a run reports: metrics.csv (and TensorBoard, when installed), throughput and model FLOPs
utilisation, and the summaries and plots that `samovar runs` and `samovar plot` read back."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..plots import loss_curves

COLUMNS = ["step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens", "elapsed_s",
           "expert_balance"]
SCALARS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "expert_balance")  # to TensorBoard


class MetricsLog:
    """RUN/metrics.csv, a row per logged step, and RUN/tensorboard when the extra is installed.
    Written by the main process only: on other ranks every method does nothing."""

    def __init__(self, run: Path, main: bool, extra: tuple[str, ...] = ()):
        self.file = run / "metrics.csv"
        self.main = main
        self.columns = COLUMNS + list(extra)  # extra: the objective's own metrics (DPO's rewards)
        self.scalars = SCALARS + tuple(extra)
        self.last_step = 0  # of the last row written
        self.writer = None
        if main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard extra is not installed
                pass
            else:
                self.writer = SummaryWriter(str(run / "tensorboard"))

    def start(self) -> None:
        """A new file holding the header only."""
        if self.main:
            ckpt.atomic_write_text(self.file, ",".join(self.columns) + "\n")
        self.last_step = 0

    def truncate(self, step: int) -> None:
        """Keep the complete rows up to `step`, in step order; a resumed run logs the rest again
        (a SIGKILL may have cut the last line in half, or logged steps past the checkpoint)."""
        if not self.main:
            return
        kept, last = [], 0
        for r in read_metrics(self.file.parent):
            try:
                n = int(r.get("step") or "")
            except ValueError:
                continue
            if None in r.values() or n <= last or n > step:
                continue
            kept.append(r)
            last = n
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        ckpt.atomic_write_text(self.file, buf.getvalue())
        self.last_step = last

    def log(self, row: dict) -> None:
        """Append a row; a second row for the same step (the final evaluation's) replaces the first."""
        if not self.main:
            return
        if row["step"] == self.last_step:
            self.truncate(row["step"] - 1)
        self.last_step = row["step"]
        with self.file.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, lineterminator="\n").writerow(
                {k: ("" if row.get(k) is None else row[k]) for k in self.columns})
        if self.writer is not None:
            for k in self.scalars:
                if row.get(k) not in (None, ""):
                    self.writer.add_scalar(k, float(row[k]), row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Throughput:
    """Tokens per second since the last reading, and the model FLOPs utilisation they imply."""

    def __init__(self, flops_per_token: float, peak_flops: float | None):
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.start, self.tokens = time.time(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> tuple[float, float | None]:
        now = time.time()
        tps = self.tokens / max(now - self.start, 1e-9)
        self.start, self.tokens = now, 0
        return tps, (self.flops_per_token * tps / self.peak_flops if self.peak_flops else None)


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


def read_metrics(run: str | Path) -> list[dict]:
    file = Path(run) / "metrics.csv"
    if not file.exists():
        return []
    with file.open(newline="") as f:
        return list(csv.DictReader(f))


def plot_runs(runs: list[str | Path], out: str | Path) -> None:
    """The loss curves of run folders on one chart (see plots.loss_curves)."""
    loss_curves([(Path(run).name, read_metrics(run)) for run in runs], out)


def run_summary(run: str | Path) -> dict:
    """Steps, tokens, best val loss and time of a run folder: its latest checkpoint's counters (what a
    resume continues from), else its metrics; and the last logged training loss."""
    rows = read_metrics(run)
    vals = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    last = rows[-1] if rows else {}
    summary = {"run": str(run), "steps": int(last.get("step") or 0), "tokens": int(last.get("tokens") or 0),
               "best_val_loss": min(vals) if vals else None, "last_loss": losses[-1] if losses else None,
               "elapsed_s": float(last.get("elapsed_s") or 0)}
    checkpoints = ckpt.list_checkpoints(Path(run))
    if checkpoints:
        try:
            state = ckpt.read_json(checkpoints[-1] / "trainer_state.json", "trainer state")
            summary.update(steps=state["step"], tokens=state["tokens_seen"], elapsed_s=state["elapsed_s"],
                           best_val_loss=state["best_val_loss"])
        except (ckpt.CheckpointError, KeyError):
            pass  # a damaged checkpoint: the metrics' figures
    return summary
