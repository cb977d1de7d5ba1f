"""Cleaning conversations (data/cleaning.py): each rule, idempotence, prose left alone, duplicates,
the command line, and the measurement on planted noise."""

import json
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from samovar.data import Conversation, read_conversations
from samovar.data.cleaning import RULES, CleanOptions, clean_conversations, clean_text
from samovar.data.dedup import DedupOptions, near_duplicates

from conftest import ROOT, run_cli, shared_file


@pytest.mark.parametrize("rule, noisy, clean", [
    ("date", "Встретимся 12 марта 2024 г. в 15:30 у входа", "Встретимся у входа"),
    ("date", "[12.03.2021 14:55] Вася: привет", "Вася: привет"),
    ("date", "on March 12, 2024 we met at 5:30 PM.", "on we met at."),
    ("date", "отчёт за 2023-05-01 готов", "отчёт за готов"),
    ("forwarded", "Forwarded from Иван Петров\nНу и новости", "Ну и новости"),
    ("forwarded", "Пересланное сообщение от Маша\nсмотри", "смотри"),
    ("mention", "Привет @ivan_petrov как дела?", "Привет как дела?"),
    ("hashtag", "#новости дня и #fun", "дня и"),
    ("url", "ссылка https://example.com/a?b=1 смотри и vk.com/durov", "ссылка смотри и"),
    ("email", "пиши на ivan@mail.ru или john.doe@example.co.uk", "пиши на или"),
    ("phone", "звони +7 (999) 123-45-67 или 8 999 123 45 67, а в Лондон +44 20 7946 0958", "звони или, а в Лондон"),
    ("html", "<b>жирный</b> &amp; &quot;кавычки&quot; <br/>", 'жирный & "кавычки"'),
    ("repeats", "Ура!!!!! Что??? Ждём....... 😂😂😂 ну", "Ура! Что? Ждём... 😂 ну"),
    ("whitespace", "Тихо  и   спокойно\n\n\n\nконец  ", "Тихо и спокойно\n\nконец"),
])
def test_each_rule_removes_what_it_claims(rule, noisy, clean):
    changed = Counter()
    assert clean_text(noisy, changed=changed) == clean
    assert rule in changed
    others = tuple(r for r in RULES if r != rule)
    assert clean_text(noisy, rules=others) != clean or rule == "whitespace"  # switched off, it stays


