"""The OpenAI-compatible HTTP server: thin routes over an LLM and the continuous-batching Scheduler.

    GET  /health                health and load
    GET  /v1/models             the one model served
    POST /v1/completions        text in, text out (echo and logprobs: how evaluation harnesses score)
    POST /v1/chat/completions   a conversation in, the assistant's reply out (the chat template)
    GET  /                      the web chat page (static/chat.html)

Replies stream as server-sent events in OpenAI's chunk format when asked (stream=true). Every error
is OpenAI's JSON, {"error": {"message", "type", "param", "code"}}, with a 4xx status: the request's
body is read and checked here (content type, size, JSON, fields) before anything reaches the model.

    app = create_app(LLM.from_path("runs/chat"))
    uvicorn.run(app, host="127.0.0.1", port=8000)       # what `samovar serve` does
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from ..api import LLM, TextStream
from ..chat import ChatError, render
from ..engine import GenerationError, SamplingParams
from ..tokenizer import TokenizerError
from .reply import KEEPALIVE, Choice
from .scheduler import Busy, Scheduler, Token

PAGE = Path(__file__).with_name("static") / "chat.html"
MAX_N = 16
MAX_LOGPROBS = 20


# ---- requests: what the routes accept (and the OpenAPI schema documents) ------------------------------
class StreamOptions(BaseModel):
    include_usage: bool | None = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields of OpenAI's that change nothing here (user, ...)

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # 0 or -1: no top-k (vLLM's and llama.cpp's)
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stop: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]] | None = None
    seed: int | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=100)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id (as text) -> bias


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")  # (json_schema's schema: refused with the type)
    type: str


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[dict] | None = None  # refused when given: the model calls no tools
    response_format: ResponseFormat | None = None  # only "text": nothing constrains the samples to JSON


class CompletionRequest(Sampling):
    prompt: (Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
             | Annotated[list[int], Field(min_length=1)] | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)])
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = False
    suffix: str | None = None  # refused when given: insertion needs a model trained for it
    best_of: int | None = None  # refused unless it is n: every sample drawn is returned


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
               503: "service_unavailable"}


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class KeyCheck:
    """Every /v1 route answers 401 without `Authorization: Bearer KEY` (compared in constant time).
    A plain ASGI middleware: what passes goes through untouched (FastAPI's @app.middleware would carry
    every streamed chunk through a memory stream of its own)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "invalid or missing API key: send Authorization: Bearer KEY",
                                          code="invalid_api_key")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_message(error: ValidationError) -> tuple[str, str | None]:
    """OpenAI's one-line message for what is wrong with a request, and the field it names: of the
    errors pydantic reports (one for each member of a union), the deepest, its path without the
    union members' type names."""
    def path(e):
        return [str(p) for p in e["loc"] if isinstance(p, int) or not (p in TYPE_NAMES or any(c in p for c in "[-"))]
    first = max(error.errors(), key=lambda e: len(path(e)))
    param = ".".join(path(first)) or None
    return (f"{param}: {first['msg']}" if param else first["msg"]), param


