"""Batch-1 greedy decoding speed, samovar beside HF `LlamaForCausalLM.generate`, same weights.

For each configuration: build a random HF LLaMA, save it, import it into samovar, then decode
--new-tokens tokens after a --prompt-tokens prompt with each, alternating, --repeats times; print
tokens/s (medians) and the ratios. The first tokens of both must agree (the same model).

--compile also times samovar's compiled one-token step (Engine(compile=True)); --bf16 times bf16
weights (eager, and compiled with --compile); --int8 times
decoding with int8 weights (samovar.quantize: FBGEMM's int8, and with --compile also weight-only
int8 through the compiled step; their perplexity cost on a trained model is what
benchmarks/int8.py measures); --llama-bench PATH writes the same weights as an f32 GGUF file and
times llama.cpp's `llama-bench` on it (text generation of --new-tokens tokens after a
--prompt-tokens context, as many threads as torch uses).

    .venv/bin/python benchmarks/decode.py [--configs 10m,51m] [--repeats 3] [--compile] [--int8]
        [--llama-bench /path/to/llama.cpp/build/bin/llama-bench]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = {
    "10m": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1024,
                vocab_size=4096, tie_word_embeddings=True),
    "51m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376,
                vocab_size=50257, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=512, tie_word_embeddings=True),
}


def write_gguf(hf_folder: str, path: Path, q8: bool = False) -> None:
    """The HF LLaMA's weights as an f32 (or, q8=True, llama.cpp's 8-bit Q8_0 for the matrices) GGUF
    file llama.cpp loads, written by samovar's exporter without a vocabulary (llama-bench feeds
    random token ids)."""
    from samovar.interop.gguf import export_gguf
    from samovar.interop.hf import import_hf

    export_gguf(import_hf(hf_folder)[0], None, path, kind="q8_0" if q8 else "f32", weights_only=True)


def llama_bench(binary: str, model: Path, prompt_tokens: int, new_tokens: int) -> float:
    """llama.cpp's text-generation speed (tokens/s) after a prompt_tokens context, one repetition.
    (--repack 0: the build measured here crashed prefilling Q8_0 weights repacked for this CPU.)"""
    out = subprocess.run([binary, "-m", str(model), "-p", "0", "-n", str(new_tokens), "-d", str(prompt_tokens),
                          "-t", str(torch.get_num_threads()), "-r", "1", "-o", "json", "--repack", "0"],
                         check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def decoding_arguments(doc: str) -> argparse.ArgumentParser:
    """The options every batch-1 decoding benchmark takes: which models, how long, how many times."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--configs", default="10m,51m")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    return p


def main() -> None:
    import transformers

    from samovar.engine import Engine, SamplingParams
    from samovar.interop.hf import import_hf
    from samovar.quantize import quantize_int8, quantize_int8_weight_only

    p = decoding_arguments(__doc__)
    p.add_argument("--compile", action="store_true", help="also time Engine(compile=True)")
    p.add_argument("--int8", action="store_true", help="also time int8 decoding (samovar.quantize)")
    p.add_argument("--bf16", action="store_true", help="also time bf16 weights (fast where the CPU has native bf16)")
    p.add_argument("--llama-bench", help="path of llama.cpp's llama-bench binary, to time it too")
    args = p.parse_args()
    torch.manual_seed(0)
    for name in args.configs.split(","):
        cfg = transformers.LlamaConfig(max_position_embeddings=args.prompt_tokens + args.new_tokens + 8,
                                       **CONFIGS[name])
        hf = transformers.LlamaForCausalLM(cfg).eval()
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            ours = import_hf(folder)[0].eval()
            peers = {}  # llama.cpp runs: name -> its GGUF file of the same weights
            if args.llama_bench:
                peers = {"llama.cpp": Path(folder) / "model.gguf"}
                if args.int8:
                    peers["llama.cpp q8_0"] = Path(folder) / "model-q8.gguf"
                for peer, file in peers.items():
                    write_gguf(folder, file, q8=peer.endswith("q8_0"))
            n_params = sum(p.numel() for p in ours.parameters())
            prompt = [(7 * i) % cfg.vocab_size for i in range(1, args.prompt_tokens + 1)]
            params = SamplingParams(max_tokens=args.new_tokens, temperature=0)
            engines = {"samovar": Engine(ours)}
            if args.compile:
                engines["samovar compiled"] = Engine(ours, compile=True)
                list(engines["samovar compiled"].generate(prompt, params))  # compile outside the timing
            if args.int8:
                engines["samovar int8"] = Engine(quantize_int8(ours))
            if args.int8 and args.compile:
                engines["samovar int8wo compiled"] = Engine(quantize_int8_weight_only(ours), compile=True)
                list(engines["samovar int8wo compiled"].generate(prompt, params))
            if args.bf16:
                bf16 = copy.deepcopy(ours).to(torch.bfloat16)
                engines["samovar bf16"] = Engine(bf16)
                if args.compile:
                    engines["samovar bf16 compiled"] = Engine(bf16, compile=True)
                    list(engines["samovar bf16 compiled"].generate(prompt, params))
            agreement = {}
            rates = {key: [] for key in [*engines, "HF", *peers]}
            for _ in range(args.repeats):
                outs = {}
                for key, engine in engines.items():
                    start = time.perf_counter()
                    outs[key] = list(engine.generate(prompt, params))
                    rates[key].append(len(outs[key]) / (time.perf_counter() - start))
                with torch.inference_mode():
                    start = time.perf_counter()
                    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
                    rates["HF"].append(args.new_tokens / (time.perf_counter() - start))
                expected = ref[0, len(prompt):].tolist()
                for key, out in outs.items():
                    if "int8" in key or "bf16" in key:  # rounded weights: greedy paths part sooner or later
                        same = next((i for i, (a, b) in enumerate(zip(out, expected)) if a != b), len(out))
                        agreement[key] = f"  ({key} agrees with float32 for the first {same} tokens)"
                    else:
                        assert out[:16] == expected[:16], f"{key} disagrees with HF"
                for peer, file in peers.items():
                    rates[peer].append(llama_bench(args.llama_bench, file, args.prompt_tokens, args.new_tokens))
        medians = {key: statistics.median(r) for key, r in rates.items()}
        print(f"{name}: {n_params / 1e6:.1f}M parameters, {args.prompt_tokens}-token prompt, {args.new_tokens} new "
              f"tokens, fp32, {torch.get_num_threads()} threads, medians of {args.repeats}:")
        for key, rate in medians.items():
            peer = "llama.cpp q8_0" if "int8" in key and "llama.cpp q8_0" in medians else "llama.cpp"
            ratios = "" if not key.startswith("samovar") else f"  {rate / medians['HF']:.2f}x HF" + (
                f", {rate / medians[peer]:.0%} of {peer}" if peer in medians else "")
            print(f"  {key:24s} {rate:7.1f} tok/s{ratios}")
        for line in agreement.values():
            print(line)


if __name__ == "__main__":
    main()
