"""DPO on real parts: preference pairs rendered with the chat template, the loss of the paper (and
TRL's), ln 2 at the first step, LoRA as the reference-free-of-copies way, exact resume, torchrun."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import PAIRS, run_cli
from samovar.chat import render
from samovar.data import DataError, ReadOptions, TokenData, prepare
from samovar.tokenizer import Tokenizer
from samovar.train.objectives import dpo_loss

TINY = ["--set", "device=cpu", "--set", "batch_size=4", "--set", "eval_steps=1", "--set", "peak_flops=0",
        "--set", "log_interval=1", "--set", "lr=3e-3", "--set", "warmup_steps=0", "--set", "plot=false",
        "--set", "dropout=0"]


def preference_lines() -> list[dict]:
    """Chosen: the learned answer; rejected: another question's answer, or the answer repeated."""
    lines = []
    for i, (q, a) in enumerate(PAIRS):
        other = PAIRS[(i + 1) % len(PAIRS)][1]
        lines.append({"prompt": q, "chosen": a, "rejected": other})
        lines.append({"prompt": [{"role": "system", "content": "ты самовар"}, {"role": "user", "content": q}],
                      "chosen": [{"role": "assistant", "content": a}],
                      "rejected": [{"role": "assistant", "content": (a.split()[0] + " ") * 4}]})
    return lines * 2


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory, chat_model):
    root = tmp_path_factory.mktemp("dpo")
    lines = [json.dumps(line, ensure_ascii=False) for line in preference_lines()]
    lines.insert(3, '{"prompt": "кто ты?", "chosen": "я самовар"}')  # no rejected
    lines.insert(5, "not json")
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_cli("prepare", root / "pairs.jsonl", "--preference", "--tokenizer", chat_model / "tokenizer.json",
                     "--out", root / "data", "--val-fraction", "0.2")
    assert result.returncode == 0, result.stderr
    assert "16 + 4 preference pairs" in result.stdout and "line 4: no 'rejected'" in result.stdout
    return root / "data"


def test_pairs_are_rendered_with_the_template_and_scored_on_the_answer_only(pairs_data, chat_model):
    tok = Tokenizer.load(chat_model / "tokenizer.json")
    data = TokenData.open(pairs_data)
    ids, mask, index = data.examples("train")
    assert len(index) == 2 * 16
    first = preference_lines()[0]
    prompt = [{"role": "user", "content": first["prompt"]}]
    head = render(tok, prompt, add_generation_prompt=True)[0]
    for k, answer in ((0, first["chosen"]), (1, first["rejected"])):
        start, end = index[k]
        row, learn = np.asarray(ids[start:end]).tolist(), np.asarray(mask[start:end]).astype(bool)
        assert row == render(tok, prompt + [{"role": "assistant", "content": answer}])[0]
        assert not learn[:len(head)].any()
        scored = tok.decode([t for t, m in zip(row, learn) if m])
        assert scored.startswith(answer) and len(scored) <= len(answer) + 12  # the answer and its end of turn
    if tok.bos_id is not None:  # the template's bos, once
        assert np.asarray(ids[index[0][0]:index[0][1]]).tolist().count(tok.bos_id) == 1


def test_malformed_pairs_are_named_by_line_and_strict_refuses(tmp_path, chat_model):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                                        '{"prompt": "a", "chosen": "", "rejected": "c"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl line 2: 'chosen' is empty"):
        prepare([tmp_path / "bad.jsonl"], tmp_path / "out", tokenizer=str(chat_model / "tokenizer.json"),
                preference=True)
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "a", "chosen": "b", "rejected": "c"}\n'.encode() * 2
                                             + '{"prompt": "é", "chosen": "b", "rejected": "c"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl line 3: not UTF-8 text"):
        prepare([tmp_path / "latin1.jsonl"], tmp_path / "out", tokenizer=str(chat_model / "tokenizer.json"),
                preference=True, chat_options=ReadOptions(strict=True))
    result = run_cli("prepare", tmp_path / "bad.jsonl", "--preference", "--out", tmp_path / "o2")
    assert result.returncode == 2 and "--tokenizer RUN/tokenizer.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo"])
