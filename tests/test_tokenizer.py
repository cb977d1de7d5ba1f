import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from samovar.tokenizer import EOS, Tokenizer, TokenizerError

CORPUS = ("Мороз и солнце; день чудесный! Ещё ты дремлешь, друг прелестный.\r\n"
          "To be, or not to be: that is the question. 😀 naïve café\x00\n") * 20


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train("bpe", [CORPUS], vocab_size=400)


@pytest.fixture(scope="module")
def char():
    return Tokenizer.train("char", [CORPUS])


@pytest.fixture(scope="module")
def word():
    return Tokenizer.train("word", [CORPUS])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_bpe_round_trips_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(sorted(set(CORPUS)))))
def test_char_round_trips_over_its_alphabet(text):
    tok = Tokenizer.train("char", [CORPUS])
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", ["Привет, мир!\r\n", "emoji 😀🇺🇦 and NUL \x00 end", "\n\n\t  ", "a" * 1000])
def test_bpe_round_trips_hard_cases(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_learns_merges(bpe):
    text = "To be, or not to be"
    assert len(bpe.encode(text)) < len(text.encode("utf-8")) / 2
    assert 259 < bpe.vocab_size <= 400  # merges stop early when the corpus has no more pairs


def test_char_vocabulary_is_sorted_characters_then_specials(char):
    chars = sorted(set(CORPUS))
    assert [char.encode(c)[0] for c in chars] == list(range(len(chars)))
    assert char.vocab_size == len(chars) + 4  # bos, eos, pad, unk
    assert char.decode(char.encode("Ж")) == "<|unk|>"  # an unseen character maps to unk


def test_char_without_specials_has_the_bare_alphabet():
    tok = Tokenizer.train("char", ["abcab"], special_tokens=())
    assert tok.vocab_size == 3
    assert tok.encode("cab") == [2, 0, 1]
    with pytest.raises(TokenizerError, match="'z' is not in the tokenizer's vocabulary"):
        tok.encode("z")


def test_char_fast_path_matches_hf(char):
    text = CORPUS[:300]
    assert char.encode(text) == char.hf.encode(text, add_special_tokens=False).ids
    with_special = "ab" + EOS + "c"
    assert char.encode(with_special)[2] == char.eos_id


def test_word_tokenizer_round_trips_known_words_and_marks_unknown(word):
    assert word.decode(word.encode("To be, or not to be")) == "To be, or not to be"
    ids = word.encode("To be zyzzyva")
    assert ids[-1] == word.token_id("<|unk|>")


def test_word_vocab_size_limit():
    tok = Tokenizer.train("word", [CORPUS], vocab_size=20)
    assert tok.vocab_size == 20


def test_special_tokens_and_roles(bpe):
    ids = bpe.encode("hi", bos=True, eos=True)
    assert ids[0] == bpe.bos_id and ids[-1] == bpe.eos_id
    assert bpe.pad_id is not None
    assert len({bpe.bos_id, bpe.eos_id, bpe.pad_id}) == 3
    assert bpe.encode(EOS) == [bpe.eos_id]  # a special token's text is that one token


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_save_load_round_trip(tmp_path, kind):
    tok = Tokenizer.train(kind, [CORPUS], vocab_size=300 if kind == "bpe" else None)
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path)
    assert again.kind == kind
    assert again.vocab_size == tok.vocab_size
    assert again.encode(CORPUS[:200]) == tok.encode(CORPUS[:200])
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_saved_tokenizer_loads_in_transformers(tmp_path, bpe):
    transformers = pytest.importorskip("transformers")
    bpe.save(tmp_path / "tokenizer.json")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    text = "Мороз и солнце 😀"
    assert fast(text)["input_ids"] == bpe.encode(text)
    assert fast.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_empty_corpus_is_refused(kind):
    with pytest.raises(TokenizerError, match="empty corpus"):
        Tokenizer.train(kind, [""])


def test_bad_inputs(tmp_path):
    with pytest.raises(TokenizerError, match="unknown tokenizer kind"):
        Tokenizer.train("sentencepiece", ["abc"])
    with pytest.raises(TokenizerError, match="vocab_size >= 259"):
        Tokenizer.train("bpe", ["abc"], vocab_size=100)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        Tokenizer.load(tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        Tokenizer.load(tmp_path / "missing.json")