WORDS_RU = "мама мыла раму и кот сидел на окне а потом ушёл в лес где было тихо и светло".split()
WORDS_EN = "the quick brown fox jumps over a lazy dog while it rains in the old town".split()
PROSE = st.lists(st.tuples(st.sampled_from(WORDS_RU + WORDS_EN + ["Москва", "ёж", "42", "1999"]),
                           st.sampled_from(["", "", "", ",", ".", "!", "?", "...", ":", " -", ";", "?!"])),
                 min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(PROSE, st.sampled_from([" ", "\n"]))
def test_prose_without_the_patterns_comes_back_byte_for_byte(words, sep):
    text = sep.join(w + p for w, p in words)
    assert clean_text(text) == text


NOISE = st.sampled_from(["12.03.2021", "@user", "#tag", "https://x.ru/a", "a@b.ru", "+7 999 123-45-67", "<i>",
                         "&amp;", "!!!!", "😂😂", "   ", "\n\n\n", "Forwarded from X\n", "15:30", "&amp;amp;", "<<b>b>"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(NOISE, st.sampled_from(WORDS_RU + WORDS_EN), st.text(max_size=5)), max_size=20),
       st.sampled_from(["", " "]))
def test_cleaning_is_idempotent(pieces, sep):
    once = clean_text(sep.join(pieces))
    assert clean_text(once) == once


def conv(*turns, group=None):
    return Conversation([{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)], group)


def test_empty_turns_and_duplicates_are_dropped_and_counted():
    convs = [conv("Привет @ivan", "Здравствуй!"), conv("Привет", "Здравствуй!"),  # the same once cleaned
             conv("https://x.ru", "@bot"),  # nothing left
             conv("Как пройти в библиотеку имени Ленина сегодня вечером?", "Прямо и направо, там увидите."),
             conv("Как пройти в библиотеку имени Ленина сегодня вечером??", "Прямо и направо, там увидите!")]
    kept, report = clean_conversations(convs)
    assert [c.messages[0]["content"] for c in kept] == ["Привет", "Как пройти в библиотеку имени Ленина сегодня вечером?"]
    assert report.dropped == {"exact duplicate": 1, "no assistant turn left": 1, "near duplicate": 1}
    assert report.empty_turns == 2 and report.changed["mention"] == 2
    kept_all, _ = clean_conversations(convs, CleanOptions(dedup=False, near_duplicate=None))
    assert len(kept_all) == 4


def test_near_duplicates_by_minhash():
    base = "Мама мыла раму, а кот сидел на окне и смотрел на улицу, где шёл дождь."
    texts = [base, base.replace("дождь", "снег"), "Совсем другой текст про лес и реку, и про рыбу в реке.", base + "!"]
    def jaccard(a, b):
        grams = [{t[i:i + 5] for i in range(len(t) - 4)} for t in (a.lower(), b.lower())]
        return len(grams[0] & grams[1]) / len(grams[0] | grams[1])

    assert jaccard(base, texts[1]) > 0.7 and jaccard(base, texts[3]) > 0.95 and jaccard(base, texts[2]) < 0.1
    chars = lambda t: DedupOptions(threshold=t, unit="char")  # noqa: E731
    assert near_duplicates(texts, chars(0.6)) == {1, 3}
    assert near_duplicates(texts, chars(0.9)) == {3}
    assert 2 not in near_duplicates(texts, chars(0.3))


def test_prepare_cleans_by_default_counts_and_dry_run_writes_nothing(tmp_path):
    lines = ["- Привет @vasya!!!!", "- Здравствуй, звони +7 999 123-45-67", "", "",
             "- Который час?", "- 15:30, пора", "", "", "- Пока", "- Пока!"]
    (tmp_path / "d.txt").write_text("\n\n\n".join(["\n".join(lines)] * 5) + "\n", encoding="utf-8")  # 3 x 5
    dry = run_cli("prepare", tmp_path / "d.txt", "--chat", "dialogue", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "nothing written" in dry.stdout and "before: 'Привет @vasya!!!!'" in dry.stdout
    assert "after:  'Привет!'" in dry.stdout and not list(tmp_path.glob("*/meta.json"))
    done = run_cli("prepare", tmp_path / "d.txt", "--chat", "dialogue", "--out", tmp_path / "data")
    assert done.returncode == 0, done.stderr
    assert "mention 5 turns" in done.stdout and "dropped 12 conversations (exact duplicate)" in done.stdout
    assert "near duplicate" not in done.stdout
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["examples"]["cleaning"]["changed"]["phone"] == 5 and meta["examples"]["train"] == 2
    kept = run_cli("prepare", tmp_path / "d.txt", "--chat", "dialogue", "--keep", "date", "--out", tmp_path / "kept",
                   "--near-duplicates", "0")
    assert "date" not in json.loads((tmp_path / "kept" / "meta.json").read_text())["examples"]["cleaning"]["changed"]
    bad = run_cli("prepare", tmp_path / "d.txt", "--chat", "dialogue", "--keep", "dates", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "unknown cleaning rule 'dates'" in bad.stderr
    raw = run_cli("prepare", tmp_path / "d.txt", "--chat", "dialogue", "--no-clean", "--out", tmp_path / "raw")
    assert raw.returncode == 0 and "cleaning" not in json.loads((tmp_path / "raw" / "meta.json").read_text())["examples"]


def test_planted_noise_is_removed_and_clean_text_kept():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cleaning import measure

    conversations = read_conversations([shared_file("ru_dialogues/anekdot_dialogues.txt")]).conversations[:3000]
    turns = [m["content"] for c in conversations for m in c.messages]
    result = measure(turns)
    assert all(share >= 0.99 for share in result["removed"].values()), result["removed"]
    assert result["clean_chars_changed"] < 0.005
