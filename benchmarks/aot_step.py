"""Batch-1 decoding step: torch.compile beside the same step compiled ahead of time.

The compiled step samovar runs (`engine.compiled_step`: torch.compile, so each call first passes
Dynamo's guard check and a Python wrapper) beside the same step exported (`torch.export`) and
compiled ahead of time by AOTInductor, which a call reaches through a C++ runner with no guards.
A lead for the "fast by default" issue, measured; samovar does not run the AOT step.

Random LLaMA-shaped weights (decode.py's configurations), one row, the step timed at each length
from the end of a --prompt-tokens prompt over --new-tokens positions, both steps in turn, --repeats
times (medians). The AOT step's logits and the keys it writes must equal the compiled step's.
The AOT package takes the model's own weights (not a copy: `user_managed` constants). Its length
dimension must stay below the cache buffer's (export specialises a view that is the whole buffer),
so the cache here has one position to spare.

    .venv/bin/python benchmarks/aot_step.py [--configs 10m,51m] [--new-tokens 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from decode import CONFIGS


def build(name: str, context_len: int):
    from samovar.config import get_preset
    from samovar.model import Transformer

    c = CONFIGS[name]
    cfg = get_preset("llama-tiny").replace(
        n_embd=c["hidden_size"], n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"],
        n_kv_head=c["num_attention_heads"], d_ff=c["intermediate_size"], vocab_size=c["vocab_size"],
        context_len=context_len, tie_embeddings=c["tie_word_embeddings"])
    return Transformer(cfg).eval()


def aot_step(model, example: tuple, max_len: int, folder: str):
    """The model's one-token step, exported with the attended length dynamic and compiled by
    AOTInductor (the options compiled_step gives inductor); returns the loaded runner and seconds."""
    from samovar.kv_cache import SlotRows

    class GivenRows(SlotRows):  # a SlotRows made of tensors the caller passes
        def __init__(self, pos, written, k, v):
            self.pos, self.written, self.k, self.v = pos, written, k, v

    n_layer = model.config.n_layer

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, idx, pos, rows, positions, kv):
            cache = GivenRows(pos, (rows, positions), list(kv[:n_layer]), list(kv[n_layer:]))
            return self.m(idx, kv_cache=cache)[:, -1, :]

    step = Step()
    length = torch.export.Dim("length", min=2, max=max_len - 1)
    start = time.perf_counter()
    exported = torch.export.export(step, example, dynamic_shapes={
        "idx": None, "pos": None, "rows": None, "positions": None, "kv": ({2: length},) * (2 * n_layer)})
    package = torch._inductor.aoti_compile_and_package(
        exported, package_path=str(Path(folder) / "step.pt2"),
        inductor_configs={"aot_inductor.package_constants_in_so": False,
                          "post_grad_fusion_options": {"decompose_mm_pass": {}}})
    runner = torch._inductor.aoti_load_package(package)
    tensors = dict(step.named_parameters(remove_duplicate=False))
    tensors.update(step.named_buffers(remove_duplicate=False))
    runner.load_constants({k: tensors[k] for k in runner.get_constant_fqns()}, check_full_update=True,
                          user_managed=True)
    return runner, time.perf_counter() - start


def main() -> None:
    from samovar.engine import compiled_step
    from samovar.kv_cache import SlotCache

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="10m,51m")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    context = args.prompt_tokens + args.new_tokens + 8
    lengths = range(args.prompt_tokens, args.prompt_tokens + args.new_tokens)
    for name in args.configs.split(","):
        model = build(name, context)
        p0 = model.tok_emb.weight
        caches = [SlotCache(model.config, 1, context + 1, p0.device, p0.dtype) for _ in range(2)]  # a position to spare
        idx = torch.tensor([[7]])

        def inputs(cache, length):
            cache.lengths[0] = length
            rows = cache.rows(0, 1, 1)
            return rows, (idx, rows.pos, *rows.written, (*rows.k, *rows.v))

        with torch.inference_mode(), tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            compiled_step(model, idx, inputs(caches[0], args.prompt_tokens)[0])
            compile_seconds = time.perf_counter() - start
            runner, aot_seconds = aot_step(model, inputs(caches[1], args.prompt_tokens)[1], context + 1, folder)
            for cache in caches:  # the same keys and values in both
                for layer in (*cache.k, *cache.v):
                    layer.copy_(torch.randn(layer.shape, generator=torch.Generator().manual_seed(1)))
            for length in (args.prompt_tokens, lengths[-1]):
                ours = compiled_step(model, idx, inputs(caches[0], length)[0])
                theirs = runner(*inputs(caches[1], length)[1])[0]
                assert torch.allclose(ours, theirs, atol=1e-4), f"logits differ by {(ours - theirs).abs().max()}"
                for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
                    assert torch.allclose(a[0, :, length], b[0, :, length], atol=1e-5), "the written keys differ"
            times = {"compiled (torch.compile)": [], "ahead of time (AOTInductor)": []}
            for _ in range(args.repeats):
                start = time.perf_counter()
                for length in lengths:
                    compiled_step(model, idx, inputs(caches[0], length)[0])
                times["compiled (torch.compile)"].append((time.perf_counter() - start) / len(lengths))
                start = time.perf_counter()
                for length in lengths:
                    runner(*inputs(caches[1], length)[1])
                times["ahead of time (AOTInductor)"].append((time.perf_counter() - start) / len(lengths))
        n_params = sum(t.numel() for t in model.parameters())
        print(f"{name}: {n_params / 1e6:.1f}M parameters, one row, lengths {lengths.start}-{lengths.stop - 1}, fp32, "
              f"{torch.get_num_threads()} threads, medians of {args.repeats}; logits and written keys agree")
        medians = {key: statistics.median(t) for key, t in times.items()}
        for key, seconds in medians.items():
            print(f"  {key:28s} {seconds * 1e3:6.3f} ms a step ({1 / seconds:7.1f} steps/s)")
        compiled, ahead = medians.values()
        print(f"  ahead of time: {compiled / ahead:.2f}x the compiled step's steps/s; first compile "
              f"{compile_seconds:.1f} s (torch.compile, inductor's cache as it is), {aot_seconds:.1f} s (export and AOTInductor)")


if __name__ == "__main__":
    main()
