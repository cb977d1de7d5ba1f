"""The Telegram bot (serve/telegram.py): the real aiogram bot, `samovar telegram` in a subprocess,
against a fake Bot API server on 127.0.0.1 that serves getUpdates and records what the bot sends."""

import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest

aiohttp_web = pytest.importorskip("aiohttp.web")
pytest.importorskip("aiogram")

from samovar.api import LLM  # noqa: E402
from samovar.serve.telegram import split_message  # noqa: E402

TOKEN = "123456:TEST-token-" + "z" * 24


class FakeBotAPI:
    """The Bot API's methods the bot uses, on a free port of 127.0.0.1, in a thread of its own.
    `say(chat_id, text)` queues a user's message; `calls` lists (time, method, fields) of every call;
    `texts(chat_id)` is the chat's messages from the bot as they stand after edits."""

    def __init__(self):
        self.lock = threading.Lock()
        self.updates: list[dict] = []
        self.calls: list[tuple[float, str, dict]] = []
        self.messages: dict[int, dict[int, str]] = {}  # chat -> message id -> text
        self.flood: dict[str, int] = {}  # method -> retry_after, answered once with 429
        self.update_id = self.message_id = 0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._serve, args=(started,), daemon=True).start()
        assert started.wait(30)

    def _serve(self, started):
        asyncio.set_event_loop(self.loop)
        app = aiohttp_web.Application()
        app.router.add_post("/bot{token}/{method}", self._handle)
        self.runner = aiohttp_web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = aiohttp_web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        started.set()
        self.loop.run_forever()

    def say(self, chat_id: int, text: str, kind: str = "private") -> None:
        with self.lock:
            self.update_id += 1
            self.message_id += 1
            message = {"message_id": self.message_id, "date": int(time.time()), "text": text,
                       "chat": {"id": chat_id, "type": kind, **({"title": "group"} if kind != "private" else {})},
                       "from": {"id": chat_id, "is_bot": False, "first_name": f"user{chat_id}"}}
            if text.startswith("/"):
                message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
            self.updates.append({"update_id": self.update_id, "message": message})

    def texts(self, chat_id: int) -> list[str]:
        with self.lock:
            return list(self.messages.get(chat_id, {}).values())

    def methods(self, chat_id: int) -> list[str]:
        with self.lock:
            return [m for _, m, f in self.calls if str(f.get("chat_id")) == str(chat_id)]

    async def _handle(self, request):
        assert request.match_info["token"] == TOKEN
        method, fields = request.match_info["method"], dict(await request.post())
        with self.lock:
            self.calls.append((time.monotonic(), method, fields))
            retry = self.flood.pop(method, None)
        if retry is not None:
            return aiohttp_web.json_response({"ok": False, "error_code": 429, "parameters": {"retry_after": retry},
                                              "description": f"Too Many Requests: retry after {retry}"}, status=429)
        if method == "getMe":
            return ok({"id": 42, "is_bot": True, "first_name": "samovar", "username": "samovar_test_bot"})
        if method == "getUpdates":
            # long polling, held at most a second (so that stopping the fake server never waits long)
            offset, deadline = int(fields.get("offset", 0)), time.monotonic() + min(float(fields.get("timeout", 0)), 1)
            while True:
                with self.lock:
                    self.updates = [u for u in self.updates if u["update_id"] >= offset]
                    if self.updates or time.monotonic() > deadline:
                        return ok(list(self.updates))
                await asyncio.sleep(0.05)
        chat = int(fields.get("chat_id", 0))
        if method in ("sendMessage", "editMessageText"):
            with self.lock:
                if method == "sendMessage":
                    self.message_id += 1
                    mid = self.message_id
                else:
                    mid = int(fields["message_id"])
                    assert fields["text"] != self.messages[chat][mid], "Telegram refuses an edit that changes nothing"
                assert 0 < len(fields["text"].encode("utf-16-le")) // 2 <= 4096
                self.messages.setdefault(chat, {})[mid] = fields["text"]
            return ok({"message_id": mid, "date": int(time.time()), "text": fields["text"],
                       "chat": {"id": chat, "type": "private"}})
        return ok(True)  # sendChatAction, sendMessageDraft, deleteWebhook, ...

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def ok(result):
    return aiohttp_web.json_response({"ok": True, "result": result})


