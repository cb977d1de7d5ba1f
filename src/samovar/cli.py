"""The `samovar` command: each subcommand is a few lines over a function of the library.

    samovar presets
    samovar prepare INPUT... --tokenizer {char,word,bpe} [--vocab-size N] --out DIR [--workers N]
    samovar train --preset P --data DIR --out RUN [--config FILE] [--set key=value ...] [--resume RUN]
    samovar generate RUN --prompt TEXT [--max-tokens N --temperature T --top-k K --top-p P --seed S]
    samovar eval RUN --data FILE_OR_DIR [--task auto|lm|qa|dialogue|chat] [--json]
    samovar compare RUN_A RUN_B ... --data FILE [--out chart.png]
    samovar runs [FOLDER]          samovar plot RUN [RUN ...] --out FILE.png
    samovar import HF_FOLDER|FILE.gguf --out RUN       samovar export RUN --format hf|gguf --out DIR_OR_FILE
    samovar import PEFT_ADAPTER --base CKPT --out RUN   samovar merge-lora RUN --out DIR
    samovar data ingest INPUT... --out DIR   (text, JSONL, Parquet, CSV, .gz/.zst -> sharded Parquet)
    samovar data dedup DIR --out DIR         (exact and near duplicates dropped: MinHash LSH + Jaccard)
    samovar filter train --positive F --negative F --out FILTER    samovar filter apply FILTER DIR --out DIR
    samovar speedrun [--data input.txt]      samovar demo [--minutes M]
    samovar serve RUN [--host 127.0.0.1] [--port 8000] [--api-key-env VAR] [--slots N]
    samovar telegram RUN [--token-env TELEGRAM_TOKEN] [--api-url URL] [--allow CHAT_ID]

Errors a user can cause print one line, `samovar: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from .config import PRESETS, ConfigError, ModelConfig, format_count


def user_errors() -> tuple[type[BaseException], ...]:
    from .chat import ChatError
    from .checkpoint import CheckpointError
    from .data import DataError
    from .data.shakespeare import DemoError
    from .engine import GenerationError
    from .interop.hf import HFError
    from .quantize import QuantizationError
    from .runtime import RuntimeConfigError
    from .tokenizer import TokenizerError
    from .train import TrainingError

    return (ConfigError, ChatError, HFError, DataError, TokenizerError, CheckpointError, GenerationError,
            RuntimeConfigError, TrainingError, DemoError, QuantizationError, FileNotFoundError, PermissionError)


# ---- presets -----------------------------------------------------------------------------------------
def preset_parts(cfg: ModelConfig) -> str:
    """The parts a preset is made of, in a few words."""
    if cfg.arch == "lstm-seq2seq":
        return f"LSTM encoder-decoder, {cfg.n_layer} layers each side, hidden size {cfg.n_embd}"
    parts = [f"{cfg.norm_placement}-{cfg.norm}", cfg.position, cfg.mlp]
    parts += ["latent attention"] if cfg.attention == "mla" else []
    parts += [f"{cfg.n_expert_active} of {cfg.n_expert} experts"
              + (f" + {cfg.n_shared_expert} shared" if cfg.n_shared_expert else "")] if cfg.n_expert else []
    parts += [f"window {cfg.sliding_window}"] if cfg.sliding_window else []
    parts += ["qk-norm"] if cfg.qk_norm else []
    parts += ["tied"] if cfg.tie_embeddings else []
    return ", ".join(parts)


def cmd_presets(args) -> None:
    from .model import count_parameters

    print(f"{'preset':<16} {'family':<10} {'params':>9}  {'layers':>6} {'width':>6} {'heads':>7} "
          f"{'context':>8} {'vocab':>7}  parts")
    for name, cfg in PRESETS.items():
        heads = f"{cfg.n_head}/{cfg.n_kv_head}" if cfg.n_kv_head != cfg.n_head else str(cfg.n_head)
        heads = "-" if cfg.arch != "transformer" else heads  # the LSTM has no attention heads
        print(f"{name:<16} {cfg.family:<10} {format_count(count_parameters(cfg)):>9}  {cfg.n_layer:>6} "
              f"{cfg.n_embd:>6} {heads:>7} {cfg.context_len:>8} {cfg.vocab_size:>7}  {preset_parts(cfg)}")


# ---- prepare and train -------------------------------------------------------------------------------
def cmd_prepare(args) -> None:
    from .data import ReadOptions, prepare
    from .data.cleaning import CleanOptions

    kwargs = {"special_tokens": ()} if args.no_special_tokens else {}
    options = ReadOptions(strict=args.strict, question=args.question_column, answer=args.answer_column,
                          assistant=args.assistant, gap_hours=args.gap_hours)
    cleaning = None if args.no_clean else CleanOptions.keeping(args.keep, args.near_duplicates or None)
    if args.dry_run:
        return preview_cleaning(args, options, cleaning)
    if args.out is None:
        raise ConfigError("give --out DIR, the folder to write")
    meta = prepare(args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, context_len=args.context_len, pairs=args.pairs,
                   chat=args.chat, chat_options=options, cleaning=cleaning, preference=args.preference,
                   workers=args.workers, shard_mb=args.shard_mb, sample_mb=args.tokenizer_sample_mb,
                   progress=sys.stderr.isatty(), **kwargs)
    examples = meta.get("examples")
    kinds = {"pairs": f"{(examples or {}).get('format')} pairs", "chat": "conversations", "preference": "preference pairs"}
    what = "" if examples is None else f", {examples['train']:,} + {examples['val']:,} {kinds[examples['kind']]}"
    print(f"{meta['tokenizer']} tokenizer, vocabulary {meta['vocab_size']}: "
          f"{meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens ({meta['dtype']}) "
          f"from {len(meta['sources'])} file(s){what}"
          + (f" in {len(meta['shards'])} shard(s)" if "shards" in meta else "") + f" -> {args.out}")
    if meta.get("unknown_tokens"):
        print(f"note: {meta['unknown_tokens']:,} tokens are <|unk|>: text the tokenizer's sample did not hold "
              "(a larger --tokenizer-sample-mb, or bpe, which has no unknown text)")
    if examples and examples.get("skipped"):
        print(f"skipped {examples['skipped']:,} malformed lines or rows, e.g. {examples['problems'][0]}")
    if examples and "cleaning" in examples:
        c = examples["cleaning"]
        print("cleaning: " + (", ".join(f"{rule} {n:,} turns" for rule, n in c["changed"].items()) or "nothing to change")
              + "".join(f"; dropped {n:,} conversations ({why})" for why, n in c["dropped"].items()))


def cmd_data(args) -> None:
    {"ingest": data_ingest, "dedup": data_dedup}[args.stage](args)


def data_ingest(args) -> None:
    from .data.ingest import IngestOptions, ingest

    options = IngestOptions(field=args.field, min_chars=args.min_chars, min_letters=args.min_letters,
                            shard_bytes=int(args.shard_mb * (1 << 20)))
    state = ingest(args.inputs, args.out, options, progress=sys.stderr.isatty())
    dropped = ", ".join(f"{n:,} {why.replace('_', ' ')}" for why, n in state.dropped.items() if n) or "none"
    print(f"{state.documents:,} documents ({state.bytes / 1e6:,.1f} MB of text) from {len(state.inputs)} file(s) "
          f"in {state.shards} shard(s) -> {args.out}; dropped: {dropped}")


def data_dedup(args) -> None:

    from .data.dedup import DedupOptions, dedup

    options = DedupOptions(threshold=args.threshold, shingle=args.shingle, bands=args.bands, rows=args.rows,
                           seed=args.seed)
    if options.chance(options.threshold) < 0.9:
        print(f"samovar: note: {options.bands} bands of {options.rows} rows find a pair at Jaccard {options.threshold} "
              f"with probability {options.chance(options.threshold):.0%}; a lower threshold needs more bands or "
              "fewer rows (e.g. --bands 20 --rows 5 for 0.7)", file=sys.stderr)
    start = time.perf_counter()
    r = dedup(args.folder, args.out, options, workers=args.workers, progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    print(f"{r.documents:,} documents: {r.exact_duplicates:,} exact and {r.near_duplicates:,} near duplicates "
          f"({r.clusters:,} clusters) dropped, {r.kept:,} kept ({r.kept_bytes / 1e6:,.1f} of {r.bytes / 1e6:,.1f} MB) "
          f"-> {args.out}; {r.bytes / 1e6 / seconds:,.1f} MB/s")
    for e in r.examples[:1]:
        print(f"e.g. Jaccard {e['jaccard']}:\n  kept:    {e['kept'][:120]!r}\n  dropped: {e['dropped'][:120]!r}")


def cmd_filter(args) -> None:
    from .data.quality import apply_filter, read_examples, train_filter

    if args.action == "train":
        positive, negative = read_examples(args.positive), read_examples(args.negative)
        print(f"training a {args.kind} filter on {len(positive)} positive and {len(negative)} negative examples")
        train_filter(positive, negative, args.kind, seed=args.seed, iterations=args.iterations).save(args.out)
        print(f"-> {args.out}")
        return
    r = apply_filter(args.filter, args.folder, args.out, args.threshold, workers=args.workers,
                     progress=sys.stderr.isatty())
    print(f"{r.documents:,} documents scored ({r.documents_per_second:,.0f} documents/s): {r.kept:,} kept, "
          f"{r.documents - r.kept:,} dropped at threshold {r.threshold} -> {args.out}")
    for name, examples in (("kept", r.kept_examples), ("dropped", r.dropped_examples)):
        for e in examples[:2]:
            print(f"  {name} ({e['score']:.2f}): {e['text'][:100]!r}")


def preview_cleaning(args, options, cleaning) -> None:
    """--dry-run: what cleaning would change, with examples; nothing is written."""
    from .data import find_files, read_conversations
    from .data.cleaning import clean_conversations

    if not args.chat:
        raise ConfigError("--dry-run shows what cleaning does to conversations: give --chat FORMAT")
    if cleaning is None:
        raise ConfigError("--dry-run with --no-clean has nothing to show")
    report = read_conversations(find_files(args.inputs), args.chat, options)
    examples = []
    kept, cleaned = clean_conversations(report.conversations, cleaning, examples)
    print(f"{len(report.conversations):,} conversations read, {len(kept):,} kept; nothing written (--dry-run)")
    for line in cleaned.lines():
        print("  " + line)
    for before, after in examples:
        print(f"  before: {before!r}\n  after:  {after!r}")


def cmd_train(args) -> None:
    from .checkpoint import resolve_checkpoint
    from .data import TokenData
    from .recipes import build_configs, parse_sets, read_config_file, resume_configs
    from .train import Trainer

    file_values = read_config_file(args.config) if args.config else {}
    sets = parse_sets(args.set)
    if args.resume:  # the run's own configs and data, changed only where flags say so
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise ConfigError(f"--resume {args.resume} continues that folder; --out {args.out} names another")
        model_cfg, train_cfg, data = resume_configs(args.resume, args.preset, file_values, sets)
        out, data = args.resume, args.data or data
    else:
        out, data = args.out or file_values.get("out"), args.data or file_values.get("data")
        if out is None:
            raise ConfigError("no run folder: give --out RUN (or --resume RUN)")
        if data is None:
            raise ConfigError("no data: give --data DIR (a folder made by `samovar prepare`)")
        vocab = TokenData.open(data).meta.get("vocab_size")
        base = ModelConfig.load(resolve_checkpoint(args.init_from) / "config.json") if args.init_from else None
        model_cfg, train_cfg = build_configs(args.preset, file_values, sets, vocab, base)
    trainer = Trainer(model_cfg, train_cfg, data, out, resume=bool(args.resume), init_from=args.init_from)
    budget = trainer.budget_note()
    print(f"model {format_count(trainer.model.num_params())} parameters on {trainer.device} "
          f"({str(trainer.dtype).removeprefix('torch.')}); run folder {out}"
          + (f", resuming at step {trainer.step}" if args.resume else "") + (f"; {budget}" if budget else ""))
    note = trainer.objective.note(trainer.data, trainer.model.config.context_len)
    if note:
        print(f"note: {note}")
    result = trainer.train()
    print(f"done: step {result['step']} ({result['stop_reason']}), val loss {result.get('val_loss', 0):.4f}, "
          f"best {result['best_val_loss']:.4f}, {result['tokens_seen']:,} tokens in {result['elapsed_s']:.0f}s")


# ---- generate, eval, compare -------------------------------------------------------------------------
COMPILE_PAYS = 4096  # new tokens from which compiling the step pays for itself (RESULTS.md: ahead of time,
#                      130-220 on the benchmark models with its package on disk, 2,700-5,400 the first time)


def cmd_generate(args) -> None:
    from .api import generate, load

    model, tokenizer = load(args.run, device=args.device, dtype=args.dtype, quantize=args.quantize)
    compile = compiles(args, model)
    if compile and args.compile is None:
        print(f"samovar: compiling the decoding step: it pays from about {COMPILE_PAYS:,} new tokens "
              "(--no-compile: decode eagerly)", file=sys.stderr, flush=True)
    kwargs = dict(sampling_of(args), ignore_eos=args.ignore_eos, compile=compile)
    if args.stream:
        sys.stdout.write(args.prompt)
        for piece in generate(model, tokenizer, args.prompt, stream=True, **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(args.prompt + generate(model, tokenizer, args.prompt, **kwargs))


CHAT_HELP = "/reset  /system TEXT  /save FILE  /load FILE  /exit   (Ctrl-C stops an answer)"


def cmd_chat(args) -> None:
    from .api import LLM
    from .chat import ChatError, ChatSession
    from .engine import Engine

    llm = LLM.from_path(args.run, device=args.device, dtype=args.dtype, quantize=args.quantize)
    if llm.tokenizer is None or llm.tokenizer.chat_template is None:
        raise ChatError(f"{args.run} has no chat template: fine-tune it on conversations first "
                        "(samovar prepare --chat FORMAT ..., then train with objective=sft)")
    session = ChatSession(llm.tokenizer, llm.model.config.context_len, args.system)
    announce_dtype(args, llm.model)
    compile = compiles(args, llm.model)
    if compile:
        with compiling():
            Engine(llm.model, compile=True).warm_up()
    sampling = dict(sampling_of(args), compile=compile)
    terminal = sys.stdin.isatty()
    if terminal:
        print(f"chatting with {args.run}: {CHAT_HELP}")
    for text in chat_lines(terminal):
        if text.startswith("/"):
            if not chat_command(session, text):
                return
            continue
        messages, dropped = session.prompt(text, args.max_tokens)
        if dropped:
            print(f"(the {dropped} oldest turns no longer fit the context and were dropped)", file=sys.stderr)
        pieces = []
        try:
            for piece in llm.chat_stream(messages, prefix=session.prefix, **sampling):
                pieces.append(piece)
                if terminal:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            pieces.append(" ...")
        session.answered("".join(pieces))
        print("" if terminal else " ".join("".join(pieces).split("\n")), flush=True)


def chat_lines(terminal: bool):
    """The user's lines: typed at a prompt (Ctrl-C there starts a new line, Ctrl-D ends), or one a line of stdin."""
    if not terminal:
        yield from (line.strip() for line in sys.stdin if line.strip())
        return
    while True:
        try:
            line = input("> ").strip()
        except KeyboardInterrupt:
            print()
            continue
        except EOFError:
            print()
            return
        if line:
            yield line


