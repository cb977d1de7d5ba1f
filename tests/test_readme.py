"""The README's tour, run as written (in its order, with small budgets appended), and its Python API
snippet pasted as it is: the README cannot drift from the code."""

import os
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED_DATA

README = (ROOT / "README.md").read_text(encoding="utf-8")

# appended to each command of a kind (argparse: the last value given wins), to keep the tour small
SMALL = {
    "train": ["--set", "max_steps=6", "--set", "eval_interval=3", "--set", "eval_steps=2", "--set", "batch_size=4",
              "--set", "n_layer=1", "--set", "n_embd=64", "--set", "n_head=2", "--set", "context_len=64",
              "--set", "device=cpu", "--set", "peak_flops=0"],
    "resume": ["--set", "max_steps=9"],  # a model field cannot change on resume
    "init": ["--set", "max_steps=4", "--set", "eval_interval=4", "--set", "eval_steps=2", "--set", "batch_size=2",
             "--set", "device=cpu", "--set", "peak_flops=0"],  # nor on fine-tuning
    "chat": ["--max-tokens", "8", "--no-compile"],
    "generate": ["--max-tokens", "8"],
    "demo": ["--minutes", "0.03", "--max-tokens", "20"],
}


def block(after: str, language: str) -> str:
    """The first ```language block after the heading `after`."""
    return README.split(after, 1)[1].split(f"```{language}\n", 1)[1].split("```", 1)[0]


def commands(text: str) -> list[list[str]]:
    """The shell commands of a block: continuation lines joined, comments dropped."""
    joined = text.replace("\\\n", " ")
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def run_block(heading: str, work, env) -> list[tuple[list[str], str]]:
    """Each command of the README's first sh block under `heading`, in order, with SMALL appended."""
    ran = []
    for words in commands(block(heading, "sh")):
        given = ""
        if "|" in words:  # echo TEXT | samovar ...: TEXT on stdin
            bar = words.index("|")
            given, words = " ".join(words[1:bar]) + "\n", words[bar + 1:]
        if words[0] != "samovar":
            assert words[:2] == ["source", ".venv/bin/activate"], words
            continue
        kind = "resume" if "--resume" in words else "init" if "--init-from" in words else words[1]
        result = subprocess.run([sys.executable, "-m", *words, *SMALL.get(kind, [])], cwd=work, env=env,
                                input=given, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{shlex.join(words)}\n{result.stderr}"
        ran.append((words, result.stdout))
    return ran


@pytest.fixture(scope="module")
def toured(tmp_path_factory):
    if not (SHARED_DATA / "tinyshakespeare" / "input.txt").exists():
        pytest.skip("the tour reads ../shared/data")
    root = tmp_path_factory.mktemp("tour")
    (root / "shared").symlink_to(SHARED_DATA.parent)
    work = root / "work"  # so that ../shared/data is where the README says
    work.mkdir()
    env = {**os.environ, "SAMOVAR_CACHE": str(root / "cache")}
    return work, run_block("## A tour of the command line", work, env), env


def test_the_tour_runs_as_written(toured):
    work, ran, _ = toured
    kinds = [words[1] for words, _ in ran]
    assert {"presets", "prepare", "train", "generate", "demo", "runs", "export"} <= set(kinds)
    resumed = next(out for words, out in ran if "--resume" in words)
    assert "resuming at step 6" in resumed and "done: step 9" in resumed
    assert (work / "export" / "shakespeare" / "config.json").exists()
    assert (work / "runs" / "demo" / "run").is_dir() and (work / "runs" / "demo" / "run-2").is_dir()


def test_the_chat_bot_section_runs_as_written(toured):
    work, _, env = toured
    ran = run_block("## A chat bot of your own", work, env)
    scripted = ran[-1][1]
    assert ran[-1][0][:2] == ["samovar", "chat"] and len(scripted.splitlines()) == 1  # one line in, one out
    assert (work / "runs" / "chat" / "tokenizer_config.json").exists()


def test_the_adapters_section_runs_as_written(toured):
    import json

    work, _, env = toured
    if not (work / "runs" / "chat").exists():
        run_block("## A chat bot of your own", work, env)
    pairs = [{"prompt": "Привет!", "chosen": "Привет.", "rejected": "Привет привет привет привет"},
             {"prompt": [{"role": "user", "content": "Как дела?"}], "chosen": [{"role": "assistant", "content": "Хорошо."}],
              "rejected": [{"role": "assistant", "content": "Не знаю."}]}] * 30
    (work / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    ran = run_block("## Adapters and preferences: LoRA and DPO", work, env)
    assert [words[1] for words, _ in ran] == ["train", "chat", "merge-lora", "export", "import", "prepare", "train"]
    assert (work / "runs" / "chat-lora" / "checkpoints").is_dir()
    assert (work / "export" / "chat-lora" / "adapter" / "adapter_config.json").exists()
    assert "rewards/margins" in (work / "runs" / "chat-dpo" / "metrics.csv").read_text().splitlines()[0]


def test_the_corpus_section_runs_as_written(toured):
    work, _, env = toured
    novels = sorted((SHARED_DATA / "russian_novels").glob("*.txt"))
    jokes = (SHARED_DATA / "ru_dialogues" / "anekdot_dialogues.txt").read_text(encoding="utf-8").split("\n\n\n")
    (work / "prose.txt").write_text("\n".join(" ".join(f.read_text(encoding="utf-8")[i:i + 600].split())
                                             for f in novels for i in range(5000, 50000, 5000)), encoding="utf-8")
    (work / "jokes.txt").write_text("\n".join(" ".join(j.split()) for j in jokes[:60]), encoding="utf-8")
    ran = run_block("## From a pile of files to a corpus", work, env)
    assert [words[1:3] for words, _ in ran] == [["data", "ingest"], ["data", "dedup"], ["filter", "train"],
                                                ["filter", "apply"], ["prepare", "kept"]]
    assert "6 documents" in ran[0][1] and "5 kept" in ran[3][1]  # the novels kept, the jokes dropped
    assert (work / "data" / "corpus" / "tokens-00000.bin").exists()


def test_the_python_api_snippet_runs_as_pasted(toured):
    work, _, _ = toured
    code = block("## The Python API", "python")
    result = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