def test_the_loss_is_the_paper_s_formula(kind):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g) * 5 - 20 for _ in range(4))
    nc, nr = torch.tensor([3, 5, 8, 2, 9, 4]), torch.tensor([7, 1, 4, 6, 3, 5])
    beta, eps = 0.3, 0.1
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, kind, eps if kind == "sigmoid" else 0.0, nc, nr)
    for i in range(6):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if kind == "sigmoid":  # conservative DPO (Mitchell 2023): labels flipped with probability eps
            expected = -(1 - eps) * math.log(1 / (1 + math.exp(-beta * h))) - eps * math.log(1 / (1 + math.exp(beta * h)))
        elif kind == "hinge":
            expected = max(0.0, 1 - beta * float(h))
        else:  # IPO on log-ratios averaged over each answer's tokens
            h = (pc[i] - rc[i]) / nc[i] - (pr[i] - rr[i]) / nr[i]
            expected = float((h - 1 / (2 * beta)) ** 2)
        assert float(losses[i]) == pytest.approx(expected, rel=1e-6, abs=1e-6)
        assert float(chosen[i]) == pytest.approx(beta * float(pc[i] - rc[i]), rel=1e-6)
        assert float(rejected[i]) == pytest.approx(beta * float(pr[i] - rr[i]), rel=1e-6)
    same = dpo_loss(pc, pr, pc, pr, beta)[0]
    torch.testing.assert_close(same, torch.full_like(same, math.log(2)))


def test_a_batch_is_chosen_rows_then_rejected_rows_and_ranks_take_whole_pairs(pairs_data):
    from samovar.train.objectives import DirectPreference

    data, objective = TokenData.open(pairs_data), DirectPreference()

    def draw(rows):
        return objective.batch(data, "train", torch.Generator().manual_seed(5), 4, 128, rows)

    whole, half = draw(slice(None)), draw(slice(2, 4))
    assert whole.pairs == 4 and half.pairs == 2 and whole.scored == 4
    torch.testing.assert_close(half.x, whole.x[[2, 3, 6, 7], :half.x.size(1)])
    ids, _, index = data.examples("train")
    chosen, rejected = whole.x[0].tolist(), whole.x[4].tolist()
    starts = {int(index[k][0]): k for k in range(len(index))}
    first = next(k for s, k in starts.items() if ids[s:index[k][1] - 1].tolist() == chosen[:index[k][1] - 1 - s])
    assert first % 2 == 0  # a chosen example, and its rejected one right after it
    e = index[first + 1]
    assert rejected[:e[1] - e[0] - 1] == ids[e[0]:e[1] - 1].tolist()


def metrics(run) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_starts_at_ln2_and_learns_the_preference(tmp_path, pairs_data, chat_model, lora):
    extra = ["--set", "lora_rank=8", "--set", "lora_alpha=16", "--set", "lora_targets=q_proj,v_proj,down_proj",
             "--set", "lr=1e-2"] if lora else []
    result = run_cli("train", "--init-from", chat_model, "--data", pairs_data, "--out", tmp_path / "run", *TINY,
                     "--set", "objective=dpo", "--set", "max_steps=12", "--set", "eval_interval=12", *extra)
    assert result.returncode == 0, result.stderr
    rows = metrics(tmp_path / "run")
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(rows[0])
    assert float(rows[0]["loss"]) == pytest.approx(math.log(2), abs=1e-5)  # (metrics.csv keeps 5 decimals)
    assert float(rows[0]["rewards/margins"]) == 0
    assert float(rows[-1]["loss"]) < 0.5 and float(rows[-1]["rewards/accuracies"]) == 1.0
    assert float(rows[-1]["rewards/margins"]) > 0.5
    last = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert (last / "adapter.safetensors").exists() == lora and (last / "model.safetensors").exists() != lora


@pytest.mark.parametrize("sets", [{}, {"lora_rank": 4, "precompute_ref": True}])
def test_the_first_step_s_loss_is_ln2(tmp_path, pairs_data, chat_model, sets):
    from samovar.config import ModelConfig
    from samovar.train import TrainConfig, Trainer

    cfg = TrainConfig(device="cpu", batch_size=8, objective="dpo", max_steps=1, peak_flops=0, plot=False, **sets)
    trainer = Trainer(ModelConfig.load(chat_model / "config.json"), cfg, pairs_data, tmp_path / "run",
                      progress=False, init_from=chat_model)
    trainer._begin()
    assert trainer.train_step()
    assert abs(trainer.last["loss"] - math.log(2)) < 1e-6
    if sets.get("precompute_ref"):  # the reference came from inference's kernels (oneDNN), the policy from
        # training's (F.linear): their log-probabilities are rounding apart (2e-7 on an AVX2 CPU), so
        # a margin's sign, and the accuracy, is noise
        assert abs(trainer.last["rewards/margins"]) < 1e-6
    else:
        assert trainer.last["rewards/accuracies"] == 0 and abs(trainer.last["rewards/margins"]) < 1e-7


