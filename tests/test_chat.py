"""Conversations (data/conversations.py), chat templates equal to HF's (chat.py), fine-tuning on
conversations, and `samovar chat` with its memory."""

import json
import random

import numpy as np
import pytest
import torch

from samovar.chat import ROLE_TOKENS, ChatError, ChatSession, add_chat_tokens, render
from samovar.data import DataError, ReadOptions, masked_batch, read_conversations, split_by_group
from samovar.tokenizer import Tokenizer

from conftest import run_cli, shared_file

WORDS = ["Привет", "как", "дела", "hello", "world", "🙂", "ёжик", "Москва", "—", "12:30", "ok", "?", "!", " "]


def random_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Conversations of every shape: Cyrillic, emoji, empty turns, with and without a system prompt."""
    rng = random.Random(seed)

    def text():
        return "".join(rng.choice(WORDS) + rng.choice(["", " ", "\n"]) for _ in range(rng.randint(0, 8)))

    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
        for t in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": text()})
            if rng.random() < 0.9 or t < 1:
                messages.append({"role": "assistant", "content": text()})
        out.append(messages)
    return out


@pytest.fixture(scope="module", params=["char", "bpe"])
def exported_tokenizer(request, tmp_path_factory):
    """A chat tokenizer of each kind, saved and loaded back by transformers."""
    from transformers import AutoTokenizer

    corpus = ["".join(WORDS) * 30, "Съешь же ещё этих мягких французских булок. The quick brown fox."]
    tok = add_chat_tokens(Tokenizer.train(request.param, corpus, vocab_size=400 if request.param == "bpe" else None))
    folder = tmp_path_factory.mktemp(f"tok_{request.param}")
    tok.save(folder / "tokenizer.json")
    return tok, AutoTokenizer.from_pretrained(folder), folder


def test_samovar_template_equals_apply_chat_template(exported_tokenizer):
    tok, hf, _ = exported_tokenizer
    for messages in random_conversations(200):
        for generation_prompt in (False, True):
            ids, mask = render(tok, messages, add_generation_prompt=generation_prompt)
            theirs = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                            add_generation_prompt=generation_prompt)
            assert ids == theirs["input_ids"] and mask == theirs["assistant_masks"], messages
            assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id


def test_the_mask_covers_exactly_what_the_assistant_says(exported_tokenizer):
    tok = exported_tokenizer[0]
    messages = [{"role": "system", "content": "Будь краток."}, {"role": "user", "content": "Привет 🙂"},
                {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "ok?"},
                {"role": "assistant", "content": ""}]
    ids, mask = render(tok, messages)
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == tok.encode("hello world") + [tok.eos_id] + [tok.eos_id]  # an empty reply: only its end
    with pytest.raises(ChatError, match="message 1 must be"):
        render(tok, [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}])


def test_chat_tokens_are_added_after_the_old_ids_which_do_not_change():
    old = Tokenizer.train("bpe", ["Привет, как дела? " * 50], vocab_size=300)
    new = add_chat_tokens(old)
    old_vocab = old.hf.get_vocab(with_added_tokens=True)
    assert all(new.hf.token_to_id(t) == i for t, i in old_vocab.items())
    role_ids = [new.token_id(t) for t in ROLE_TOKENS.values()]
    assert sorted(role_ids) == list(range(old.vocab_size, new.vocab_size))
    assert not set(role_ids) & set(new.encode("system user assistant <| user |> Привет, как дела?"))
    bare = add_chat_tokens(Tokenizer.train("char", ["abc"], special_tokens=()))  # no bos/eos: they are added
    assert bare.bos_id is not None and bare.eos_id is not None


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
          "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
          "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
         "{{ raise_exception('System role not supported') }}{% endif %}"
         "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' }}{% if role == 'model' %}{% generation %}"
         "{{ message['content'] | trim + '<end_of_turn>\n' }}{% endgeneration %}"
         "{% else %}{{ message['content'] | trim + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


@pytest.mark.parametrize("template, specials", [
    (CHATML, ["<|im_start|>", "<|im_end|>"]),
    (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    (GEMMA, ["<bos>", "<start_of_turn>", "<end_of_turn>"]),
])
def test_an_imported_models_own_template_renders_as_transformers_renders_it(template, specials, tmp_path):
    from transformers import AutoTokenizer

    base = Tokenizer.train("bpe", ["".join(WORDS) * 30, "The quick brown fox jumps."], vocab_size=400,
                           special_tokens=specials)
    tok = Tokenizer(base.hf, {"bos": specials[0]} if template != CHATML else {}, chat_template=template)
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path)
    assert loaded.chat_template == template and add_chat_tokens(loaded) is loaded  # its own template is kept
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for messages in random_conversations(200, seed=1):
        if template == GEMMA:
            messages = [m for m in messages if m["role"] != "system"]
        for generation_prompt in (False, True):
            ids, mask = render(loaded, messages, add_generation_prompt=generation_prompt)
            theirs = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True, add_generation_prompt=generation_prompt)
            assert ids == theirs["input_ids"] and mask == theirs["assistant_masks"], messages
    if template == GEMMA:
        with pytest.raises(ChatError, match="System role not supported"):
            render(loaded, [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])


# ---- formats -----------------------------------------------------------------------------------------------
def test_every_format_reads_and_malformed_lines_are_reported_by_number(tmp_path):
    (tmp_path / "openai.jsonl").write_text(
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Привет"},
                                 {"role": "assistant", "content": "Здравствуй"}]}, ensure_ascii=False) + "\n"
        + "{not json\n"
        + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n", encoding="utf-8")
    (tmp_path / "sharegpt.jsonl").write_text(
        json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}) + "\n")
    (tmp_path / "qa.csv").write_text("question,answer\nКто лает?,пёс\n,пусто\nГде кот?,на окне\n", encoding="utf-8")
    report = read_conversations([tmp_path / "openai.jsonl"])
    assert report.skipped == 2 and report.problems[0].startswith(f"{tmp_path / 'openai.jsonl'}:2: malformed JSON")
    assert f"{tmp_path / 'openai.jsonl'}:3:" in report.problems[1]
    assert report.conversations[0].messages[1] == {"role": "user", "content": "Привет"}
    with pytest.raises(DataError, match="openai.jsonl:2: malformed JSON"):
        read_conversations([tmp_path / "openai.jsonl"], options=ReadOptions(strict=True))
    shared = read_conversations([tmp_path / "sharegpt.jsonl"]).conversations[0].messages
    assert shared == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    csv_report = read_conversations([tmp_path / "qa.csv"])
    assert len(csv_report.conversations) == 2 and csv_report.problems[0].startswith(f"{tmp_path / 'qa.csv'}:3:")
    with pytest.raises(DataError, match="no columns 'q' and 'a'.*--question-column"):
        read_conversations([tmp_path / "qa.csv"], options=ReadOptions(question="q", answer="a"))


def test_parquet_columns_by_name(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"вопрос": ["Как дела?", "Ты где?"], "ответ": ["Хорошо.", "Дома."]}),
                   tmp_path / "russian_dialogues.parquet")
    report = read_conversations([tmp_path / "russian_dialogues.parquet"],
                                options=ReadOptions(question="вопрос", answer="ответ"))
    assert [c.messages[1]["content"] for c in report.conversations] == ["Хорошо.", "Дома."]


def test_a_telegram_export_becomes_conversations(tmp_path):
    def msg(n, who, when, text, **extra):
        return {"id": n, "type": "message", "date": when, "from": who, "from_id": f"user{hash(who) % 100}",
                "text": text, **extra}

    export = {"name": "chat", "messages": [
        msg(1, "Аня", "2024-03-01T10:00:00", "Привет!"),
        msg(2, "Аня", "2024-03-01T10:00:30", [{"type": "bold", "text": "Ты"}, " тут?"]),
        {"id": 3, "type": "service", "date": "2024-03-01T10:01:00", "action": "pin_message"},
        msg(4, "Бот", "2024-03-01T10:02:00", "Тут."),
        msg(5, "Аня", "2024-03-01T20:00:00", "Вечер добрый", reply_to_message_id=4),  # 10 hours later
        msg(6, "Бот", "2024-03-01T20:01:00", "Добрый!", forwarded_from="Кто-то"),
    ]}
    (tmp_path / "result.json").write_text(json.dumps(export, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match="--assistant.*Аня, Бот"):
        read_conversations([tmp_path / "result.json"])
    convs = read_conversations([tmp_path / "result.json"], options=ReadOptions(assistant="Бот")).conversations
    assert [c.messages for c in convs] == [
        [{"role": "user", "content": "Привет!\nТы тут?"}, {"role": "assistant", "content": "Тут."}],
        [{"role": "user", "content": "Вечер добрый"}, {"role": "assistant", "content": "Добрый!"}]]


def test_qa_needs_the_earlier_turn_and_splits_by_premise():
    report = read_conversations([shared_file("ru_qa/premise_question_answer6.txt")])
    first = report.conversations[0]
    assert [m["role"] for m in first.messages] == ["user", "user", "assistant"]
    assert first.messages[0]["content"].startswith("А божественное право") and first.group == first.messages[0]["content"]
    train, val = split_by_group(report.conversations, 0.1)
    assert not {c.group for c in train} & {c.group for c in val} and len(val) > 0.05 * len(report.conversations)
    dialogues = read_conversations([shared_file("ru_dialogues/anekdot_dialogues.txt")]).conversations
    assert len(dialogues) > 15_000 and dialogues[0].messages[0]["role"] == "user"
    assert all(m["role"] == ("user", "assistant")[i % 2] for c in dialogues[:200] for i, m in enumerate(c.messages))


def test_a_long_conversation_is_cut_at_a_turn_boundary():
    ids = np.arange(30)
    mask = np.array([0] * 5 + [1] * 5 + [0] * 5 + [1] * 5 + [0] * 5 + [1] * 5, dtype=np.uint8)
    index = np.array([[0, 30]])
    x, y, learn = masked_batch(ids, mask, index, [0], context_len=24)
    assert x.shape[1] == 19 and y[0, -1] == 19  # the window ends where the second reply ends
    assert int(learn.sum()) == 10 and learn[0, 4:9].all()  # both replies whole, nothing of the third
    first_only = masked_batch(ids[:10], mask[:10], np.array([[0, 10]]), [0], context_len=6)
    assert first_only[1][0, -1] == 9 and first_only[0].shape[1] == 6  # a long prompt loses its start
    long_reply = masked_batch(ids[:10], np.array([0, 0] + [1] * 8, dtype=np.uint8), np.array([[0, 10]]), [0], 6)
    assert long_reply[0][0].tolist() == [0, 1, 2, 3, 4, 5] and int(long_reply[2].sum()) == 5  # the reply's start


# ---- memory -----------------------------------------------------------------------------------------------
def test_a_session_drops_the_oldest_exchanges_never_the_system_prompt(exported_tokenizer, tmp_path):
    tok = exported_tokenizer[0]
    session = ChatSession(tok, context_len=120, system="Будь краток.")
    for n in range(6):
        messages, dropped = session.prompt(f"вопрос {n} " + "ёжик " * 3, reply_tokens=20)
        assert messages[0] == {"role": "system", "content": "Будь краток."}
        assert len(render(tok, messages, add_generation_prompt=True)[0]) + 20 <= 120
        session.answered(f"ответ {n}")
    assert dropped > 0 and session.turns[0]["role"] == "user" and "вопрос 5" in session.turns[-2]["content"]
    session.save(tmp_path / "c.jsonl")
    again = ChatSession(tok, 120)
    again.load(tmp_path / "c.jsonl")
    assert again.messages == session.messages
    with pytest.raises(ChatError, match="does not fit"):
        session.prompt("ёжик " * 200, reply_tokens=20)


# ---- the whole path, from the command line ----------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, small_text):
    """Pretrain a char model on plain text, add conversations (the tokenizer gains the chat tokens),
    fine-tune it on their assistant turns, as a user does."""
    dialogues = shared_file("ru_dialogues/anekdot_dialogues.txt")
    root = tmp_path_factory.mktemp("chat")
    lines = dialogues.read_text(encoding="utf-8").splitlines()
    (root / "dialogues.txt").write_text("\n".join(lines[:4000]) + "\n", encoding="utf-8")
    (root / "plain.txt").write_text(" ".join(l[2:] for l in lines[4000:12000] if l.startswith("- ")), encoding="utf-8")
    tiny = ("--set", "n_layer=2", "--set", "n_embd=64", "--set", "n_head=2", "--set", "context_len=128",
            "--set", "batch_size=8", "--set", "device=cpu", "--set", "eval_steps=2", "--set", "peak_flops=0")
    assert run_cli("prepare", root / "plain.txt", "--out", root / "plain").returncode == 0
    pre = run_cli("train", "--preset", "llama-tiny", "--data", root / "plain", "--out", root / "pre", *tiny,
                  "--set", "max_steps=20", "--set", "eval_interval=20")
    assert pre.returncode == 0, pre.stderr
    prepared = run_cli("prepare", root / "dialogues.txt", "--chat", "dialogue", "--tokenizer",
                       root / "pre" / "tokenizer.json", "--out", root / "chatdata")
    assert prepared.returncode == 0, prepared.stderr
    sft = run_cli("train", "--init-from", root / "pre", "--data", root / "chatdata", "--out", root / "sft", *tiny,
                  "--set", "objective=sft", "--set", "max_steps=60", "--set", "eval_interval=30", "--set", "lr=3e-3")
    assert sft.returncode == 0, sft.stderr
    return root


def test_fine_tuning_grows_the_vocabulary_with_mean_rows(chat_run):
    from samovar.checkpoint import load_weights, resolve_checkpoint
    from samovar.train.state import extends, grow_vocab

    before = load_weights(resolve_checkpoint(chat_run / "pre"))
    old_vocab = before["tok_emb.weight"].shape[0]
    meta = json.loads((chat_run / "chatdata" / "meta.json").read_text())
    assert meta["vocab_size"] == old_vocab + 3 and meta["examples"]["kind"] == "chat"  # the three role tokens
    assert json.loads((chat_run / "sft" / "config.json").read_text())["vocab_size"] == meta["vocab_size"]
    grown = grow_vocab(before, old_vocab + 3)
    for name in ("tok_emb.weight", "lm_head.weight"):
        torch.testing.assert_close(grown[name][:old_vocab], before[name])
        torch.testing.assert_close(grown[name][old_vocab:], before[name].mean(0).expand(3, -1))
    chat_tok, pre_tok = Tokenizer.load(chat_run / "chatdata"), Tokenizer.load(chat_run / "pre")
    assert extends(chat_tok, pre_tok) and not extends(pre_tok, chat_tok)
    assert chat_tok.chat_template is not None and pre_tok.chat_template is None


def test_chat_keeps_the_conversation_scripted_through_stdin(chat_run, tmp_path):
    import os
    import subprocess
    import sys

    script = "Привет!\nКак дела?\n/save {0}\n/reset\nТы кто?\n/exit\nне дойдёт\n".format(tmp_path / "c.jsonl")
    result = subprocess.run([sys.executable, "-m", "samovar", "chat", str(chat_run / "sft"), "--system", "Шути.",
                             "--max-tokens", "20", "--temperature", "0"], input=script, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert "samovar: compiled in" in result.stderr  # the compiled step, by default; its answers are LLM.chat's:
    assert len(list((tmp_path / "cache" / "samovar" / "aot").glob("*.pt2"))) == 1  # at start-up, none mid-conversation
    assert "Warning" not in result.stderr
    answers = result.stdout.splitlines()
    assert len(answers) == 3  # one line an answer; /exit ends before the last line
    saved = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [m["role"] for m in saved] == ["system", "user", "assistant", "user", "assistant"]
    assert saved[2]["content"].split() == answers[0].split()
    import samovar

    llm = samovar.LLM.from_path(chat_run / "sft", device="cpu")
    assert llm.chat(saved[:4], max_tokens=20, temperature=0).split() == answers[1].split()  # the same memory
    pieces = list(llm.chat_stream(saved[:2], max_tokens=20, temperature=0))
    assert "".join(pieces).split() == answers[0].split()


def test_a_model_without_a_template_is_refused_with_a_hint(chat_run):
    result = run_cli("chat", chat_run / "pre")
    assert result.returncode == 2 and "no chat template" in result.stderr and "--chat" in result.stderr


def test_an_exported_chat_model_renders_and_stops_as_transformers_does(chat_run, tmp_path):
    from transformers import AutoTokenizer

    assert run_cli("export", chat_run / "sft", "--format", "hf", "--out", tmp_path / "hf").returncode == 0
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    import samovar

    tok = samovar.LLM.from_path(chat_run / "sft", device="cpu").tokenizer
    for messages in random_conversations(50, seed=3):
        ids, mask = render(tok, messages, add_generation_prompt=False)
        theirs = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ids == theirs["input_ids"] and mask == theirs["assistant_masks"]
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == tok.eos_id == hf.eos_token_id


def test_last_replies_are_the_last_runs_of_learned_tokens():
    from samovar.evaluation import last_replies

    mask = np.array([0, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0], dtype=np.uint8)
    index = np.array([[0, 7], [7, 9], [9, 12]])
    assert last_replies(mask, index) == [(0, 4, 7), (9, 10, 11)]  # the middle example learns nothing


def test_eval_scores_the_held_out_conversations_last_turns(chat_run):
    result = run_cli("eval", chat_run / "sft", "--data", chat_run / "chatdata", "--json", "--no-latency",
                     "--max-examples", "8")
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["task"] == "chat" and r["examples"] == 8 and 0 <= r["end_of_turn"] <= 1
    assert r["answer_tokens"] > 0 and "most_frequent" in r and r["most_frequent_reply"]
    dialogues = (chat_run / "dialogues.txt").read_text(encoding="utf-8")
    for sample in r["samples"]:  # the references are turns of the dialogues, the prompt's turn before them
        assert f"- {sample['reference']}" in dialogues and sample["prompt"] in dialogues
    text = run_cli("eval", chat_run / "sft", "--data", chat_run / "chatdata", "--no-latency", "--max-examples", "4")
    assert "ended with the end-of-turn token" in text.stdout and "most frequent training reply" in text.stdout
    from_file = run_cli("eval", chat_run / "sft", "--data", chat_run / "dialogues.txt", "--task", "chat", "--json",
                        "--no-latency", "--max-examples", "4")
    assert from_file.returncode == 0, from_file.stderr
    f = json.loads(from_file.stdout)
    assert f["examples"] == 4 and "most_frequent" not in f and f["samples"][0]["reference"] in dialogues
    refused = run_cli("eval", chat_run / "sft", "--data", chat_run / "plain", "--task", "chat", "--no-latency")
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1


def test_an_imported_gpt2_becomes_a_chat_bot_that_transformers_runs_the_same(tmp_path):
    """The path from an HF GPT-2 folder (its byte-level BPE and `<|endoftext|>`, no template): import,
    `prepare --chat` with its tokenizer, fine-tune, `samovar chat`; exported back, transformers answers
    the same conversation with the same tokens."""
    import subprocess
    import sys

    import transformers
    from tokenizers import ByteLevelBPETokenizer

    lines = shared_file("ru_dialogues/anekdot_dialogues.txt").read_text(encoding="utf-8").splitlines()[:3000]
    (tmp_path / "dialogues.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=600, special_tokens=["<|endoftext|>"])
    hf_tok = transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                            eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    hf_tok.save_pretrained(tmp_path / "gpt2")
    config = transformers.GPT2Config(vocab_size=len(hf_tok), n_positions=128, n_embd=64, n_layer=2, n_head=2,
                                     bos_token_id=hf_tok.eos_token_id, eos_token_id=hf_tok.eos_token_id)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")

    assert run_cli("import", tmp_path / "gpt2", "--out", tmp_path / "imported").returncode == 0
    prepared = run_cli("prepare", tmp_path / "dialogues.txt", "--chat", "dialogue", "--tokenizer",
                       tmp_path / "imported" / "tokenizer.json", "--out", tmp_path / "chatdata")
    assert prepared.returncode == 0, prepared.stderr
    sft = run_cli("train", "--init-from", tmp_path / "imported", "--data", tmp_path / "chatdata", "--out",
                  tmp_path / "sft", "--set", "objective=sft", "--set", "max_steps=30", "--set", "eval_interval=30",
                  "--set", "batch_size=4", "--set", "eval_steps=2", "--set", "lr=3e-3", "--set", "device=cpu")
    assert sft.returncode == 0, sft.stderr
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["vocab_size"] == len(hf_tok) + 3

    said = subprocess.run([sys.executable, "-m", "samovar", "chat", str(tmp_path / "sft"), "--max-tokens", "12",
                           "--temperature", "0", "--no-compile"], input="Привет!\nКак дела?\n", capture_output=True, text=True,
                          timeout=300)
    assert said.returncode == 0, said.stderr
    answers = said.stdout.splitlines()
    assert len(answers) == 2 and all(a.strip() for a in answers), answers

    assert run_cli("export", tmp_path / "sft", "--format", "hf", "--out", tmp_path / "hf").returncode == 0
    theirs_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    messages = [{"role": "user", "content": "Привет!"}, {"role": "assistant", "content": answers[0]},
                {"role": "user", "content": "Как дела?"}]
    prompt = theirs_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    with torch.no_grad():
        out = theirs.generate(prompt, max_new_tokens=12, do_sample=False,
                              generation_config=transformers.GenerationConfig.from_pretrained(tmp_path / "hf"))
    reply = theirs_tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    assert reply.split() == answers[1].split(), (reply, answers)