def chat_command(session, text: str) -> bool:
    """Run a /command of the chat; False for /exit."""
    name, _, rest = text.partition(" ")
    rest = rest.strip()
    if name == "/exit":
        return False
    if name == "/reset":
        session.reset()
        print("(a new conversation)", file=sys.stderr)
    elif name == "/system":
        session.system = rest or None
        print("(system prompt " + ("set)" if rest else "removed)"), file=sys.stderr)
    elif name in ("/save", "/load") and rest:
        try:
            session.save(rest) if name == "/save" else session.load(rest)
        except (OSError, ValueError) as e:
            print(f"samovar: {name}: {e}", file=sys.stderr)
        else:
            print(f"({'saved to' if name == '/save' else 'loaded'} {rest})", file=sys.stderr)
    else:
        print(f"commands: {CHAT_HELP}", file=sys.stderr)
    return True


def load_for_eval(run, args, quantize: str | None = None, bf16_on_cpu: bool = True):
    from .api import LLM

    llm = LLM.from_path(run, device=args.device, dtype=args.dtype, quantize=quantize, bf16_on_cpu=bf16_on_cpu)
    if llm.tokenizer is None:
        raise ConfigError(f"{run} has no tokenizer.json")
    return llm


def announce_dtype(args, model) -> None:
    """Say so when dtype auto chose bf16 on the CPU (runtime.resolve_dtype): a start-up line of chat."""
    import torch

    weight = next(model.parameters())
    if args.dtype == "auto" and weight.is_cpu and weight.dtype == torch.bfloat16:
        print("samovar: computing in bf16, which this CPU multiplies natively (faster; +0.01% perplexity "
              "measured); --dtype fp32 for float32", file=sys.stderr, flush=True)


