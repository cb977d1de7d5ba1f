"""Recipes: a preset, then a TOML/YAML file of settings, then --set values, made into a ModelConfig
and a TrainConfig; the recipe files that ship inside the package (`samovar/recipes/*.toml`); and
the two recipes that are commands of their own, the demo and the speedrun, as library functions.

    from samovar.recipes import demo, speedrun
    demo(minutes=2)                                    # prepare, train, sample
    speedrun(data="tinyshakespeare/input.txt")         # time to a whole-split val loss of 1.88
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
import shutil
import time
from pathlib import Path

from .config import ConfigError, ModelConfig, format_count, get_preset, parse_field_value, unknown_key
from .train import TrainConfig, Trainer

MODEL_KEYS = set(ModelConfig.__dataclass_fields__)
TRAIN_KEYS = set(TrainConfig.__dataclass_fields__)
SPEEDRUN_CORPUS = Path("..") / "shared" / "data" / "tinyshakespeare" / "input.txt"  # beside a checkout


def packaged_recipes() -> dict[str, Path]:
    """The recipe files shipped with samovar, by name (file name without .toml)."""
    folder = importlib.resources.files("samovar") / "recipes"
    return {Path(f.name).stem: Path(str(f)) for f in folder.iterdir() if f.name.endswith(".toml")}


def recipe_file(name: str | Path) -> Path:
    """A recipe file: `name` itself when it exists, else the packaged recipe of that name
    (`speedrun-shakespeare-char`, or `recipes/speedrun-shakespeare-char.toml` as the README writes it)."""
    path = Path(name)
    if path.exists():
        return path
    packaged = packaged_recipes()
    if path.stem in packaged:
        return packaged[path.stem]
    raise ConfigError(f"config file {path} does not exist (packaged recipes: {', '.join(sorted(packaged))})")


def read_config_file(path: str | Path) -> dict:
    """A flat TOML or YAML mapping (sections [model] and [train] are merged in)."""
    file = recipe_file(path)
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
    """--set key=value pairs as a dict of strings."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set takes key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def build_configs(preset: str | None, file_values: dict, sets: dict, data_vocab: int | None,
                  base: ModelConfig | None = None, train_base: TrainConfig | None = None
                  ) -> tuple[ModelConfig, TrainConfig]:
    """ModelConfig and TrainConfig from a preset (or `base`, the config of --init-from or --resume),
    then the config file, then --set (last wins); `train_base`: the TrainConfig they change."""
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
            raise unknown_key(key, MODEL_KEYS | TRAIN_KEYS)
    if "vocab_size" not in model_changes and data_vocab is not None and \
            (base is None or data_vocab > base.vocab_size):
        model_changes["vocab_size"] = data_vocab  # the preset's shape (or a grown one's), the data's vocabulary
    return model_cfg.replace(**model_changes), (train_base or TrainConfig()).replace(**train_changes)


def resume_configs(run: str | Path, preset: str | None, file_values: dict, sets: dict
                   ) -> tuple[ModelConfig, TrainConfig, str | None]:
    """The configs and data folder a run was trained with, changed only where a config file or --set
    names a training setting. A model field cannot change on resume: that is refused by name."""
    run = Path(run)
    if not (run / "config.json").exists() or not (run / "train_config.json").exists():
        raise ConfigError(f"{run} is not a run folder (no config.json and train_config.json): nothing to resume")
    model_cfg = ModelConfig.load(run / "config.json")
    saved = json.loads((run / "train_config.json").read_text(encoding="utf-8"))
    data = saved.pop("data", None)
    saved.pop("init_from", None)  # (the Trainer reads it back itself)
    values = {**file_values, **sets}
    given = values.pop("preset", None) or preset
    if given is not None and given != model_cfg.name:
        raise ConfigError(f"{run} is a {model_cfg.name} model, not {given}: --resume continues it as it is "
                          "(leave out --preset)")
    new_model, train_cfg = build_configs(None, values, {}, None, base=model_cfg,
                                         train_base=TrainConfig.from_dict(saved))
    for name in ModelConfig.__dataclass_fields__:
        old, new = getattr(model_cfg, name), getattr(new_model, name)
        if old != new:
            raise ConfigError(f"--resume {run}: the model's {name} cannot change ({old} -> {new}); "
                              f"start a new run with --init-from {run} instead")
    return model_cfg, train_cfg, data


def new_folder(path: str | Path) -> Path:
    """`path`, or, when that exists, the first of path-2, path-3, ... that does not: a new run never
    replaces an old one."""
    path = Path(path)
    n = 2
    found = path
    while found.exists():
        found = path.with_name(f"{path.name}-{n}")
        n += 1
    return found


