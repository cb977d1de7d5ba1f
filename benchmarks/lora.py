"""LoRA against full fine-tuning of the same model on the same data, side by side in one run:
trainable parameters, peak memory (the training process's peak RSS) and training tokens/s.

    .venv/bin/python benchmarks/lora.py [--base RUN] [--data DIR] [--preset NAME] [--steps 30] [--rank 16]

--base: the model to fine-tune (a run or checkpoint folder); without it a base of --preset is made
(one training step on --data, so that it has a checkpoint). --data: a folder prepared for objective=sft
(default: ru_qa as conversations, prepared here with a BPE tokenizer when absent). The two runs
alternate, twice each, and the report gives each figure's median with the LoRA / full ratio.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def run(*args) -> dict:
    """One `samovar` command in a child process; its peak RSS (MiB) and wall time."""
    args = [str(a) for a in args]
    print("$ samovar " + " ".join(args), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "samovar", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"samovar {args[0]} failed:\n{err.strip()}")
    return {"peak_mib": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - start, "stdout": out}


def tokens_per_s(folder: Path) -> float:
    with open(folder / "metrics.csv") as f:
        rows = [float(r["tokens_per_s"]) for r in csv.DictReader(f) if r["tokens_per_s"]]
    return statistics.median(rows[1:] or rows)  # the first row includes start-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--preset", default="deepseek-60m", help="the base's preset when --base is not given "
                        "(its context cut to 256)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-lora"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,out_proj,gate_proj,up_proj,down_proj")
    args = parser.parse_args()
    w = args.work
    data = args.data
    if data is None:
        data = w / "qa"
        if not (data / "meta.json").exists():
            run("prepare", DATA / "ru_qa" / "premise_question_answer6.txt", "--chat", "qa", "--tokenizer", "bpe",
                "--vocab-size", 4000, "--out", data)
    base = args.base
    if base is None:
        base = w / "base"
        if not base.exists():
            run("train", "--preset", args.preset, "--data", data, "--out", base, "--set", "max_steps=1",
                "--set", "context_len=256",
                "--set", "objective=sft", "--set", "eval_steps=1", "--set", "plot=false")
    common = ["train", "--init-from", base, "--data", data, "--set", "objective=sft", "--set", f"max_steps={args.steps}",
              "--set", f"eval_interval={args.steps}", "--set", "eval_steps=1", "--set", "log_interval=5",
              "--set", "plot=false", "--set", "peak_flops=0", "--set", "batch_size=8"]
    kinds = {"full": [], "lora": ["--set", f"lora_rank={args.rank}", "--set", f"lora_alpha={2 * args.rank}",
                                  "--set", f"lora_targets={args.targets}"]}
    results = {k: [] for k in kinds}
    for round_ in range(2):
        for kind, extra in kinds.items():
            out = w / f"{kind}-{round_}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            r = run(*common, *extra, "--out", out)
            results[kind].append({"peak_mib": r["peak_mib"], "tokens_per_s": tokens_per_s(out)})
    trainable = {}
    import torch

    from samovar.api import load

    for kind in kinds:
        model, _ = load(w / f"{kind}-0", device="cpu")
        if kind == "full":
            trainable[kind] = sum(p.numel() for p in model.parameters())
        else:
            trainable[kind] = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        del model
        torch.set_num_threads(torch.get_num_threads())
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("peak_mib", "tokens_per_s")} for k, v in results.items()}
    lines = [f"`benchmarks/lora.py --steps {args.steps} --rank {args.rank}` (base {base}, data {data}; "
             f"targets {args.targets}; medians of 2 alternating runs each):", "",
             "| | full fine-tuning | LoRA | LoRA / full |", "|---|---|---|---|",
             f"| trainable parameters | {trainable['full']:,} | {trainable['lora']:,} | "
             f"{trainable['lora'] / trainable['full']:.2%} |",
             f"| peak memory (RSS, MiB) | {med['full']['peak_mib']:.0f} | {med['lora']['peak_mib']:.0f} | "
             f"{med['lora']['peak_mib'] / med['full']['peak_mib']:.2f} |",
             f"| training tokens/s | {med['full']['tokens_per_s']:,.0f} | {med['lora']['tokens_per_s']:,.0f} | "
             f"{med['lora']['tokens_per_s'] / med['full']['tokens_per_s']:.2f} |"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