def cmd_eval(args) -> None:
    from .evaluation import add_quantization_cost, evaluate, format_result

    llm = load_for_eval(args.run, args, args.quantize)
    result = evaluate(llm, args.data, task=args.task, max_examples=args.max_examples, max_tokens=args.max_tokens,
                      with_latency=not args.no_latency, compile=compile_wanted(args))
    result["dtype"] = str(next(llm.model.parameters()).dtype).removeprefix("torch.")  # (auto: bf16 on some CPUs)
    if args.quantize:  # the cost of rounding: the float model's perplexity on the same text
        reference = evaluate(load_for_eval(args.run, args, bf16_on_cpu=False), args.data, task=result["task"],
                             max_examples=0, max_tokens=args.max_tokens, with_latency=False)
        add_quantization_cost(result, reference, args.quantize)
    print(json.dumps(result, ensure_ascii=False, indent=2) if args.json else format_result(args.run, args.data, result))


def cmd_compare(args) -> None:
    from .evaluation import compare_chart, compare_table, evaluate

    rows = []
    for run in args.runs:
        llm = load_for_eval(run, args, args.quantize)
        result = evaluate(llm, args.data, task=args.task, max_examples=args.max_examples, max_tokens=args.max_tokens,
                          compile=compile_wanted(args))
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


