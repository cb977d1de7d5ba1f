"""The Telegram bot: a thin layer over the continuous-batching Scheduler, as the HTTP server is.

    samovar telegram runs/chat --token-env TELEGRAM_TOKEN [--api-url URL] [--allow CHAT_ID ...]

Each chat is a conversation (a ChatSession, trimmed to the context as in `samovar chat`) kept in
SQLite next to the run, so that a restart loses none. Many chats talk at once: every reply is a
sequence of the one Scheduler, decoded together with the others, and each chat's next turn starts
from the keys and values of its last (the scheduler's sessions), prefilling only what is new. While
a reply is generated the bot shows "typing…" (renewed every few seconds: Telegram drops it after
about 5) and the text as it grows, at a bounded rate: a message draft in private chats (Bot API sendMessageDraft), elsewhere one
message edited in place; then the whole reply is sent, in pieces below Telegram's 4,096-character
limit. Flood-control answers (retry_after) are waited out. The token comes from an environment
variable and never appears in a log; --api-url points the bot at a self-hosted Bot API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sqlite3
import threading
import time
from pathlib import Path

from ..api import LLM, TextStream, sampling_params
from ..chat import ChatError, ChatSession, render
from ..engine import GenerationError
from .reply import Choice
from .scheduler import Busy, Scheduler

LIMIT = 4096  # Telegram's longest message, in UTF-16 code units
HELP = ("I am a language model brewed with samovar. Write to me and I answer; I remember this chat's "
        "conversation.\n/reset starts a new conversation\n/system TEXT tells me how to answer "
        "(/system alone removes it)\n/help shows this")


def split_message(text: str, limit: int = LIMIT) -> list[str]:
    """`text` in pieces of at most `limit` UTF-16 code units (how Telegram counts), each cut after the
    last line break, else the last space, of its second half, else where the limit falls; never
    inside a character (an emoji outside the BMP counts 2 and stays whole)."""
    pieces = []
    while text:
        units, end = 0, 0
        for end, ch in enumerate(text):
            units += 2 if ord(ch) > 0xFFFF else 1
            if units > limit:
                break
        else:
            pieces.append(text)
            break
        cut = max(text.rfind("\n", end // 2, end), text.rfind(" ", end // 2, end))
        cut = cut + 1 if cut > 0 else end
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces


class Memory:
    """Each chat's system prompt and turns, in one SQLite table (written in a transaction a turn)."""

    def __init__(self, path: str | Path):
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS chats (chat_id INTEGER PRIMARY KEY, system TEXT, turns TEXT NOT NULL)")
        self.db.commit()

    def load(self, chat_id: int, session: ChatSession) -> ChatSession:
        row = self.db.execute("SELECT system, turns FROM chats WHERE chat_id = ?", (chat_id,)).fetchone()
        if row is not None:
            session.system, session.turns = row[0], json.loads(row[1])
        return session

    def store(self, chat_id: int, session: ChatSession) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO chats VALUES (?, ?, ?)",
                            (chat_id, session.system, json.dumps(session.turns, ensure_ascii=False)))


