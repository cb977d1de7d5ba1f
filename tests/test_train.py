import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from samovar import checkpoint as ckpt
from samovar.config import ConfigError, get_preset
from samovar.train import TrainConfig, Trainer, TrainingError


def tiny_model(data_vocab):
    return get_preset("gpt2-tiny").replace(vocab_size=data_vocab, context_len=32, dropout=0.1)


def tiny_train(**kw):
    base = dict(batch_size=4, max_steps=30, lr=3e-3, warmup_steps=5, eval_interval=10, eval_steps=3,
                log_interval=5, device="cpu", keep_last=10, seed=3)
    return TrainConfig(**{**base, **kw})


def read_rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_a_short_run_writes_a_complete_run_folder(tmp_path, char_data):
    trainer = Trainer(tiny_model(69), tiny_train(), char_data, tmp_path / "run", progress=False)
    result = trainer.train()
    run = tmp_path / "run"
    assert result["step"] == 30 and result["stop_reason"] == "max_steps"
    rows = read_rows(run)
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 25, 30]
    assert {"step", "loss", "val_loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert rows[0]["val_loss"] == "" and rows[1]["val_loss"] != ""
    assert float(rows[-1]["val_loss"]) < float(rows[1]["val_loss"])
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = [p.name for p in ckpt.list_checkpoints(run)]
    assert names == ["step-0000010", "step-0000020", "step-0000030"]
    last = run / "checkpoints" / "step-0000030"
    for f in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json", "optimizer.pt"):
        assert (last / f).exists(), f
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 30 and state["tokens_seen"] == 30 * 4 * 32
    weights = load_file(last / "model.safetensors")
    assert "lm_head.weight" not in weights  # tied: stored once
    torch.testing.assert_close(weights["tok_emb.weight"], trainer.model.tok_emb.weight.detach())


def test_resume_continues_with_the_same_losses_and_weights(tmp_path, char_data):
    full = tmp_path / "full"
    Trainer(tiny_model(69), tiny_train(checkpoint_interval=10), char_data, full, progress=False).train()
    # a crash right after the step-20 checkpoint: later checkpoints and metrics rows never existed
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-0000030")
    resumed = Trainer(tiny_model(69), tiny_train(checkpoint_interval=10), char_data, crashed,
                      resume=True, progress=False)
    assert resumed.step == 20
    resumed.train()
    keep = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens")
    assert [{k: r[k] for k in keep} for r in read_rows(crashed)] == \
           [{k: r[k] for k in keep} for r in read_rows(full)]
    a = load_file(full / "checkpoints" / "step-0000030" / "model.safetensors")
    b = load_file(crashed / "checkpoints" / "step-0000030" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_drops_rows_logged_after_the_checkpoint(tmp_path, char_data):
    run = tmp_path / "run"
    Trainer(tiny_model(69), tiny_train(max_steps=20), char_data, run, progress=False).train()
    shutil.rmtree(run / "checkpoints" / "step-0000020")
    trainer = Trainer(tiny_model(69), tiny_train(max_steps=20), char_data, run, resume=True, progress=False)
    assert [int(r["step"]) for r in read_rows(run)] == [5, 10]
    trainer.train()
    assert [int(r["step"]) for r in read_rows(run)] == [5, 10, 15, 20]


def test_early_stopping_on_the_train_val_gap(tmp_path, char_data):
    cfg = tiny_train(early_stop_gap=-100.0)  # any gap is too large: stop at the first evaluation
    result = Trainer(tiny_model(69), cfg, char_data, tmp_path / "run", progress=False).train()
    assert result["stop_reason"] == "early_stop_gap" and result["step"] == 10
    assert ckpt.list_checkpoints(tmp_path / "run")[-1].name == "step-0000010"


def test_early_stopping_when_val_stops_improving(tmp_path, char_data):
    # an lr so small that the weights do not move: val loss never improves after the first evaluation
    cfg = tiny_train(lr=1e-30, weight_decay=0.0, early_stop_patience=2, max_steps=100)
    result = Trainer(tiny_model(69), cfg, char_data, tmp_path / "run", progress=False).train()
    assert result["stop_reason"] == "early_stop_patience" and result["step"] == 30


def test_gradient_accumulation_sees_more_tokens(tmp_path, char_data):
    cfg = tiny_train(grad_accum=3, max_steps=10)
    result = Trainer(tiny_model(69), cfg, char_data, tmp_path / "run", progress=False).train()
    assert result["tokens_seen"] == 10 * 3 * 4 * 32


def test_keeps_last_checkpoints_and_the_best(tmp_path, char_data):
    run = tmp_path / "run"
    Trainer(tiny_model(69), tiny_train(keep_last=1, max_steps=40), char_data, run, progress=False).train()
    names = [p.name for p in ckpt.list_checkpoints(run)]
    best = (run / "best.txt").read_text().strip()
    assert names[-1] == "step-0000040" and best in names and len(names) <= 2


def test_bad_runs_are_refused_before_the_first_step(tmp_path, char_data):
    run = tmp_path / "run"
    Trainer(tiny_model(69), tiny_train(max_steps=10), char_data, run, progress=False).train()
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        Trainer(tiny_model(69), tiny_train(), char_data, run)
    with pytest.raises(ConfigError, match="more than the model's vocab_size=50"):
        Trainer(tiny_model(50), tiny_train(), char_data, tmp_path / "other")
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        tiny_train(batch_size=0)
    with pytest.raises(ConfigError, match="differs"):
        Trainer(tiny_model(69).replace(n_layer=3), tiny_train(max_steps=20), char_data, run, resume=True)


@pytest.mark.parametrize("preset", ["mixtral-tiny", "deepseek-v3-tiny"])
def test_mixture_of_experts_trains_and_reports_expert_usage(tmp_path, char_data, preset):
    cfg = get_preset(preset).replace(vocab_size=69, context_len=32)
    trainer = Trainer(cfg, tiny_train(max_steps=20, lr=3e-3), char_data, tmp_path / "run", progress=False)
    start = trainer.estimate_loss()["val"]
    result = trainer.train()
    assert result["val_loss"] < start - 0.5
    balance = [float(r["expert_balance"]) for r in read_rows(tmp_path / "run")]
    assert len(balance) == 4 and all(1.0 <= b <= cfg.n_expert for b in balance)


def test_bf16_on_the_cpu_warns_only_without_native_bf16():
    import warnings

    from samovar.runtime import cpu_has_native_bf16, resolve_dtype

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    slow = [w for w in caught if "far slower than fp32" in str(w.message)]
    assert len(slow) == (0 if cpu_has_native_bf16() else 1)


def test_auto_is_bf16_on_a_cpu_with_native_bf16_and_fp32_elsewhere(monkeypatch, tmp_path, char_data):
    """dtype auto for decoding: bf16 where the CPU multiplies it natively (measured faster, RESULTS.md),
    fp32 on other CPUs, for int8 models, serving and training; SAMOVAR_DTYPE says what auto means."""
    from samovar.api import load
    from samovar.checkpoint import save_checkpoint
    from samovar.model import Transformer
    from samovar.runtime import RuntimeConfigError, cpu_has_native_bf16, resolve_dtype

    cpu = torch.device("cpu")
    monkeypatch.delenv("SAMOVAR_DTYPE")  # (the suite pins fp32: conftest)
    native = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", cpu) == native
    assert resolve_dtype("auto", cpu, bf16_on_cpu=False) == torch.float32
    assert resolve_dtype("fp32", cpu) == torch.float32
    save_checkpoint(tmp_path / "ckpt", Transformer(tiny_model(69)), None)
    assert load(tmp_path / "ckpt")[0].tok_emb.weight.dtype == native
    assert load(tmp_path / "ckpt", quantize="int8wo")[0].tok_emb.weight.dtype == torch.float32
    assert load(tmp_path / "ckpt", bf16_on_cpu=False)[0].tok_emb.weight.dtype == torch.float32  # serve, telegram
    trainer = Trainer(tiny_model(69), tiny_train(max_steps=1), char_data, tmp_path / "run", progress=False)
    assert trainer.dtype == torch.float32
    monkeypatch.setenv("SAMOVAR_DTYPE", "fp32")
    assert resolve_dtype("auto", cpu) == torch.float32 and load(tmp_path / "ckpt")[0].tok_emb.weight.dtype == torch.float32
    monkeypatch.setenv("SAMOVAR_DTYPE", "fp64")
    with pytest.raises(RuntimeConfigError, match="SAMOVAR_DTYPE='fp64' is not a dtype"):
        resolve_dtype("auto", cpu)


def test_compiled_training_matches_eager(tmp_path, char_data):
    eager = Trainer(tiny_model(69).replace(dropout=0.0), tiny_train(max_steps=3, eval_interval=3),
                    char_data, tmp_path / "eager", progress=False).train()
    compiled = Trainer(tiny_model(69).replace(dropout=0.0), tiny_train(max_steps=3, eval_interval=3, compile=True),
                       char_data, tmp_path / "compiled", progress=False).train()
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], abs=1e-3)