# ---- the demo ----------------------------------------------------------------------------------------
def demo(minutes: float = 8.0, preset: str | None = None, out: str | Path = "runs/demo",
         prompt: str = "ROMEO.\n", max_tokens: int = 600, sets: dict | None = None, device: str = "auto",
         say=print) -> str:
    """Download Shakespeare's plays (once), prepare them char-level, train the demo recipe for
    `minutes`, and return a sample; `say` reports each stage."""
    from .api import generate, load
    from .data import prepare
    from .data.shakespeare import shakespeare_corpus

    if minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {minutes}")
    out = Path(out)
    t0 = time.time()
    plays = shakespeare_corpus()
    say(f"corpus: {len(list(plays.glob('*.txt')))} plays in {plays}")
    meta = prepare([plays], out / "data", tokenizer="char")
    say(f"prepared {meta['train_tokens']:,} train / {meta['val_tokens']:,} val characters "
        f"({meta['vocab_size']} symbols) in {time.time() - t0:.0f}s")
    run = new_folder(out / "run")  # an earlier demo's run is kept
    recipe = read_config_file("demo")
    recipe.update({"max_seconds": minutes * 60, "device": device, **({"preset": preset} if preset else {})})
    model_cfg, train_cfg = build_configs(None, recipe, sets or {}, meta["vocab_size"])
    trainer = Trainer(model_cfg, train_cfg, out / "data", run)
    say(f"training {model_cfg.name} ({format_count(trainer.model.num_params())} parameters) "
        f"for {minutes:g} minutes on {trainer.device} ...")
    result = trainer.train()
    say(f"trained {result['step']} steps, val loss {result['val_loss']:.3f}; "
        f"run folder {run} (try: samovar generate {run} --prompt 'ROMEO.' --stream)\n")
    model, tokenizer = load(run, device=device)
    return prompt + generate(model, tokenizer, prompt, max_tokens=max_tokens, temperature=0.8, top_k=40, seed=0)


# ---- the speedrun ------------------------------------------------------------------------------------
def process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED_AT


_IMPORTED_AT = time.time()


def speedrun(recipe: str | Path = "speedrun-shakespeare-char", data: str | Path | None = None,
             budget_seconds: float | None = None, target_loss: float = 1.88, seed: int | None = None,
             out: str | Path = "runs/speedrun", sets: dict | None = None, device: str = "auto",
             progress: bool = False) -> dict:
    """Train `recipe` on tinyshakespeare's input.txt and time it, from process start, to a whole-split
    val loss of `target_loss` (or, with budget_seconds, train until then). Returns the result with
    time_to_target_s (inf when the target was not reached) and reached_step."""
    from .data import prepare

    values = read_config_file(recipe)
    corpus = Path(data) if data is not None else SPEEDRUN_CORPUS
    if not corpus.exists():
        raise ConfigError(f"corpus {corpus} does not exist; give --data path/to/tinyshakespeare/input.txt")
    out = Path(out)
    shutil.rmtree(out / "data", ignore_errors=True)  # prepared again: the race times it
    run = new_folder(out / "run")  # an earlier race's run is kept
    meta = prepare([corpus], out / "data", tokenizer="char", special_tokens=())  # nanoGPT's split and vocab
    sets = dict(sets or {})
    sets.update({"full_val_eval": "true", "plot": "false", "device": device})
    sets.setdefault("peak_flops", "0")  # no MFU: measuring the matmul peak would cost 0.3 s of the race
    if seed is not None:
        sets["seed"] = str(seed)
    model_cfg, train_cfg = build_configs(None, values, sets, meta["vocab_size"])
    if budget_seconds is not None:
        reserve = 2.0  # the final whole-split evaluation and the last checkpoint
        train_cfg = train_cfg.replace(max_steps=10**9, max_seconds=max(1.0, budget_seconds - process_age() - reserve))
    trainer = Trainer(model_cfg, train_cfg, out / "data", run, progress=progress)
    reached = {}

    def on_eval(step: int, losses: dict) -> None:
        if "time" not in reached and losses["val"] <= target_loss:
            reached.update(time=process_age(), step=step)

    trainer.eval_hook = on_eval
    result = trainer.train()
    return {**result, "params": trainer.model.num_params(), "age_s": process_age(), "run": str(run),
            "time_to_target_s": reached.get("time", math.inf), "reached_step": reached.get("step")}
