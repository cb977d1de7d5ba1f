"""The server under load: `samovar serve` on a ~10M model, 1, 4 and 16 concurrent streaming clients.

A random LLaMA-shaped model (384 wide, 6 layers; a word vocabulary of --vocab tokens from
tinyshakespeare, or from generated words without it, so that every token is whole text and streams
as a chunk of its own; no end token, so every reply runs to max_tokens) is saved and served with `samovar serve --slots 16` in a subprocess on 127.0.0.1. For
each concurrency C, C clients stream /v1/completions (a --prompt-tokens prompt of token ids,
--new-tokens new tokens, greedy) back to back until --requests replies are in; reported: aggregate
completion tokens/s, time to first token p50/p95 and inter-token latency p50/p95 (the gaps between
streamed chunks: a chunk holds a token, or a few when one character takes several). Beside it, `samovar generate`'s batch-1 speed on the same model and prompt, in
the same run, and the ratios the serving issue sets targets on: one client against `generate`,
16 clients against one.

    .venv/bin/python benchmarks/serve.py [--clients 1,4,16] [--requests 32] [--new-tokens 128]

    .venv/bin/python benchmarks/serve.py --llama-server .cache/llama.cpp-0.3.36/build/bin/llama-server
(`make test-llamacpp` builds llama.cpp from the llama-cpp-python sdist.) Both servers run at once and
are loaded in turn at each concurrency, so that a drift of the machine's speed touches both alike,
--rounds times over (3): tokens/s are the medians of the rounds, latencies are over all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from samovar.api import LLM
from samovar.checkpoint import save_checkpoint
from samovar.config import get_preset
from samovar.engine import Engine, SamplingParams
from samovar.interop.gguf import export_gguf
from samovar.model import Transformer
from samovar.tokenizer import Tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def build(folder: Path, vocab: int) -> Path:
    """The benchmark model, saved as a checkpoint folder and as an f32 GGUF file beside it."""
    if SHAKESPEARE.exists():
        corpus = SHAKESPEARE.read_text(encoding="utf-8")
    else:
        corpus = " ".join(f"w{(i * 7919) % 5000}" for i in range(200_000))
    tok = Tokenizer.train("bpe", [corpus], vocab_size=vocab, special_tokens=())  # no eos: replies run to the end
    torch.manual_seed(0)
    cfg = get_preset("llama-tiny").replace(vocab_size=tok.vocab_size, n_embd=384, n_layer=6, n_head=6,
                                           n_kv_head=6, d_ff=1024, context_len=1024, tie_embeddings=True)
    model = Transformer(cfg)
    ids = torch.tensor(tok.encode(corpus[:200_000]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        starts = torch.randint(len(ids) - 65, (8,))
        batch = torch.stack([ids[i:i + 65] for i in starts])
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_checkpoint(folder, model, tok)
    export_gguf(model, tok, folder.with_suffix(".gguf"))
    return folder


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, list[float], int]:
    """One streamed reply: (time to first token, gaps between chunks, completion tokens)."""
    start = time.perf_counter()
    times, tokens = [], 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    return times[0] - start, [b - a for a, b in zip(times, times[1:])], tokens


async def load(url: str, clients: int, requests: int, body: dict) -> dict:
    """`clients` clients streaming back to back until `requests` replies are in."""
    remaining = requests
    ttft, gaps, tokens = [], [], 0

    async def client_loop(client):
        nonlocal remaining, tokens
        while remaining > 0:
            remaining -= 1
            first, between, n = await stream_one(client, url, body)
            ttft.append(first)
            gaps.extend(between)
            tokens += n

    # a connection a request (llama-server closes kept-alive connections after a while, mid-benchmark)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"clients": clients, "tokens_per_s": tokens / wall, "ttft": ttft, "gaps": gaps}


def summary(rounds: list[dict]) -> dict:
    """One concurrency's rounds: the median of their tokens/s, and percentiles of all their latencies."""
    ttft = [t for r in rounds for t in r["ttft"]]
    gaps = [g for r in rounds for g in r["gaps"]]
    return {"clients": rounds[0]["clients"], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rounds),
            "rounds": [r["tokens_per_s"] for r in rounds], "ttft_p50": percentile(ttft, 0.5),
            "ttft_p95": percentile(ttft, 0.95), "itl_p50": percentile(gaps, 0.5), "itl_p95": percentile(gaps, 0.95)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=32, help="replies per concurrency level (at least the clients)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--llama-server", help="path of llama.cpp's llama-server binary, to load it the same way")
    p.add_argument("--rounds", type=int, default=3, help="times over every concurrency (medians of tokens/s)")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp) / "serve-10m", args.vocab)
        llm = LLM.from_path(folder, device="cpu", dtype="fp32")
        n_params = sum(p.numel() for p in llm.model.parameters())
        prompt = [(7 * i) % llm.tokenizer.vocab_size for i in range(1, args.prompt_tokens + 1)]
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0)
        engine = Engine(llm.model)
        list(engine.generate(prompt, params))  # warm up
        rates = []
        for _ in range(3):
            start = time.perf_counter()
            n = len(list(engine.generate(prompt, params)))
            rates.append(n / (time.perf_counter() - start))
        generate_rate = statistics.median(rates)
        del llm, engine

        body = {"prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        servers = {"samovar": [sys.executable, "-m", "samovar", "serve", str(folder), "--device", "cpu",
                               "--slots", str(max(levels)), "--max-waiting", "256", "--port"]}
        if args.llama_server:
            gguf_file = folder.with_suffix(".gguf")
            context = max(levels) * (args.prompt_tokens + args.new_tokens + 8)
            servers["llama.cpp"] = [args.llama_server, "-m", str(gguf_file), "--host", "127.0.0.1", "-c", str(context),
                                    "--parallel", str(max(levels)), "-t", str(torch.get_num_threads()),
                                    "--no-warmup", "--port"]
            # llama.cpp's options: never stop early (the file has no end token anyway), and prefill every
            # prompt as samovar does (llama-server would reuse the keys and values of the identical prompts)
            body.update(ignore_eos=True, cache_prompt=False)
        results = run_servers(servers, body, levels, args.requests, args.rounds)
    print(f"{n_params / 1e6:.1f}M parameters, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, "
          f"greedy, fp32, {torch.get_num_threads()} threads; tokens/s: medians of {args.rounds} rounds (each round's "
          "in brackets), latencies over all rounds")
    print(f"samovar generate (batch 1): {generate_rate:.1f} tok/s")
    print("| server | clients | tokens/s | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        for r in rows:
            each = ", ".join(f"{x:.0f}" for x in r["rounds"])
            print(f"| {name} | {r['clients']} | {r['tokens_per_s']:.1f} ({each}) | {r['ttft_p50'] * 1e3:.0f} ms "
                  f"| {r['ttft_p95'] * 1e3:.0f} ms | {r['itl_p50'] * 1e3:.1f} ms | {r['itl_p95'] * 1e3:.1f} ms |")
    by = {r["clients"]: r for r in results["samovar"]}

    def each(ours, base, form):  # the ratio in each round
        return ", ".join(format(a / b, form) for a, b in zip(ours["rounds"], base["rounds"]))

    if 1 in by:
        print(f"one client: {by[1]['tokens_per_s'] / generate_rate:.0%} of samovar generate's tokens/s")
        for c in levels[1:]:
            print(f"{c} clients: {by[c]['tokens_per_s'] / by[1]['tokens_per_s']:.2f}x one client's aggregate tokens/s "
                  f"(each round: {each(by[c], by[1], '.2f')})")
    if "llama.cpp" in results:
        theirs = {r["clients"]: r for r in results["llama.cpp"]}
        for c in levels:
            print(f"{c} clients: samovar at {by[c]['tokens_per_s'] / theirs[c]['tokens_per_s']:.0%} of llama-server's "
                  f"aggregate tokens/s (each round: {each(by[c], theirs[c], '.0%')})")


def run_servers(servers: dict[str, list[str]], body: dict, levels: list[int], requests: int, rounds: int) -> dict:
    """Start every server (each command with its port appended), then load them in turn at each
    concurrency, interleaved (this machine's speed drifts over a run), `rounds` times over; stop them."""
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(started(command)) for name, command in servers.items()}
        for url in urls.values():
            asyncio.run(load(url + "/v1/completions", 1, 2, body))  # warm up
        measured = {(name, c): [] for name in servers for c in levels}
        for _ in range(rounds):
            for c in levels:
                for name, url in urls.items():
                    measured[name, c].append(asyncio.run(load(url + "/v1/completions", c, max(requests, c), body)))
        return {name: [summary(measured[name, c]) for c in levels] for name in servers}


@contextlib.contextmanager
def started(command: list[str]):
    """A server on a free port of 127.0.0.1, healthy; its URL. Stopped on leaving."""
    port = free_port()
    log = tempfile.TemporaryFile("w+")
    server = subprocess.Popen([*command, str(port)], stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                log.seek(0)
                sys.exit(f"{command[0]} did not start; its output ends:\n{log.read()[-3000:]}")
            time.sleep(0.2)
        try:
            yield url
        except httpx.HTTPError:
            log.seek(0)
            sys.exit(f"{command[0]} failed under load; its output ends:\n{log.read()[-3000:]}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


if __name__ == "__main__":
    main()