# ---- import / export ---------------------------------------------------------------------------------
def cmd_import(args) -> None:
    from .checkpoint import save_checkpoint
    from .interop.hf import import_hf

    if (Path(args.folder) / "adapter_config.json").exists():
        return import_adapter(args)
    if args.base:
        raise ConfigError(f"--base is for a peft adapter folder, and {args.folder} has no adapter_config.json")
    if args.folder.endswith(".gguf"):
        from .interop.gguf import import_gguf

        model, tokenizer = import_gguf(args.folder)
    else:
        model, tokenizer = import_hf(args.folder)
    save_checkpoint(args.out, model, tokenizer)
    print(f"imported a {model.config.family} model, {format_count(model.num_params())} parameters"
          + ("" if tokenizer else " (no tokenizer.json found: add one before generating)") + f" -> {args.out}")


def import_adapter(args) -> None:
    """A peft LoRA adapter onto a samovar base checkpoint: a LoRA checkpoint naming that base."""
    from .api import load
    from .checkpoint import resolve_checkpoint, save_checkpoint
    from .interop.peft import load_peft
    from .lora import adapter_record

    if not args.base:
        raise ConfigError(f"{args.folder} is a peft adapter: give --base CKPT, the samovar checkpoint of its base "
                          "model (samovar import HF_FOLDER --out CKPT)")
    base = resolve_checkpoint(args.base)
    model, tokenizer = load(base, device="cpu", dtype="fp32")
    lora = load_peft(model, args.folder)
    save_checkpoint(args.out, model, tokenizer, adapter=adapter_record(lora, base))
    print(f"imported a rank-{lora.rank} LoRA adapter of {', '.join(lora.targets)} onto {base} -> {args.out}")


def cmd_merge_lora(args) -> None:
    from .api import load
    from .checkpoint import save_checkpoint
    from .lora import adapted, merge_lora

    model, tokenizer = load(args.run, device="cpu", dtype="fp32")
    layers = len(adapted(model))
    if not layers:
        raise ConfigError(f"{args.run} holds no LoRA adapters: nothing to merge")
    save_checkpoint(args.out, merge_lora(model), tokenizer)
    print(f"merged the LoRA adapters of {layers} layers into the weights -> {args.out}")


def cmd_export(args) -> None:
    from .api import load
    from .interop.hf import export_hf
    from .lora import adapted

    model, tokenizer = load(args.run, device="cpu", dtype="fp32")
    if adapted(model):
        return export_lora(args, model, tokenizer)
    if args.format == "gguf":
        from .interop.gguf import export_gguf, llamacpp_context

        export_gguf(model, tokenizer, args.out, args.type)
        print(f"exported {args.run} as a {args.type} GGUF file -> {args.out}")
        if (context := llamacpp_context(model.config)) < model.config.context_len:
            print(f"note: llama.cpp has no sliding window for this model, so the file declares a context of "
                  f"{context} positions, its window, where llama.cpp computes what samovar does")
        return
    export_hf(model, tokenizer, args.out)
    model_type = json.loads((Path(args.out) / "config.json").read_text())["model_type"]
    print(f"exported {args.run} as a HuggingFace {model_type} model -> {args.out}")


def export_lora(args, model, tokenizer) -> None:
    """A LoRA run: its base as an HF folder, and the adapters in peft's format in its adapter/ folder."""
    from .checkpoint import read_json, resolve_checkpoint
    from .interop.hf import export_hf
    from .interop.peft import save_peft
    from .lora import ADAPTER_CONFIG, LoRAConfig

    if args.format != "hf":
        raise ConfigError(f"{args.run} holds LoRA adapters: merge them first (samovar merge-lora {args.run} --out DIR) "
                          "to export a GGUF file")
    record = read_json(resolve_checkpoint(args.run) / ADAPTER_CONFIG, "adapter config")
    out = export_hf(model, tokenizer, args.out)
    save_peft(model, LoRAConfig.from_dict(record["lora"]), out / "adapter", base_model=str(out.resolve()))
    print(f"exported the base of {args.run} as a HuggingFace model -> {args.out}, and its LoRA adapters in "
          f"peft's format -> {out / 'adapter'}")


