"""Recipes (recipes.py): configs from a preset, a file and --set; packaged recipe files; and the demo
and the speedrun working from an installed samovar, outside the source checkout."""

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from samovar.config import ConfigError
from samovar.recipes import build_configs, packaged_recipes, read_config_file, recipe_file

from conftest import ROOT, shared_file


def test_packaged_recipes_are_found_by_name_and_by_the_readme_path(tmp_path):
    names = set(packaged_recipes())
    assert {"demo", "speedrun-shakespeare-char", "shakespeare-char", "nanogpt-shakespeare-char-cpu"} <= names
    assert recipe_file("speedrun-shakespeare-char") == recipe_file("recipes/speedrun-shakespeare-char.toml")
    own = tmp_path / "demo.toml"  # a file of the user's own comes first
    own.write_text('preset = "gpt2-tiny"\n')
    assert read_config_file(own) == {"preset": "gpt2-tiny"}
    with pytest.raises(ConfigError, match="does not exist.*packaged recipes: .*speedrun-shakespeare-char"):
        recipe_file(tmp_path / "nope.toml")


def test_file_then_sets_override_the_preset_and_typos_are_named():
    model, train = build_configs("gpt2-tiny", {"n_layer": 3, "lr": 0.01}, {"lr": "0.02"}, data_vocab=70)
    assert (model.n_layer, model.vocab_size, train.lr) == (3, 70, 0.02)
    with pytest.raises(ConfigError, match="unknown key 'max_step': did you mean max_steps"):
        build_configs("gpt2-tiny", {}, {"max_step": "5"}, data_vocab=None)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install .` into a fresh virtual environment outside the checkout. Its dependencies (torch,
    ...) come from the test's own environment through a .pth line, so no wheel is downloaded; the
    checkout's editable install is not visible there (its .pth files are not read)."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                             "--no-build-isolation", "--ignore-installed", str(ROOT)],
                            capture_output=True, text=True, cwd=venv, timeout=300)
    assert result.returncode == 0, result.stderr
    return venv


def run_installed(venv: Path, cwd: Path, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "samovar"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, **env})


def test_installed_samovar_is_not_the_checkout(installed, tmp_path):
    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import samovar; print(samovar.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path).stdout.strip()
    assert where.startswith(str(installed)) and not where.startswith(str(ROOT))


def test_installed_speedrun_runs_on_a_given_corpus(installed, tmp_path):
    (tmp_path / "input.txt").write_bytes(shared_file("tinyshakespeare/input.txt").read_bytes())
    result = run_installed(installed, tmp_path, "speedrun", "--data", "input.txt", "--set", "max_steps=20",
                           "--set", "warmup_steps=2", "--target-loss", "3.5")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"time_to_target_s=\S+ final_val_loss=\S+", result.stdout.strip().splitlines()[-1])
    assert (tmp_path / "runs" / "speedrun" / "run" / "checkpoints").is_dir()


def test_installed_demo_trains_and_samples(installed, tmp_path):
    result = run_installed(installed, tmp_path, "demo", "--minutes", "0.05", "--max-tokens", "40",
                           "--set", "eval_interval=10", SAMOVAR_CACHE=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    sample = result.stdout.split("-" * 72)[1]
    assert sample.strip().startswith("ROMEO.") and (tmp_path / "runs" / "demo" / "run" / "metrics.csv").exists()
