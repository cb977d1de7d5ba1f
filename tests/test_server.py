"""The OpenAI-compatible server (serve/server.py) as its users meet it: `samovar serve` in a
subprocess on 127.0.0.1, driven by the official `openai` client and by raw HTTP."""

import json
import subprocess
import sys
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from samovar.api import LLM  # noqa: E402
from samovar.chat import render  # noqa: E402

from conftest import PAIRS, Server  # noqa: E402

@pytest.fixture(scope="module")
def server(chat_model):  # decoding through the compiled step, the default
    s = Server(chat_model, "--slots", 8, "--max-waiting", 32, "--keep-alive", 0.2)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def llm(chat_model):
    return LLM.from_path(chat_model, device="cpu")


def ask(q):
    return [{"role": "user", "content": q}]


# ---- the openai client ----------------------------------------------------------------------------------
def test_models_lists_the_run(client, chat_model):
    assert [m.id for m in client.models.list().data] == [chat_model.name]


def test_the_server_compiles_its_decoding_step_at_start_up_by_default(server):
    """What `samovar serve` decodes with out of the box: the compiled step, compiled before it
    listens (the answers below, equal to LLM.chat's eager ones, come through it)."""
    out = server.output()
    assert "samovar: compiling the decoding step" in out and "samovar: compiled in" in out
    assert out.index("samovar: compiled in") < out.index("serving ")
    assert "samovar: the weights laid out for batches of rows too (+" in out  # --slots > 1


def test_chat_equals_llm_chat_with_exact_usage(client, llm):
    for q, _ in PAIRS:
        r = client.chat.completions.create(model="samovar-chat", messages=ask(q), max_tokens=40, temperature=0)
        ours = llm.chat(ask(q), max_tokens=40, temperature=0)
        choice = r.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == ours
        assert choice.finish_reason == "stop"  # it learned to end its turn
        prompt = render(llm.tokenizer, ask(q), add_generation_prompt=True)[0]
        assert r.usage.prompt_tokens == len(prompt)
        assert r.usage.completion_tokens == len(llm.tokenizer.encode(ours))  # a char model: a token a character
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    r = client.chat.completions.create(model="samovar-chat", messages=ask("привет"), max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_a_stream_joins_to_the_whole_reply_and_ends_with_usage(client):
    for kwargs in (dict(temperature=0), dict(temperature=1.0, seed=7), dict(temperature=0, max_tokens=5)):
        kwargs = {"max_tokens": 40, **kwargs}
        whole = client.chat.completions.create(model="samovar-chat", messages=ask("кто ты?"), **kwargs)
        chunks = list(client.chat.completions.create(model="samovar-chat", messages=ask("кто ты?"), stream=True,
                                                     stream_options={"include_usage": True}, **kwargs))
        assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
        content = [c for c in chunks if c.choices]
        assert content[0].choices[0].delta.role == "assistant"
        assert all(c.choices[0].delta.role is None for c in content[1:])  # the role in the first chunk only
        assert [c.choices[0].finish_reason for c in content if c.choices[0].finish_reason] == \
            [whole.choices[0].finish_reason]  # exactly one finish_reason, the whole reply's
        assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # the final usage chunk
        assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_stop_strings_and_seeds(client):
    r = client.chat.completions.create(model="samovar-chat", messages=ask("как дела?"), n=2, temperature=1.5,
                                       seed=3, max_tokens=30)
    assert [c.index for c in r.choices] == [0, 1]
    again = client.chat.completions.create(model="samovar-chat", messages=ask("как дела?"), n=2, temperature=1.5,
                                           seed=3, max_tokens=30)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # the seed
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(model="samovar-chat", messages=ask("как дела?"), n=2,
                                                temperature=1.5, seed=3, max_tokens=30, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[0], streamed[1]] == [c.message.content for c in r.choices]
    assert r.usage.completion_tokens == sum(len(c.message.content) for c in r.choices) or \
        any(c.finish_reason == "length" for c in r.choices)

    full = client.chat.completions.create(model="samovar-chat", messages=ask("кто ты?"), temperature=0, max_tokens=40)
    text = full.choices[0].message.content
    cut = client.chat.completions.create(model="samovar-chat", messages=ask("кто ты?"), temperature=0, max_tokens=40,
                                         stop=[",", "чай"])
    assert cut.choices[0].message.content == text[:text.index(",")] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="samovar-chat", messages=ask("кто ты?"), temperature=0, max_tokens=40, stop=",", stream=True) if c.choices)
    assert streamed == text[:text.index(",")]


