"""Training objectives (train/objectives.py): each draws its kind of batch and turns it into a loss."""

import pytest
import torch

from samovar.config import ConfigError, get_preset
from samovar.data import TokenData, prepare
from samovar.lstm import Seq2SeqLSTM
from samovar.model import Transformer
from samovar.train.objectives import OBJECTIVES, Batch


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa")
    blocks = [f"T: Кот сидит на окне номер {i}.\nQ: Где сидит кот?\nA: На окне {i}." for i in range(60)]
    (folder / "qa.txt").write_text("\n\n".join(blocks), encoding="utf-8")
    prepare([folder / "qa.txt"], folder / "data", tokenizer="char", pairs="qa")
    return TokenData.open(folder / "data")


def batch_of(objective, data, seed=0, rows=slice(None)):
    return OBJECTIVES[objective]().batch(data, "train", torch.Generator().manual_seed(seed), 4, 64, rows)


def test_lm_draws_windows_of_the_stream_and_scores_every_position(qa_data):
    batch = batch_of("lm", qa_data)
    assert batch.x.shape == batch.y.shape == (4, 64) and batch.loss_mask is None
    torch.testing.assert_close(batch.x[:, 1:], batch.y[:, :-1])  # y is x shifted by one
    model = Transformer(get_preset("gpt2-tiny").replace(vocab_size=qa_data.meta["vocab_size"]))
    loss, logged = OBJECTIVES["lm"]().loss(model, batch)
    assert logged == {}
    torch.testing.assert_close(loss, model(batch.x, batch.y))


def test_sft_scores_the_answers_only(qa_data):
    batch = batch_of("sft", qa_data)
    assert batch.loss_mask is not None and batch.loss_mask.any() and not batch.loss_mask.all()
    model = Transformer(get_preset("gpt2-tiny").replace(vocab_size=qa_data.meta["vocab_size"]))
    loss, _ = OBJECTIVES["sft"]().loss(model, batch)
    logits = model(batch.x)
    mask = batch.loss_mask
    expected = torch.nn.functional.cross_entropy(logits[mask], batch.y[mask])
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_the_same_seed_draws_the_same_batch_and_rows_take_a_share(qa_data):
    for name in ("lm", "sft"):  # (dpo's, of preference pairs: test_dpo.py)
        a, b = batch_of(name, qa_data, seed=5), batch_of(name, qa_data, seed=5)
        torch.testing.assert_close(a.x, b.x)
        half = batch_of(name, qa_data, seed=5, rows=slice(2, 4))  # a rank's share of the same draw
        torch.testing.assert_close(half.x, a.x[2:4, :half.x.size(1)])


def test_each_objective_refuses_what_it_cannot_train(qa_data, char_data):
    lstm = Seq2SeqLSTM(get_preset("lstm-seq2seq"))
    with pytest.raises(ConfigError, match="set objective=sft"):
        OBJECTIVES["lm"]().check(lstm, qa_data)
    OBJECTIVES["sft"]().check(lstm, qa_data)  # pairs: fine
    with pytest.raises(ConfigError, match="needs conversations or prompt/answer pairs"):
        OBJECTIVES["sft"]().check(Transformer(get_preset("gpt2-tiny")), TokenData.open(char_data))


def test_the_lstm_baseline_is_driven_like_any_model(qa_data):
    batch = batch_of("sft", qa_data)
    lstm = Seq2SeqLSTM(get_preset("lstm-seq2seq").replace(vocab_size=qa_data.meta["vocab_size"], n_embd=32))
    loss, _ = OBJECTIVES["sft"]().loss(lstm, Batch(batch.x, batch.y, batch.loss_mask))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
