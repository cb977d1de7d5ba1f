"""PNG charts, for training and evaluation alike: runs' loss curves and evaluation bar charts.
Each is drawn with matplotlib's Agg backend (no screen needed) and written atomically."""

from __future__ import annotations

import io
from pathlib import Path

from .checkpoint import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, out: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    atomic_write_bytes(out, buf.getvalue())


def loss_curves(runs: list[tuple[str, list[dict]]], out: str | Path) -> None:
    """Loss and val loss, learning rate, and gradient norm against step, one line per run, from
    each run's name and metrics.csv rows."""
    fig, (ax_loss, ax_lr, ax_grad) = _pyplot().subplots(3, 1, figsize=(8, 7), sharex=True,
                                                        gridspec_kw={"height_ratios": [3, 1, 1]})
    for name, rows in runs:
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
    save_png(fig, out)


def bar_charts(names: list[str], metrics: list[tuple[str, str]], rows: list[dict], out: str | Path) -> None:
    """One bar chart a metric (key, title), one bar a row (named by `names`)."""
    fig, axes = _pyplot().subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], metrics):
        ax.bar(range(len(rows)), [r[key] for r in rows], color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_png(fig, out)
