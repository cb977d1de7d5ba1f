"""Batch-1 decoding step: torch.compile beside the same step compiled ahead of time.

The step torch.compile makes (`engine.compiled_step`, which the Scheduler runs: each call first
passes Dynamo's guard check and a Python wrapper) beside the same step exported and compiled ahead
of time by AOTInductor (`engine.AheadOfTimeStep`, which the Engine runs on the CPU: `generate`,
`chat`), whose C++ runner a call reaches with no guards.

Random LLaMA-shaped weights (decode.py's configurations), one row, the step timed at each length
from the end of a --prompt-tokens prompt over --new-tokens positions, both steps in turn, --repeats
times (medians). The AOT step's logits and the keys it writes must equal the compiled step's.
Its length dimension stays below the cache buffer's, so the caches have a position to spare. Also
printed: the time to make each, and to make the AOT step again from its package on disk.

    .venv/bin/python benchmarks/aot_step.py [--configs 10m,51m] [--new-tokens 256] [--repeats 3]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from decode import CONFIGS, decoding_arguments


def build(name: str, context_len: int):
    from samovar.config import get_preset
    from samovar.model import Transformer

    c = CONFIGS[name]
    cfg = get_preset("llama-tiny").replace(
        n_embd=c["hidden_size"], n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"],
        n_kv_head=c["num_attention_heads"], d_ff=c["intermediate_size"], vocab_size=c["vocab_size"],
        context_len=context_len, tie_embeddings=c["tie_word_embeddings"])
    return Transformer(cfg).eval()


def main() -> None:
    from samovar.engine import AheadOfTimeStep, compiled_step
    from samovar.kv_cache import SlotCache

    args = decoding_arguments(__doc__).parse_args()
    torch.manual_seed(0)
    context = args.prompt_tokens + args.new_tokens + 8
    lengths = range(args.prompt_tokens, args.prompt_tokens + args.new_tokens)
    for name in args.configs.split(","):
        model = build(name, context)
        p0 = model.tok_emb.weight
        caches = [SlotCache(model.config, 1, context + 1, p0.device, p0.dtype) for _ in range(2)]  # a position to spare
        idx = torch.tensor([[7]])

        def rows(cache, length):
            cache.lengths[0] = length
            return cache.rows(0, 1, 1)

        with torch.inference_mode(), tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            compiled_step(model, idx, rows(caches[0], args.prompt_tokens))
            compile_seconds = time.perf_counter() - start
            start = time.perf_counter()
            AheadOfTimeStep(model, context + 1, Path(folder))
            aot_seconds = time.perf_counter() - start
            start = time.perf_counter()
            ahead = AheadOfTimeStep(model, context + 1, Path(folder))  # a second start: the package is on disk
            load_seconds = time.perf_counter() - start
            for cache in caches:  # the same keys and values in both
                for layer in (*cache.k, *cache.v):
                    layer.copy_(torch.randn(layer.shape, generator=torch.Generator().manual_seed(1)))
            for length in (args.prompt_tokens, lengths[-1]):
                ours = compiled_step(model, idx, rows(caches[0], length))
                theirs = ahead(idx, rows(caches[1], length))
                assert torch.allclose(ours, theirs, atol=1e-4), f"logits differ by {(ours - theirs).abs().max()}"
                for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
                    assert torch.allclose(a[0, :, length], b[0, :, length], atol=1e-5), "the written keys differ"
            times = {"compiled (torch.compile)": [], "ahead of time (AOTInductor)": []}
            for _ in range(args.repeats):
                start = time.perf_counter()
                for length in lengths:
                    compiled_step(model, idx, rows(caches[0], length))
                times["compiled (torch.compile)"].append((time.perf_counter() - start) / len(lengths))
                start = time.perf_counter()
                for length in lengths:
                    ahead(idx, rows(caches[1], length))
                times["ahead of time (AOTInductor)"].append((time.perf_counter() - start) / len(lengths))
        n_params = sum(t.numel() for t in model.parameters())
        print(f"{name}: {n_params / 1e6:.1f}M parameters, one row, lengths {lengths.start}-{lengths.stop - 1}, fp32, "
              f"{torch.get_num_threads()} threads, medians of {args.repeats}; logits and written keys agree")
        medians = {key: statistics.median(t) for key, t in times.items()}
        for key, seconds in medians.items():
            print(f"  {key:28s} {seconds * 1e3:6.3f} ms a step ({1 / seconds:7.1f} steps/s)")
        compiled, ahead_time = medians.values()
        print(f"  ahead of time: {compiled / ahead_time:.2f}x the compiled step's steps/s; first compile "
              f"{compile_seconds:.1f} s (torch.compile, inductor's cache as it is), {aot_seconds:.1f} s (export and "
              f"AOTInductor), {load_seconds:.1f} s the second time (export, the package loaded from disk)")


if __name__ == "__main__":
    main()
