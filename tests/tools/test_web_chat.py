"""The chat page served by tools/serve.py at "/", driven in headless Chromium (selenium + chromedriver): a question
streams into the page, the model's thinking lands apart from its answer, the temperature and max-tokens controls
reach the server, and the conversation so far is sent with the next turn; with a server started with tools, the "use
tools" switch runs a tool round trip (the call shown, run through /v1/tools/call, its result sent back, the answer).

The model is a one-layer net trained here for a second to answer one question in the <think>/<answer> format; the
second turn's expected text comes from minimind_fast.generate on the same model. The tool round trip uses the model of
tests/tools/conftest.py `tool_model`. Skipped only where /usr/bin/chromium is absent (CI installs the Debian packages
chromium and chromium-driver).
"""

import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from test_serve import REASON_ANSWER, REASON_QUESTION, REASON_THOUGHT, train_reasoner

from minimind_fast.generate import generate
from minimind_fast.toolcall import Toolbox
from tools import serve

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt install chromium)")

QUESTION, THOUGHT, ANSWER = REASON_QUESTION, REASON_THOUGHT, REASON_ANSWER


@pytest.fixture(scope="module")
def model(tokenizer):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield train_reasoner(tokenizer)
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    engine = serve.Engine(model, tokenizer)
    app = serve.create_app(engine, "reasoner")
    sock = socket.create_server(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(timeout=15)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        opts.add_argument(flag)
    # An explicit driver path: selenium must not try to download one.
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _set(browser, element_id, value):
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(str(value))


def _wait(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the page")


def test_page_streams_answers_with_thinking_apart_and_keeps_history(server, browser, model, tokenizer):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(server + "/")
    _wait(lambda: browser.find_element(By.ID, "model-name").text == "reasoner")
    _set(browser, "temperature", 0)
    _set(browser, "max-tokens", 60)

    # Turn 1: typed, sent with Enter.
    browser.find_element(By.ID, "input").send_keys(QUESTION, Keys.ENTER)
    _wait(lambda: browser.find_element(By.ID, "status").text == "done")
    bubbles = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    assert len(bubbles) == 1
    first = bubbles[0]
    assert first.find_element(By.CSS_SELECTOR, ".content").text == ANSWER
    thinking = first.find_element(By.CSS_SELECTOR, ".thinking")
    assert thinking.get_attribute("hidden") is None
    assert thinking.find_element(By.CSS_SELECTOR, ".thought").get_attribute("textContent") == THOUGHT
    assert int(first.get_attribute("data-chunks")) > 5  # streamed piece by piece
    assert first.get_attribute("data-finish-reason") == "stop"
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == QUESTION

    # Turn 2: the page must send turn 1 back (the answer without its thinking), with max tokens 5.
    _set(browser, "max-tokens", 5)
    follow_up = "And at night?"
    browser.find_element(By.ID, "input").send_keys(follow_up)
    browser.find_element(By.ID, "send").click()
    _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2)
    _wait(lambda: browser.find_element(By.ID, "status").text == "done")
    second = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1]
    history = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": follow_up},
    ]
    ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
    assert int(second.get_attribute("data-prompt-tokens")) == len(ids)
    out = generate(model, [ids], 5, greedy=True)[0]
    want_thought, want_answer = serve.split_reasoning(tokenizer.decode(out, skip_special_tokens=True))
    assert second.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent") == want_answer
    assert second.find_element(By.CSS_SELECTOR, ".thought").get_attribute("textContent") == (want_thought or "")
    recent = httpx.get(server + "/metrics").json()["recent"]
    assert recent[-1]["max_tokens"] == 5 and recent[-1]["prompt_tokens"] == len(ids)
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.error") == []
    assert not browser.find_element(By.ID, "use-tools").is_enabled()  # this server runs no tools (GET /v1/tools: 404)


