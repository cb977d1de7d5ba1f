"""What int8 weights cost and buy on a trained run: held-out perplexity and bits per byte, and
batch-1 greedy decoding speed, float32 beside int8 (FBGEMM's, eager) and int8wo (weight-only,
through the compiled step), from samovar.quantize.

    .venv/bin/python benchmarks/int8.py RUN --data HELD_OUT_TEXT [--max-tokens 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse

from samovar.api import LLM
from samovar.evaluation import latency, lm_metrics, read_eval_text
from samovar.quantize import quantize_int8, quantize_int8_weight_only


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run or checkpoint folder (a Transformer with a tokenizer)")
    p.add_argument("--data", required=True, help="held-out text: a file, a folder, or a prepared data folder")
    p.add_argument("--max-tokens", type=int, default=20000, help="evaluate the first N tokens")
    p.add_argument("--repeats", type=int, default=3, help="latency rounds (medians)")
    args = p.parse_args()
    llm = LLM.from_path(args.run, device="cpu", dtype="fp32")
    ids = llm.tokenizer.encode(read_eval_text(args.data))[:args.max_tokens]
    n_bytes = len(llm.tokenizer.decode(ids).encode("utf-8"))
    rows = {}
    for name, model, compile in (("float32", llm.model, False), ("int8", quantize_int8(llm.model), False),
                                 ("int8wo", quantize_int8_weight_only(llm.model), True)):
        rows[name] = {**lm_metrics(model, ids, n_bytes), **latency(model, repeats=args.repeats, compile=compile)}
    print(f"{args.run}: {llm.model.num_params() / 1e6:.1f}M parameters, {len(ids):,} held-out tokens")
    for name, r in rows.items():
        print(f"  {name:8s} perplexity {r['perplexity']:8.3f}   bits per byte {r['bits_per_byte']:.4f}   "
              f"decode {r['decode_tokens_per_s']:7.1f} tok/s{' (compiled)' if name == 'int8wo' else ''}")
    f = rows["float32"]
    for name in ("int8", "int8wo"):
        q = rows[name]
        print(f"  {name} cost: perplexity {q['perplexity'] / f['perplexity'] - 1:+.2%}, bits per byte "
              f"{q['bits_per_byte'] - f['bits_per_byte']:+.4f}; speed {q['decode_tokens_per_s'] / f['decode_tokens_per_s']:.2f}x "
              f"float32 eager")

if __name__ == "__main__":
    main()
