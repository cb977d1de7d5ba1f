"""Continuous batching: many sequences decoded together, each in its own row of one SlotCache.

    submit(prompt) -> waiting -> prefilling (its prompt, a chunk a step) -> decoding -> finished

One thread runs the loop. Each step it
  1. drops what was cancelled and gives the rows of finished sequences back,
  2. decodes one token for every decoding sequence, in one forward pass over rows [0, A),
  3. prefills one chunk of the prompt of the sequence being admitted (in row A or past it), which
     joins the decoders once its whole prompt is in; or, when the requests waiting behind it have
     prompts that fit in the same chunk together, all of them at once, in one pass over as many
     rows (the shorter prompts padded at their ends, where nothing reads).
The decoders stall for at most one chunk when requests arrive, and a finished or cancelled
sequence frees its row within one step. Decoding sequences always hold rows 0..A-1: one that
finishes gives its row to the last of them, so a step's forward pass reads one contiguous view.

Each sequence draws its tokens with the same functions, in the same order, as Engine.generate
(engine.choose, its own seeded generator and penalties), so what it gets does not depend on who
else is decoding: under greedy decoding, the tokens a request gets alone.

A sequence submitted with a `session` (a chat's id) leaves a copy of its keys and values behind when
it ends; the session's next sequence starts from the longest prefix of its prompt that they cover
and prefills only the rest (a conversation's new turn). The last `keep_sessions` sessions are kept.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from dataclasses import dataclass, field

import torch

from ..engine import (GenerationError, Penalties, SamplingParams, check_compilable, choose, compiled_step,
                      mask_padding, reusable, seeded_generator, step_logits)
from ..kv_cache import SlotCache


class Busy(RuntimeError):
    """Every slot is taken and the queue of waiting requests is full."""


@dataclass
class Token:
    id: int
    logprob: float | None = None  # of this token under the model (raw logits), when asked for
    top: list[tuple[int, float]] = field(default_factory=list)  # the likeliest tokens and their logprobs


class Sequence:
    """One request: its prompt, how to sample, and the tokens it gets, which its reader takes by
    iterating (`for token in seq`, or `async for` when it was submitted with an event loop).
    `finish_reason` is "stop" (a stop id) or "length" (max_tokens) once it has ended."""

    def __init__(self, prompt: list[int], params: SamplingParams, stop_ids=(), logprobs: int | None = None,
                 echo: bool = False, loop: asyncio.AbstractEventLoop | None = None, session=None):
        self.prompt, self.params, self.stop_ids = list(prompt), params, set(stop_ids)
        self.session = session  # a key: keep this sequence's keys and values for the session's next one
        self.tokens: list[int] = []  # the ids generated so far
        self.reused = 0  # prompt positions taken from the session's kept keys and values, not prefilled
        self.logprobs = logprobs  # None: none; n: the token's logprob and the n likeliest alternatives
        self.echo = echo  # also the logprobs of the prompt's tokens (the first has none)
        self.prompt_logprobs: list[Token] = []
        self.finish_reason: str | None = None
        self.cancelled = False
        self.row: int | None = None
        self.prefilled = 0
        self.last: int | None = None  # the token the next decoding step feeds
        self.generator = self.penalties = None
        self._loop = loop
        self._events = asyncio.Queue() if loop is not None else queue.SimpleQueue()

    @property
    def generated(self) -> int:
        return len(self.tokens)

    def cancel(self) -> None:
        """Stop generating (the reader went away): the scheduler frees the row at its next step."""
        self.cancelled = True

    def __iter__(self):
        try:
            while (item := self._events.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.cancel()  # a no-op once finished

    async def __aiter__(self):
        try:
            while (item := await self._events.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.cancel()

    async def next_event(self, timeout: float | None = None):
        """The next Token, None at the end, or TimeoutError after `timeout` seconds (async readers
        that send keep-alives while they wait)."""
        if timeout is None:
            item = await self._events.get()
        else:
            async with asyncio.timeout(timeout):  # (lighter than wait_for, which wraps the wait in a task)
                item = await self._events.get()
        if isinstance(item, Exception):
            raise item
        return item


class Scheduler:
    """Decodes the sequences submitted to it together, `slots` at a time, in a thread of its own."""

    def __init__(self, model, slots: int = 16, max_waiting: int = 64, prefill_chunk: int = 256,
                 vocab_limit: int | None = None, keep_sessions: int = 64, compile: bool = False,
                 thread: bool = True):
        """compile: decoding steps run through engine.compiled_step (prefill stays eager); its graphs
        are compiled when first needed, or by warm_up().
        thread: run the loop in a thread of its own; thread=False leaves it to the caller, run().
        On the CPU, run it in the thread that loaded the model (samovar serve and telegram run it in
        the main thread, their front ends in another): torch's OpenMP keeps a pool of threads for
        each thread that runs parallel work, and with a second pool beside the first, each waits
        for its work asleep instead of spinning, which halved decoding speed here (RESULTS.md)."""
        if compile:
            check_compilable(model)
        self.model = model.eval()
        self.compile = compile
        self.context_len = model.config.context_len
        self.slots, self.max_waiting, self.prefill_chunk = slots, max_waiting, prefill_chunk
        self.vocab_limit = vocab_limit
        p = model.tok_emb.weight
        self.cache = SlotCache(model.config, slots, self.context_len, p.device, p.dtype)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: list[Sequence] = []  # in rows A, A + 1, ...: one long prompt, or short ones
        self.decoding: list[Sequence] = []  # decoding[i] holds row i
        self.kept: collections.OrderedDict = collections.OrderedDict()  # session -> (ids, keys, values)
        self.keep_sessions = keep_sessions
        self.steps = 0
        self._outbox: list[tuple[Sequence, object]] = []  # what this step hands to readers (_send, _flush)
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self.run, name="samovar-scheduler", daemon=True) if thread else None
        if self._thread is not None:
            self._thread.start()

    # ---- the readers' side ------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, stop_ids=(), logprobs: int | None = None,
               echo: bool = False, loop: asyncio.AbstractEventLoop | None = None, session=None) -> Sequence:
        params.validate(self.model.config.vocab_size)
        if not prompt:
            raise GenerationError("the prompt is empty: give at least one token")
        if len(prompt) + params.max_tokens > self.context_len:
            raise GenerationError(f"the prompt's {len(prompt)} tokens and max_tokens={params.max_tokens} "
                                  f"exceed the model's context of {self.context_len}")
        seq = Sequence(prompt, params, () if params.ignore_eos else stop_ids, logprobs, echo, loop, session)
        with self._wake:
            if self._closed:
                raise GenerationError("the scheduler is closed")
            if len(self.waiting) >= self.max_waiting + self.slots - self.active:  # free slots take some soon
                raise Busy(f"all {self.slots} slots are busy and {len(self.waiting)} requests wait")
            self.waiting.append(seq)
            self._wake.notify()
        return seq

    @property
    def active(self) -> int:
        """How many sequences hold a row (decoding or being prefilled)."""
        return len(self.decoding) + len(self.prefilling)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def warm_up(self) -> None:
        """Compile the decoding graphs now (one row; two at once) rather than at the first requests
        (compile=True). Call it before the loop runs, in the thread that will run it."""
        if not self.compile:
            return
        with torch.inference_mode():
            for rows in sorted({1, min(2, self.slots)}):
                self.cache.lengths.fill_(1)  # one position cached: two attended, as in any decoding step
                compiled_step(self.model, torch.zeros((rows, 1), dtype=torch.long, device=self.cache.lengths.device),
                              self.cache.rows(0, rows, 1))
            self.cache.lengths.zero_()

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        """The loop: decode until close() (in the scheduler's thread, or the caller's: thread=False).
        Whatever ends it, the sequences still waiting or decoding get an error, none hangs."""
        try:
            while True:
                with self._wake:
                    while not self._closed and not (self.waiting or self.prefilling or self.decoding):
                        self._wake.wait()
                    if self._closed:
                        break
                    if not self.prefilling and self.waiting and len(self.decoding) < self.slots:
                        self._admit_group()
                try:
                    with torch.inference_mode():
                        self._step()
                except Exception as error:  # the model failed: every active sequence gets it, none hangs
                    for seq in [*self.decoding, *self.prefilling]:
                        self._send(seq, error)
                    self.decoding, self.prefilling = [], []
                self._flush()
        finally:
            with self._wake:
                self._closed = True
            for seq in [*self.waiting, *self.decoding, *self.prefilling]:
                self._send(seq, GenerationError("the server is shutting down"))
            self._flush()

    def run_beside(self, front, stop) -> None:
        """Run front() (an HTTP server, a bot) in a thread and the loop in this one, until Ctrl-C,
        SIGTERM or the front's end; then stop() the front. The front's error is raised here."""
        import signal

        errors = []

        def target():
            try:
                front()
            except BaseException as error:  # noqa: BLE001 (raised again in the caller's thread)
                errors.append(error)
            finally:
                self.close()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # a service manager's stop: as Ctrl-C
        thread = threading.Thread(target=target, name="samovar-front", daemon=True)
        thread.start()
        try:
            self.run()
        except KeyboardInterrupt:
            pass
        finally:
            stop()
            thread.join(timeout=30)
        if errors:
            raise errors[0]

    def _step(self) -> None:
        for seq in [s for s in self.decoding if s.cancelled]:
            self._retire(seq, None)
        if any(seq.cancelled for seq in self.prefilling):
            self.prefilling = [seq for seq in self.prefilling if not seq.cancelled]
            for row, seq in enumerate(self.prefilling, start=len(self.decoding)):  # rows A, A + 1, ... again
                self._place(seq, row)
        if self.decoding:
            self._decode()
        if self.prefilling:
            self._prefill()
        self.steps += 1

    def _admit_group(self) -> None:
        """The next waiting sequence, and behind it those whose prompts fit in one chunk with it (a
        session's continuation, which reuses kept keys and values, goes alone)."""
        room, tokens = self.slots - len(self.decoding), 0
        while self.waiting and len(self.prefilling) < room:
            seq = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                continue
            if self.prefilling and (self._resumes(seq) or tokens + len(seq.prompt) > self.prefill_chunk):
                break
            self._admit(self.waiting.popleft())
            tokens += len(seq.prompt) - seq.prefilled
            if seq.prefilled or tokens > self.prefill_chunk:  # reused a prefix, or takes chunks: alone
                break

    def _resumes(self, seq: Sequence) -> bool:
        """Whether the sequence continues a session whose keys and values are kept."""
        return seq.session in self.kept and not seq.echo

    def _admit(self, seq: Sequence) -> None:
        seq.row = len(self.decoding) + len(self.prefilling)
        self.cache.clear(seq.row)
        if self._resumes(seq):
            ids, keys, values = self.kept.pop(seq.session)
            n = reusable(ids, seq.prompt)
            if n:
                self.cache.load(seq.row, keys, values, n)
                seq.prefilled = seq.reused = n
        self.prefilling.append(seq)

    def _prefill(self) -> None:
        """One chunk of the prompts being prefilled, in one pass over their rows (a group's prompts
        whole, each padded to the longest; the cache then forgets each row's padding)."""
        group = self.prefilling
        chunks = [seq.prompt[seq.prefilled:seq.prefilled + self.prefill_chunk] for seq in group]
        T = max(map(len, chunks))
        idx = torch.tensor([chunk + chunk[-1:] * (T - len(chunk)) for chunk in chunks], device=self.cache.lengths.device)
        lo = group[0].row
        logits = mask_padding(self.model(idx, kv_cache=self.cache.rows(lo, lo + len(group), T)),
                              self.vocab_limit)  # (k, T, V)
        for seq, chunk, row_logits in zip(group, chunks, logits):
            self.cache.rewind(seq.row, seq.prefilled + len(chunk))
            if seq.echo:
                for t, target in enumerate(seq.prompt[seq.prefilled + 1:seq.prefilled + len(chunk) + 1]):
                    seq.prompt_logprobs.append(_scored(row_logits[t:t + 1], target, seq.logprobs or 0))
            seq.prefilled += len(chunk)
        if group[0].prefilled < len(group[0].prompt):
            return  # a long prompt (a group of one), prefilled a chunk a step
        self.prefilling = []
        for seq, chunk, row_logits in zip(group, chunks, logits):
            self._place(seq, len(self.decoding))  # the end of the decoding rows, which may have shrunk meanwhile
            self.decoding.append(seq)
            seq.generator = seeded_generator(seq.params, logits.device)
            if seq.params.penalized:
                seq.penalties = Penalties(seq.prompt, logits.size(-1), logits.device, seq.params.logit_bias)
            if seq.params.max_tokens == 0:
                self._retire(seq, "length")
                continue
            self._emit(seq, row_logits[len(chunk) - 1:len(chunk)])

    def _place(self, seq: Sequence, row: int) -> None:
        """Move the sequence (its positions so far) to the row, a free one or its own."""
        if seq.row != row:
            self.cache.move(seq.row, row)
            seq.row = row

    def _decode(self) -> None:
        decoding = list(self.decoding)
        last = torch.tensor([[s.last] for s in decoding], device=self.cache.lengths.device)
        rows = self.cache.rows(0, len(decoding), 1)
        logits = mask_padding(step_logits(self.model, last, rows, self.compile), self.vocab_limit)  # (A, V)
        for i, seq in enumerate(decoding):
            self._emit(seq, logits[i:i + 1])

    def _emit(self, seq: Sequence, logits) -> None:
        """Choose the sequence's next token from its logits (1, V) and hand it to the reader."""
        token = choose(logits, seq.params, seq.penalties, seq.generator)
        if token in seq.stop_ids:
            self._retire(seq, "stop")
            return
        self._send(seq, _scored(logits, token, seq.logprobs) if seq.logprobs is not None else Token(token))
        seq.tokens.append(token)
        seq.last = token
        if seq.penalties is not None:
            seq.penalties.add(token)
        if seq.generated >= seq.params.max_tokens:
            self._retire(seq, "length")

    def _retire(self, seq: Sequence, reason: str | None) -> None:
        """The sequence has ended: its row goes to the last decoding sequence (its keys and values,
        when it has a session, to the kept ones)."""
        if seq.session is not None and reason is not None:
            cached = int(self.cache.lengths[seq.row])  # the prompt and the tokens fed back so far
            self.kept[seq.session] = ((seq.prompt + seq.tokens)[:cached], *self.cache.save(seq.row))
            self.kept.move_to_end(seq.session)
            while len(self.kept) > self.keep_sessions:
                self.kept.popitem(last=False)
        i = self.decoding.index(seq)
        last = self.decoding.pop()
        if last is not seq:
            self._place(last, seq.row)
            self.decoding[i] = last
        seq.finish_reason = reason
        self._send(seq, None)

    # ---- handing tokens to the readers ------------------------------------------------------------
    def _send(self, seq: Sequence, item) -> None:
        """A Token, an exception, or None (the end) for the sequence's reader, handed over at _flush."""
        self._outbox.append((seq, item))

    def _flush(self) -> None:
        """Hand over what this step made: to threads' readers at once, and to each event loop's in one
        call, which wakes the loop once a step rather than once a token (a write to its wake-up pipe
        each: a tenth of the loop's time with 16 readers)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, item in self._outbox:
            if seq._loop is None:
                seq._events.put(item)
            else:
                by_loop.setdefault(seq._loop, []).append((seq, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the readers' event loop is closed: nobody is reading
                for seq, _ in items:
                    seq.cancelled = True


def _deliver(items) -> None:  # in the readers' event loop
    for seq, item in items:
        seq._events.put_nowait(item)


def _scored(logits, token: int, top: int) -> Token:
    """The token with its logprob and the `top` likeliest tokens', from logits (1, V)."""
    logprobs = torch.log_softmax(logits[0].float(), dim=-1)
    best = torch.topk(logprobs, top) if top else None
    return Token(token, float(logprobs[token]),
                 [] if best is None else list(zip(best.indices.tolist(), best.values.tolist())))