def test_keyed_server_page_names_the_model_and_asks_for_the_key(model, tokenizer, browser):
    """With a key required: the model name still shows (from /health), a turn sent without the key fails with a
    message about the key box and leaves neither its question nor an answer on the page (its text goes back into the
    input), and with the key typed the same turn is answered and the error is gone."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app = serve.create_app(serve.Engine(model, tokenizer), "reasoner-keyed", api_key="page-key")
    sock = socket.create_server(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait(lambda: srv.started)
        browser.get(f"http://127.0.0.1:{sock.getsockname()[1]}/")
        _wait(lambda: browser.find_element(By.ID, "model-name").text == "reasoner-keyed")
        icon = browser.execute_script("return document.querySelector('link[rel=icon]').href")
        assert icon.startswith("data:image/svg+xml")  # no /favicon.ico request
        _set(browser, "temperature", 0)
        _set(browser, "max-tokens", 60)
        browser.find_element(By.ID, "input").send_keys(QUESTION, Keys.ENTER)
        _wait(lambda: browser.find_element(By.ID, "status").text == "error")
        error = browser.find_element(By.CSS_SELECTOR, ".msg.error").text
        assert "API key box" in error and "header" not in error.lower()
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.user") == []
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.assistant") == []
        assert browser.find_element(By.ID, "input").get_attribute("value") == QUESTION
        assert browser.switch_to.active_element.get_attribute("id") == "api-key"
        _set(browser, "api-key", "page-key")
        browser.find_element(By.ID, "send").click()
        _wait(lambda: browser.find_element(By.ID, "status").text == "done")
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.error") == []
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.user")] == [QUESTION]
        answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .content").text
        assert answer == ANSWER
    finally:
        srv.should_exit = True
        thread.join(timeout=15)


def test_use_tools_switch_runs_a_tool_round_trip(tool_model, tokenizer, browser, server_thread):
    """A server with tools (the calculator): the switch comes on, the question is answered with a call that the page
    shows, runs through /v1/tools/call and sends back, and the model's second turn answers with the result."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app = serve.create_app(serve.Engine(tool_model.model, tokenizer), "tool-caller", toolbox=Toolbox())
    with server_thread(app) as srv:
        browser.get(srv.base + "/")
        _wait(lambda: browser.find_element(By.ID, "model-name").text == "tool-caller")
        switch = browser.find_element(By.ID, "use-tools")
        _wait(switch.is_enabled)
        switch.click()
        _set(browser, "temperature", 0)
        _set(browser, "max-tokens", 80)
        browser.find_element(By.ID, "input").send_keys(tool_model.question, Keys.ENTER)
        _wait(lambda: browser.find_element(By.ID, "status").text == "done")

        log = browser.find_elements(By.CSS_SELECTOR, "#log > .msg")
        assert [e.get_attribute("class") for e in log] == ["msg user", "msg assistant", "msg tool", "msg assistant"]
        call_turn, result, answer = log[1:]
        assert [c.text for c in call_turn.find_elements(By.CSS_SELECTOR, ".tool-call")] == [
            'calculator {"expression": "37 + 48"}'
        ]
        assert call_turn.find_element(By.CSS_SELECTOR, ".content").text == ""
        assert call_turn.get_attribute("data-finish-reason") == "tool_calls"
        assert result.find_element(By.CSS_SELECTOR, ".tool-name").text == "calculator"
        assert result.find_element(By.CSS_SELECTOR, ".result").text == '{"result": 85}'
        assert answer.find_element(By.CSS_SELECTOR, ".content").text == "37 + 48 = 85."
        assert answer.get_attribute("data-finish-reason") == "stop"
        assert answer.find_elements(By.CSS_SELECTOR, ".tool-call") == []
        # The second request carried the tools, the call and its result, as the template renders them.
        call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "37 + 48"}}}
        history = [
            {"role": "user", "content": tool_model.question},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": '{"result": 85}'},
        ]
        ids = tokenizer.apply_chat_template(history, True, True, tools=tool_model.specs)
        assert int(answer.get_attribute("data-prompt-tokens")) == len(ids)
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.error") == []
