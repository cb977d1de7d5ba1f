"""The `samovar` command end to end, in real subprocesses."""

import json

import pytest

from conftest import ROOT, run_cli


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("samovar: error:"), result.stderr
    assert fragment in lines[0]


def test_presets_lists_families_and_counts():
    result = run_cli("presets")
    assert result.returncode == 0
    by_name = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert {"gpt1", "gpt2", "gpt2-124m", "llama", "deepseek-60m", "gpt-mini-char"} <= set(by_name)
    assert "124M" in by_name["gpt2-124m"] and "10.8M" in by_name["gpt-mini-char"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, small_text):
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(small_text, encoding="utf-8")
    result = run_cli("prepare", root / "corpus.txt", "--tokenizer", "char", "--out", root / "data")
    assert result.returncode == 0, result.stderr
    (root / "run.toml").write_text('preset = "gpt2-tiny"\n[train]\nbatch_size = 4\neval_steps = 2\n')
    result = run_cli("train", "--config", root / "run.toml", "--data", root / "data", "--out", root / "run",
                     "--set", "max_steps=20", "--set", "eval_interval=10", "--set", "context_len=32",
                     "--set", "n_layer=1", "--set", "device=cpu", "--set", "seed=5")
    assert result.returncode == 0, result.stderr
    return root


def test_prepare_and_train_write_their_folders(cli_run):
    meta = json.loads((cli_run / "data" / "meta.json").read_text())
    assert meta["tokenizer"] == "char" and meta["train_tokens"] > 0
    config = json.loads((cli_run / "run" / "config.json").read_text())
    assert (config["n_layer"], config["context_len"], config["vocab_size"]) == (1, 32, meta["vocab_size"])
    train_config = json.loads((cli_run / "run" / "train_config.json").read_text())
    assert (train_config["batch_size"], train_config["max_steps"], train_config["seed"]) == (4, 20, 5)
    assert (cli_run / "run" / "metrics.csv").exists() and (cli_run / "run" / "loss.png").exists()


def test_generate_is_reproducible_and_streams(cli_run):
    args = ("generate", cli_run / "run", "--prompt", "ROMEO", "--max-tokens", "30", "--seed", "3",
            "--temperature", "1.0", "--top-k", "20", "--top-p", "0.95", "--device", "cpu")
    a, b, streamed = run_cli(*args), run_cli(*args), run_cli(*args, "--stream")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout == streamed.stdout
    assert a.stdout.startswith("ROMEO") and len(a.stdout) > len("ROMEO") + 5
    greedy = run_cli("generate", cli_run / "run", "--prompt", "ROMEO", "--temperature", "0", "--max-tokens", "10")
    assert greedy.returncode == 0 and greedy.stdout.startswith("ROMEO")


def test_compiled_and_int8_decoding_from_the_command_line(cli_run):
    base = ("generate", cli_run / "run", "--prompt", "ROMEO", "--temperature", "0", "--max-tokens", "20")
    eager, compiled, int8 = run_cli(*base), run_cli(*base, "--compile"), run_cli(*base, "--quantize", "int8")
    int8wo = run_cli(*base, "--quantize", "int8wo", "--compile")
    assert eager.returncode == compiled.returncode == int8.returncode == int8wo.returncode == 0, (
        compiled.stderr + int8.stderr + int8wo.stderr)
    assert compiled.stdout == eager.stdout and int8.stdout.startswith("ROMEO") and int8wo.stdout.startswith("ROMEO")
    assert_one_line_error(run_cli(*base, "--compile", "--quantize", "int8"), "int8wo (weight-only int8) compiles")
    ev = [json.loads(run_cli("eval", cli_run / "run", "--data", cli_run / "corpus.txt", "--no-latency", "--json",
                             *extra).stdout) for extra in ((), ("--quantize", "int8"), ("--quantize", "int8wo"))]
    slow = run_cli(*base, "--quantize", "int8wo")  # works, and says it is the slow way
    assert slow.returncode == 0 and slow.stdout.startswith("ROMEO") and "fast with --compile" in slow.stderr
    assert "int8wo" not in int8wo.stderr
    for quantized in ev[1:]:
        assert quantized["perplexity"] != ev[0]["perplexity"]
        assert abs(quantized["perplexity"] / ev[0]["perplexity"] - 1) < 0.05


