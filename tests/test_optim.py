"""Optimizers (train/optim.py): which parameters Muon takes, and AdamW's groups."""

import shutil

import torch

from samovar.config import get_preset
from samovar.lstm import Seq2SeqLSTM
from samovar.model import Transformer
from samovar.train import Trainer
from samovar.train.optim import hidden_matrices, make_optimizer

from test_train import tiny_train


def test_muon_takes_block_matrices_and_adamw_the_rest(tmp_path, char_data):
    from samovar.train import Optimizers, make_optimizer

    cfg = get_preset("llama-tiny").replace(vocab_size=69, context_len=32)
    from samovar.model import Transformer

    model = Transformer(cfg)
    opt = make_optimizer(model, tiny_train(optimizer="muon", muon_lr=0.05), torch.device("cpu"))
    assert isinstance(opt, Optimizers)
    adamw, muon = opt.optimizers
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon_params) == (name.startswith("blocks.") and p.dim() == 2), name
    assert {g["base_lr"] for g in muon.param_groups} == {0.05}
    run = tmp_path / "run"
    trainer = Trainer(cfg, tiny_train(optimizer="muon", muon_lr=0.05, max_steps=20), char_data, run, progress=False)
    start = trainer.estimate_loss()["val"]
    result = trainer.train()
    assert result["val_loss"] < start - 0.8
    shutil.rmtree(run / "checkpoints" / "step-0000020")  # resume restores both optimizers
    again = Trainer(cfg, tiny_train(optimizer="muon", muon_lr=0.05, max_steps=20), char_data, run,
                    resume=True, progress=False)
    assert again.step == 10 and again.optimizer.optimizers[1].state


def test_muon_decides_by_module_not_by_name():
    """A tied head is the embedding's matrix: neither is Muon's; the LSTM's recurrent matrices are
    not Linear layers, so an LSTM with optimizer=muon trains with AdamW alone."""
    tied = Transformer(get_preset("qwen3-tiny"))
    assert all(w is not tied.tok_emb.weight for w in hidden_matrices(tied))
    assert {id(w) for w in hidden_matrices(tied)} == {
        id(p) for n, p in tied.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    lstm = Seq2SeqLSTM(get_preset("lstm-seq2seq"))
    assert hidden_matrices(lstm) == []
    opt = make_optimizer(lstm, tiny_train(optimizer="muon"), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)


def test_adamw_decays_matrices_only():
    model = Transformer(get_preset("gpt2-tiny"))
    opt = make_optimizer(model, tiny_train(weight_decay=0.1), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
