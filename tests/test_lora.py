"""LoRA equals peft's, on every family: adapted logits, peft-format adapters both ways, merging.

For each family an HF model with random weights is imported into samovar; LoRA with random A and B
goes on our model, and the same adapters, written in peft's format, go on the HF model with
`PeftModel.from_pretrained` over our HF export of the base: the float32 logits agree within 1e-5. An
adapter made by peft itself (on HF's own module names) loads into samovar with the same logits.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from samovar.checkpoint import CheckpointError, load_checkpoint_into, save_checkpoint  # noqa: E402
from samovar.config import ConfigError  # noqa: E402
from samovar.interop.hf import export_hf, import_hf  # noqa: E402
from samovar.interop.peft import load_peft, save_peft  # noqa: E402
from samovar.lora import (LoRAConfig, LoRALinear, adapted, adapter_record, adapters_disabled,  # noqa: E402
                          apply_lora, merge_lora)

from test_hf_parity import hf_reference  # noqa: E402

# family case of test_hf_parity -> the projections to adapt (samovar's names)
FAMILIES = {
    "gpt1": "q_proj,v_proj,out_proj,up_proj",
    "gpt2": "q_proj,k_proj,v_proj,down_proj",
    "llama-mqa-bias-head-dim": "q_proj,k_proj,v_proj,out_proj,gate_proj,up_proj,down_proj",
    "mistral-sliding-window": "q_proj,v_proj",
    "mixtral": "q_proj,k_proj,out_proj",
    "gemma": "v_proj,gate_proj,down_proj",
    "qwen3": "q_proj,v_proj,up_proj",
    "deepseek-v3": "q_down,q_up,kv_down,kv_up,out_proj",
    "deepseek-v3-no-q-lora-yarn": "q_proj,kv_down,kv_up",
}


def randomize_adapters(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapted(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.3)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)


def logits(model, vocab: int) -> torch.Tensor:
    idx = torch.randint(vocab, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_adapted_logits_equal_peft_both_ways(case, tmp_path):
    reference, folder = hf_reference(case, tmp_path)
    vocab = reference.config.vocab_size
    ours, tokenizer = import_hf(folder)
    base_logits = logits(ours, vocab)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=tuple(FAMILIES[case].split(",")), rslora=case.startswith("qwen"))
    apply_lora(ours, lora)
    randomize_adapters(ours, seed=len(case))
    adapted_logits = logits(ours, vocab)
    assert (adapted_logits - base_logits).abs().max() > 1e-2  # the adapters change the model

    export = export_hf(ours, tokenizer, tmp_path / "export")  # the base, and the adapters beside it
    save_peft(ours, lora, tmp_path / "adapter", base_model=str(export))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    torch.testing.assert_close(logits(hf_base, vocab), base_logits, atol=1e-5, rtol=1e-5)
    theirs = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(theirs, vocab), adapted_logits, atol=1e-5, rtol=1e-5)

    # and back: the peft folder onto a fresh samovar model of the base
    again, _ = import_hf(folder)
    load_peft(again, tmp_path / "adapter")
    torch.testing.assert_close(logits(again, vocab), adapted_logits, atol=1e-5, rtol=1e-5)

    # merged: plain Linears, the same logits
    merged = merge_lora(ours)
    assert not adapted(merged) and all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(logits(merged, vocab), adapted_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case,targets,rank", [
    ("llama-gqa", ["q_proj", "o_proj", "down_proj"], 3),
    ("gpt2", ["c_attn", "c_fc"], 2),
    ("deepseek-v3", ["q_b_proj", "kv_a_proj_with_mqa"], 5),
])
def test_an_adapter_made_by_peft_loads_into_samovar(case, targets, rank, tmp_path):
    reference, folder = hf_reference(case, tmp_path)
    vocab = reference.config.vocab_size
    config = peft.LoraConfig(r=rank, lora_alpha=7, target_modules=targets, init_lora_weights=False,
                             layers_to_transform=[1], fan_in_fan_out=case == "gpt2")
    theirs = peft.get_peft_model(reference, config).eval()
    expected = logits(theirs, vocab)
    theirs.save_pretrained(tmp_path / "peft")
    ours, _ = import_hf(folder)
    lora = load_peft(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours, vocab), expected, atol=1e-5, rtol=1e-5)
    assert (lora.rank, lora.alpha) == (rank, rank)  # only layer 1 adapted: padded, scaling folded into B


def test_the_adapted_model_starts_equal_to_its_base_and_disables_to_it():
    from samovar.config import get_preset
    from samovar.model import build_model

    torch.manual_seed(0)
    model = build_model(get_preset("llama-tiny").replace(vocab_size=64))
    before = logits(model, 64)
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj", "down_proj")))
    torch.testing.assert_close(logits(model, 64), before, rtol=0, atol=0)  # B starts at zero
    randomize_adapters(model, 1)
    assert not torch.allclose(logits(model, 64), before)
    with adapters_disabled(model):
        torch.testing.assert_close(logits(model, 64), before, rtol=0, atol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * model.config.n_layer
    with pytest.raises(ConfigError, match="no w1; its projections are"):
        apply_lora(build_model(get_preset("llama-tiny")), LoRAConfig(rank=2, targets=("w1",)))


def test_scaling_is_peft_s():
    assert LoRAConfig(rank=8, alpha=16).scaling == 2.0
    assert LoRAConfig(rank=16, alpha=8, rslora=True).scaling == 8 / math.sqrt(16)
    for bad in (dict(rank=0), dict(rank=2, dropout=1.0), dict(rank=2, targets=())):
        with pytest.raises(ConfigError):
            LoRAConfig(**bad)


def test_a_lora_checkpoint_refuses_a_changed_base(tmp_path):
    from samovar.config import get_preset
    from samovar.model import build_model

    torch.manual_seed(0)
    cfg = get_preset("llama-tiny").replace(vocab_size=64)
    base = build_model(cfg)
    save_checkpoint(tmp_path / "base", base, None)
    lora = LoRAConfig(rank=2, targets=("v_proj",))
    apply_lora(base, lora)
    randomize_adapters(base, 2)
    save_checkpoint(tmp_path / "adapter", base, None, adapter=adapter_record(lora, tmp_path / "base"))
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    fresh = build_model(cfg)
    assert load_checkpoint_into(fresh, tmp_path / "adapter") == [n for n in adapted(base)]
    torch.testing.assert_close(logits(fresh, 64), logits(base, 64), rtol=0, atol=0)
    assert all(isinstance(m, LoRALinear) for m in adapted(fresh).values())

    changed = build_model(cfg)  # other weights where the base was
    save_checkpoint(tmp_path / "base", changed, None)
    with pytest.raises(CheckpointError, match=f"base checkpoint {tmp_path / 'base'} has changed"):
        load_checkpoint_into(build_model(cfg), tmp_path / "adapter")
    record = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert record["base"] == str((tmp_path / "base").resolve()) and len(record["base_sha256"]) == 64


# ---- training with LoRA, and what a LoRA run gives -------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, chat_model):
    """LoRA fine-tuning of the tiny chat model on conversations, from the command line."""
    from conftest import PAIRS, run_cli

    root = tmp_path_factory.mktemp("lora")
    swapped = [(q, PAIRS[(i + 1) % len(PAIRS)][1]) for i, (q, _) in enumerate(PAIRS)]  # new answers to learn
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                        ensure_ascii=False) for q, a in swapped * 8]
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepared = run_cli("prepare", root / "chat.jsonl", "--chat", "openai", "--tokenizer",
                       chat_model / "tokenizer.json", "--out", root / "data", "--no-clean", "--val-fraction", "0.3")
    assert prepared.returncode == 0, prepared.stderr
    result = run_cli("train", "--init-from", chat_model, "--data", root / "data", "--out", root / "run",
                     "--set", "objective=sft", "--set", "lora_rank=4", "--set", "lora_alpha=8",
                     "--set", "lora_targets=q_proj,v_proj,gate_proj,down_proj", "--set", "max_steps=40", "--set", "warmup_steps=0",
                     "--set", "eval_interval=20", "--set", "eval_steps=1", "--set", "batch_size=8",
                     "--set", "device=cpu", "--set", "peak_flops=0", "--set", "lr=1e-2", "--set", "plot=false")
    assert result.returncode == 0, result.stderr
    return root


def test_a_lora_run_trains_the_adapters_only(lora_run, chat_model):
    from samovar.api import load
    from samovar.checkpoint import load_optimizer_state, load_weights

    last = lora_run / "run" / "checkpoints" / "step-0000040"
    assert sorted(p.name for p in last.iterdir()) == sorted(
        ["adapter.json", "adapter.safetensors", "config.json", "optimizer.pt", "tokenizer.json",
         "tokenizer_config.json", "trainer_state.json"])
    model, _ = load(lora_run / "run", device="cpu")
    base = load_weights(chat_model)
    state = model.state_dict()
    for name, tensor in base.items():  # every base weight, bit for bit
        assert torch.equal(state[name], tensor), name
    layers = adapted(model)
    assert len(layers) == 4 * model.config.n_layer
    assert all(m.lora_B.weight.abs().max() > 0 for m in layers.values())  # trained away from zero
    optimizer = load_optimizer_state(last)["optimizer"]
    assert len(optimizer["state"]) == 2 * len(layers)  # Adam's moments for the adapters alone
    assert sum(s["exp_avg"].numel() for s in optimizer["state"].values()) == \
        sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in layers.values())


def test_a_lora_run_generates_merges_and_exports(lora_run, chat_model, tmp_path):
    from conftest import run_cli
    from samovar.api import LLM, load

    model, tokenizer = load(lora_run / "run", device="cpu")
    vocab = model.config.vocab_size
    llm = LLM(model, tokenizer)
    from conftest import PAIRS
    from samovar.data import TokenData

    train_text = tokenizer.decode(TokenData.open(lora_run / "data").train.tolist())
    learned = [(q, PAIRS[(i + 1) % len(PAIRS)][1]) for i, (q, _) in enumerate(PAIRS) if q in train_text]
    assert len(learned) >= 2
    for q, a in learned:  # the adapters learned the swapped answers
        assert llm.chat([{"role": "user", "content": q}], temperature=0, max_tokens=30).strip() == a
    q, a = learned[0]
    import subprocess
    import sys

    chat = subprocess.run([sys.executable, "-m", "samovar", "chat", str(lora_run / "run"), "--temperature", "0",
                           "--max-tokens", "40", "--no-compile"],
                          input=q + "\n", capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and a in chat.stdout, chat.stderr

    openai = pytest.importorskip("openai")
    from conftest import Server

    server = Server(lora_run / "run", "--no-compile")  # the server, with the adapters unmerged
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="run", messages=[{"role": "user", "content": q}],
                                                temperature=0, max_tokens=30)
        assert answer.choices[0].message.content.strip() == a
    finally:
        server.stop()

    merged = run_cli("merge-lora", lora_run / "run", "--out", tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr
    plain, _ = load(tmp_path / "merged", device="cpu")
    assert not adapted(plain) and (tmp_path / "merged" / "model.safetensors").exists()
    torch.testing.assert_close(logits(plain, vocab), logits(model, vocab), atol=1e-5, rtol=1e-5)

    exported = run_cli("export", lora_run / "run", "--out", tmp_path / "hf")
    assert exported.returncode == 0, exported.stderr
    config = json.loads((tmp_path / "hf" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                                            tmp_path / "hf" / "adapter").eval()
    torch.testing.assert_close(logits(theirs, vocab), logits(model, vocab), atol=1e-5, rtol=1e-5)

    back = run_cli("import", tmp_path / "hf" / "adapter", "--base", chat_model, "--out", tmp_path / "imported")
    assert back.returncode == 0, back.stderr
    again, _ = load(tmp_path / "imported", device="cpu")
    torch.testing.assert_close(logits(again, vocab), logits(model, vocab), atol=1e-5, rtol=1e-5)
    no_base = run_cli("import", tmp_path / "hf" / "adapter", "--out", tmp_path / "y")
    assert no_base.returncode == 2 and "give --base CKPT" in no_base.stderr


def test_a_changed_base_or_a_grown_vocabulary_is_refused_in_one_line(lora_run, chat_model, tmp_path):
    import shutil

    from conftest import run_cli
    from samovar.checkpoint import save_checkpoint
    from samovar.config import get_preset
    from samovar.model import build_model

    copy = tmp_path / "base"
    shutil.copytree(chat_model, copy)
    run = tmp_path / "run"
    shutil.copytree(lora_run / "run", run)
    for ckpt in (run / "checkpoints").iterdir():
        record = json.loads((ckpt / "adapter.json").read_text())
        (ckpt / "adapter.json").write_text(json.dumps({**record, "base": str(copy)}))
    assert run_cli("generate", run, "--prompt", "a", "--max-tokens", "2").returncode == 0
    torch.manual_seed(1)
    save_checkpoint(copy, build_model(json_config(copy)), None)
    result = run_cli("generate", run, "--prompt", "a", "--max-tokens", "2")
    assert result.returncode == 2 and f"the base checkpoint {copy} has changed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    # a base without the chat tokens: LoRA would leave their embedding rows untrained
    from samovar.tokenizer import Tokenizer

    plain_tok = Tokenizer.train("char", ["привет здравствуй как дела хорошо спасибо кто ты я самовар"])
    save_checkpoint(tmp_path / "plain", build_model(get_preset("llama-tiny").replace(
        vocab_size=plain_tok.vocab_size, context_len=128)), plain_tok)
    prepared = run_cli("prepare", lora_run / "chat.jsonl", "--chat", "openai", "--tokenizer",
                       tmp_path / "plain" / "tokenizer.json", "--out", tmp_path / "data", "--no-clean",
                       "--val-fraction", "0.3")
    assert prepared.returncode == 0, prepared.stderr
    grown = run_cli("train", "--init-from", tmp_path / "plain", "--data", tmp_path / "data", "--out", tmp_path / "g",
                    "--set", "objective=sft", "--set", "lora_rank=2", "--set", "device=cpu")
    assert grown.returncode == 2 and "LoRA keeps the embeddings frozen" in grown.stderr


def json_config(folder):
    from samovar.config import ModelConfig

    return ModelConfig.load(folder / "config.json")


def test_lora_with_activation_checkpointing_saves_the_same_names_and_quantizing_is_refused(lora_run, chat_model,
                                                                                            tmp_path):
    from conftest import run_cli
    from samovar.api import load

    result = run_cli("train", "--init-from", chat_model, "--data", lora_run / "data", "--out", tmp_path / "run",
                     "--set", "objective=sft", "--set", "lora_rank=2", "--set", "activation_checkpointing=true",
                     "--set", "optimizer=muon", "--set", "max_steps=2", "--set", "eval_interval=2",
                     "--set", "eval_steps=1", "--set", "batch_size=2", "--set", "device=cpu", "--set", "peak_flops=0")
    assert result.returncode == 0, result.stderr
    model, _ = load(tmp_path / "run", device="cpu")
    assert sorted(adapted(model)) == sorted(f"blocks.{i}.attn.{p}" for i in range(model.config.n_layer)
                                            for p in ("q_proj", "v_proj"))
    with pytest.raises(CheckpointError, match="merge them first"):
        load(tmp_path / "run", device="cpu", quantize="int8")
    changed = run_cli("train", "--resume", tmp_path / "run", "--set", "lora_rank=4", "--set", "max_steps=3")
    assert changed.returncode == 2 and "LoRA settings (lora_*) cannot change" in changed.stderr


@pytest.mark.slow  # about a minute: the benchmarks themselves, at their smallest
def test_the_lora_and_dpo_benchmarks_run(lora_run, chat_model, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    dpo = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dpo.py"), "--sft", str(chat_model),
                          "--qa", str(lora_run / "data"), "--work", str(tmp_path / "dpo"), "--minutes", "0.05",
                          "--train-premises", "12", "--held-out", "6"], capture_output=True, text=True, timeout=600)
    assert dpo.returncode == 0, dpo.stderr
    assert "| reward accuracy (held-out pairs) | 0.0% |" in dpo.stdout and "| exact match |" in dpo.stdout
    lora = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora.py"), "--base", str(chat_model),
                           "--data", str(lora_run / "data"), "--work", str(tmp_path / "lora"), "--steps", "2",
                           "--rank", "2", "--targets", "q_proj,v_proj"], capture_output=True, text=True, timeout=600)
    assert lora.returncode == 0, lora.stderr
    assert "| trainable parameters |" in lora.stdout and "| peak memory (RSS, MiB), glibc malloc" in lora.stdout