def test_resume_of_a_finished_run_extends_it(cli_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cli_run / "run", run)
    result = run_cli("train", "--config", cli_run / "run.toml", "--data", cli_run / "data", "--resume", run,
                     "--set", "max_steps=30", "--set", "eval_interval=10", "--set", "context_len=32",
                     "--set", "n_layer=1", "--set", "device=cpu", "--set", "seed=5")
    assert result.returncode == 0, result.stderr
    assert "resuming at step 20" in result.stdout
    assert (run / "checkpoints" / "step-0000030").exists()


@pytest.mark.parametrize("args, fragment", [
    (("train", "--preset", "gpt7", "--data", "{data}", "--out", "{tmp}/r"), "unknown preset 'gpt7'"),
    (("train", "--preset", "gpt2-tiny", "--data", "{data}", "--out", "{tmp}/r", "--set", "n_layerz=2"),
     "unknown key 'n_layerz'"),
    (("train", "--preset", "gpt2-tiny", "--data", "{data}", "--out", "{tmp}/r", "--set", "lr=fast"),
     "lr='fast' is not a valid float"),
    (("train", "--preset", "gpt2-tiny", "--data", "{tmp}/nothing", "--out", "{tmp}/r"), "does not exist"),
    (("train", "--preset", "gpt2-tiny", "--data", "{data}", "--out", "{tmp}/r", "--set", "context_len=100000"),
     "fewer than one context"),
    (("train", "--preset", "gpt2-tiny", "--data", "{data}", "--out", "{tmp}/r", "--set", "vocab_size=10"),
     "more than the model's vocab_size=10"),
    (("train", "--preset", "gpt2-tiny", "--data", "{data}", "--out", "{tmp}/r", "--config", "{tmp}/none.toml"),
     "does not exist"),
    (("generate", "{tmp}/no-run", "--prompt", "x"), "does not exist"),
    (("generate", "{run}", "--prompt", "x", "--temperature", "-1"), "temperature must be >= 0"),
    (("generate", "{run}", "--prompt", "x" * 40), "more than the model's context of 32"),
    (("generate", "{run}", "--prompt", "x", "--device", "cuda"), "no CUDA GPU"),
    (("prepare", "{tmp}/missing.txt", "--out", "{tmp}/d"), "does not exist"),
    (("prepare", "{tmp}/latin1.txt", "--out", "{tmp}/d"), "is not UTF-8"),
    (("prepare", "{tmp}/empty.txt", "--out", "{tmp}/d"), "the corpus is empty"),
])
def test_bad_inputs_get_one_error_line(cli_run, tmp_path, args, fragment):
    (tmp_path / "latin1.txt").write_bytes("café olé".encode("latin-1") * 100)
    (tmp_path / "empty.txt").write_text("")
    subs = {"{data}": str(cli_run / "data"), "{tmp}": str(tmp_path), "{run}": str(cli_run / "run")}
    filled = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        filled.append(a)
    assert_one_line_error(run_cli(*filled), fragment)


def test_corrupted_checkpoint_is_refused(cli_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cli_run / "run", run)
    last = sorted((run / "checkpoints").iterdir())[-1]
    data = (last / "model.safetensors").read_bytes()
    (last / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("generate", run, "--prompt", "x"), "cannot read weights")
    (last / "config.json").write_text("{oops")
    assert_one_line_error(run_cli("generate", run, "--prompt", "x"), "cannot read model config")


