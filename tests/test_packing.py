"""Packed SFT rows: several conversations a row, kept apart by a block-diagonal causal mask with
positions restarting at each one; equal to the same conversations one a row. And gradient
accumulation equal to one batch of all its rows."""

import copy
import random

import numpy as np
import pytest
import torch

from samovar.chat import add_chat_tokens, render
from samovar.config import get_preset
from samovar.data import masked_batch, packed_batch, prepare
from samovar.model import Transformer, document_positions
from samovar.tokenizer import Tokenizer
from samovar.train import TrainConfig, Trainer

from test_chat import random_conversations


@pytest.fixture(scope="module")
def examples():
    tok = add_chat_tokens(Tokenizer.train("char", ["Привет, как дела? Hello world! 🙂 ёжик Москва — 12:30 ok"]))
    ids, mask, index = [], [], []
    for messages in random_conversations(60, seed=7):
        c_ids, c_mask = render(tok, messages)
        index.append((len(ids), len(ids) + len(c_ids)))
        ids += c_ids
        mask += c_mask
    return tok, (np.array(ids), np.array(mask, dtype=np.uint8), np.array(index))


def test_document_positions_restart_and_the_mask_is_block_diagonal():
    documents = torch.tensor([[0, 0, 0, 1, 1, 2]])
    positions, mask = document_positions(documents)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0]]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)
    _, windowed = document_positions(documents, window=2)
    assert not windowed[0, 0, 2, 0] and windowed[0, 0, 2, 1]


@pytest.mark.parametrize("preset, extra", [("llama-tiny", {}), ("gpt2-tiny", {}), ("mistral-tiny", {"sliding_window": 16}),
                                           ("qwen3-tiny", {}), ("deepseek-v3-tiny", {"aux_loss_coef": 0.0})])
def test_packed_rows_equal_the_same_conversations_one_a_row(examples, preset, extra):
    tok, arrays = examples
    torch.manual_seed(0)
    model = Transformer(get_preset(preset).replace(vocab_size=tok.vocab_size, context_len=96, dropout=0.0,
                                                   **extra)).eval()
    drawn = []
    rng = random.Random(3)

    def draw():
        drawn.append(rng.randrange(len(arrays[2])))
        return drawn[-1]

    x, y, mask, documents = packed_batch(*arrays, draw, batch_size=4, context_len=96)
    assert documents.max() > 0, "several conversations share a row"
    packed_in = drawn[:-1]  # the last one drawn did not fit
    loose = masked_batch(*arrays, packed_in, context_len=96)
    with torch.no_grad():
        packed_loss = model(x, y, loss_mask=mask, documents=documents)
        loose_loss = model(loose[0], loose[1], loss_mask=loose[2])
        assert int(mask.sum()) == int(loose[2].sum())  # the same tokens are learned
        torch.testing.assert_close(packed_loss, loose_loss, atol=1e-5, rtol=1e-5)
        # and each conversation's logits are those it has alone
        logits = model(x, documents=documents)
        first = int((documents[0] == 0).sum())
        alone = model(x[:1, :first])
        torch.testing.assert_close(logits[:1, :first], alone, atol=1e-5, rtol=1e-5)


def test_padding_is_not_counted_as_tokens(examples):
    from samovar.train.objectives import Batch

    _, arrays = examples
    rng = random.Random(0)
    x, y, mask, documents = packed_batch(*arrays, lambda: rng.randrange(len(arrays[2])), 3, 96)
    batch = Batch(x, y, mask, documents)
    assert batch.tokens == int((y != -100).sum()) < x.numel() and batch.scored == int(mask.sum())


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("packdata")
    lines = []
    for messages in random_conversations(200, seed=11):
        lines += ["- " + (m["content"].replace("\n", " ").strip() or "ok") for m in messages if m["role"] != "system"]
        lines += ["", ""]
    (root / "d.txt").write_text("\n".join(lines), encoding="utf-8")
    prepare([root / "d.txt"], root / "data", chat="dialogue", cleaning=None)
    return root / "data"


@pytest.mark.parametrize("pack", [True, False])
def test_accumulated_micro_batches_equal_one_batch_of_them_all(chat_data, tmp_path, pack):
    cfg = TrainConfig(objective="sft", pack=pack, batch_size=2, grad_accum=3, max_steps=1, device="cpu",
                      grad_clip=1e9, plot=False, peak_flops=0, eval_steps=1)
    model_cfg = get_preset("llama-tiny").replace(vocab_size=200, context_len=64, n_layer=2)
    trainer = Trainer(model_cfg, cfg, chat_data, tmp_path / "run")
    reference = copy.deepcopy(trainer.model)
    batches = [trainer.batch("train", 0, m) for m in trainer.micros]
    assert (batches[0].documents is not None) == pack
    T = max(b.x.size(1) for b in batches)

    def padded(t, value):
        return torch.nn.functional.pad(t, (0, T - t.size(1)), value=value)

    x = torch.cat([padded(b.x, 0) for b in batches])
    y = torch.cat([padded(b.y, -100) for b in batches])
    mask = torch.cat([padded(b.loss_mask, False) for b in batches])
    documents = torch.cat([padded(b.documents, 10**6) for b in batches]) if pack else None
    loss = reference(x, y, loss_mask=mask, **({"documents": documents} if pack else {}))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9)
    trainer._begin()
    assert trainer.train_step()
    assert trainer.last["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert trainer.last["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    assert trainer.state.tokens_seen == sum(b.tokens for b in batches)  # real tokens, never padding


def test_conversations_longer_than_the_context_are_counted(chat_data, tmp_path):
    from conftest import run_cli

    result = run_cli("train", "--preset", "llama-tiny", "--data", chat_data, "--out", tmp_path / "run",
                     "--set", "objective=sft", "--set", "context_len=24", "--set", "max_steps=2",
                     "--set", "eval_interval=2", "--set", "eval_steps=1", "--set", "device=cpu",
                     "--set", "peak_flops=0", "--set", "batch_size=2")
    assert result.returncode == 0, result.stderr
    from samovar.data import TokenData

    index = TokenData.open(chat_data).examples("train")[2]
    long = int(((index[:, 1] - index[:, 0]) > 25).sum())
    assert long > 0 and f"note: {long:,} of {len(index):,} training examples are longer than the context" in result.stdout


def test_the_russian_chat_recipe_trains(chat_data, tmp_path):
    from conftest import run_cli

    result = run_cli("train", "--config", "russian-chat", "--data", chat_data, "--out", tmp_path / "run",
                     "--set", "max_steps=2", "--set", "eval_interval=2", "--set", "eval_steps=1",
                     "--set", "device=cpu", "--set", "peak_flops=0", "--set", "n_layer=1", "--set", "batch_size=2")
    assert result.returncode == 0, result.stderr
    sft = run_cli("train", "--init-from", tmp_path / "run", "--data", chat_data, "--out", tmp_path / "chat",
                  "--set", "objective=sft", "--set", "max_steps=2", "--set", "eval_interval=2", "--set", "eval_steps=1",
                  "--set", "device=cpu", "--set", "peak_flops=0", "--set", "batch_size=2")
    assert sft.returncode == 0, sft.stderr
    exported = run_cli("export", tmp_path / "chat", "--format", "hf", "--out", tmp_path / "hf")
    assert exported.returncode == 0 and "qwen3" in exported.stdout