# ---- the speedrun and the demo -----------------------------------------------------------------------
def cmd_speedrun(args) -> None:
    from .recipes import parse_sets, speedrun

    r = speedrun(args.recipe, args.data, args.budget_seconds, args.target_loss, args.seed, args.out,
                 parse_sets(args.set), args.device, args.progress)
    reached = f"; reached {args.target_loss} at step {r['reached_step']}" if r["reached_step"] is not None else ""
    print(f"{args.recipe}: {r['params']:,} parameters, {r['step']} steps, {r['tokens_seen']:,} tokens; "
          f"whole-split val loss {r['val_loss']:.4f} after {r['age_s']:.1f}s{reached}")
    print(f"time_to_target_s={r['time_to_target_s']:.1f} final_val_loss={r['val_loss']:.4f}")


def cmd_demo(args) -> None:
    from .recipes import demo, parse_sets

    sample = demo(args.minutes, args.preset, args.out, args.prompt, args.max_tokens, parse_sets(args.set), args.device)
    print("-" * 72 + "\n" + sample + "\n" + "-" * 72)


# ---- serve ---------------------------------------------------------------------------------------------
BATCHES_IN_BF16 = False  # whether dtype auto means bf16 for serve and telegram on a CPU with native bf16 (as for
#   generate and chat): not, because in bf16 a sequence's greedy tokens would depend, through rounding, on
#   the sequences decoded beside it and on how its prompt was chunked; in fp32 they do not (test_scheduler)


def compile_wanted(args) -> bool:
    """--compile or --no-compile, else the command's default: chat, serve and telegram compile,
    generate from COMPILE_PAYS new tokens, eval and compare do not."""
    if args.compile is not None:
        return args.compile
    if args.func is cmd_generate:
        return args.max_tokens >= COMPILE_PAYS
    return args.func in (cmd_chat, cmd_serve, cmd_telegram)


def compiles(args, model) -> bool:
    """Whether to decode `model` through the compiled step (compile_wanted). A model that cannot
    compile (a mixture of experts, FBGEMM's int8) decodes eagerly, with a note; asked for by
    --compile, it is an error."""
    from .engine import GenerationError, check_compilable
    from .model import Transformer

    if not compile_wanted(args) or not isinstance(model, Transformer):
        return False
    try:
        check_compilable(model)
    except GenerationError as e:
        if args.compile:
            raise
        print(f"samovar: note: decoding eagerly: {e}", file=sys.stderr)
        return False
    return True


@contextlib.contextmanager
def compiling():
    """The start-up lines around compiling the decoding step."""
    print("samovar: compiling the decoding step (up to half a minute the first time, seconds later: what it "
          "compiled is kept on disk; --no-compile skips it) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"samovar: compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def decoding_scheduler(args, llm, **options):
    """The Scheduler that serve and telegram decode through, compiled unless --no-compile (warmed up
    here), its loop left to the main thread: Scheduler.run_beside. With more than one slot, the
    weights get a copy laid out for batches of rows (layers.Linear.pack)."""
    from .layers import pack_linears
    from .serve.scheduler import Scheduler

    compile = compiles(args, llm.model)
    scheduler = Scheduler(llm.model, vocab_limit=llm.tokenizer.vocab_size, compile=compile, thread=False, **options)
    if scheduler.slots > 1 and (copy := pack_linears(llm.model)):
        print(f"samovar: the weights laid out for batches of rows too (+{copy / 2**20:.0f} MiB; --slots 1 "
              "goes without)", file=sys.stderr, flush=True)
    if compile:
        with compiling():
            scheduler.warm_up()
    return scheduler


def cmd_serve(args) -> None:
    import os

    from .api import LLM
    from .engine import GenerationError
    from .serve.server import create_app, serve

    key = args.api_key
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise GenerationError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    llm = LLM.from_path(args.run, device=args.device, dtype=args.dtype, quantize=args.quantize,
                        bf16_on_cpu=BATCHES_IN_BF16)
    if llm.tokenizer is None:
        raise GenerationError(f"{args.run} has no tokenizer.json; copy the model's tokenizer.json into it")
    name = args.model_name or Path(args.run).resolve().name
    scheduler = decoding_scheduler(args, llm, slots=args.slots, max_waiting=args.max_waiting)
    app = create_app(llm, scheduler, model_name=name, api_key=key, keepalive_seconds=args.keep_alive)
    serve(app, args.host, args.port, name)


def cmd_telegram(args) -> None:
    import asyncio
    import os
    import threading

    from .api import LLM
    from .engine import GenerationError
    from .serve.telegram import run_bot

    token = os.environ.get(args.token_env)
    if not token:
        raise GenerationError(f"--token-env {args.token_env}: that environment variable is not set "
                              "(put the bot token from @BotFather in it)")
    llm = LLM.from_path(args.run, device=args.device, dtype=args.dtype, quantize=args.quantize,
                        bf16_on_cpu=BATCHES_IN_BF16)
    if llm.tokenizer is None or llm.tokenizer.chat_template is None:
        raise GenerationError(f"{args.run} has no chat template: fine-tune it on conversations first "
                              "(samovar prepare --chat FORMAT ..., then train with objective=sft)")
    database = Path(args.db) if args.db else Path(args.run) / "telegram.sqlite"
    scheduler = decoding_scheduler(args, llm, slots=args.slots)
    stop = threading.Event()
    scheduler.run_beside(lambda: asyncio.run(run_bot(llm, scheduler, token, sampling_of(args), database, args.api_url,
                                                     args.system, set(args.allow) or None, args.update_seconds,
                                                     stop)),
                         stop.set)


def telegram_arguments(s) -> None:
    s.add_argument("--token-env", default="TELEGRAM_TOKEN", metavar="VAR",
                   help="the environment variable holding the bot's token (default TELEGRAM_TOKEN)")
    s.add_argument("--api-url", default=None, help="a self-hosted Bot API server's base URL (default: Telegram's)")
    s.add_argument("--allow", type=int, action="append", default=[], metavar="CHAT_ID",
                   help="answer only this chat (repeatable); others get a polite refusal")
    s.add_argument("--system", default=None, help="the system prompt of a new chat (/system changes it per chat)")
    s.add_argument("--db", default=None, help="the SQLite file of the conversations (default: RUN/telegram.sqlite)")
    s.add_argument("--slots", type=int, default=16, help="replies generated at once (continuous batching)")
    s.add_argument("--update-seconds", type=float, default=1.0,
                   help="show a growing reply at most this often (Telegram limits edits)")


def serve_arguments(s) -> None:
    s.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000)
    key = s.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 routes")
    key.add_argument("--api-key-env", default=None, metavar="VAR", help="the same, the key read from this "
                                                                       "environment variable")
    s.add_argument("--model-name", default=None, help="the model's id in the API (default: the run folder's name)")
    s.add_argument("--slots", type=int, default=16, help="sequences decoded at once (continuous batching)")
    s.add_argument("--max-waiting", type=int, default=64, help="requests that may wait for a slot before the "
                                                              "server answers 503")
    s.add_argument("--keep-alive", type=float, default=10.0, metavar="SECONDS",
                   help="send a keep-alive comment on a stream that has waited this long for a token")