class Bot:
    """`samovar telegram` in a subprocess, pointed at the fake server."""

    def __init__(self, run, api, db, *options):
        self.log = open(db.parent / f"bot-{time.monotonic_ns()}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "samovar", "telegram", str(run), "--token-env", "SAMOVAR_TEST_BOT_TOKEN",
             "--api-url", api.url, "--db", str(db), "--device", "cpu", "--temperature", "0", "--max-tokens", "40",
             "--update-seconds", "0", "--no-compile", *map(str, options)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "SAMOVAR_TEST_BOT_TOKEN": TOKEN})

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        out = self.output()
        self.log.close()
        return out


def wait_for(condition, what, api, timeout=60):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"{what}: not seen; calls: {[(m, f) for _, m, f in api.calls][-12:]}"
        time.sleep(0.05)


@pytest.fixture
def api():
    fake = FakeBotAPI()
    yield fake
    fake.close()


def test_two_chats_at_once_remembered_across_a_restart(api, chat_model, tmp_path):
    llm = LLM.from_path(chat_model, device="cpu")

    def reply(*turns):
        return llm.chat([{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)],
                        max_tokens=40, temperature=0).strip()

    db = tmp_path / "telegram.sqlite"
    bot = Bot(chat_model, api, db)
    try:
        api.say(1, "/start")
        wait_for(lambda: any("Hello" in t for t in api.texts(1)), "/start's greeting", api)
        first, group = reply("привет"), reply("как дела?")
        api.say(1, "привет")
        api.say(2, "как дела?", kind="group")  # both chats at once
        wait_for(lambda: first in api.texts(1), "chat 1's reply", api)
        wait_for(lambda: group in api.texts(2), "chat 2's reply", api)
        assert "sendMessageDraft" in api.methods(1)  # private: drafts, then the message
        assert "editMessageText" in api.methods(2) and api.texts(2)[-1] == group  # a group: one message edited
        assert "typing" in [f.get("action") for _, m, f in api.calls if m == "sendChatAction"]
        drafts = [f["text"] for _, m, f in api.calls if m == "sendMessageDraft"]
        assert drafts and all(first.startswith(d.strip()) for d in drafts)
        api.say(1, "как дела?")  # a second turn: from the first's kept keys and values
        wait_for(lambda: api.texts(1)[-1] == reply("привет", first, "как дела?"), "chat 1's second reply", api)
    finally:
        out = bot.stop()
    assert TOKEN not in out

    bot = Bot(chat_model, api, db, "--allow", 1, "--allow", 2)  # a restart: the conversations are in SQLite
    try:
        api.say(1, "кто ты?")
        remembered = reply("привет", first, "как дела?", reply("привет", first, "как дела?"), "кто ты?")
        wait_for(lambda: api.texts(1)[-1] == remembered, "the reply that remembers the first turn", api)
        api.say(3, "привет")
        wait_for(lambda: any("Sorry" in t for t in api.texts(3)), "a refusal outside the allow-list", api)
        assert "sendChatAction" not in api.methods(3)
        api.say(1, "/reset")
        wait_for(lambda: api.texts(1)[-1] == "A new conversation.", "/reset", api)
        api.say(1, "/system ты самовар")
        wait_for(lambda: api.texts(1)[-1] == "System prompt set.", "/system", api)
        api.flood["sendMessage"] = 1  # flood control: the next sendMessage is answered 429, retry after 1 s
        api.say(1, "кто ты?")
        expected = llm.chat([{"role": "system", "content": "ты самовар"}, {"role": "user", "content": "кто ты?"}],
                            max_tokens=40, temperature=0).strip()
        wait_for(lambda: api.texts(1)[-1] == expected, "the reply after /reset and /system", api)
        sends = [t for t, m, f in api.calls if m == "sendMessage" and f["chat_id"] == "1"]
        assert sends[-1] - sends[-2] >= 0.95  # the retry waited retry_after
    finally:
        out = bot.stop()
    assert TOKEN not in out


def test_a_missing_token_is_one_line(chat_model):
    r = subprocess.run([sys.executable, "-m", "samovar", "telegram", str(chat_model), "--token-env", "NOPE_TOKEN_X"],
                       capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items()
                                                                          if k != "NOPE_TOKEN_X"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "NOPE_TOKEN_X" in r.stderr


@pytest.mark.parametrize("text", ["слово " * 1500, "😀" * 3000, "a" * 9000, "строка\n" * 1000 + "end", "x", ""])
def test_long_replies_split_below_the_limit_without_breaking_a_character(text):
    pieces = split_message(text)
    assert "".join(pieces) == text
    assert all(0 < len(p.encode("utf-16-le")) // 2 <= 4096 for p in pieces)
    if "\n" in text:
        assert all(p.endswith("\n") for p in pieces[:-1])  # cut at line breaks where there are some