def test_import_generate_finetune_export(tmp_path, small_text):
    """The README's interop path: a local HF model in, generation, fine-tuning, and back out."""
    transformers = pytest.importorskip("transformers")
    from samovar.tokenizer import Tokenizer

    tok = Tokenizer.train("bpe", [small_text], vocab_size=400)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf" / "tokenizer.json")

    result = run_cli("import", tmp_path / "hf", "--out", tmp_path / "imported")
    assert result.returncode == 0, result.stderr
    assert "llama" in result.stdout
    result = run_cli("generate", tmp_path / "imported", "--prompt", "ROMEO", "--max-tokens", "5", "--temperature", "0")
    assert result.returncode == 0 and result.stdout.startswith("ROMEO")

    (tmp_path / "corpus.txt").write_text(small_text)
    result = run_cli("prepare", tmp_path / "corpus.txt", "--tokenizer", tmp_path / "imported" / "tokenizer.json",
                     "--out", tmp_path / "data")
    assert result.returncode == 0, result.stderr
    result = run_cli("train", "--init-from", tmp_path / "imported", "--data", tmp_path / "data",
                     "--out", tmp_path / "tuned", "--set", "max_steps=10", "--set", "eval_interval=5",
                     "--set", "batch_size=2", "--set", "eval_steps=2", "--set", "device=cpu")
    assert result.returncode == 0, result.stderr
    result = run_cli("export", tmp_path / "tuned", "--format", "hf", "--out", tmp_path / "export")
    assert result.returncode == 0, result.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert type(model).__name__ == "LlamaForCausalLM"

    bad = run_cli("train", "--init-from", tmp_path / "imported", "--data", tmp_path / "data",
                  "--out", tmp_path / "bad", "--set", "n_layer=3")
    assert_one_line_error(bad, "the model's n_layer cannot change")
    assert_one_line_error(run_cli("import", tmp_path / "data", "--out", tmp_path / "x"), "no config.json")


def test_runs_lists_and_plot_draws(cli_run, tmp_path):
    result = run_cli("runs", cli_run)
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith(str(cli_run / "run")))
    assert " 20 " in line and "2,560" in line  # 20 steps of 4 x 32 tokens
    out = tmp_path / "both.png"
    result = run_cli("plot", cli_run / "run", cli_run / "run", "--out", out)
    assert result.returncode == 0 and out.read_bytes()[:4] == b"\x89PNG"
    assert_one_line_error(run_cli("plot", tmp_path, "--out", out), "not a run folder")


def test_yaml_config_and_bad_config_files(cli_run, tmp_path):
    (tmp_path / "run.yaml").write_text("preset: gpt2-tiny\nmodel:\n  n_layer: 1\n  context_len: 32\n"
                                       "train:\n  max_steps: 4\n  eval_interval: 2\n  eval_steps: 1\n  batch_size: 2\n")
    result = run_cli("train", "--config", tmp_path / "run.yaml", "--data", cli_run / "data", "--out", tmp_path / "r",
                     "--set", "max_steps=6")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "r" / "train_config.json").read_text())["max_steps"] == 6  # --set wins
    (tmp_path / "bad.toml").write_text("preset = [unclosed\n")
    assert_one_line_error(run_cli("train", "--config", tmp_path / "bad.toml", "--data", cli_run / "data",
                                  "--out", tmp_path / "r2"), "cannot parse")
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    assert_one_line_error(run_cli("train", "--config", tmp_path / "bad.yaml", "--data", cli_run / "data",
                                  "--out", tmp_path / "r3"), "cannot parse")


@pytest.mark.parametrize("recipe", sorted((ROOT / "src" / "samovar" / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_recipes_parse_into_valid_configs(recipe):
    from samovar.recipes import build_configs, packaged_recipes, read_config_file

    assert packaged_recipes()[recipe.stem] == recipe  # shipped inside the package

    model_cfg, train_cfg = build_configs(None, read_config_file(recipe), {}, data_vocab=65)
    assert model_cfg.vocab_size == 65 and train_cfg.max_steps > 0
