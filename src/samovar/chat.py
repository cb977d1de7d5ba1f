"""Conversations rendered for a model: messages, chat templates equal to HF's, and (ids, loss mask).

A conversation is a list of messages, {"role": "system" | "user" | "assistant", "content": str}.
A chat template is a Jinja template, as in HF `transformers`: samovar's own (`SAMOVAR_TEMPLATE`), or
the one an imported model brings (ChatML, Llama 3, Gemma, ...). Either is rendered the way
`tokenizer.apply_chat_template` renders it (a sandboxed Jinja environment configured as transformers
configures it, `{% generation %}` blocks marking what the assistant says), then tokenized, so that
ids and loss mask equal `apply_chat_template(..., return_assistant_tokens_mask=True)`'s.

samovar's template, with its role markers as special tokens (one id each) and the tokenizer's eos
ending every turn (the eos that an export's config.json and generation_config.json name, so that a
served model stops there):

    <|bos|><|system|>You are terse.<|eos|><|user|>Hi!<|eos|><|assistant|>Hello.<|eos|>
                                                                       ^^^^^^^^^^^^^ the loss mask
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime

from tokenizers import Tokenizer as HFTokenizer

from .tokenizer import BOS, EOS, Tokenizer, TokenizerError

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
SAMOVAR_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class ChatError(ValueError):
    """A conversation or template that cannot be rendered; the message is one line for the user."""


def check_messages(messages: list[dict]) -> list[dict]:
    """`messages` as plain {"role", "content"} dicts, or a ChatError naming the first bad one."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("a conversation is a non-empty list of messages")
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatError(f"message {n} must be {{\"role\": system|user|assistant, \"content\": text}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def add_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """A tokenizer that can render samovar's template: the role markers (and bos/eos, if missing)
    added as special tokens after the existing ids, which do not change; and the template. A
    tokenizer that already has a chat template (an imported model's) is returned as it is."""
    if tokenizer.chat_template is not None:
        return tokenizer
    hf = HFTokenizer.from_str(tokenizer.hf.to_str())
    roles, new = dict(tokenizer.roles), []
    for role, token in (("bos", BOS), ("eos", EOS)):
        if tokenizer.token_id(roles.get(role)) is None:
            roles[role] = token
            new.append(token)
    hf.add_special_tokens(new + [t for t in ROLE_TOKENS.values() if hf.token_to_id(t) is None])
    return Tokenizer(hf, roles, chat_template=SAMOVAR_TEMPLATE)


# ---- the Jinja environment transformers renders templates in ---------------------------------------
_tracking: ContextVar = ContextVar("generation_tracking", default=None)


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: records where the assistant's text lies."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            tracking = _tracking.get()
            if tracking is not None:
                pieces, spans = tracking
                start = len("".join(pieces))
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env


_compiled: dict[str, object] = {}


def _template(source: str):
    if source not in _compiled:
        import jinja2

        try:
            _compiled[source] = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatError(f"the chat template does not parse: {e}") from None
    return _compiled[source]


@contextmanager
def _tracked(pieces: list, spans: list):
    token = _tracking.set((pieces, spans))
    try:
        yield
    finally:
        _tracking.reset(token)


def render_text(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False
                ) -> tuple[str, list[tuple[int, int]]]:
    """The template's text for `messages`, and the character spans of its {% generation %} blocks."""
    import jinja2

    if tokenizer.chat_template is None:
        raise ChatError("this tokenizer has no chat template: fine-tune the model on conversations first "
                        "(samovar prepare --chat ... then objective=sft)")
    template = _template(tokenizer.chat_template)
    specials = {f"{role}_token": tokenizer.roles.get(role) or "" for role in ("bos", "eos", "pad", "unk")}
    pieces, spans = [], []
    try:
        with _tracked(pieces, spans):
            stream = template.generate(messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
                                       **specials)
            for piece in stream:
                pieces.append(piece)
    except jinja2.exceptions.TemplateError as e:
        raise ChatError(f"the chat template refused the conversation: {e}") from None
    return "".join(pieces), spans


def render(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False
           ) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation: mask is 1 on the tokens the assistant says (the end-of-turn
    token included), as apply_chat_template's assistant_masks."""
    text, spans = render_text(tokenizer, messages, add_generation_prompt)
    try:
        enc = tokenizer.hf.encode(text, add_special_tokens=False)
    except Exception as e:
        raise TokenizerError(f"cannot encode the conversation: {str(e).splitlines()[0]}") from None
    mask, k = [0] * len(enc.ids), 0
    for i, (start, end) in enumerate(enc.offsets):  # as transformers: every token overlapping a span
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[i] = 1
    return list(enc.ids), mask


# ---- a conversation kept within the model's context ----------------------------------------------------
class ChatSession:
    """The messages of one conversation (a system prompt first, if any), trimmed to fit the context:
    the oldest whole exchanges go first, never the system prompt. The terminal chat, the server and
    the bot keep their conversations in one of these."""

    def __init__(self, tokenizer: Tokenizer, context_len: int, system: str | None = None):
        from .engine import PrefixCache

        self.tokenizer, self.context_len = tokenizer, context_len
        self.system = system
        self.turns: list[dict] = []  # user and assistant messages, oldest first
        self.prefix = PrefixCache()  # the keys and values of the conversation so far, for the next turn

    @property
    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def reset(self) -> None:
        self.turns = []

    def prompt(self, user: str, reply_tokens: int) -> tuple[list[dict], int]:
        """Add the user's turn; drop the oldest exchanges until the rendered conversation and a reply of
        reply_tokens fit the context. Returns the messages to answer and how many turns were dropped."""
        self.turns.append({"role": "user", "content": user})
        dropped = 0
        while len(render(self.tokenizer, self.messages, add_generation_prompt=True)[0]) + reply_tokens \
                > self.context_len:
            if len(self.turns) == 1:
                self.turns.pop()
                raise ChatError(f"this message does not fit the model's context of {self.context_len} tokens "
                                f"with a reply of {reply_tokens} (with the system prompt)")
            cut = 1
            while cut < len(self.turns) - 1 and self.turns[cut]["role"] != "user":
                cut += 1  # a whole exchange: the user's turn and the replies after it
            del self.turns[:cut]
            dropped += cut
        return self.messages, dropped

    def answered(self, reply: str) -> None:
        self.turns.append({"role": "assistant", "content": reply})

    def save(self, path) -> None:
        """The conversation as JSONL: one message a line."""
        from .checkpoint import atomic_write_text

        atomic_write_text(path, "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in self.messages))

    def load(self, path) -> None:
        from pathlib import Path

        messages = []
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    messages.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ChatError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        messages = check_messages(messages)
        self.system = messages[0]["content"] if messages[0]["role"] == "system" else self.system
        self.turns = [m for m in messages if m["role"] != "system"]
