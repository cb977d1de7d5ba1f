"""Supervised fine-tuning on ru_dialogues: packed rows beside padded ones, in real tokens per second
(padding is never counted) and in what the same number of steps learns.

The same model (a 4-layer, 256-wide LLaMA-shaped char model, context 256) trains for --steps steps
of --batch rows, once with pack=true (several dialogues a row, kept apart by the attention mask)
and once with pack=false (one dialogue a row, padded to the longest), one after the other in one
process; the ratio is packed / padded.

    .venv/bin/python benchmarks/sft.py [--steps 30] [--batch 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from samovar.config import get_preset
from samovar.data import prepare
from samovar.train import TrainConfig, Trainer

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ru_dialogues" / "anekdot_dialogues.txt"


def run(data: Path, out: Path, pack: bool, steps: int, batch: int) -> dict:
    model_cfg = get_preset("llama-tiny").replace(vocab_size=256, context_len=256, n_layer=4, n_embd=256,
                                                 n_head=4, n_kv_head=4, d_ff=688)
    cfg = TrainConfig(objective="sft", pack=pack, batch_size=batch, max_steps=steps, eval_interval=steps,
                      eval_steps=2, device="cpu", plot=False, peak_flops=0, lr=1e-3, warmup_steps=5)
    trainer = Trainer(model_cfg, cfg, data, out, progress=False)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": result["tokens_seen"] / seconds, "tokens": result["tokens_seen"],
            "val_loss": result["val_loss"], "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    if not CORPUS.exists():
        sys.exit(f"{CORPUS} is not here")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare([CORPUS], tmp / "data", chat="dialogue")
        rows = {pack: run(tmp / "data", tmp / f"run-{pack}", pack, args.steps, args.batch) for pack in (True, False)}
    for pack, r in rows.items():
        print(f"pack={str(pack).lower():<5} {r['tokens']:>9,} real tokens in {r['seconds']:5.1f} s: "
              f"{r['tokens_per_s']:8,.0f} tokens/s, val loss after {args.steps} steps {r['val_loss']:.3f}")
    print(f"packed / padded: {rows[True]['tokens_per_s'] / rows[False]['tokens_per_s']:.2f}x real tokens per second")


if __name__ == "__main__":
    main()