def test_logit_bias_moves_the_tokens_it_names(client, llm):
    """OpenAI's logit_bias: +100 makes a token all that greedy decoding picks; -100 keeps the likeliest
    token of the plain reply out of it; response_format text is the default and accepted."""
    plain = client.chat.completions.create(model="samovar-chat", messages=ask("привет"), temperature=0, max_tokens=8,
                                           logprobs=True)
    first = llm.tokenizer.encode(plain.choices[0].logprobs.content[0].token)[0]
    chosen = llm.tokenizer.encode("привет")[1]
    forced = client.chat.completions.create(model="samovar-chat", messages=ask("привет"), temperature=0, max_tokens=8,
                                            logit_bias={str(chosen): 100}, response_format={"type": "text"})
    assert forced.choices[0].message.content == llm.tokenizer.decode([chosen] * 8)
    banned = client.chat.completions.create(model="samovar-chat", messages=ask("привет"), temperature=0, max_tokens=8,
                                            logit_bias={str(first): -100})
    assert first not in llm.tokenizer.encode(banned.choices[0].message.content)
    text = client.completions.create(model="samovar-chat", prompt="при", temperature=0, max_tokens=4,
                                     logit_bias={str(chosen): 100}).choices[0].text
    assert text == llm.tokenizer.decode([chosen] * 4)


