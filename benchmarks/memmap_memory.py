"""Training on a token file larger than the machine's memory keeps memory bounded.

Writes a sparse uint16 token file of --gigabytes (32 GB by default, more than the 24 GB of RAM of our
CI machines; sparse, so it costs no disk), trains a tiny model on it for a few steps, and prints the
process's peak resident memory beside the file size. samovar's loader reads random windows through a
numpy memmap, so the peak stays at the size of the model and a batch, whatever the file's size.

    .venv/bin/python benchmarks/memmap_memory.py [--gigabytes 32] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from samovar.config import get_preset
from samovar.tokenizer import Tokenizer
from samovar.train import TrainConfig, Trainer


def make_sparse_data(folder: Path, gigabytes: float) -> int:
    tok = Tokenizer.train("char", ["abcdefgh"], special_tokens=())
    tok.save(folder / "tokenizer.json")
    n_tokens = int(gigabytes * 1e9) // 2
    for split, n in (("train", n_tokens), ("val", 1_000_000)):
        with open(folder / f"{split}.bin", "wb") as f:
            f.truncate(n * 2)  # a sparse file: reads return zeros (token 0), no disk is used
    meta = {"tokenizer": "char", "vocab_size": tok.vocab_size, "dtype": "uint16", "train_tokens": n_tokens,
            "val_tokens": 1_000_000, "bytes": n_tokens, "val_bytes": 1_000_000, "sources": [], "documents": 1}
    (folder / "meta.json").write_text(json.dumps(meta))
    return n_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gigabytes", type=float, default=32.0)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "data").mkdir()
        n_tokens = make_sparse_data(folder / "data", args.gigabytes)
        cfg = get_preset("gpt2-tiny").replace(vocab_size=8, context_len=64)
        train = TrainConfig(batch_size=16, max_steps=args.steps, eval_interval=args.steps, eval_steps=2,
                            device="cpu", peak_flops=1e11)
        start = time.time()
        Trainer(cfg, train, folder / "data", folder / "run", progress=False).train()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        size_mb = n_tokens * 2 / 1e6
        print(f"token file: {size_mb:,.0f} MB ({n_tokens:,} tokens); trained {args.steps} steps in "
              f"{time.time() - start:.1f}s; peak resident memory {peak_mb:,.0f} MB "
              f"({peak_mb / size_mb:.4f} of the file)")


if __name__ == "__main__":
    main()
