"""The web chat page (serve/static/chat.html) in a real headless Chromium, driven by Playwright:
type, see the answer stream in, keep the conversation, stop an answer, reset, and never turn text
into HTML. Debian's `chromium` is used (Playwright's own browser download needs the network)."""

import shutil

import pytest

playwright = pytest.importorskip("playwright.sync_api")

from samovar.api import LLM  # noqa: E402

from conftest import Server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; .ci/run does)")


@pytest.fixture(scope="module")
def server(chat_model):
    s = Server(chat_model, "--slots", 4, "--no-compile")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('context')")
    page.fill("#temperature", "0")
    page.fill("#repetition_penalty", "1")
    page.fill("#max_tokens", "40")
    yield page
    page.close()


def say(page, text: str) -> str:
    """Type a message, press Enter, wait for the answer to finish; returns it."""
    before = page.locator(".msg.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant, .msg.error').length > {before}")
    page.wait_for_function("document.getElementById('send').disabled === false")
    return page.locator(".msg.assistant").nth(before).text_content()


def test_the_page_streams_answers_and_keeps_the_conversation(page, chat_model):
    llm = LLM.from_path(chat_model, device="cpu")
    page.evaluate("""() => {  // every text the answer shows on its way, to see it stream in
        window.seen = [];
        new MutationObserver(() => {
            const last = [...document.querySelectorAll('.msg.assistant')].pop();
            if (last) window.seen.push(last.textContent);
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
    }""")
    network = page.context.new_cdp_session(page)  # a slow network: pieces that arrive together would
    network.send("Network.enable")                # show as one change, so space them out
    network.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": 1500,
                                                      "uploadThroughput": -1})
    first = say(page, "привет")
    network.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                      "uploadThroughput": -1})
    messages = [{"role": "user", "content": "привет"}]
    assert first == llm.chat(messages, max_tokens=40, temperature=0) and first
    seen = [s for s in page.evaluate("window.seen") if s]
    assert len(set(seen)) >= 2 and all(first.startswith(s) for s in seen)  # a part shown first, then the rest
    second = say(page, "кто ты?")
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "кто ты?"}]
    assert second == llm.chat(messages, max_tokens=40, temperature=0)  # the whole conversation was sent

    page.fill("#system", "ты самовар")
    page.click("#reset")
    assert page.locator(".msg").count() == 0
    third = say(page, "кто ты?")
    assert third == llm.chat([{"role": "system", "content": "ты самовар"}, {"role": "user", "content": "кто ты?"}],
                             max_tokens=40, temperature=0)


def test_stop_cuts_the_answer_and_frees_the_server(page, server, chat_model):
    # a slow network makes each streamed piece take a while, so Stop lands mid-answer
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": 1500,
                                                  "uploadThroughput": -1})
    page.fill("#input", "что ты умеешь?")
    page.press("#input", "Enter")
    page.wait_for_function("(document.querySelector('.msg.assistant') || {}).textContent")
    page.click("#stop")
    page.wait_for_function("document.getElementById('send').disabled === false")
    assert page.text_content("#status") == "stopped"
    cut = page.locator(".msg.assistant").first.text_content()
    whole = LLM.from_path(chat_model, device="cpu").chat([{"role": "user", "content": "что ты умеешь?"}],
                                                         max_tokens=40, temperature=0)
    assert cut and whole.startswith(cut) and len(cut) < len(whole)
    page.wait_for_function("fetch('/health').then(r => r.json()).then(h => h.active === 0)", timeout=10_000)


def test_text_never_becomes_html(page):
    attack = '<img src=x onerror="window.pwned=1"><b>bold</b> & "quotes"'
    page.fill("#input", attack)
    page.press("#input", "Enter")
    page.wait_for_function("document.getElementById('send').disabled === false")
    assert page.locator(".msg.user").first.text_content() == attack
    assert page.locator("#log img, #log b").count() == 0
    assert page.evaluate("window.pwned") is None


def test_errors_are_shown_and_leave_the_conversation_as_it_was(page):
    page.fill("#temperature", "-1")  # the server refuses it with a 400 and OpenAI's error body
    page.fill("#input", "привет")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.error")
    assert "temperature" in page.text_content(".msg.error")
    page.fill("#temperature", "0")
    assert say(page, "привет")  # the failed turn is not part of the conversation