def test_precomputed_reference_is_kept_with_the_data_and_resume_is_exact(tmp_path, pairs_data, chat_model):
    common = ["--init-from", chat_model, "--data", pairs_data, *TINY, "--set", "objective=dpo",
              "--set", "lora_rank=4", "--set", "precompute_ref=true", "--set", "max_steps=6",
              "--set", "eval_interval=3", "--set", "lora_dropout=0.1", "--set", "dpo_loss=ipo",
              "--set", "schedule=wsd", "--set", "cooldown_frac=0"]  # lr independent of max_steps
    straight = run_cli("train", *common, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    assert len(list(pairs_data.glob("reference-*.safetensors"))) == 1
    first = run_cli("train", *common, "--out", tmp_path / "split", "--set", "max_steps=3")
    assert first.returncode == 0, first.stderr
    second = run_cli("train", "--resume", tmp_path / "split", "--set", "max_steps=6")
    assert second.returncode == 0, second.stderr
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-0000006" / "adapter.safetensors")
    b = load_file(tmp_path / "split" / "checkpoints" / "step-0000006" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(tmp_path / "straight")] == [r["loss"] for r in metrics(tmp_path / "split")]


def test_dpo_refuses_data_without_pairs_and_a_run_without_a_start(tmp_path, pairs_data, chat_model, char_data):
    no_pairs = run_cli("train", "--init-from", chat_model, "--data", char_data, "--out", tmp_path / "a", *TINY,
                       "--set", "objective=dpo")
    assert no_pairs.returncode == 2 and "objective=dpo needs preference pairs" in no_pairs.stderr
    no_start = run_cli("train", "--preset", "llama-tiny", "--data", pairs_data, "--out", tmp_path / "b", *TINY,
                       "--set", "objective=dpo")
    assert no_start.returncode == 2 and "give --init-from RUN" in no_start.stderr
    sft = run_cli("train", "--init-from", chat_model, "--data", pairs_data, "--out", tmp_path / "c", *TINY,
                  "--set", "objective=sft")
    assert sft.returncode == 2 and "train on them with objective=dpo" in sft.stderr


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo"])
def test_loss_and_rewards_equal_trl_s_dpo_trainer(kind, tmp_path, chat_model):
    """TRL's DPOTrainer (a test reference only) on our HF export, against a perturbed reference model,
    and samovar's objective on the same pairs rendered by samovar: the same loss and rewards."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import transformers
    from trl import DPOConfig, DPOTrainer

    from samovar.api import load
    from samovar.data import masked_batch
    from samovar.data.preference import preference_examples
    from samovar.interop.hf import export_hf
    from samovar.train import TrainConfig
    from samovar.train.objectives import Batch, DirectPreference

    policy, tok = load(chat_model, device="cpu")
    reference, _ = load(chat_model, device="cpu")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.03)
    export_hf(policy, tok, tmp_path / "policy")
    export_hf(reference, tok, tmp_path / "reference")
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
             "rejected": [{"role": "assistant", "content": PAIRS[(i + 2) % len(PAIRS)][1]}]}
            for i, (q, a) in enumerate(PAIRS)]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.2, loss_type=[kind], per_device_eval_batch_size=8,
                     report_to=[], use_cpu=True, max_length=None, bf16=False)  # (TRL autocasts to bf16 by default)
    trainer = DPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "policy"),
                         ref_model=transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "reference"),
                         args=args, train_dataset=datasets.Dataset.from_list(rows),
                         eval_dataset=datasets.Dataset.from_list(rows),
                         processing_class=transformers.AutoTokenizer.from_pretrained(tmp_path / "policy"))
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, next(iter(trainer.get_eval_dataloader()))).item()
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    objective = DirectPreference(TrainConfig(objective="dpo", dpo_beta=0.2, dpo_loss=kind))
    objective.reference_model = reference
    pairs = [(r["prompt"], r["chosen"][0], r["rejected"][0]) for r in rows]
    ids, mask, index = preference_examples(tok, pairs)
    n = len(pairs)
    x, y, loss_mask = masked_batch(ids, mask, index, [2 * i for i in range(n)] + [2 * i + 1 for i in range(n)],
                                   policy.config.context_len)
    with torch.no_grad():
        ours, metrics = objective.loss(policy, Batch(x, y, loss_mask, pairs=n))
    assert ours.item() == pytest.approx(theirs, abs=1e-5)
    for name in DirectPreference.columns:
        assert metrics[name] == pytest.approx(logged[name], abs=1e-5), name
    assert abs(metrics["rewards/margins"]) > 1e-3  # the reference differs from the policy


def test_two_processes_follow_the_single_process_dpo_curve(tmp_path, pairs_data, chat_model):
    from test_distributed import torchrun

    common = ["train", "--init-from", chat_model, "--data", pairs_data, *TINY, "--set", "objective=dpo",
              "--set", "lora_rank=4", "--set", "max_steps=4", "--set", "eval_interval=4", "--set", "grad_accum=2"]
    single = run_cli(*common, "--out", tmp_path / "one")
    assert single.returncode == 0, single.stderr
    multi = torchrun(*common, "--out", tmp_path / "two")
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for name in ("loss", "val_loss", "rewards/chosen", "rewards/margins", "rewards/accuracies"):
            assert (a[name] == "") == (b[name] == "")
            assert a[name] == "" or float(a[name]) == pytest.approx(float(b[name]), abs=1e-4), name
