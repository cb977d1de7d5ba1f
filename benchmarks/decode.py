"""Batch-1 greedy decoding speed, samovar beside HF `LlamaForCausalLM.generate`, same weights.

For each configuration: build a random HF LLaMA, save it, import it into samovar, then decode
--new-tokens tokens after a --prompt-tokens prompt with each, alternating, --repeats times; print
tokens/s (medians) and the ratio. The first tokens of both must agree (the same model).

    .venv/bin/python benchmarks/decode.py [--configs 10m,51m] [--repeats 3] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

CONFIGS = {
    "10m": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1024,
                vocab_size=4096, tie_word_embeddings=True),
    "51m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376,
                vocab_size=50257, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=512, tie_word_embeddings=True),
}


def main() -> None:
    import transformers

    from samovar.engine import Engine, SamplingParams
    from samovar.hf import import_hf

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="10m,51m")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    for name in args.configs.split(","):
        cfg = transformers.LlamaConfig(max_position_embeddings=args.prompt_tokens + args.new_tokens + 8,
                                       **CONFIGS[name])
        hf = transformers.LlamaForCausalLM(cfg).eval()
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            ours, _ = import_hf(folder)
        n_params = sum(p.numel() for p in ours.parameters())
        prompt = [(7 * i) % cfg.vocab_size for i in range(1, args.prompt_tokens + 1)]
        engine = Engine(ours)
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0)
        ours_rates, hf_rates = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = list(engine.generate(prompt, params))
            ours_rates.append(len(out) / (time.perf_counter() - start))
            with torch.inference_mode():
                start = time.perf_counter()
                ref = hf.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
                hf_rates.append(args.new_tokens / (time.perf_counter() - start))
            assert out[:16] == ref[0, len(prompt):len(prompt) + 16].tolist(), "the two models disagree"
        a, b = statistics.median(ours_rates), statistics.median(hf_rates)
        print(f"{name}: {n_params / 1e6:.1f}M parameters, {args.prompt_tokens}-token prompt, {args.new_tokens} new "
              f"tokens, fp32, {torch.get_num_threads()} threads: samovar {a:.1f} tok/s, HF {b:.1f} tok/s, "
              f"ratio {a / b:.2f}x")


if __name__ == "__main__":
    main()
