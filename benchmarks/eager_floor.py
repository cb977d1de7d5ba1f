"""How fast can eager PyTorch decode at all? The Engine's eager step beside the same LLaMA step
written as one lean function: no modules, one cache tensor per layer written at an int position,
the q/k/v and gate/up projections joined into one product each (copies of the weights), every
product through the kernel `layers.Linear` picks, and the prompt a token at a time (untimed).

The lean step is not samovar's model (it knows one family, one sequence, no masks, no adapters);
it is a floor for what PyTorch's per-operator cost leaves room for, the eager target of the
"fast by default" issue measured against it. Its greedy tokens must equal the Engine's.
Random LLaMA-shaped weights (decode.py's configurations), a --prompt-tokens prompt, --new-tokens
greedy tokens, both in turn --repeats times (medians); --llama-bench PATH also times llama.cpp on
the same weights (an f32 GGUF file).

    .venv/bin/python benchmarks/eager_floor.py [--configs 10m,51m] [--llama-bench PATH]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from aot_step import build
from decode import decoding_arguments, llama_bench


def lean_step(model, joined: bool):
    """step(token, position) -> logits (V,), over caches of its own: the model's step as one function."""
    cfg = model.config
    assert cfg.n_kv_head == cfg.n_head and cfg.mlp == "swiglu" and cfg.norm == "rmsnorm", "a LLaMA with MHA"
    C, H, D, eps = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.norm_eps

    def products(*weights):  # of projections that read the same input: one product (joined) or one each
        return [_product(torch.cat(weights))] if joined else [_product(w) for w in weights]

    layers = []
    for block in model.blocks:
        a, f = block.attn, block.mlp
        layers.append(dict(
            attn_norm=block.attn_norm.weight, mlp_norm=block.mlp_norm.weight,
            qkv=products(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
            gate_up=products(f.gate_proj.weight, f.up_proj.weight),
            out=_product(a.out_proj.weight), down=_product(f.down_proj.weight),
            k=torch.zeros(H, cfg.context_len, D), v=torch.zeros(H, cfg.context_len, D)))
    head = _product(model.lm_head.weight)

    def step(token: int, pos: int):
        x = model.tok_emb.weight[token]
        cos, sin = model.rotary.cos[pos], model.rotary.sin[pos]
        for layer in layers:
            h = F.rms_norm(x, (C,), layer["attn_norm"], eps)
            qkv = _products(h, layer["qkv"]).view(3, H, D)
            qk = qkv[:2]
            q, k = qk * cos + qk.roll(D // 2, dims=-1) * sin  # rotary on both at once
            layer["k"][:, pos], layer["v"][:, pos] = k, qkv[2]
            y = F.scaled_dot_product_attention(q.unsqueeze(1), layer["k"][:, :pos + 1], layer["v"][:, :pos + 1])
            x = x + layer["out"](y.view(C))
            h = F.rms_norm(x, (C,), layer["mlp_norm"], eps)
            gate, up = _products(h, layer["gate_up"]).view(2, -1)
            x = x + layer["down"](F.silu(gate) * up)
        return head(F.rms_norm(x, (C,), model.final_norm.weight, eps))

    return step


def _products(x, products):
    """The products of x, joined into one vector (one product: its own)."""
    return products[0](x) if len(products) == 1 else torch.cat([product(x) for product in products])


def _product(weight):
    """x -> x W^T through a layers.Linear over the weight (not a copy), its forward called directly:
    the kernel the model's layers pick for one row, without a module call."""
    from samovar.layers import Linear

    linear = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    return linear.forward


def main() -> None:
    from samovar.engine import Engine, SamplingParams
    from samovar.interop.gguf import export_gguf

    p = decoding_arguments(__doc__)
    p.add_argument("--llama-bench", help="path of llama.cpp's llama-bench binary, to time it too")
    args = p.parse_args()
    torch.manual_seed(0)
    for name in args.configs.split(","):
        model = build(name, args.prompt_tokens + args.new_tokens + 8)
        prompt = [(7 * i) % model.config.vocab_size for i in range(1, args.prompt_tokens + 1)]
        engine = Engine(model)
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0)
        steps = {"lean step": lean_step(model, joined=True), "lean step, 7 products": lean_step(model, joined=False)}

        def lean(step):
            """The step's greedy tokens after the prompt, and their tokens/s (the prompt's steps untimed)."""
            with torch.inference_mode():
                for pos, token in enumerate(prompt[:-1]):
                    step(token, pos)
                token, out = prompt[-1], []
                start = time.perf_counter()
                for pos in range(len(prompt) - 1, len(prompt) - 1 + args.new_tokens):
                    token = int(step(token, pos).argmax())
                    out.append(token)
                return out, len(out) / (time.perf_counter() - start)

        rates = {key: [] for key in ["samovar eager (Engine)", *steps, *(["llama.cpp"] if args.llama_bench else [])]}
        with tempfile.TemporaryDirectory() as folder:
            gguf = Path(folder) / "model.gguf"
            if args.llama_bench:
                export_gguf(model, None, gguf, kind="f32", weights_only=True)
            for _ in range(args.repeats):
                start = time.perf_counter()
                expected = list(engine.generate(prompt, params))
                rates["samovar eager (Engine)"].append(len(expected) / (time.perf_counter() - start))
                for key, step in steps.items():
                    out, rate = lean(step)
                    rates[key].append(rate)
                    assert out[:16] == expected[:16], f"the {key} disagrees with the Engine"
                if args.llama_bench:
                    rates["llama.cpp"].append(llama_bench(args.llama_bench, gguf, args.prompt_tokens, args.new_tokens))
        medians = {key: statistics.median(r) for key, r in rates.items()}
        print(f"{name}: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens (the Engine's time includes "
              f"its prefill, the lean steps' not), {torch.get_num_threads()} threads, medians of {args.repeats}:")
        for key, rate in medians.items():
            peer = "llama.cpp" in medians and key != "llama.cpp"
            share = f", {rate / medians['llama.cpp']:.0%} of llama.cpp f32" if peer else ""
            print(f"  {key:26s} {rate:8.1f} tok/s{share}")
        print(f"  (the lean steps' greedy tokens equal the Engine's; the Engine at "
              f"{medians['samovar eager (Engine)'] / medians['lean step']:.0%} of the lean step)")


if __name__ == "__main__":
    main()