# ---- options: each a function that adds its arguments to a subcommand's parser ------------------------
def sets_option(s, what="any ModelConfig or TrainConfig field, e.g. --set n_layer=4 --set lr=3e-4") -> None:
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=what)


def device_options(s) -> None:
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    s.add_argument("--dtype", default="auto",
                   help="auto (bf16 on CUDA, and on a CPU with native bf16, avx512_bf16 or AMX, except for serve "
                        "and telegram; else fp32; the SAMOVAR_DTYPE environment variable says what auto means), "
                        "fp32, bf16, fp16; bf16 is ~100x slower than fp32 on CPUs without native bf16")


def decode_options(s) -> None:
    s.add_argument("--quantize", choices=["int8", "int8wo"], default=None,
                   help="int8: int8 Linear weights run by FBGEMM (CPU, float32 model), about 2.5x faster decoding "
                        "of a 51M model with a large vocabulary; int8wo: weight-only int8, for --compile (the "
                        "fastest decoding on a CPU with AVX-512; slow without compiling). `samovar eval --quantize KIND` shows the "
                        "perplexity cost")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode through the compiled one-token step (compiling takes up to half a minute the first "
                        "time, seconds later). Default: yes for chat, serve and telegram; for generate when "
                        f"--max-tokens is at least {COMPILE_PAYS:,}; no for eval and compare. Mixtures of experts and "
                        "the lstm-seq2seq baseline decode eagerly")


def sampling_options(s) -> None:
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--min-p", type=float, default=None, help="keep tokens at least this share as likely as the likeliest")
    s.add_argument("--repetition-penalty", type=float, default=None,
                   help="HF's: divide the logit of every token already in the text by this (e.g. 1.2)")
    s.add_argument("--frequency-penalty", type=float, default=None,
                   help="OpenAI's: lower a token's logit by this times its count in the reply so far")
    s.add_argument("--presence-penalty", type=float, default=None,
                   help="OpenAI's: lower a token's logit by this once it is in the reply")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the text before this string (repeatable)")
    s.add_argument("--seed", type=int, default=None)


def sampling_of(args) -> dict:
    """The sampling options of a command's arguments (None: the default)."""
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                stop=tuple(args.stop), seed=args.seed)


def prompt_options(s) -> None:
    s.add_argument("--prompt", default="", help="the text to continue (printed first, then its continuation)")
    s.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    s.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")


def eval_options(s) -> None:
    s.add_argument("--data", required=True, help="a text file or folder (held-out text, QA or dialogues), "
                                                 "or a prepared data folder (its held-out tail, or its "
                                                 "validation conversations)")
    s.add_argument("--task", default="auto", choices=["auto", "lm", "qa", "dialogue", "chat"],
                   help="qa and dialogue add BLEU/chrF of generated answers; chat scores each conversation's "
                        "last assistant turn; auto detects the format")
    s.add_argument("--max-examples", type=int, default=100, help="answers to generate for BLEU/chrF")
    s.add_argument("--max-tokens", type=int, default=None, help="evaluate the loss on the first N tokens only")


def chat_arguments(s) -> None:
    s.add_argument("--system", default=None, help="the system prompt")


def run_argument(s) -> None:
    s.add_argument("run", help="a run folder or a checkpoint folder")