class ChatBot:
    """What the bot does with a message; `router` has its handlers for aiogram's Dispatcher."""

    def __init__(self, llm: LLM, scheduler: Scheduler, memory: Memory, sampling: dict, system: str | None = None,
                 allow: set[int] | None = None, update_seconds: float = 1.0, typing_seconds: float = 4.0):
        from aiogram import F, Router
        from aiogram.filters import Command, CommandStart

        self.llm, self.scheduler, self.memory = llm, scheduler, memory
        self.params = sampling_params(sampling)
        self.system, self.allow = system, allow
        self.update_seconds, self.typing_seconds = update_seconds, typing_seconds
        self.drafts = itertools.count(1)  # draft ids: non-zero, one a reply
        self.locks: dict[int, asyncio.Lock] = {}  # one reply at a time in a chat; chats run side by side
        self.router = Router()
        if allow:
            self.router.message.register(self.refuse, ~F.chat.id.in_(allow))
        self.router.message.register(self.start, CommandStart())
        self.router.message.register(self.help, Command("help"))
        self.router.message.register(self.reset, Command("reset"))
        self.router.message.register(self.set_system, Command("system"))
        self.router.message.register(self.answer, F.text)

    def session(self, chat_id: int) -> ChatSession:
        return self.memory.load(chat_id, ChatSession(self.llm.tokenizer, self.scheduler.context_len, self.system))

    # ---- commands -------------------------------------------------------------------------------------
    async def refuse(self, message) -> None:
        await self.call(message.bot.send_message, chat_id=message.chat.id,
                        text="Sorry, this bot only talks in the chats it was set up for.")

    async def start(self, message) -> None:
        await self.call(message.bot.send_message, chat_id=message.chat.id, text="Hello! " + HELP)

    async def help(self, message) -> None:
        await self.call(message.bot.send_message, chat_id=message.chat.id, text=HELP)

    async def reset(self, message) -> None:
        async with self.lock(message.chat.id):
            session = self.session(message.chat.id)
            session.reset()
            self.memory.store(message.chat.id, session)
        await self.call(message.bot.send_message, chat_id=message.chat.id, text="A new conversation.")

    async def set_system(self, message, command) -> None:
        async with self.lock(message.chat.id):
            session = self.session(message.chat.id)
            session.system = (command.args or "").strip() or None
            self.memory.store(message.chat.id, session)
        await self.call(message.bot.send_message, chat_id=message.chat.id,
                        text="System prompt " + ("set." if session.system else "removed."))

    # ---- a reply ---------------------------------------------------------------------------------------
    def lock(self, chat_id: int) -> asyncio.Lock:
        return self.locks.setdefault(chat_id, asyncio.Lock())

    async def answer(self, message) -> None:
        bot, chat = message.bot, message.chat
        async with self.lock(chat.id):
            session = self.session(chat.id)
            try:
                messages, _ = session.prompt(message.text, self.params.max_tokens)  # the oldest turns dropped to fit
            except ChatError as e:
                await self.call(bot.send_message, chat_id=chat.id, text=str(e))
                return
            tokenizer = self.llm.tokenizer
            try:
                seq = self.scheduler.submit(render(tokenizer, messages, add_generation_prompt=True)[0], self.params,
                                            [tokenizer.eos_id] if tokenizer.eos_id is not None else [],
                                            loop=asyncio.get_running_loop(), session=chat.id)
            except (Busy, GenerationError) as e:
                await self.call(bot.send_message, chat_id=chat.id,
                                text="I am busy, try again in a moment." if isinstance(e, Busy) else str(e))
                return
            typing = asyncio.create_task(self.keep_typing(bot, chat.id))
            try:
                reply = await self.stream(bot, chat, Choice(0, 0, seq, TextStream(tokenizer, self.params.stop)))
            finally:
                typing.cancel()
                seq.cancel()
            session.answered(reply)
            self.memory.store(chat.id, session)

    async def stream(self, bot, chat, choice: Choice) -> str:
        """Show the reply as it grows (drafts in private chats, else one message edited), at most once
        every update_seconds; then send it whole. Returns the reply."""
        private = chat.type == "private"
        text, shown, sent_id, last = "", "", None, 0.0
        draft_id = next(self.drafts)
        async for piece, _ in choice.pieces(None):
            text += piece
            if time.monotonic() - last < self.update_seconds or not text.strip():
                continue
            preview = split_message(text)[-1 if private else 0]
            if preview == shown:
                continue
            if private:
                await self.call(bot.send_message_draft, chat_id=chat.id, draft_id=draft_id, text=preview)
            elif sent_id is None:
                sent_id = (await self.call(bot.send_message, chat_id=chat.id, text=preview)).message_id
            else:
                await self.call(bot.edit_message_text, chat_id=chat.id, message_id=sent_id, text=preview)
            shown, last = preview, time.monotonic()
        pieces = split_message(text.strip()) or ["…"]  # Telegram refuses an empty message
        if sent_id is not None:
            if pieces[0] != shown:
                await self.call(bot.edit_message_text, chat_id=chat.id, message_id=sent_id, text=pieces[0])
            pieces = pieces[1:]
        for piece in pieces:
            await self.call(bot.send_message, chat_id=chat.id, text=piece)
        return text

    async def keep_typing(self, bot, chat_id: int) -> None:
        while True:
            await self.call(bot.send_chat_action, chat_id=chat_id, action="typing")
            await asyncio.sleep(self.typing_seconds)

    @staticmethod
    async def call(method, tries: int = 5, **kwargs):
        """A Bot API call that waits out flood control (429 with retry_after) and tries again."""
        from aiogram.exceptions import TelegramRetryAfter

        for attempt in range(tries):
            try:
                return await method(**kwargs)
            except TelegramRetryAfter as e:
                if attempt == tries - 1:
                    raise
                await asyncio.sleep(e.retry_after)


async def run_bot(llm: LLM, scheduler: Scheduler, token: str, sampling: dict, database: str | Path,
                  api_url: str | None = None, system: str | None = None, allow: set[int] | None = None,
                  update_seconds: float = 1.0, stop: threading.Event | None = None) -> None:
    """Poll the Bot API and answer through `scheduler` until `stop` is set (or, without one, until
    SIGINT or SIGTERM)."""
    try:
        from aiogram import Bot, Dispatcher
        from aiogram.client.session.aiohttp import AiohttpSession
        from aiogram.client.telegram import TelegramAPIServer
    except ImportError:
        raise GenerationError("the Telegram bot needs aiogram: pip install 'samovar[telegram]'") from None
    session = AiohttpSession(api=TelegramAPIServer.from_base(api_url)) if api_url else None
    bot = Bot(token, session=session)
    chat_bot = ChatBot(llm, scheduler, Memory(database), sampling, system, allow, update_seconds)
    dispatcher = Dispatcher()
    dispatcher.include_router(chat_bot.router)
    try:
        me = await bot.get_me()
        print(f"samovar telegram: @{me.username} is answering (conversations in {database}); Ctrl-C stops",
              flush=True)
        if stop is None:
            await dispatcher.start_polling(bot, polling_timeout=10)
            return
        polling = asyncio.create_task(dispatcher.start_polling(bot, polling_timeout=10, handle_signals=False))
        asked = asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await asyncio.wait([polling, asked], return_when=asyncio.FIRST_COMPLETED)
        if not polling.done():
            try:
                await dispatcher.stop_polling()
            except RuntimeError:  # asked before polling had begun
                polling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await polling
    finally:
        if stop is not None:
            stop.set()  # (ends the executor's wait when polling ended first)
        await bot.session.close()
