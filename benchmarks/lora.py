"""LoRA against full fine-tuning of the same model on the same data, side by side in one run:
trainable parameters, peak memory (the training process's peak RSS) and training tokens/s.

    .venv/bin/python benchmarks/lora.py [--base RUN] [--data DIR] [--preset NAME] [--steps 20] [--rank 16]

--base: the model to fine-tune (a run or checkpoint folder); without it a base of --preset is made
(one training step on --data, so that it has a checkpoint). --data: a folder prepared for objective=sft
(default: ru_qa as conversations, prepared here with a BPE tokenizer when absent). The two runs
alternate, twice each, and the report gives each figure's median with the LoRA / full ratio.

Peak memory is measured twice: with glibc's malloc as it comes, and with MALLOC_MMAP_THRESHOLD_=65536,
which serves every block over 64 KiB from mmap and so gives freed activations back to the system at
once. As it comes, glibc keeps freed heap blocks and fragments; LoRA's many small products fragment
it more, so its peak RSS can exceed full fine-tuning's although it holds less (see RESULTS.md).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def run(*args, env: dict | None = None) -> dict:
    """One `samovar` command in a child process; its peak RSS (MiB) and wall time."""
    args = [str(a) for a in args]
    print("$ " + "".join(f"{k}={v} " for k, v in (env or {}).items()) + "samovar " + " ".join(args), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "samovar", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
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
    parser.add_argument("--steps", type=int, default=20)
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
    mallocs = {"peak_mib": {}, "peak_mmap_mib": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
    results = {k: {m: [] for m in (*mallocs, "tokens_per_s")} for k in kinds}
    for round_ in range(2):
        for measure, env in mallocs.items():
            for kind, extra in kinds.items():
                out = w / f"{kind}-{round_}-{measure}"
                if out.exists():
                    shutil.rmtree(out)
                r = run(*common, *extra, "--out", out, env=env)
                results[kind][measure].append(r["peak_mib"])
                results[kind]["tokens_per_s"].append(tokens_per_s(out))
    from samovar.api import load
    from samovar.lora import adapter_state

    full, _ = load(w / "full-0-peak_mib", device="cpu", dtype="fp32")
    lora, _ = load(w / "lora-0-peak_mib", device="cpu", dtype="fp32")
    trainable = {"full": sum(p.numel() for p in full.parameters()),
                 "lora": sum(t.numel() for t in adapter_state(lora).values())}
    med = {k: {m: statistics.median(values) for m, values in v.items()} for k, v in results.items()}
    lines = [f"`benchmarks/lora.py --steps {args.steps} --rank {args.rank}` (base {base}, data {data}; "
             f"targets {args.targets}; medians of runs alternating full and LoRA: 2 per memory row, 4 for tokens/s):",
             "",
             "| | full fine-tuning | LoRA | LoRA / full |", "|---|---|---|---|",
             f"| trainable parameters | {trainable['full']:,} | {trainable['lora']:,} | "
             f"{trainable['lora'] / trainable['full']:.2%} |",
             f"| peak memory (RSS, MiB), glibc malloc as it comes | {med['full']['peak_mib']:.0f} | "
             f"{med['lora']['peak_mib']:.0f} | {med['lora']['peak_mib'] / med['full']['peak_mib']:.2f} |",
             f"| peak memory (RSS, MiB), MALLOC_MMAP_THRESHOLD_=65536 | {med['full']['peak_mmap_mib']:.0f} | "
             f"{med['lora']['peak_mmap_mib']:.0f} | {med['lora']['peak_mmap_mib'] / med['full']['peak_mmap_mib']:.2f} |",
             f"| training tokens/s | {med['full']['tokens_per_s']:,.0f} | {med['lora']['tokens_per_s']:,.0f} | "
             f"{med['lora']['tokens_per_s'] / med['full']['tokens_per_s']:.2f} |"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
