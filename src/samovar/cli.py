"""The `samovar` command: each subcommand is a few lines over api.py, data.py and train.py.

    samovar presets
    samovar prepare INPUT... --tokenizer {char,word,bpe} [--vocab-size N] --out DIR
    samovar train --preset P --data DIR --out RUN [--config FILE] [--set key=value ...] [--resume RUN]
    samovar generate RUN --prompt TEXT [--max-tokens N --temperature T --top-k K --top-p P --seed S]
    samovar eval RUN --data FILE_OR_DIR [--task auto|lm|qa|dialogue] [--json]
    samovar compare RUN_A RUN_B ... --data FILE [--out chart.png]
    samovar runs [FOLDER]          samovar plot RUN [RUN ...] --out FILE.png
    samovar import HF_FOLDER --out RUN       samovar export RUN --format hf --out DIR
    samovar demo [--minutes M]

Errors a user can cause print one line, `samovar: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

from .config import PRESETS, ConfigError, ModelConfig, format_count, get_preset, parse_field_value
from .train import TrainConfig

MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
FILE_KEYS = {"preset", "data", "out"}


def user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .demo import DemoError
    from .engine import GenerationError
    from .runtime import RuntimeConfigError
    from .tokenizer import TokenizerError
    from .hf import HFError
    from .quantize import QuantizationError
    from .train import TrainingError

    return (ConfigError, HFError, DataError, TokenizerError, CheckpointError, GenerationError,
            RuntimeConfigError, TrainingError, DemoError, QuantizationError, FileNotFoundError, PermissionError)


# ---- presets -----------------------------------------------------------------------------------------
def cmd_presets(args) -> None:
    print(f"{'preset':<16} {'family':<10} {'params':>9}  {'layers':>6} {'width':>6} {'heads':>7} "
          f"{'context':>8} {'vocab':>7}  parts")
    for name, cfg in PRESETS.items():
        heads = f"{cfg.n_head}/{cfg.kv_heads}" if cfg.kv_heads != cfg.n_head else str(cfg.n_head)
        parts = [f"{cfg.norm_placement}-{cfg.norm}", cfg.position, cfg.mlp]
        parts += ["latent attention"] if cfg.attention == "mla" else []
        parts += [f"{cfg.n_expert_active} of {cfg.n_expert} experts"
                  + (f" + {cfg.n_shared_expert} shared" if cfg.n_shared_expert else "")] if cfg.n_expert else []
        parts += [f"window {cfg.sliding_window}"] if cfg.sliding_window else []
        parts += ["qk-norm"] if cfg.qk_norm else []
        parts += ["tied"] if cfg.tie_embeddings else []
        parts = ", ".join(parts)
        print(f"{name:<16} {cfg.family:<10} {format_count(cfg.num_params()):>9}  {cfg.n_layer:>6} "
              f"{cfg.n_embd:>6} {heads:>7} {cfg.context_len:>8} {cfg.vocab_size:>7}  {parts}")


# ---- prepare -----------------------------------------------------------------------------------------
def cmd_prepare(args) -> None:
    from .data import prepare

    specials = () if args.no_special_tokens else None
    kwargs = {} if specials is None else {"special_tokens": specials}
    meta = prepare(args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, context_len=args.context_len, pairs=args.pairs, **kwargs)
    print(f"{meta['tokenizer']} tokenizer, vocabulary {meta['vocab_size']}: "
          f"{meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens ({meta['dtype']}) "
          f"from {len(meta['sources'])} file(s)"
          + (f", {meta['pairs']['train']:,} + {meta['pairs']['val']:,} {meta['pairs']['format']} pairs" if "pairs" in meta
             else "") + f" -> {args.out}")


# ---- train -------------------------------------------------------------------------------------------
def read_config_file(path: str) -> dict:
    """A flat TOML or YAML mapping (sections [model] and [train] are merged in)."""
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"config file {file} does not exist")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("YAML configs need PyYAML: pip install pyyaml (or use TOML)") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse {file}: {str(e).splitlines()[0]}") from None
    else:
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"cannot parse {file}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file} must hold a mapping of keys to values")
    flat = {}
    for key, value in raw.items():
        if key in ("model", "train") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def parse_sets(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set takes key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def build_configs(preset: str | None, file_values: dict, sets: dict, data_vocab: int | None,
                  base: ModelConfig | None = None) -> tuple[ModelConfig, TrainConfig]:
    """ModelConfig and TrainConfig from a preset (or `base`, the config of --init-from), then the
    config file, then --set (last wins)."""
    values = {**file_values, **sets}
    preset = values.pop("preset", None) or preset
    values.pop("data", None)
    values.pop("out", None)
    if base is None and preset is None:
        raise ConfigError("no model: give --preset NAME (see `samovar presets`) or preset = ... in --config")
    model_cfg = base if base is not None else get_preset(preset)
    model_changes, train_changes = {}, {}
    for key, value in values.items():
        if key in MODEL_KEYS:
            model_changes[key] = parse_field_value(ModelConfig, key, value)
        elif key in TRAIN_KEYS:
            train_changes[key] = parse_field_value(TrainConfig, key, value)
        else:
            raise ConfigError(f"unknown key {key!r}: not a field of ModelConfig or TrainConfig")
    if "vocab_size" not in model_changes and data_vocab is not None and base is None:
        model_changes["vocab_size"] = data_vocab  # the preset's shape, the data's vocabulary
    return model_cfg.replace(**model_changes), TrainConfig(**train_changes)


def cmd_train(args) -> None:
    from .data import TokenData
    from .train import Trainer

    file_values = read_config_file(args.config) if args.config else {}
    out = args.resume or args.out or file_values.get("out")
    data = args.data or file_values.get("data")
    if out is None:
        raise ConfigError("no run folder: give --out RUN (or --resume RUN)")
    if data is None and args.resume:
        data = json.loads((Path(args.resume) / "train_config.json").read_text()).get("data")
    if data is None:
        raise ConfigError("no data: give --data DIR (a folder made by `samovar prepare`)")
    vocab = TokenData.open(data).meta.get("vocab_size")
    base = None
    if args.init_from:
        from .checkpoint import resolve_checkpoint

        base = ModelConfig.load(resolve_checkpoint(args.init_from) / "config.json")
    model_cfg, train_cfg = build_configs(args.preset, file_values, parse_sets(args.set), vocab, base)
    trainer = Trainer(model_cfg, train_cfg, data, out, resume=bool(args.resume), init_from=args.init_from)
    print(f"model {format_count(trainer.model.num_params())} parameters on {trainer.device} "
          f"({str(trainer.dtype).removeprefix('torch.')}); run folder {out}"
          + (f", resuming at step {trainer.step}" if args.resume else ""))
    result = trainer.train()
    print(f"done: step {result['step']} ({result['stop_reason']}), val loss {result.get('val_loss', 0):.4f}, "
          f"best {result['best_val_loss']:.4f}, {result['tokens_seen']:,} tokens in {result['elapsed_s']:.0f}s")


# ---- generate ----------------------------------------------------------------------------------------
def cmd_generate(args) -> None:
    from .api import generate, load

    model, tokenizer = load(args.run, device=args.device, dtype=args.dtype, quantize=args.quantize)
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos, compile=args.compile)
    if args.stream:
        sys.stdout.write(args.prompt)
        for piece in generate(model, tokenizer, args.prompt, stream=True, **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(args.prompt + generate(model, tokenizer, args.prompt, **kwargs))


# ---- evaluation ---------------------------------------------------------------------------------------
def load_for_eval(run, args):
    from .api import LLM

    llm = LLM.from_path(run, device=args.device, dtype=args.dtype, quantize=args.quantize)
    if llm.tokenizer is None:
        raise ConfigError(f"{run} has no tokenizer.json")
    return llm


def cmd_eval(args) -> None:
    from .evaluation import evaluate

    llm = load_for_eval(args.run, args)
    result = evaluate(llm, args.data, task=args.task, max_examples=args.max_examples, max_tokens=args.max_tokens,
                      with_latency=not args.no_latency, compile=args.compile)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    print(f"{args.run} on {args.data} ({result['task']})")
    if "loss" in result:  # a language model's loss over the whole text (the LSTM baseline has none)
        print(f"  loss {result['loss']:.4f}   perplexity {result['perplexity']:.2f}   "
              f"bits per byte {result['bits_per_byte']:.4f}   ({result['tokens']:,} tokens)")
    if "answer_loss" in result:
        print(f"  answer loss {result['answer_loss']:.4f}   answer perplexity {result['answer_perplexity']:.2f}   "
              f"({result['answer_tokens']:,} answer tokens)")
    if "bleu" in result:
        print(f"  BLEU {result['bleu']:.2f}   chrF {result['chrf']:.2f}   exact match {result['exact_match']:.1%} "
              f"({result['examples']} examples)")
        for s in result["samples"]:
            print(f"    {s['prompt'].splitlines()[-1]!r} -> {s['answer']!r} (reference {s['reference']!r})")
    if "ttft_ms" in result:
        print(f"  time to first token {result['ttft_ms']:.1f} ms   decode {result['decode_tokens_per_s']:.1f} tokens/s")


def cmd_compare(args) -> None:
    from .evaluation import compare_chart, compare_table, evaluate

    rows = []
    for run in args.runs:
        llm = load_for_eval(run, args)
        result = evaluate(llm, args.data, task=args.task, max_examples=args.max_examples, max_tokens=args.max_tokens,
                          compile=args.compile)
        rows.append({"run": str(run), "params": llm.model.num_params(), **result})
    print(compare_table(rows))
    compare_chart(rows, args.out)
    print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, ensure_ascii=False, indent=2))


# ---- runs and plots --------------------------------------------------------------------------------
def cmd_runs(args) -> None:
    from .train import run_summary

    root = Path(args.folder)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder")
    runs = sorted(p.parent for p in root.rglob("metrics.csv"))
    if not runs:
        print(f"no runs under {root}")
        return
    print(f"{'run':<40} {'steps':>8} {'tokens':>14} {'best val':>9} {'last loss':>9} {'time':>8}")
    for run in runs:
        s = run_summary(run)
        best = f"{s['best_val_loss']:.4f}" if s["best_val_loss"] is not None else "-"
        last = f"{s['last_loss']:.4f}" if s["last_loss"] is not None else "-"
        print(f"{str(run):<40} {s['steps']:>8,} {s['tokens']:>14,} {best:>9} {last:>9} {s['elapsed_s']:>7.0f}s")


def cmd_plot(args) -> None:
    from .train import plot_runs

    for run in args.runs:
        if not (Path(run) / "metrics.csv").exists():
            raise ConfigError(f"{run} has no metrics.csv: not a run folder")
    plot_runs(args.runs, args.out)
    print(f"wrote {args.out}")


# ---- speedrun ------------------------------------------------------------------------------------------
def process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    try:
        import os

        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED_AT


_IMPORTED_AT = time.time()


def cmd_speedrun(args) -> None:
    """Train the speedrun recipe on tinyshakespeare and time it to the target whole-split val loss."""
    from .data import prepare
    from .train import Trainer

    recipe = read_config_file(args.recipe)
    corpus = Path(args.data or Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" /
                  "input.txt")
    if not corpus.exists():
        raise ConfigError(f"corpus {corpus} does not exist; give --data path/to/tinyshakespeare/input.txt")
    out = Path(args.out)
    for own in ("data", "run"):  # the previous race's folders (and nothing else under --out)
        shutil.rmtree(out / own, ignore_errors=True)
    meta = prepare([corpus], out / "data", tokenizer="char", special_tokens=())  # nanoGPT's split and vocab
    sets = parse_sets(args.set)
    sets.update({"full_val_eval": "true", "plot": "false", "device": args.device})
    sets.setdefault("peak_flops", "0")  # no MFU: measuring the matmul peak would cost 0.3 s of the race
    if args.seed is not None:
        sets["seed"] = str(args.seed)
    model_cfg, train_cfg = build_configs(None, recipe, sets, meta["vocab_size"])
    if args.budget_seconds is not None:
        reserve = 2.0  # the final whole-split evaluation and the last checkpoint
        train_cfg = dataclasses.replace(train_cfg, max_steps=10**9,
                                        max_seconds=max(1.0, args.budget_seconds - process_age() - reserve))
    trainer = Trainer(model_cfg, train_cfg, out / "data", out / "run", progress=args.progress)
    reached = {}

    def on_eval(step: int, losses: dict) -> None:
        if "time" not in reached and losses["val"] <= args.target_loss:
            reached.update(time=process_age(), step=step)

    trainer.eval_hook = on_eval
    result = trainer.train()
    t = reached.get("time", math.inf)
    print(f"{args.recipe}: {trainer.model.num_params():,} parameters, {result['step']} steps, "
          f"{result['tokens_seen']:,} tokens; whole-split val loss {result['val_loss']:.4f} "
          f"after {process_age():.1f}s" + (f"; reached {args.target_loss} at step {reached['step']}" if reached else ""))
    print(f"time_to_target_s={t:.1f} final_val_loss={result['val_loss']:.4f}")


# ---- import / export ---------------------------------------------------------------------------------
def cmd_import(args) -> None:
    from .checkpoint import save_checkpoint
    from .hf import import_hf

    model, tokenizer = import_hf(args.folder)
    save_checkpoint(args.out, model, tokenizer)
    cfg = model.config
    print(f"imported a {cfg.family} model, {format_count(model.num_params())} parameters"
          + ("" if tokenizer else " (no tokenizer.json found: add one before generating)") + f" -> {args.out}")


def cmd_export(args) -> None:
    from .api import load
    from .hf import export_hf

    model, tokenizer = load(args.run, device="cpu", dtype="fp32")
    export_hf(model, tokenizer, args.out)
    print(f"exported {args.run} as a HuggingFace {json.loads((Path(args.out) / 'config.json').read_text())['model_type']}"
          f" model -> {args.out}")


# ---- demo --------------------------------------------------------------------------------------------
# What the speedrun's ablations found (benchmarks/SPEEDRUN.md), applied to the demo's larger model.
DEMO_RECIPE = dict(position="rope", mlp="relu", qk_norm=True, tie_embeddings=False, zero_init_out=True,
                   optimizer="muon", muon_lr=0.05, lr=6e-3, warmup_steps=10, schedule="wsd", cooldown_frac=0.5,
                   min_lr=0.0, weight_decay=0.0)


def cmd_demo(args) -> None:
    from .api import generate, load
    from .data import prepare
    from .demo import shakespeare_corpus
    from .train import Trainer

    if args.minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {args.minutes}")
    out = Path(args.out)
    t0 = time.time()
    plays = shakespeare_corpus()
    print(f"corpus: {len(list(plays.glob('*.txt')))} plays in {plays}")
    meta = prepare([plays], out / "data", tokenizer="char")
    print(f"prepared {meta['train_tokens']:,} train / {meta['val_tokens']:,} val characters "
          f"({meta['vocab_size']} symbols) in {time.time() - t0:.0f}s")
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)  # the demo's own previous run
    # the demo's training: the time budget drives the schedule; --set changes anything
    defaults = dict(batch_size=32, max_steps=10**9, max_seconds=args.minutes * 60, lr=2e-3, warmup_steps=50,
                    eval_interval=200, eval_steps=10, log_interval=20, device=args.device, keep_last=1)
    model_cfg, train_cfg = build_configs(args.preset, {**defaults, **DEMO_RECIPE}, parse_sets(args.set),
                                         meta["vocab_size"])
    trainer = Trainer(model_cfg, train_cfg, out / "data", run)
    print(f"training {args.preset} ({format_count(trainer.model.num_params())} parameters) "
          f"for {args.minutes:g} minutes on {trainer.device} ...")
    result = trainer.train()
    print(f"trained {result['step']} steps, val loss {result['val_loss']:.3f}; "
          f"run folder {run} (try: samovar generate {run} --prompt 'ROMEO.' --stream)\n")
    model, tokenizer = load(run, device=args.device)
    print("-" * 72)
    print(args.prompt + generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens,
                                 temperature=0.8, top_k=40, seed=0))
    print("-" * 72)


# ---- wiring ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="samovar", description="Brew your own language model from scratch.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("presets", help="list the model presets with their parameter counts")
    s.set_defaults(func=cmd_presets)

    s = sub.add_parser("prepare", help="tokenize text files into train.bin / val.bin")
    s.add_argument("inputs", nargs="+", help="text files, folders of them, or JSONL files")
    s.add_argument("--tokenizer", default="char",
                   help="char, word or bpe (trained on the inputs), or a path to a tokenizer.json")
    s.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for word and bpe")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--val-fraction", type=float, default=0.1, help="share of tokens held out (the tail)")
    s.add_argument("--context-len", type=int, default=None, help="fail unless each split holds a context")
    s.add_argument("--no-special-tokens", action="store_true", help="no bos/eos/pad (a pure char vocabulary)")
    s.add_argument("--pairs", choices=["qa", "dialogue"], default=None,
                   help="also write prompt/answer pairs (T:/Q:/A: blocks or '- ' dialogues) for objective=sft")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("train", help="train a model on prepared data")
    s.add_argument("--preset", help="a model preset (see `samovar presets`)")
    s.add_argument("--data", help="a folder made by `samovar prepare`")
    s.add_argument("--out", help="the run folder to write")
    s.add_argument("--config", help="a TOML or YAML file of settings (preset, data, out, fields)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any ModelConfig or TrainConfig field, e.g. --set n_layer=4 --set lr=3e-4")
    s.add_argument("--resume", metavar="RUN", help="continue RUN from its latest complete checkpoint")
    s.add_argument("--init-from", metavar="RUN",
                   help="start from the weights and config of RUN (fine-tuning; prepare the data with "
                        "--tokenizer RUN/tokenizer.json)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("generate", help="generate text from a trained run")
    s.add_argument("run", help="a run folder or a checkpoint folder")
    s.add_argument("--prompt", default="", help="the text to continue")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    s.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    _device_options(s)
    _decode_options(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("eval", help="loss, perplexity, bits per byte, BLEU/chrF and latency of a run")
    s.add_argument("run", help="a run folder or a checkpoint folder")
    _eval_options(s)
    s.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    _device_options(s)
    _decode_options(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("compare", help="evaluate several runs on the same data: a table and a bar chart")
    s.add_argument("runs", nargs="+", help="run or checkpoint folders")
    _eval_options(s)
    s.add_argument("--out", default="compare.png", help="the bar chart to write")
    s.add_argument("--json", default=None, help="also write the results to this JSON file")
    _device_options(s)
    _decode_options(s)
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("runs", help="list the runs under a folder with their best val loss, steps and tokens")
    s.add_argument("folder", nargs="?", default="runs")
    s.set_defaults(func=cmd_runs)

    s = sub.add_parser("plot", help="draw several runs' loss curves on one chart")
    s.add_argument("runs", nargs="+", help="run folders")
    s.add_argument("--out", default="runs.png", help="the PNG to write")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("import", help="import a local HuggingFace model folder as a samovar checkpoint")
    s.add_argument("folder", help="a folder with config.json and model.safetensors (or pytorch_model.bin)")
    s.add_argument("--out", required=True, help="the checkpoint folder to write")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("export", help="export a run as a HuggingFace model folder")
    s.add_argument("run", help="a run folder or a checkpoint folder")
    s.add_argument("--format", default="hf", choices=["hf"], help="hf: transformers' from_pretrained layout")
    s.add_argument("--out", required=True, help="the folder to write")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("speedrun", help="time a recipe to a whole-split val loss on char-level Shakespeare")
    s.add_argument("--recipe", default=str(Path(__file__).resolve().parents[2] / "recipes" /
                                           "speedrun-shakespeare-char.toml"))
    s.add_argument("--data", help="tinyshakespeare's input.txt (default: ../shared/data/tinyshakespeare)")
    s.add_argument("--budget-seconds", type=float, default=None,
                   help="train until this many seconds after start (the schedule follows the clock)")
    s.add_argument("--target-loss", type=float, default=1.88)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--out", default="runs/speedrun")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    s.add_argument("--device", default="auto")
    s.add_argument("--progress", action="store_true", help="show the progress bar")
    s.set_defaults(func=cmd_speedrun)

    s = sub.add_parser("demo", help="download Shakespeare, train a small model, print a sample")
    s.add_argument("--minutes", type=float, default=8.0, help="training budget in minutes")
    s.add_argument("--preset", default="char-small")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--prompt", default="ROMEO.\n")
    s.add_argument("--max-tokens", type=int, default=600)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a model or training setting of the demo")
    _device_options(s)
    s.set_defaults(func=cmd_demo)
    return p


def _device_options(s) -> None:
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    s.add_argument("--dtype", default="auto",
                   help="auto (fp32 on CPU, bf16 on CUDA), fp32, bf16, fp16; bf16 is ~100x slower than fp32 "
                        "on CPUs without native bf16")


def _eval_options(s) -> None:
    s.add_argument("--data", required=True, help="a text file or folder (held-out text, QA or dialogues), "
                                                 "or a prepared data folder (its held-out tail)")
    s.add_argument("--task", default="auto", choices=["auto", "lm", "qa", "dialogue"],
                   help="qa and dialogue add BLEU/chrF of generated answers; auto detects the format")
    s.add_argument("--max-examples", type=int, default=100, help="answers to generate for BLEU/chrF")
    s.add_argument("--max-tokens", type=int, default=None, help="evaluate the loss on the first N tokens only")


def _decode_options(s) -> None:
    s.add_argument("--quantize", choices=["int8", "int8wo"], default=None,
                   help="int8: int8 Linear weights run by FBGEMM (CPU, float32 model), about 2.5x faster decoding "
                        "of a 51M model with a large vocabulary; int8wo: weight-only int8, for --compile (the "
                        "fastest decoding; slow without compiling). `samovar eval --quantize KIND` shows the "
                        "perplexity cost")
    s.add_argument("--compile", action="store_true",
                   help="decode through a torch.compile'd one-token step (compiling takes seconds to a minute; "
                        "the lstm-seq2seq baseline always decodes eagerly)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quantize", None) == "int8wo" and not args.compile:
        print("samovar: note: int8wo is fast with --compile; without it, decoding runs at about half "
              "float32's speed", file=sys.stderr)
    try:
        args.func(args)
    except user_errors() as e:
        msg = str(e) if not isinstance(e, FileNotFoundError) else f"{e.filename or e}: no such file"
        print(f"samovar: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("samovar: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