def test_chat_logprobs_are_the_models(client, llm):
    r = client.chat.completions.create(model="samovar-chat", messages=ask("привет"), temperature=0, max_tokens=40,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and "".join(t.token for t in content) == r.choices[0].message.content
    prompt = render(llm.tokenizer, ask("привет"), add_generation_prompt=True)[0]
    with torch.no_grad():
        logits = llm.model(torch.tensor([prompt + llm.tokenizer.encode(r.choices[0].message.content)]))[0]
    expected = torch.log_softmax(logits.float(), -1)
    for t, entry in enumerate(content):
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy: the likeliest
        assert entry.logprob == pytest.approx(float(expected[len(prompt) - 1 + t].max()), abs=1e-4)
        assert entry.bytes == list(entry.token.encode())


def test_completions_score_a_text_with_echo(client, llm):
    text = "the quick brown fox jumps"
    r = client.completions.create(model="samovar-chat", prompt=text, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    ids = llm.tokenizer.encode(text)
    assert r.choices[0].text == text and lp.tokens == list(text) and lp.token_logprobs[0] is None
    with torch.no_grad():
        expected = torch.log_softmax(llm.model(torch.tensor([ids]))[0].float(), -1)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(float(expected[t - 1, ids[t]]), abs=1e-4)
        assert len(lp.top_logprobs[t]) == 2
    assert lp.text_offset == list(range(len(text))) and r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 0 and r.choices[0].finish_reason == "length"

    plain = client.completions.create(model="samovar-chat", prompt=["the quick", "brown"], max_tokens=6, temperature=0)
    assert [c.index for c in plain.choices] == [0, 1]
    assert plain.choices[0].text == llm.generate("the quick", max_tokens=6, temperature=0)
    assert plain.usage.prompt_tokens == len("the quick") + len("brown")
    assert plain.usage.completion_tokens == sum(len(c.text) for c in plain.choices)  # a token a character
    by_ids = client.completions.create(model="samovar-chat", prompt=ids[:9], max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == plain.choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(model="samovar-chat", prompt="the quick",
                                                                   max_tokens=6, temperature=0, stream=True)]
    assert "".join(pieces) == plain.choices[0].text


def test_sixteen_concurrent_streams_equal_sixteen_serial_requests(client, server):
    questions = [PAIRS[i % len(PAIRS)][0] + " " * (i // len(PAIRS)) for i in range(16)]
    serial = [client.chat.completions.create(model="samovar-chat", messages=ask(q), temperature=0,
                                             max_tokens=30 + i).choices[0].message.content
              for i, q in enumerate(questions)]
    together = [None] * 16
    barrier = threading.Barrier(16)

    def talk(i):
        barrier.wait()
        stream = client.chat.completions.create(model="samovar-chat", messages=ask(questions[i]), temperature=0,
                                                max_tokens=30 + i, stream=True)
        together[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == serial


# ---- raw HTTP: what the client never sends ----------------------------------------------------------------
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    url = server.url + "/v1/chat/completions"
    good = {"model": "samovar-chat", "messages": ask("привет"), "max_tokens": 5}
    cases = [
        (dict(content=b"{oops", headers={"content-type": "application/json"}), 400, None),
        (dict(json=[1, 2]), 400, None),
        (dict(json={**good, "model": "gpt-4"}), 404, "model"),
        (dict(json={**good, "messages": []}), 400, "messages"),
        (dict(json={**good, "messages": [{"role": "wizard", "content": "x"}]}), 400, "messages.0.role"),
        (dict(json={**good, "max_tokens": 10_000}), 400, "max_tokens"),
        (dict(json={**good, "messages": ask("чай " * 200)}), 400, "messages"),
        (dict(json={**good, "temperature": -1}), 400, "temperature"),
        (dict(json={**good, "top_p": 0}), 400, "top_p"),
        (dict(json={**good, "top_p": 1.5}), 400, "top_p"),
        (dict(json={**good, "n": 0}), 400, "n"),
        (dict(json={**good, "n": 1000}), 400, "n"),
        (dict(json={**good, "stream_options": {"include_usage": True}}), 400, "stream_options"),
        (dict(json={**good, "top_logprobs": 2}), 400, "top_logprobs"),
        (dict(json={**good, "stop": [""]}), 400, "stop.0"),
        (dict(json={**good, "max_tokens": "many"}), 400, "max_tokens"),
        (dict(json={**good, "temperature": 1, "seed": 2 ** 70}), 400, None),  # (once a 500: found by the fuzzer)
        (dict(json={**good, "logit_bias": {"x": 5}}), 400, "logit_bias"),
        (dict(json={**good, "logit_bias": {"10000000": 5}}), 400, "logit_bias"),
        (dict(json={**good, "logit_bias": {"5": 101}}), 400, "logit_bias.5"),
        (dict(json={**good, "tools": [{"type": "function", "function": {"name": "f"}}]}), 400, "tools"),
        (dict(json={**good, "response_format": {"type": "json_object"}}), 400, "response_format"),
        (dict(content=json.dumps(good).encode(), headers={"content-type": "text/plain"}), 415, None),
        (dict(content=b'{"x": "' + b"a" * (2 << 20) + b'"}', headers={"content-type": "application/json"}), 413, None),
    ]
    for kwargs, status, param in cases:
        r = httpx.post(url, timeout=30, **kwargs)
        assert r.status_code == status, (kwargs.get("json"), r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], r.text
        if param is not None:
            assert error["param"] == param, r.text
    completions = server.url + "/v1/completions"
    for body in ({"prompt": ""}, {"prompt": []}, {"prompt": [10 ** 9]}, {"prompt": "x", "max_tokens": -1},
                 {"prompt": "x", "logprobs": 100}, {}, {"prompt": "x", "suffix": "y"}, {"prompt": "x", "best_of": 3},
                 {"prompt": ["x"] * 5, "n": 9}):  # 45 sequences for 8 slots and 32 waiting (once a 503: the fuzzer)
        r = httpx.post(completions, json=body)
        assert r.status_code == 400 and r.json()["error"]["message"], (body, r.text)
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(url).json()["error"]["type"]  # the wrong method, in the same shape
    assert httpx.post(url, json=good).status_code == 200 and server.health()["active"] == 0


def test_an_api_key_guards_every_v1_route_and_is_never_logged(chat_model):
    secret = "sk-test-" + "x" * 24
    s = Server(chat_model, "--no-compile", "--api-key-env", "SAMOVAR_TEST_KEY", env={"SAMOVAR_TEST_KEY": secret})
    try:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
            r = httpx.request(method, s.url + path, json={"prompt": "x"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = httpx.request(method, s.url + path, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200
        keyed = openai.OpenAI(base_url=s.url + "/v1", api_key=secret, max_retries=0)
        assert keyed.chat.completions.create(model=chat_model.name, messages=ask("привет"), max_tokens=3).choices
        assert secret not in s.output()
    finally:
        s.stop()
    missing = subprocess.run([sys.executable, "-m", "samovar", "serve", str(chat_model), "--api-key-env", "NOPE_X"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "NOPE_X" in missing.stderr


# ---- load: a full queue, waiting streams, clients that go away ----------------------------------------------
@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """An untrained model with a long context and no end token: it talks for thousands of tokens."""
    from samovar.checkpoint import save_checkpoint
    from samovar.config import get_preset
    from samovar.model import Transformer
    from samovar.tokenizer import Tokenizer

    tok = Tokenizer.train("char", ["abcdefghijklmnopqrstuvwxyz "], special_tokens=())  # no eos: it never stops
    torch.manual_seed(0)
    model = Transformer(get_preset("llama-tiny").replace(vocab_size=tok.vocab_size, context_len=4096))
    folder = tmp_path_factory.mktemp("slow_model") / "slow"
    save_checkpoint(folder, model, tok)
    return folder


def test_a_full_server_answers_503_keeps_waiting_streams_alive_and_frees_what_clients_leave(slow_model):
    s = Server(slow_model, "--no-compile", "--slots", 1, "--max-waiting", 1, "--keep-alive", 0.2)
    url = s.url + "/v1/completions"
    long = {"prompt": "abc", "max_tokens": 4000, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", url, json=long, timeout=60) as first:  # takes the one slot
            assert first.status_code == 200 and first.headers["x-accel-buffering"] == "no"
            streamed = first.iter_lines()  # kept: a closed iterator closes the connection
            assert next(line for line in streamed if line.startswith("data: "))
            with httpx.stream("POST", url, json=long, timeout=60) as second:  # waits for the slot
                assert second.status_code == 200 and s.health()["waiting"] == 1
                refused = httpx.post(url, json={**long, "stream": False}, timeout=60)
                assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1, \
                    (refused.text[:300], s.health())
                assert refused.json()["error"]["code"] == "server_busy"
                waiting = second.iter_lines()
                assert next(line for line in waiting if line) == ": keep-alive"  # while it waits, comments
        deadline = time.time() + 10  # both clients went away mid-stream: the slot and the queue empty
        while s.health()["active"] or s.health()["waiting"]:
            assert time.time() < deadline, s.health()
            time.sleep(0.05)
        whole = httpx.post(url, json={**long, "stream": False, "max_tokens": 50}, timeout=60).json()
        assert whole["choices"][0]["finish_reason"] == "length" and whole["usage"]["completion_tokens"] == 50
    finally:
        s.stop()


# ---- fuzzed from the server's own OpenAPI document ----------------------------------------------------------
def test_the_api_fuzzed_from_its_own_schema_never_fails_and_keeps_serving(server):
    """Every operation, 100 requests that fit the schema and 100 that do not (schemathesis): no 5xx,
    only documented status codes, bodies as documented; the server answers afterwards."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"}
    for operation in operations:
        with_body = operation.method.upper() == "POST"  # a GET without parameters has no invalid form
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[:2 if with_body else 1]:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                      database=None)
            def call(case):
                response = case.call(timeout=60)
                case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                         response_schema_conformance])

            call()
    assert server.proc.poll() is None and server.health()["active"] == 0
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "the", "max_tokens": 3}).status_code == 200
