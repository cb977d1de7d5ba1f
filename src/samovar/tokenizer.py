"""Tokenizers: char, word and byte-level BPE behind one interface, all stored as HF `tokenizer.json`.

Every kind is a `tokenizers.Tokenizer` underneath, so the saved file loads in HF `transformers`
(PreTrainedTokenizerFast) with no code of ours:

| kind | model     | pre-tokenizer                            | round trip                           |
|------|-----------|------------------------------------------|--------------------------------------|
| char | WordLevel | every character on its own               | exact over the training alphabet     |
| word | WordLevel | words, punctuation and whitespace runs   | exact for in-vocabulary words        |
| bpe  | BPE       | GPT-2's byte-level split (ByteLevel)     | exact for any UTF-8 text             |

Special tokens: bos, eos, pad (and unk for char and word) are found by their conventional strings.
A chat model's tokenizer also has a chat template (chat.py), saved as HF saves it: in
tokenizer_config.json beside tokenizer.json, with the role tokens.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

KINDS = ("char", "word", "bpe")
BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
DEFAULT_SPECIALS = (BOS, EOS, PAD)
# the strings other tokenizers use for the same roles, so imported tokenizers work too
ROLE_STRINGS = {
    "bos": (BOS, "<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>"),
    "eos": (EOS, "</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>"),
    "pad": (PAD, "<pad>", "<|pad|>", "[PAD]"),
    "unk": (UNK, "<unk>", "[UNK]"),
}
CHAR_SPLIT = r"[\s\S]"  # any one character, newline included
WORD_SPLIT = r"\w+|[^\w\s]|\s+"


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """A thin, typed wrapper over `tokenizers.Tokenizer` (the `hf` attribute)."""

    def __init__(self, hf: HFTokenizer, roles: dict[str, str] | None = None, chat_template: str | None = None):
        self.hf = hf
        self.chat_template = chat_template  # a Jinja chat template (chat.py), or None
        model = json.loads(hf.to_str())
        self.kind = _kind_of(model)
        vocab = hf.get_vocab(with_added_tokens=True)
        self.special_tokens = [t["content"] for t in model.get("added_tokens", []) if t.get("special")]
        roles = dict(roles or {})
        for role, candidates in ROLE_STRINGS.items():
            if role not in roles:
                roles[role] = next((c for c in candidates if c in vocab), None)
        self.roles = roles
        self._char_vocab = None
        if self.kind == "char":
            self._char_vocab = {t: i for t, i in vocab.items() if len(t) == 1}
        self._fast = None  # a tiktoken encoder for byte-level BPE, built on first use

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def train(cls, kind: str, texts: Iterable[str], vocab_size: int | None = None,
              special_tokens: Iterable[str] = DEFAULT_SPECIALS) -> "Tokenizer":
        """Train a tokenizer of `kind` on `texts` (an iterable of strings, read once for char/word)."""
        if kind not in KINDS:
            raise TokenizerError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
        specials = list(dict.fromkeys(special_tokens))
        if kind == "char":
            chars = set()
            for t in texts:
                chars.update(t)
            if not chars:
                raise TokenizerError("cannot train a tokenizer on an empty corpus")
            if specials and UNK not in specials:
                specials.append(UNK)
            vocab = {c: i for i, c in enumerate(sorted(chars))}  # nanoGPT's order: ids of sorted chars
            for s in specials:
                vocab.setdefault(s, len(vocab))
            return cls.from_chars(vocab, specials)
        elif kind == "word":
            counts = Counter()
            split = re.compile(WORD_SPLIT)
            for t in texts:
                counts.update(split.findall(t))
            if not counts:
                raise TokenizerError("cannot train a tokenizer on an empty corpus")
            specials = [UNK] + [s for s in specials if s != UNK]
            n_words = len(counts) if vocab_size is None else max(0, vocab_size - len(specials))
            words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_words]]
            vocab = {w: i for i, w in enumerate(specials + [w for w in words if w not in specials])}
            hf = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
            hf.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_SPLIT), behavior="isolated")
        else:
            vocab_size = vocab_size or 4096
            floor = len(pre_tokenizers.ByteLevel.alphabet()) + len(specials)
            if vocab_size < floor:
                raise TokenizerError(f"byte-level BPE needs vocab_size >= {floor} (256 bytes + specials)")
            hf = HFTokenizer(models.BPE())
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            hf.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                          show_progress=False)
            seen = False

            def _texts():
                nonlocal seen
                for t in texts:
                    seen = seen or bool(t)
                    yield t

            hf.train_from_iterator(_texts(), trainer)
            if not seen:
                raise TokenizerError("cannot train a tokenizer on an empty corpus")
        if kind != "bpe":
            hf.decoder = decoders.Fuse()  # join the pieces with nothing between them
        hf.add_special_tokens(specials)
        return cls(hf)

    @classmethod
    def from_chars(cls, vocab: dict[str, int], specials: list[str], **kwargs) -> "Tokenizer":
        """A char tokenizer with these ids: one token a character, and the special tokens."""
        hf = HFTokenizer(models.WordLevel(vocab, unk_token=UNK if UNK in vocab else None))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(CHAR_SPLIT), behavior="isolated")
        hf.decoder = decoders.Fuse()  # join the pieces with nothing between them
        hf.add_special_tokens(specials)
        return cls(hf, **kwargs)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json (a file, or a folder holding it, with tokenizer_config.json if any)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises bare Exceptions for unreadable JSON
            raise TokenizerError(f"cannot load tokenizer from {file}: {str(e).splitlines()[0]}") from None
        roles, template = {}, None
        config_file = file.parent / "tokenizer_config.json"
        if config_file.exists():
            try:
                cfg = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"cannot read {config_file}: {e}") from None
            for role in ("bos", "eos", "pad", "unk"):
                value = cfg.get(f"{role}_token")
                if isinstance(value, dict):
                    value = value.get("content")
                if value:
                    roles[role] = value
            template = cfg.get("chat_template")
            if isinstance(template, list):  # named templates: the default one
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (file.parent / "chat_template.jinja").exists():  # transformers' newer layout
            template = (file.parent / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(hf, roles, template)

    def save(self, path: str | Path) -> None:
        """tokenizer.json at `path`; with a chat template, also tokenizer_config.json beside it."""
        from .checkpoint import atomic_write_text

        path = Path(path)
        atomic_write_text(path, self.hf.to_str(pretty=True))
        if self.chat_template is not None:
            atomic_write_text(path.parent / "tokenizer_config.json", json.dumps(self.hf_config(), indent=2) + "\n")

    def hf_config(self) -> dict:
        """What transformers reads from tokenizer_config.json: the role tokens and the chat template."""
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
               "add_bos_token": False, "add_eos_token": False}
        for role in ("bos", "eos", "pad", "unk"):
            if self.token_id(self.roles.get(role)) is not None:
                cfg[f"{role}_token"] = self.roles[role]
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        return cfg

    # ---- use -----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.hf.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.roles.get("bos"))

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.roles.get("eos"))

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.roles.get("pad"))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if self._char_vocab is not None and not any(s in text for s in self.special_tokens):
            ids = self._encode_chars(text)  # same ids as the HF path, ~10x faster
        else:
            try:
                ids = self.hf.encode(text, add_special_tokens=False).ids
            except Exception as e:
                raise TokenizerError(f"cannot encode text: {str(e).splitlines()[0]}") from None
        return self._with_specials(ids, bos, eos)

    def _encode_chars(self, text: str) -> list[int]:
        vocab, unk = self._char_vocab, self.token_id(self.roles.get("unk"))
        try:
            return [vocab[c] for c in text]
        except KeyError:
            if unk is None:
                missing = next(c for c in text if c not in vocab)
                raise TokenizerError(f"character {missing!r} is not in the tokenizer's vocabulary") from None
            return [vocab.get(c, unk) for c in text]

    def _with_specials(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        for role, wanted in (("bos", bos), ("eos", eos)):
            if wanted and self.token_id(self.roles.get(role)) is None:
                raise TokenizerError(f"this tokenizer has no {role} token")
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_many(self, texts: list[str], threads: int | None = None, arrays: bool = False) -> list:
        """Encode several texts at once, on `threads` cores (all by default): byte-level BPE through
        tiktoken when it is installed (the same ids as HF tokenizers, ~10x faster), else through HF
        tokenizers. arrays=True: each text's ids as a numpy array (int64) rather than a list."""
        if self._char_vocab is not None:
            ids = [self.encode(t) for t in texts]
        elif self.kind == "bpe" and self._fast is not False and (self._fast or self._build_fast()):
            return self._fast.encode_many(texts, threads or os.cpu_count() or 1, arrays)
        elif threads == 1:  # (a worker process: HF's own thread pool is not used after a fork)
            ids = [self.hf.encode(t, add_special_tokens=False).ids for t in texts]
        else:
            ids = [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        return [np.asarray(i, dtype=np.int64) for i in ids] if arrays else ids

    def _build_fast(self) -> bool:
        self._fast = TiktokenBPE.build(self) or False
        return bool(self._fast)

    def byte_lengths(self) -> np.ndarray:
        """The UTF-8 bytes each id adds to decoded text (a special token: its own text), so that a
        token array's text size is a sum, without decoding it."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        specials = set(self.special_tokens)
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            byte_level = self.kind == "bpe" and token not in specials  # one character per byte
            lengths[i] = len(token) if byte_level else len(token.encode("utf-8"))
        return lengths

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)


def _kind_of(model: dict) -> str:
    kind = model["model"]["type"]
    if kind == "BPE":
        return "bpe"
    if kind == "WordLevel":
        pre = json.dumps(model.get("pre_tokenizer"))
        return "char" if json.dumps(CHAR_SPLIT)[1:-1] in pre else "word"
    return kind.lower()  # e.g. an imported Unigram or WordPiece tokenizer


# ---- fast byte-level BPE encoding ------------------------------------------------------------------
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters: printable Latin-1
    bytes stand for themselves, the other 68 take the characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


class TiktokenBPE:
    """The same byte-level BPE as a `tokenizers` model, run by tiktoken (Rust, releases the GIL).

    tiktoken merges the adjacent pair whose joined bytes have the lowest rank; ranking each merge's
    result by its position in the merge list reproduces HF's merge order. Ranks are mapped back to
    our ids. Only tokenizers that are exactly GPT-2 style (ByteLevel pre-tokenizer with its regex, no
    normaliser, plain BPE) are accepted; tests compare the ids with HF's on real corpora.
    """

    def __init__(self, encoding, id_of_rank):
        self.encoding = encoding
        self.id_of_rank = id_of_rank

    @classmethod
    def build(cls, tok: "Tokenizer") -> "TiktokenBPE | None":
        try:
            import tiktoken
        except ImportError:
            return None
        spec = json.loads(tok.hf.to_str())
        pre, model = spec.get("pre_tokenizer") or {}, spec["model"]
        if spec.get("normalizer") or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
                or pre.get("add_prefix_space") or model.get("dropout") or model.get("ignore_merges") \
                or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            return None
        to_byte = {c: b for b, c in byte_to_unicode().items()}
        vocab = model["vocab"]
        ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
        for i, merge in enumerate(model["merges"]):
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            try:
                joined = bytes(to_byte[c] for c in left + right)
            except KeyError:
                return None
            ranks.setdefault(joined, 256 + i)
        specials = {t: len(ranks) + 256 + k for k, t in enumerate(tok.special_tokens)}
        size = max([*ranks.values(), *specials.values()]) + 1
        id_of_rank = np.full(size, -1, dtype=np.int64)
        for token, i in vocab.items():
            data = bytes(to_byte[c] for c in token) if all(c in to_byte for c in token) else None
            if data is not None and data in ranks:
                id_of_rank[ranks[data]] = i
        for t, r in specials.items():
            id_of_rank[r] = tok.token_id(t)
        if (id_of_rank[list(ranks.values())] < 0).any():
            return None  # a merge result without an id: not a tokenizer tiktoken can stand in for
        encoding = tiktoken.Encoding("samovar-bpe", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                                     special_tokens=specials)
        return cls(encoding, id_of_rank)

    def encode_many(self, texts: list[str], threads: int, arrays: bool = False) -> list:
        batches = self.encoding.encode_batch(texts, num_threads=threads, allowed_special="all")
        return [self.id_of_rank[b] if arrays else self.id_of_rank[b].tolist() for b in batches]
