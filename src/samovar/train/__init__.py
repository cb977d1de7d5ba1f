"""Training: the loop (loop.py) and the components it delegates to.

    config.py       TrainConfig, TrainingError
    loop.py         Trainer: step, evaluate, checkpoint, until a step or time budget or early stop
    objectives.py   lm, sft, dpo: a batch -> loss + logged metrics
    optim.py        AdamW groups, Muon for the hidden matrices
    schedule.py     warmup, cosine or warmup-stable-decay, by steps or by the clock
    state.py        run state and folder: resume, RNG, pruning, best checkpoint
    metrics.py      metrics.csv, TensorBoard, throughput and MFU, run summaries and loss plots
    parallelize.py  activation checkpointing, DDP / FSDP2, compile: applied from outside the model
"""

from .config import TrainConfig, TrainingError
from .loop import Trainer, split_batch
from .metrics import measure_peak_flops, plot_runs, read_metrics, run_summary
from .objectives import OBJECTIVES
from .optim import Optimizers, make_optimizer
from .parallelize import apply_activation_checkpointing
from .schedule import lr_at

__all__ = ["OBJECTIVES", "Optimizers", "TrainConfig", "Trainer", "TrainingError", "apply_activation_checkpointing",
           "lr_at", "make_optimizer", "measure_peak_flops", "plot_runs", "read_metrics", "run_summary",
           "split_batch"]
