"""A reply as text: the tokens a scheduled Sequence gets, turned into text pieces as they come (a
TextStream: whole characters only, ending before a stop string). The server's routes and the
Telegram bot read their replies through this."""

from __future__ import annotations

import asyncio

from ..api import TextStream
from .scheduler import Token


KEEPALIVE = "keep-alive"


class Choice:
    """One of a request's n replies: its sequence, the text so far, the tokens it took."""

    def __init__(self, index: int, prompt: int, seq, text: TextStream):
        self.index, self.prompt, self.seq, self.text = index, prompt, seq, text
        self.tokens: list[Token] = []
        self.text_parts: list[str] = []
        self.finish_reason: str | None = None

    async def pieces(self, keepalive: float | None):
        """(text, tokens) as they come, KEEPALIVE while waiting longer than `keepalive` seconds for
        the first token (in the queue; after it, tokens come a step apart); ends at the sequence's
        end or at a stop string (then the sequence is cancelled)."""
        unsent: list[Token] = []
        while True:
            try:
                item = await self.seq.next_event(None if self.tokens else keepalive)
            except (TimeoutError, asyncio.TimeoutError):
                yield KEEPALIVE
                continue
            if item is None:
                self.finish_reason = self.seq.finish_reason
                rest = self.text.finish()
                if rest or unsent:
                    self.text_parts.append(rest)
                    yield rest, unsent
                return
            self.tokens.append(item)
            unsent.append(item)
            piece = self.text.add(item.id)
            if piece or self.text.stopped:
                self.text_parts.append(piece)
                yield piece, unsent
                unsent = []
            if self.text.stopped:
                self.finish_reason = "stop"
                self.seq.cancel()
                return