def prepare_arguments(s) -> None:
    s.add_argument("inputs", nargs="+", help="text files, folders of them, or JSONL files")
    s.add_argument("--tokenizer", default="char",
                   help="char, word or bpe (trained on the inputs), or a path to a tokenizer.json")
    s.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for word and bpe")
    s.add_argument("--out", help="output folder (required unless --dry-run)")
    s.add_argument("--val-fraction", type=float, default=0.1, help="share of tokens held out (the tail)")
    s.add_argument("--context-len", type=int, default=None, help="fail unless each split holds a context")
    s.add_argument("--no-special-tokens", action="store_true", help="no bos/eos/pad (a pure char vocabulary)")
    s.add_argument("--pairs", choices=["qa", "dialogue"], default=None,
                   help="prompt/answer pairs of plain text (T:/Q:/A: blocks or '- ' dialogues) for objective=sft")
    s.add_argument("--chat", metavar="FORMAT", default=None,
                   help="conversations for objective=sft, rendered with the chat template (the tokenizer gains "
                        "its role tokens): openai or sharegpt JSONL, columns (CSV/Parquet), a telegram export "
                        "(result.json), '- ' dialogues, qa (T:/Q:/A:); auto tells them apart")
    s.add_argument("--strict", action="store_true", help="refuse a malformed line or row instead of skipping it")
    s.add_argument("--question-column", default="question", help="--chat columns: the question column")
    s.add_argument("--answer-column", default="answer", help="--chat columns: the answer column")
    s.add_argument("--assistant", default=None, help="--chat telegram: the sender (name or id) who is the assistant")
    s.add_argument("--gap-hours", type=float, default=4.0,
                   help="--chat telegram: a longer silence starts a new conversation")
    s.add_argument("--no-clean", action="store_true", help="--chat: keep the text as it is (no cleaning)")
    s.add_argument("--keep", action="append", default=[], metavar="RULE",
                   help="--chat: do not apply this cleaning rule (forwarded, html, email, url, mention, hashtag, "
                        "phone, date, repeats, whitespace); repeatable")
    s.add_argument("--near-duplicates", type=float, default=0.9, metavar="T",
                   help="--chat: drop conversations whose MinHash similarity to a kept one reaches T (0: keep them)")
    s.add_argument("--dry-run", action="store_true",
                   help="--chat: print what cleaning would change, with examples, and write nothing")
    s.add_argument("--workers", type=int, default=None,
                   help="processes tokenizing plain text into shards (default: one per core)")
    s.add_argument("--shard-mb", type=float, default=16, help="megabytes of text a token shard holds (about)")
    s.add_argument("--tokenizer-sample-mb", type=float, default=100,
                   help="train the tokenizer on a sample of this many megabytes (all of a smaller corpus)")
    s.add_argument("--preference", action="store_true",
                   help="JSONL preference pairs (prompt, chosen, rejected: TRL's format) for objective=dpo, rendered "
                        "with the chat template of --tokenizer RUN/tokenizer.json")


def data_arguments(s) -> None:
    stages = s.add_subparsers(dest="stage", required=True, metavar="STAGE")
    i = stages.add_parser("ingest", help="text, JSONL, Parquet and CSV files (also .gz, .zst) -> normalised "
                                         "documents in sharded Parquet, with counts of what was dropped and why")
    i.add_argument("inputs", nargs="+", help="files and folders")
    i.add_argument("--out", required=True, help="the folder of shards to write (a killed run continues there)")
    i.add_argument("--field", default="text", help="the JSONL field, or Parquet / CSV column, holding the text")
    i.add_argument("--min-chars", type=int, default=32, help="drop shorter documents")
    i.add_argument("--min-letters", type=float, default=0.5,
                   help="drop documents with a smaller share of letters among their non-space characters")
    i.add_argument("--shard-mb", type=float, default=64, help="megabytes of text a shard holds (about)")
    d = stages.add_parser("dedup", help="drop exact duplicates and near duplicates (MinHash LSH, then the exact "
                                        "Jaccard of each candidate pair) of an ingested corpus")
    d.add_argument("folder", help="a folder of Parquet shards (the output of `samovar data ingest`)")
    d.add_argument("--out", required=True, help="the folder to write the kept documents to")
    d.add_argument("--threshold", type=float, default=0.8, help="the Jaccard similarity of word shingles from "
                                                                "which a document is a near duplicate")
    d.add_argument("--shingle", type=int, default=5, help="words in a shingle")
    d.add_argument("--bands", type=int, default=14, help="LSH bands (FineWeb's 14 x 8 by default)")
    d.add_argument("--rows", type=int, default=8, help="MinHash values in a band")
    d.add_argument("--seed", type=int, default=0, help="the hash functions' seed")
    d.add_argument("--workers", type=int, default=None, help="processes hashing shards (default: one per core)")


def filter_arguments(s) -> None:
    actions = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = actions.add_parser("train", help="train a quality classifier from a few dozen labelled examples")
    t.add_argument("--positive", required=True, help="examples to keep: one a line (.txt) or JSONL with \"text\"")
    t.add_argument("--negative", required=True, help="examples to drop, in the same form")
    t.add_argument("--out", required=True, help="the filter folder to write")
    t.add_argument("--kind", default="ngram", choices=["setfit", "ngram"],
                   help="setfit: the all-MiniLM-L6-v2 encoder fine-tuned (English); ngram: character n-grams "
                        "(any language, e.g. Russian; no encoder)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--iterations", type=int, default=20,
                   help="setfit: contrastive pairs made per example (SetFit's default; fewer trains faster)")
    a = actions.add_parser("apply", help="keep the documents of an ingested corpus that the filter scores high")
    a.add_argument("filter", help="a folder made by `samovar filter train`")
    a.add_argument("folder", help="a folder of Parquet shards (from `samovar data ingest` or `dedup`)")
    a.add_argument("--out", required=True, help="the folder to write the kept documents to")
    a.add_argument("--threshold", type=float, default=0.5, help="keep documents scoring at or above this")
    a.add_argument("--workers", type=int, default=None,
                   help="processes scoring shards (default: one per core for ngram, one for setfit)")


def train_arguments(s) -> None:
    s.add_argument("--preset", help="a model preset (see `samovar presets`)")
    s.add_argument("--data", help="a folder made by `samovar prepare`")
    s.add_argument("--out", help="the run folder to write")
    s.add_argument("--config", help="a TOML or YAML file of settings (preset, data, out, fields), or the name "
                                    "of a packaged recipe (e.g. shakespeare-char)")
    s.add_argument("--resume", metavar="RUN",
                   help="continue RUN from its latest complete checkpoint, with its own settings and data "
                        "(--set changes training settings only; max_seconds counts the whole run's training "
                        "time, earlier sessions included)")
    s.add_argument("--init-from", metavar="RUN",
                   help="start from the weights and config of RUN (fine-tuning; prepare the data with "
                        "--tokenizer RUN/tokenizer.json)")


