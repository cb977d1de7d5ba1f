"""Training speed: forward + backward + AdamW steps, samovar beside HF `LlamaForCausalLM`, fp32 CPU.

The ~10M LLaMA configuration (384 wide, 6 layers, 6 heads, MLP 1024, vocabulary 4096), batch 8 x 256.
Prints tokens/s of each (medians over --repeats timed windows of --steps steps, after warm-up), the
ratio, and model FLOPs utilisation against this machine's measured fp32 matmul peak; --profile adds
a summary of where samovar's time goes.

    .venv/bin/python benchmarks/train_step.py [--steps 10] [--repeats 3] [--profile] [--compile] [--bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

CONFIG = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1024,
              vocab_size=4096, max_position_embeddings=256, tie_word_embeddings=False)


def tokens_per_second(step, tokens: int, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return tokens * steps / (time.perf_counter() - start)


def main() -> None:
    import transformers

    from samovar.interop.hf import config_from_hf, state_from_hf
    from samovar.model import Transformer
    from samovar.runtime import autocast
    from samovar.train import TrainConfig, make_optimizer, measure_peak_flops

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model (a smoke test)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time samovar with torch.compile (TrainConfig.compile)")
    p.add_argument("--bf16", action="store_true",
                   help="also time samovar's step under bf16 autocast (the Trainer's dtype=bf16), side by side")
    args = p.parse_args()
    conf = dict(CONFIG, max_position_embeddings=args.context)
    if args.tiny:
        conf.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**conf)
    hf = transformers.LlamaForCausalLM(hf_cfg).train()
    cfg, family = config_from_hf(hf_cfg.to_dict())
    ours = Transformer(cfg).train()
    ours.load_state_dict(state_from_hf(hf.state_dict(), cfg, family))
    train_cfg = TrainConfig(lr=1e-4)
    opt_ours = make_optimizer(ours, train_cfg, torch.device("cpu"))
    # HF Trainer's default optimizer with torch >= 2.8: adamw_torch_fused (samovar's is fused too)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
    x = torch.randint(cfg.vocab_size, (args.batch, args.context))
    y = torch.randint(cfg.vocab_size, (args.batch, args.context))

    forward = torch.compile(ours) if args.compile else ours

    def step_ours():
        loss = forward(x, y)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_ours_bf16():
        with autocast(torch.device("cpu"), torch.bfloat16):
            loss = forward(x, y)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf():
        loss = hf(input_ids=x, labels=y).loss  # (HF shifts the labels itself; the cost is the same)
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    tokens = args.batch * args.context
    steps = [step_ours, step_hf] + ([step_ours_bf16] if args.bf16 else [])
    for step in steps:
        step()
        step()  # warm-up
    rates = [[] for _ in steps]
    for _ in range(args.repeats):  # in turn, so that a drift of the machine's speed touches each alike
        for step, r in zip(steps, rates):
            r.append(tokens_per_second(step, tokens, args.steps))
    a, b = statistics.median(rates[0]), statistics.median(rates[1])
    peak = measure_peak_flops(torch.device("cpu"), torch.float32, seconds=1.0)
    flops = ours.flops_per_token()
    print(f"{ours.num_params() / 1e6:.1f}M parameters, batch {args.batch} x {args.context}, fp32, "
          f"{torch.get_num_threads()} threads; measured matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(f"samovar{' (compiled)' if args.compile else ''} {a:,.0f} tokens/s (MFU {flops * a / peak:.0%}), HF {b:,.0f} tokens/s (MFU {flops * b / peak:.0%}), "
          f"ratio {a / b:.2f}x")
    if args.bf16:
        c = statistics.median(rates[2])
        print(f"samovar under bf16 autocast {c:,.0f} tokens/s, {c / a:.2f}x its fp32 step")
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(3):
                step_ours()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