# ---- the app --------------------------------------------------------------------------------------------
def create_app(llm: LLM, scheduler: Scheduler | None = None, model_name: str = "samovar",
               api_key: str | None = None, max_body_bytes: int = 1 << 20, keepalive_seconds: float = 10.0,
               slots: int = 16, max_waiting: int = 64) -> FastAPI:
    """The FastAPI app serving `llm` through `scheduler` (by default a new one, `slots` sequences at
    once and up to `max_waiting` waiting for a slot)."""
    scheduler = scheduler or Scheduler(llm.model, slots=slots, max_waiting=max_waiting,
                                       vocab_limit=llm.tokenizer.vocab_size)
    tokenizer = llm.tokenizer
    context_len = scheduler.context_len
    created = int(time.time())
    errors = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
              413: {"model": ErrorResponse}, 415: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()

    app = FastAPI(title="samovar", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):  # unknown paths and methods, in OpenAI's shape
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    if api_key is not None:
        app.add_middleware(KeyCheck, key=api_key)

    async def body_of(request: Request, model: type[BaseModel]):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise APIError(415, f"the body must be application/json, not {kind or 'untyped'}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(413, f"the body is larger than {max_body_bytes} bytes")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > max_body_bytes:
                raise APIError(413, f"the body is larger than {max_body_bytes} bytes")
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            json.dumps(raw, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the body's text is not valid Unicode (an unpaired surrogate escape)") from None
        try:
            req = model.model_validate(raw)
        except ValidationError as e:
            message, param = validation_message(e)
            raise APIError(400, message, param) from None
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
        return req

    shared_schemas: dict = {}  # the request models' parts (Message, ...), for the document's components

    def schema(model):
        """The route's request body in the OpenAPI document (the route reads the body itself)."""
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        shared_schemas.update(body.pop("$defs", {}))
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": body}}}}

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(shared_schemas)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": scheduler.active, "waiting": len(scheduler.waiting),
                "slots": scheduler.slots}

    @app.get("/v1/models", responses=errors)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "samovar", "max_model_len": context_len}]}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.post("/v1/chat/completions", responses=errors, openapi_extra=schema(ChatRequest))
    async def chat_completions(request: Request):
        req = await body_of(request, ChatRequest)
        if tokenizer.chat_template is None:
            raise APIError(400, "this model has no chat template: fine-tune it on conversations "
                                "(samovar prepare --chat) or use /v1/completions", "messages")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", "top_logprobs")
        if req.tools:
            raise APIError(400, "this server does not call tools: its model was not trained to", "tools")
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(400, f"response_format {req.response_format.type!r} is not supported: this server "
                                "samples plain text (type text)", "response_format")
        try:
            prompt = render(tokenizer, [m.as_dict() for m in req.messages], add_generation_prompt=True)[0]
        except (ChatError, TokenizerError) as e:
            raise APIError(400, str(e), "messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens == 0:
            raise APIError(400, "max_tokens must be at least 1", "max_tokens")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        run = start(req, [prompt], max_tokens, logprobs, False)
        return await respond(run, req, chat=True)

    @app.post("/v1/completions", responses=errors, openapi_extra=schema(CompletionRequest))
    async def completions(request: Request):
        req = await body_of(request, CompletionRequest)
        prompts = req.prompt if isinstance(req.prompt, list) and not isinstance(req.prompt[0], int) else [req.prompt]
        ids = []
        for p in prompts:
            ids.append(tokenizer.encode(p) if isinstance(p, str) else list(p))
            if any(not 0 <= i < tokenizer.vocab_size for i in ids[-1]):
                raise APIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", "prompt")
            if not ids[-1]:
                raise APIError(400, "the prompt has no tokens", "prompt")
        if req.echo and req.stream:
            raise APIError(400, "echo is not supported with stream", "echo")
        if req.suffix:
            raise APIError(400, "suffix is not supported: the model continues the prompt, it does not fill a gap",
                           "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported: every sample drawn is returned (ask for n)", "best_of")
        return await respond(start(req, ids, req.max_tokens, req.logprobs, bool(req.echo)), req, chat=False)

    def start(req: Sampling, prompts: list[list[int]], max_tokens: int | None, logprobs, echo) -> "Run":
        where = "messages" if isinstance(req, ChatRequest) else "prompt"
        """Submit n sequences for each prompt; 400 for what does not fit, 503 when the queue is full."""
        loop = asyncio.get_running_loop()
        run = Run(chat_id(req), prompts)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        bias = {}
        for token, value in (req.logit_bias or {}).items():
            if not (token.isascii() and token.isdigit()) or int(token) >= tokenizer.vocab_size:
                raise APIError(400, f"logit_bias: {token!r} is not a token id of this model's "
                                    f"[0, {tokenizer.vocab_size})", "logit_bias")
            bias[int(token)] = value
        if len(prompts) * req.n > scheduler.slots + scheduler.max_waiting:  # never servable: not a 503
            raise APIError(400, f"the request asks for {len(prompts) * req.n} sequences ({len(prompts)} prompts x "
                                f"n={req.n}); this server holds at most {scheduler.slots + scheduler.max_waiting} "
                                "at once (--slots and --max-waiting)", "n")
        try:
            for p, prompt in enumerate(prompts):
                wanted = context_len - len(prompt) if max_tokens is None else max_tokens
                if len(prompt) + wanted > context_len or wanted < 0:
                    raise APIError(400, f"this model's context is {context_len} tokens; the request asks for "
                                        f"{len(prompt) + max(wanted, 1)} ({len(prompt)} in the prompt, "
                                        f"{max(wanted, 1)} to generate)",
                                   "max_tokens" if max_tokens and len(prompt) < context_len else where,
                                   "context_length_exceeded")
                for i in range(req.n):
                    seed = None if req.seed is None else req.seed + i
                    params = SamplingParams(
                        max_tokens=wanted, temperature=1.0 if req.temperature is None else req.temperature,
                        top_k=req.top_k if req.top_k and req.top_k > 0 else None, top_p=req.top_p, min_p=req.min_p,
                        repetition_penalty=req.repetition_penalty or 1.0,
                        frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
                        stop=stop, seed=seed, logit_bias=bias or None)
                    stop_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
                    seq = scheduler.submit(prompt, params, stop_ids, logprobs=logprobs, echo=echo, loop=loop)
                    run.choices.append(Choice(p * req.n + i, p, seq, TextStream(tokenizer, stop)))
        except Busy as e:
            run.cancel()
            raise APIError(503, f"the server is busy ({e}); retry shortly", code="server_busy",
                           headers={"Retry-After": "1"}) from None
        except GenerationError as e:
            run.cancel()
            raise APIError(400, str(e)) from None
        except APIError:
            run.cancel()
            raise
        return run

    def chat_id(req) -> str:
        return ("chatcmpl-" if isinstance(req, ChatRequest) else "cmpl-") + uuid.uuid4().hex

    # ---- responses -----------------------------------------------------------------------------------
    async def respond(run: "Run", req: Sampling, chat: bool):
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(run, chat, usage), media_type="text/event-stream",
                                     headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache"})
        try:
            await asyncio.gather(*(drain(c) for c in run.choices))
        finally:
            run.cancel()
        choices = [whole_choice(c, run, chat) for c in run.choices]
        return {"id": run.id, "object": "chat.completion" if chat else "text_completion", "created": run.created,
                "model": model_name, "choices": choices, "usage": run.usage()}

    async def drain(choice: "Choice") -> None:
        async for _ in choice.pieces(None):
            pass

    def whole_choice(c: "Choice", run: "Run", chat: bool) -> dict:
        text = "".join(c.text_parts)
        if chat:
            return {"index": c.index, "message": {"role": "assistant", "content": text},
                    "logprobs": chat_logprobs(c.tokens) if c.seq.logprobs is not None else None,
                    "finish_reason": c.finish_reason}
        prompt = run.prompts[c.prompt]
        tokens = ([Token(prompt[0])] + c.seq.prompt_logprobs if c.seq.echo else []) + c.tokens
        if c.seq.echo:
            text = tokenizer.decode(prompt) + text
        return {"index": c.index, "text": text, "finish_reason": c.finish_reason,
                "logprobs": completion_logprobs(tokens) if c.seq.logprobs is not None else None}

    async def stream(run: "Run", chat: bool, usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices, **extra) -> str:
            body = {"id": run.id, "object": kind, "created": run.created, "model": model_name, "choices": choices}
            if usage:
                body["usage"] = None
            body.update(extra)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def chunk(c: Choice, text: str, tokens: list[Token], finish: str | None = None, first: bool = False):
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                lp = chat_logprobs(tokens) if c.seq.logprobs is not None and tokens else None
                return {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            lp = completion_logprobs(tokens) if c.seq.logprobs is not None and tokens else None
            return {"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish}

        try:
            if chat:
                for c in run.choices:
                    yield event([chunk(c, "", [], first=True)])
            async for c, piece in merged(run.choices):
                if piece is None:
                    yield event([chunk(c, "", [], c.finish_reason)])
                elif piece == KEEPALIVE:
                    yield ": keep-alive\n\n"
                elif isinstance(piece, Exception):
                    yield f"data: {json.dumps({'error': {'message': str(piece), 'type': 'server_error'}})}\n\n"
                else:
                    text, tokens = piece
                    yield event([chunk(c, text, tokens)])
            if usage:
                yield event([], usage=run.usage())
            yield "data: [DONE]\n\n"
        finally:
            run.cancel()

    async def merged(choices: list[Choice]):
        """(choice, piece) as each choice's pieces come, then (choice, None) at its end; an error of
        the model as a piece. One choice is read directly; several through a task each."""
        async def pieces(c: Choice):
            try:
                async for piece in c.pieces(keepalive_seconds):
                    yield c, piece
            except Exception as e:  # the model failed: the stream says so and ends
                yield c, e
            yield c, None

        if len(choices) == 1:
            async for item in pieces(choices[0]):
                yield item
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def feed(c: Choice):
            async for item in pieces(c):
                await queue.put(item)

        tasks = [asyncio.create_task(feed(c)) for c in choices]
        try:
            for _ in range(len(choices)):
                while (item := await queue.get())[1] is not None:
                    yield item
                yield item
        finally:
            for t in tasks:
                t.cancel()

    def token_text(i: int) -> str:
        return tokenizer.decode([i])

    def chat_logprobs(tokens: list[Token]) -> dict:
        def entry(i, lp):
            s = token_text(i)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                            for t in tokens]}

    def completion_logprobs(tokens: list[Token]) -> dict:
        texts = [token_text(t.id) for t in tokens]
        offsets, at = [], 0
        for s in texts:
            offsets.append(at)
            at += len(s)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [None if t.logprob is None else {token_text(i): lp for i, lp in t.top} for t in tokens],
                "text_offset": offsets}

    return app


class Run:
    """The sequences one request started."""

    def __init__(self, id: str, prompts: list[list[int]]):
        self.id, self.prompts, self.created = id, prompts, int(time.time())
        self.choices: list[Choice] = []

    def cancel(self) -> None:
        for c in self.choices:
            c.seq.cancel()

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)  # once a prompt, whatever n is (as OpenAI counts)
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, name: str = "samovar") -> None:
    """Run the app with uvicorn until Ctrl-C or SIGTERM: uvicorn in a thread, the loop of the app's
    scheduler (made with thread=False) in this one (Scheduler.run_beside)."""
    try:
        import uvicorn
    except ImportError:
        raise GenerationError("serving needs uvicorn and fastapi: pip install 'samovar[serve]'") from None
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    print(f"serving {name} on http://{host}:{port} (OpenAI API at /v1, chat page at /)", flush=True)
    app.state.scheduler.run_beside(server.run, lambda: setattr(server, "should_exit", True))