def compare_arguments(s) -> None:
    s.add_argument("runs", nargs="+", help="run or checkpoint folders")
    eval_options(s)
    s.add_argument("--out", default="compare.png", help="the bar chart to write")
    s.add_argument("--json", default=None, help="also write the results to this JSON file")


def eval_arguments(s) -> None:
    eval_options(s)
    s.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    s.add_argument("--json", action="store_true", help="print the results as JSON")


def runs_arguments(s) -> None:
    s.add_argument("folder", nargs="?", default="runs")


def plot_arguments(s) -> None:
    s.add_argument("runs", nargs="+", help="run folders")
    s.add_argument("--out", default="runs.png", help="the PNG to write")


def import_arguments(s) -> None:
    s.add_argument("folder", help="a folder with config.json and model.safetensors (or pytorch_model.bin), "
                                  "a .gguf file, or a peft LoRA adapter folder (with --base)")
    s.add_argument("--base", help="for a peft adapter: the samovar checkpoint of its base model")
    s.add_argument("--out", required=True, help="the checkpoint folder to write")


def merge_lora_arguments(s) -> None:
    s.add_argument("--out", required=True, help="the checkpoint folder to write, with the adapters folded in")


def export_arguments(s) -> None:
    s.add_argument("--format", default="hf", choices=["hf", "gguf"],
                   help="hf: transformers' from_pretrained layout (a folder); gguf: one file llama.cpp loads")
    s.add_argument("--out", required=True, help="the folder (hf) or the .gguf file to write")
    s.add_argument("--type", default="f32", choices=["f32", "f16", "bf16", "q8_0"], help="gguf: the matrices' type")


def speedrun_arguments(s) -> None:
    s.add_argument("--recipe", default="speedrun-shakespeare-char", help="a recipe file or packaged recipe name")
    s.add_argument("--data", help="tinyshakespeare's input.txt (default: ../shared/data/tinyshakespeare/input.txt)")
    s.add_argument("--budget-seconds", type=float, default=None,
                   help="train until this many seconds after start (the schedule follows the clock)")
    s.add_argument("--target-loss", type=float, default=1.88)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--out", default="runs/speedrun")
    s.add_argument("--device", default="auto")
    s.add_argument("--progress", action="store_true", help="show the progress bar")


def demo_arguments(s) -> None:
    s.add_argument("--minutes", type=float, default=8.0, help="training budget in minutes")
    s.add_argument("--preset", default=None, help="the model preset (default: the demo recipe's, char-small)")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--prompt", default="ROMEO.\n")
    s.add_argument("--max-tokens", type=int, default=600)
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")


# name, function, help, options
COMMANDS = [
    ("presets", cmd_presets, "list the model presets with their parameter counts", ()),
    ("prepare", cmd_prepare, "tokenize text files, or an ingested corpus, into token shards (in parallel)", (prepare_arguments,)),
    ("data", cmd_data, "the corpus pipeline's stages: ingest, dedup", (data_arguments,)),
    ("filter", cmd_filter, "a quality filter: train it on labelled examples, apply it to a corpus",
     (filter_arguments,)),
    ("train", cmd_train, "train a model on prepared data", (train_arguments, sets_option)),
    ("generate", cmd_generate, "generate text from a trained run (prints the prompt, then its continuation)",
     (run_argument, prompt_options, sampling_options, device_options, decode_options)),
    ("chat", cmd_chat, "chat in the terminal with a model fine-tuned on conversations (it keeps the conversation)",
     (run_argument, chat_arguments, sampling_options, device_options, decode_options)),
    ("eval", cmd_eval, "loss, perplexity, bits per byte, BLEU/chrF and latency of a run",
     (run_argument, eval_arguments, device_options, decode_options)),
    ("compare", cmd_compare, "evaluate several runs on the same data: a table and a bar chart",
     (compare_arguments, device_options, decode_options)),
    ("runs", cmd_runs, "list the runs under a folder with their best val loss, steps and tokens", (runs_arguments,)),
    ("plot", cmd_plot, "draw several runs' loss curves on one chart", (plot_arguments,)),
    ("import", cmd_import, "import a local HuggingFace model folder as a samovar checkpoint", (import_arguments,)),
    ("export", cmd_export, "export a run as a HuggingFace model folder (a LoRA run's adapters in peft's format)",
     (run_argument, export_arguments)),
    ("merge-lora", cmd_merge_lora, "fold a LoRA run's adapters into its base's weights: a full checkpoint",
     (run_argument, merge_lora_arguments)),
    ("speedrun", cmd_speedrun, "time a recipe to a whole-split val loss on char-level Shakespeare",
     (speedrun_arguments, lambda s: sets_option(s, "override a recipe field"))),
    ("serve", cmd_serve, "serve a run over an OpenAI-compatible HTTP API, with a web chat page at /",
     (run_argument, serve_arguments, device_options, decode_options)),
    ("telegram", cmd_telegram, "answer in Telegram: a bot that remembers each chat's conversation",
     (run_argument, telegram_arguments, sampling_options, device_options, decode_options)),
    ("demo", cmd_demo, "download Shakespeare, train a small model, print a sample",
     (demo_arguments, lambda s: sets_option(s, "change a model or training setting of the demo"))),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="samovar", description="Brew your own language model from scratch.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, func, help, options in COMMANDS:
        s = sub.add_parser(name, help=help)
        for add in options:
            add(s)
        s.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quantize", None) == "int8wo" and not compile_wanted(args):
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
