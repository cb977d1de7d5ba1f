"""Real corpora from ../shared/data, trained for a few hundred steps."""

import math

from samovar.api import generate, load
from samovar.config import get_preset
from samovar.data import prepare
from samovar.train import TrainConfig, Trainer

from conftest import shared_file


def test_tinyshakespeare_char_model_learns(tmp_path):
    corpus = shared_file("tinyshakespeare/input.txt")
    meta = prepare([corpus], tmp_path / "data", tokenizer="char", special_tokens=())
    assert meta["vocab_size"] == 65  # nanoGPT's vocabulary
    cfg = get_preset("char-small").replace(n_layer=2, n_embd=128, context_len=64, dropout=0.0)
    train = TrainConfig(batch_size=16, max_steps=300, lr=3e-3, warmup_steps=20, eval_interval=100,
                        eval_steps=10, device="cpu")
    trainer = Trainer(cfg, train, tmp_path / "data", tmp_path / "run", progress=False)
    start = trainer.estimate_loss()["val"]
    assert abs(start - math.log(65)) < 0.3  # an untrained model is near uniform
    result = trainer.train()
    assert result["val_loss"] < 2.3 < start - 1.5  # well below the start (~4.2)
    model, tokenizer = load(tmp_path / "run", device="cpu")
    text = generate(model, tokenizer, "ROMEO:\n", max_tokens=200, temperature=0.8, seed=0)
    words = text.split()
    assert len(words) > 20 and sum(w.lower().strip(",.:;!?") in {"the", "and", "i", "to", "of", "a", "my", "you"}
                                   for w in words) >= 3


def test_russian_bpe_model_learns(tmp_path):
    corpus = shared_file("russian_novels/Pushkin_CapitanskaaDochka.txt")
    meta = prepare([corpus], tmp_path / "data", tokenizer="bpe", vocab_size=1024)
    cfg = get_preset("llama-tiny").replace(vocab_size=meta["vocab_size"], context_len=64)
    train = TrainConfig(batch_size=16, max_steps=150, lr=3e-3, warmup_steps=10, eval_interval=50,
                        eval_steps=5, device="cpu")
    trainer = Trainer(cfg, train, tmp_path / "data", tmp_path / "run", progress=False)
    start = trainer.estimate_loss()["val"]
    result = trainer.train()
    assert result["val_loss"] < start - 1.0
    model, tokenizer = load(tmp_path / "run", device="cpu")
    text = generate(model, tokenizer, "Я", max_tokens=40, temperature=0.8, seed=0)
    assert sum("а" <= ch.lower() <= "я" for ch in text) > 20  # Cyrillic comes back out
