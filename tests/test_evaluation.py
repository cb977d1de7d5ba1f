import json
import math

import pytest
import torch

from samovar.api import LLM
from samovar.config import get_preset
from samovar.data import dialogue_pairs, qa_pairs
from samovar.evaluation import evaluate, lm_metrics
from samovar.model import Transformer
from samovar.tokenizer import Tokenizer

from conftest import run_cli, shared_file

QA = "T: Кошка спит на окне\nQ: где спит кошка?\nA: на окне\n\nT: Пёс лает\nQ: кто лает?\nA: пёс\n"
DIALOGUES = "- Как дела?\n- Хорошо.\n\n\n- Ты где?\n- Дома.\n- Один?\n- Нет.\n"


def test_qa_and_dialogue_pairs():
    assert qa_pairs(QA) == [("T: Кошка спит на окне\nQ: где спит кошка?\nA:", "на окне"),
                            ("T: Пёс лает\nQ: кто лает?\nA:", "пёс")]
    assert dialogue_pairs(DIALOGUES) == [("- Как дела?\n- ", "Хорошо."), ("- Ты где?\n- Дома.\n- Один?\n- ", "Нет.")]


def test_lm_metrics_of_a_uniform_model_are_log_vocab():
    cfg = get_preset("gpt2-tiny").replace(vocab_size=50, context_len=16)
    model = Transformer(cfg)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # (tied) all logits 0: the uniform distribution
    ids = list(range(40)) * 3
    m = lm_metrics(model, ids, n_bytes=60)
    assert m["tokens"] == len(ids) - 1  # every token after the first predicted exactly once
    assert m["loss"] == pytest.approx(math.log(50), abs=1e-5)
    assert m["perplexity"] == pytest.approx(50, rel=1e-4)
    assert m["bits_per_byte"] == pytest.approx(m["loss"] * m["tokens"] / math.log(2) / 60)


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory):
    """A tiny model trained (really) on the QA file, through the CLI."""
    corpus = shared_file("ru_qa/premise_question_answer6.txt")
    root = tmp_path_factory.mktemp("qa")
    (root / "train.txt").write_text(corpus.read_text(encoding="utf-8")[:400_000])
    (root / "heldout.txt").write_text(corpus.read_text(encoding="utf-8")[-30_000:])
    assert run_cli("prepare", root / "train.txt", "--tokenizer", "char", "--out", root / "data").returncode == 0
    result = run_cli("train", "--preset", "gpt2-tiny", "--data", root / "data", "--out", root / "run",
                     "--set", "context_len=128", "--set", "max_steps=150", "--set", "eval_interval=150",
                     "--set", "batch_size=16", "--set", "lr=3e-3", "--set", "device=cpu", "--set", "eval_steps=2")
    assert result.returncode == 0, result.stderr
    return root


def test_eval_command_reports_every_metric(qa_run):
    result = run_cli("eval", qa_run / "run", "--data", qa_run / "heldout.txt", "--json", "--max-examples", "20")
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["task"] == "qa" and r["examples"] == 20
    assert r["loss"] < math.log(r["perplexity"]) + 1e-6 and r["bits_per_byte"] > 0
    assert r["loss"] < 2.5  # learned: far below uniform over the characters (~4.3)
    assert 0 <= r["bleu"] <= 100 and r["chrf"] > 5
    assert r["ttft_ms"] > 0 and r["decode_tokens_per_s"] > 10
    text = run_cli("eval", qa_run / "run", "--data", qa_run / "heldout.txt", "--task", "lm", "--no-latency")
    assert text.returncode == 0 and "bits per byte" in text.stdout and "BLEU" not in text.stdout


def test_max_tokens_limits_the_loss_not_the_answers(qa_run):
    from samovar.api import LLM
    from samovar.evaluation import evaluate

    llm = LLM.from_path(qa_run / "run", device="cpu")
    full = evaluate(llm, qa_run / "heldout.txt", max_examples=2, with_latency=False)
    short = evaluate(llm, qa_run / "heldout.txt", max_examples=2, max_tokens=500, with_latency=False)
    assert short["tokens"] == 499 < full["tokens"]
    assert short["answer_tokens"] == full["answer_tokens"] and short["examples"] == full["examples"]


def test_bits_per_byte_divide_by_the_texts_bytes(tmp_path):
    """Bits per byte count the UTF-8 bytes of the text, whatever the tokenizer (Cyrillic: 2 bytes a letter)."""
    text = " ".join(f"слово{i % 37} word{i % 11}" for i in range(300))
    for kind in ("char", "bpe"):
        tok = Tokenizer.train(kind, [text], vocab_size=300 if kind == "bpe" else None)
        cfg = get_preset("gpt2-tiny").replace(vocab_size=tok.vocab_size, context_len=64)
        model = Transformer(cfg)
        m = evaluate(LLM(model, tok), _write(tmp_path / f"{kind}.txt", text), task="lm", with_latency=False)
        n_bytes = len(text.encode("utf-8"))
        assert n_bytes > len(text)
        assert m["bits_per_byte"] == pytest.approx(m["loss"] * m["tokens"] / math.log(2) / n_bytes, rel=1e-6)


def _write(path, text):
    path.write_text(text)
    return path


def test_compare_prints_a_table_and_draws_a_chart(qa_run, tmp_path):
    import shutil

    shutil.copytree(qa_run / "run", tmp_path / "other")
    out = tmp_path / "chart.png"
    result = run_cli("compare", qa_run / "run", tmp_path / "other", "--data", qa_run / "heldout.txt",
                     "--max-examples", "5", "--out", out, "--json", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "BLEU" in lines[0] and "chrF" in lines[0] and "perplexity" in lines[0]
    assert lines[2].split()[0] == "run" and lines[3].split()[0] == "other"
    assert lines[2].split()[2:5] == lines[3].split()[2:5]  # the same weights: the same quality figures
    assert out.read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["examples"] for r in rows] == [5, 5]


def test_a_prepared_folder_is_evaluated_on_its_held_out_tail(char_data):
    from samovar.data import TokenData
    from samovar.evaluation import read_eval_text

    text = read_eval_text(char_data)
    corpus = (char_data.parent / "corpus.txt").read_text(encoding="utf-8")
    data = TokenData.open(char_data)
    assert len(data.tokenizer().encode(text)) == len(data.val)
    assert text.strip() and corpus.rstrip().endswith(text.strip())
