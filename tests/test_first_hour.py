"""A newcomer's first hour, the way a user types it: each thing that once went wrong, from a fresh run
folder through the real `samovar` command."""

import csv
import json
import re

import pytest
import torch

from conftest import ROOT, run_cli
from test_cli import assert_one_line_error

TINY = ("--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "context_len=32",
        "--set", "batch_size=4", "--set", "eval_steps=2", "--set", "device=cpu", "--set", "peak_flops=0",
        "--set", "plot=false")


@pytest.fixture(scope="module")
def data(tmp_path_factory, small_text):
    root = tmp_path_factory.mktemp("first_hour")
    (root / "corpus.txt").write_text(small_text, encoding="utf-8")
    assert run_cli("prepare", root / "corpus.txt", "--tokenizer", "char", "--out", root / "data").returncode == 0
    return root / "data"


def train(*args):
    result = run_cli("train", *args)
    assert result.returncode == 0, result.stderr
    return result


# ---- 1. the demo's and the speedrun's models leave samovar -------------------------------------------
@pytest.mark.parametrize("recipe", ["demo", "speedrun-shakespeare-char"])
def test_the_recipes_models_export_and_load_in_transformers(recipe, data, tmp_path):
    import transformers

    train("--config", recipe, "--data", data, "--out", tmp_path / "run", *TINY, "--set", "max_steps=3",
          "--set", "eval_interval=3")
    result = run_cli("export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert "qwen3" in result.stdout
    import samovar

    model, _ = samovar.load(tmp_path / "run", device="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), atol=1e-4, rtol=1e-4)


def test_an_inexpressible_model_names_what_stops_the_nearest_family(data, tmp_path):
    train("--preset", "llama-tiny", "--data", data, "--out", tmp_path / "run", *TINY, "--set", "max_steps=1",
          "--set", "norm=layernorm", "--set", "mlp=relu")
    result = run_cli("export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "hf")
    assert_one_line_error(result, "the nearest HF family, llama, needs norm=rmsnorm (not layernorm), "
                                  "mlp=swiglu/geglu (not relu)")
    assert len(result.stderr.strip()) < 130 and not (tmp_path / "hf").exists()


# ---- 2. --resume RUN alone ----------------------------------------------------------------------------
def test_resume_alone_continues_with_the_runs_own_settings(data, tmp_path):
    run = tmp_path / "run"
    train("--preset", "gpt2-tiny", "--data", data, "--out", run, *TINY, "--set", "dropout=0.2",
          "--set", "max_steps=6", "--set", "eval_interval=3", "--set", "lr=2e-3")
    result = train("--resume", run, "--set", "max_steps=9")
    assert "resuming at step 6" in result.stdout and "done: step 9" in result.stdout
    saved = json.loads((run / "train_config.json").read_text())
    assert (saved["max_steps"], saved["lr"], saved["batch_size"]) == (9, 2e-3, 4)
    assert json.loads((run / "config.json").read_text())["dropout"] == 0.2
    changed = run_cli("train", "--resume", run, "--set", "max_steps=12", "--set", "n_layer=2")
    assert_one_line_error(changed, "the model's n_layer cannot change (1 -> 2)")
    assert not (run / "checkpoints" / "step-0000012").exists()
    missing = run_cli("train", "--resume", tmp_path / "nothing")
    assert_one_line_error(missing, "nothing to resume")


# ---- 3. a resumed run's time budget -------------------------------------------------------------------
def test_the_time_budget_is_the_runs_total_and_says_so(data, tmp_path):
    run = tmp_path / "run"
    first = train("--preset", "gpt2-tiny", "--data", data, "--out", run, *TINY, "--set", "max_steps=100000",
                  "--set", "max_seconds=3", "--set", "eval_interval=100000")
    assert "time budget 3 s of training for the whole run" in first.stdout
    spent = json.loads((run / "train_config.json").read_text())
    state = json.loads(next((run / "checkpoints").iterdir()).joinpath("trainer_state.json").read_text())
    assert 3 <= state["elapsed_s"] < 6 and spent["max_seconds"] == 3
    refused = run_cli("train", "--resume", run, "--set", "max_seconds=2")
    assert_one_line_error(refused, "already trained")
    assert "max_seconds=" in refused.stderr
    more = train("--resume", run, "--set", "max_seconds=5")
    assert re.search(r"time budget 5 s of training for the whole run \(\d\.\d s spent, \d\.\d s left\)",
                     more.stdout)
    step_before = state["step"]
    assert int(re.search(r"done: step (\d+)", more.stdout).group(1)) > step_before


def test_a_timed_run_leaves_warmup_with_the_clock(data, tmp_path):
    run = tmp_path / "run"
    train("--preset", "gpt2-tiny", "--data", data, "--out", run, *TINY, "--set", "max_steps=100000",
          "--set", "max_seconds=3", "--set", "warmup_steps=100000", "--set", "lr=1e-3",
          "--set", "log_interval=1", "--set", "eval_interval=100000", "--set", "schedule=wsd")
    lrs = [float(r["lr"]) for r in csv.DictReader((run / "metrics.csv").open())]
    assert max(lrs) == pytest.approx(1e-3)  # warmup ended after warmup_frac of the budget, not 100,000 steps


# ---- 4. nothing a user trained is deleted ----------------------------------------------------------------
def test_a_new_run_folder_never_replaces_an_old_one(tmp_path):
    from samovar.recipes import new_folder

    assert new_folder(tmp_path / "run") == tmp_path / "run"
    (tmp_path / "run").mkdir()
    (tmp_path / "run-2").mkdir()
    assert new_folder(tmp_path / "run") == tmp_path / "run-3"


# ---- 5. runs, metrics.csv, best.txt and trainer_state.json agree -----------------------------------------
def agreement(run):
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    best = (run / "best.txt").read_text().strip()
    best_state = json.loads((run / "checkpoints" / best / "trainer_state.json").read_text())
    last = sorted((run / "checkpoints").iterdir())[-1]
    last_state = json.loads((last / "trainer_state.json").read_text())
    vals = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    listed = run_cli("runs", run.parent).stdout.splitlines()[1].split()
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)), "one row per step, in order"
    assert int(rows[-1]["step"]) == last_state["step"] and rows[-1]["val_loss"]
    assert int(rows[-1]["tokens"]) == last_state["tokens_seen"]
    assert min(vals) == pytest.approx(best_state["val_loss"], abs=1e-5)
    assert best_state["val_loss"] == pytest.approx(last_state["best_val_loss"], abs=1e-9)
    assert listed[1] == f"{last_state['step']:,}" and listed[2] == f"{last_state['tokens_seen']:,}"
    assert listed[3] == f"{last_state['best_val_loss']:.4f}"
    return last_state


@pytest.mark.parametrize("stop", ["max_steps", "max_seconds"])
def test_the_final_evaluation_is_in_every_record(stop, data, tmp_path):
    run = tmp_path / "runs" / "r"
    budget = ("--set", "max_steps=7", "--set", "eval_interval=5") if stop == "max_steps" else \
        ("--set", "max_seconds=2", "--set", "max_steps=100000", "--set", "eval_interval=40")
    train("--preset", "gpt2-tiny", "--data", data, "--out", run, *TINY, *budget, "--set", "log_interval=2")
    first = agreement(run)
    assert first["step"] == 7 or stop == "max_seconds"
    more = ("--set", f"max_steps={first['step'] + 4}") if stop == "max_steps" else ("--set", "max_seconds=3")
    train("--resume", run, *more)
    assert agreement(run)["step"] > first["step"]


def test_a_run_stopped_before_its_first_evaluation_still_has_one(data, tmp_path):
    run = tmp_path / "runs" / "r"
    train("--preset", "gpt2-tiny", "--data", data, "--out", run, *TINY, "--set", "max_steps=3",
          "--set", "eval_interval=1000", "--set", "log_interval=1000")
    assert agreement(run)["step"] == 3


# ---- 6. what the README promises, it does ------------------------------------------------------------------
def test_eval_quantize_prints_the_cost_against_the_float_model(data, tmp_path, small_text):
    run = tmp_path / "run"
    train("--preset", "gpt2-tiny", "--data", data, "--out", run, *TINY, "--set", "max_steps=20",
          "--set", "eval_interval=20", "--set", "lr=3e-3")
    (tmp_path / "heldout.txt").write_text(small_text[-3000:], encoding="utf-8")
    args = ("eval", run, "--data", tmp_path / "heldout.txt", "--no-latency", "--device", "cpu")
    plain = json.loads(run_cli(*args, "--json").stdout)
    q = run_cli(*args, "--quantize", "int8", "--json")
    assert q.returncode == 0, q.stderr
    r = json.loads(q.stdout)
    assert r["float_perplexity"] == pytest.approx(plain["perplexity"], rel=1e-6)
    assert r["perplexity_cost"] == pytest.approx(r["perplexity"] / plain["perplexity"] - 1, abs=1e-9)
    text = run_cli(*args, "--quantize", "int8").stdout
    assert "int8 costs" in text and f"{plain['perplexity']:.2f}" in text


def test_generate_says_what_it_prints_and_returns():
    import samovar

    assert "prints the prompt, then its continuation" in " ".join(run_cli("--help").stdout.split())
    assert "printed first, then its continuation" in " ".join(run_cli("generate", "--help").stdout.split())
    assert "continuation" in samovar.generate.__doc__ and "without the prompt" in samovar.generate.__doc__


def test_the_readme_family_table_lists_every_preset():
    from samovar.config import PRESETS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Model families and HuggingFace interop")[1].split("\n\n")[2]
    listed = set(re.findall(r"`([a-z0-9.\-]+)`", table))
    assert set(PRESETS) <= listed, set(PRESETS) - listed


# ---- 7. messages that help ---------------------------------------------------------------------------------
def test_a_binary_file_is_called_binary(tmp_path):
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    result = run_cli("prepare", tmp_path / "picture.png", "--out", tmp_path / "data")
    assert_one_line_error(result, "looks binary")
    assert "iconv" not in result.stderr
    (tmp_path / "cp1251.txt").write_bytes("Привет, мир".encode("cp1251"))
    assert "iconv" in run_cli("prepare", tmp_path / "cp1251.txt", "--out", tmp_path / "data").stderr


def test_presets_show_each_kind_its_own_fields():
    lines = {line.split()[0]: line for line in run_cli("presets").stdout.splitlines()[1:]}
    lstm = lines["lstm-seq2seq"]
    assert "LSTM" in lstm and "rope" not in lstm and "layernorm" not in lstm and "learned" not in lstm
    assert "rmsnorm" in lines["llama-tiny"] and "rope" in lines["llama-tiny"]


def test_an_unknown_set_key_suggests_the_nearest(data, tmp_path):
    result = run_cli("train", "--preset", "gpt2-tiny", "--data", data, "--out", tmp_path / "r", "--set", "max_step=3")
    assert_one_line_error(result, "did you mean max_steps")
