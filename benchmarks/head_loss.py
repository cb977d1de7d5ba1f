"""Memory and time of one training step with a large vocabulary: samovar's chunked head loss beside HF.

samovar computes the loss of its output head a chunk of rows at a time (loss.head_cross_entropy)
and never holds the (batch x context x vocabulary) logits; HF `LlamaForCausalLM` materialises them
before its cross-entropy (in float32). Each side runs forward + backward of the 51M LLaMA
shape (512 wide, 8 layers, vocabulary 50,257, tied) on a --batch x --context batch in a fresh
process, --repeats times; prints the medians of the process's peak resident memory growth and of
the step's time.

    .venv/bin/python benchmarks/head_loss.py [--batch 4] [--context 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

CONFIG = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376,
              vocab_size=50257, tie_word_embeddings=True)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            vocab_size=4096, tie_word_embeddings=True)


def one_step(side: str, conf: dict, batch: int, context: int) -> dict:
    import transformers

    from samovar.interop.hf import config_from_hf
    from samovar.model import Transformer

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(max_position_embeddings=context, **conf)
    model = transformers.LlamaForCausalLM(hf_cfg) if side == "HF" else Transformer(config_from_hf(hf_cfg.to_dict())[0])
    model.train()
    x = torch.randint(conf["vocab_size"], (batch, context))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = model(input_ids=x, labels=x).loss if side == "HF" else model(x[:, :-1], x[:, 1:])
    loss.backward()
    seconds = time.perf_counter() - start
    return {"mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, "s": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model (a smoke test)")
    p.add_argument("--side", choices=["samovar", "HF"], help=argparse.SUPPRESS)  # one measurement, in-process
    args = p.parse_args()
    conf = TINY if args.tiny else CONFIG
    if args.side:
        print(json.dumps(one_step(args.side, conf, args.batch, args.context)))
        return
    runs = {"samovar": [], "HF": []}
    for _ in range(args.repeats):
        for side in runs:
            out = subprocess.run([sys.executable, __file__, "--side", side, "--batch", str(args.batch),
                                  "--context", str(args.context)] + (["--tiny"] if args.tiny else []),
                                 check=True, capture_output=True, text=True).stdout
            runs[side].append(json.loads(out.strip().splitlines()[-1]))
    print(f"forward + backward, batch {args.batch} x {args.context}, vocabulary {conf['vocab_size']:,}, fp32, "
          f"{torch.get_num_threads()} threads, medians of {args.repeats} fresh processes:")
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("mb", "s")} for side, rs in runs.items()}
    for side, m in med.items():
        print(f"  {side:8s} peak memory growth {m['mb']:7.0f} MB   step {m['s']:6.2f} s")
    print(f"  samovar/HF: memory {med['samovar']['mb'] / med['HF']['mb']:.2f}x, time {med['samovar']['s'] / med['HF']['s']:.2f}x")


if __name__ == "__main__":
    main()
