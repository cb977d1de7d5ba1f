"""What wraps the model for training (train/parallelize.py), applied from outside the model."""

import pytest
import torch

from samovar.config import ConfigError, get_preset
from samovar.lstm import Seq2SeqLSTM
from samovar.train import apply_activation_checkpointing


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = get_preset("llama-tiny")
    torch.manual_seed(0)
    from samovar.model import Transformer
    from samovar.train import apply_activation_checkpointing

    a, b = Transformer(cfg), Transformer(cfg)
    b.load_state_dict(a.state_dict())
    apply_activation_checkpointing(b)
    assert list(b.state_dict()) == list(a.state_dict())  # applied from outside: the names stay
    idx = torch.randint(cfg.vocab_size, (2, 16))
    a(idx, idx).backward()
    b(idx, idx).backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_activation_checkpointing_refuses_a_model_without_blocks():
    with pytest.raises(ConfigError, match="recomputes Transformer blocks"):
        apply_activation_checkpointing(Seq2SeqLSTM(get_preset("lstm-seq2seq")))
