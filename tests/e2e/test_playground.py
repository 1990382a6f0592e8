"""The playground page in a real headless Chromium (Debian's chromium + chromium-driver, installed
by `make browser`) against a real `bentoml serve`: streaming, cached tokens, fork, stop, the cache
panel, API keys, and a console free of errors. Screenshots go to tests/artifacts/playground/."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import requests

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = os.environ.get("KVBENTO_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("KVBENTO_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "playground"
WAIT_S = 60


def _browser_or_skip() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if not missing:
        return
    reason = f"no {', '.join(missing)}: `make browser` installs chromium and chromium-driver"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true needs a browser: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager (which would download a driver) never runs.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(WAIT_S)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def srv(server_factory):
    # Its own: the cache panel lists the public tenant's records, which other modules fill elsewhere.
    s = server_factory()
    yield s
    s.stop()


def wait_for(driver, js: str, timeout: float = WAIT_S, what: str = ""):
    """Poll ``js`` (an expression) in the page until it is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script("return " + js)
        if value:
            return value
        time.sleep(0.05)
    driver.save_screenshot(str(ARTIFACTS / "timeout.png"))
    raise AssertionError(f"timed out waiting for {what or js}")


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def set_value(driver, selector: str, value: str) -> None:
    el = driver.find_element("css selector", selector)
    el.clear()
    el.send_keys(value)


def send(driver, text: str) -> None:
    """Type a message and press Enter (the keyboard path)."""
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("css selector", "#prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


MODEL_SHOWN = "document.querySelector('#model').textContent.includes('kvbento-tiny')"
LAST_ANSWER = "[...document.querySelectorAll('#messages .msg.assistant')].at(-1)"
IDLE = "document.querySelector('#stop').disabled && !document.querySelector('#send').disabled"


def answer_stats(driver, index: int = -1) -> dict:
    return driver.execute_script(
        "const m = [...document.querySelectorAll('#messages .msg.assistant')].at(arguments[0]);"
        "return {...m.querySelector('.stats').dataset,"
        "        text: m.querySelector('.content').textContent};", index)


def watch_answer_growth(driver) -> None:
    """Record the length of the newest answer's text at every change (before the answer exists)."""
    driver.execute_script("""
        window.__growth = [];
        new MutationObserver(() => {
          const m = [...document.querySelectorAll('#messages .msg.assistant')].at(-1);
          const n = m ? m.querySelector('.content').textContent.length : 0;
          if (!window.__growth.length || window.__growth.at(-1) !== n) window.__growth.push(n);
        }).observe(document.querySelector('#messages'),
                   {childList: true, subtree: true, characterData: true});
    """)


def prompt_tokens(srv, messages: list[dict]) -> int:
    """The prompt length of ``messages`` as the server counts it (a one-off request, no request_id)."""
    r = requests.post(f"{srv.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 1},
                      timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


def current_request_id(driver) -> str:
    return driver.execute_script("return document.querySelector('#conversations li.current button.open')"
                                 ".dataset.requestId")


def test_playground_chat_fork_stop_and_cache_panel(browser, srv):
    d = browser
    d.get(srv.url + "/playground")
    wait_for(d, MODEL_SHOWN, what="the model name")
    wait_for(d, "document.querySelector('#cache-status').textContent !== ''", what="the cache panel")
    set_value(d, "#max-tokens", "48")
    conv_id, second = _two_turns(d)
    fork_id, parent_rec = _fork_after_turn_one(d, srv, conv_id, second)
    stop_id = _stop_mid_stream(d, srv)
    _cache_panel(d, srv, (conv_id, fork_id, stop_id), parent_rec)
    _delete_and_phone_width(d, srv, stop_id)
    assert console_errors(d) == []


def _two_turns(d):
    # Turn 1: the text arrives in several steps.
    watch_answer_growth(d)
    send(d, "Tell me about cats.")
    wait_for(d, f"{LAST_ANSWER} && {IDLE}", what="turn 1 to finish")
    first = answer_stats(d)
    growth = d.execute_script("return window.__growth")
    assert len([n for n in growth if n > 0]) >= 3, f"text did not stream in steps: {growth}"
    assert growth == sorted(growth) and growth[-1] == len(first["text"]) > 0
    assert int(first["completion"]) == 48 and int(first["prompt"]) > 0
    assert float(first["ttft"]) > 0 and first["kv"] in ("miss", "hit", "partial", "unavailable")
    conv_id = current_request_id(d)

    # Turn 2 continues the conversation: the KV of turn 1 is reused.
    send(d, "And dogs?")
    wait_for(d, f"document.querySelectorAll('#messages .msg.assistant').length === 2 && {IDLE}",
             what="turn 2 to finish")
    second = answer_stats(d)
    assert int(second["prompt"]) > int(first["prompt"]) + 48 - 1
    assert second["kv"] in ("hit", "partial"), second
    assert int(second["cached"]) > 0, f"turn 2 reused no KV: {second}"
    d.save_screenshot(str(ARTIFACTS / "chat.png"))
    return conv_id, second


def _fork_after_turn_one(d, srv, conv_id, second):
    # Fork after turn 1: a new request_id with the first exchange, then its own turn.
    d.execute_script("document.querySelectorAll('#messages .msg.assistant .fork')[0].click()")
    current = "document.querySelector('#conversations li.current button.open').dataset.requestId"
    fork_id = wait_for(d, f"{current} !== '{conv_id}' && {current}", what="the fork")
    assert d.execute_script("return document.querySelectorAll('#messages .msg').length") == 2
    send(d, "What about birds?")
    wait_for(d, f"document.querySelectorAll('#messages .msg.assistant').length === 2 && {IDLE}",
             what="the fork's turn")
    forked = answer_stats(d)
    # The fork's history is turn 1 plus its own message, where turn 2 had turn 1 plus "And dogs?".
    own = prompt_tokens(srv, [{"role": "user", "content": "What about birds?"}])
    dogs = prompt_tokens(srv, [{"role": "user", "content": "And dogs?"}])
    assert int(forked["prompt"]) - int(second["prompt"]) == own - dogs, (forked, second)
    assert int(forked["cached"]) > 0, f"the fork reused none of its parent's KV: {forked}"
    fork_rec = requests.get(f"{srv.url}/api/cache/{fork_id}", timeout=10)
    parent_rec = requests.get(f"{srv.url}/api/cache/{conv_id}", timeout=10)
    assert fork_rec.status_code == parent_rec.status_code == 200
    assert fork_rec.json()["tokens"] == int(forked["prompt"]) + int(forked["completion"])
    assert parent_rec.json()["tokens"] == int(second["prompt"]) + int(second["completion"])  # untouched
    return fork_id, parent_rec


def _stop_mid_stream(d, srv):
    # Stop a long answer mid-stream: the record keeps exactly the tokens the page showed.
    d.find_element("css selector", "#new-conv").click()
    stop_id = current_request_id(d)
    set_value(d, "#max-tokens", "2000")
    # Watched and clicked by the page itself, every 5 ms (for at most 60 s): a WebDriver poll can
    # come a second late on a busy machine, when the tiny model (greedy: ~780 tokens, then its EOS,
    # streamed at ~700 tok/s or more) may have ended the answer by itself.
    d.execute_script(f"""window.kvbStopped = false;
        const watch = setInterval(() => {{
            const a = {LAST_ANSWER};
            if (a && Number(a.querySelector('.stats').dataset.completion) >= 20
                    && !document.querySelector('#stop').disabled) {{
                document.querySelector('#stop').click();
                window.kvbStopped = true;
                clearInterval(watch);
            }}
        }}, 5);
        setTimeout(() => clearInterval(watch), 60000);""")
    send(d, "Write a very long story.")
    wait_for(d, "window.kvbStopped", what="the long answer to start, then Stop")
    wait_for(d, f"{IDLE} && {LAST_ANSWER}.querySelector('.stats').dataset.stored", what="the stop")
    stopped = answer_stats(d)
    assert stopped["stopped"] == "true" and 20 <= int(stopped["completion"]) < 2000
    record = requests.get(f"{srv.url}/api/cache/{stop_id}", timeout=10).json()
    assert int(stopped["stored"]) == record["tokens"]  # the page shows the record's count
    shown = int(stopped["completion"])
    prompt = prompt_tokens(srv, [{"role": "user", "content": "Write a very long story."}])
    # Stop asks the server to end the generation and the page reads the stream to its end: the
    # record keeps exactly the tokens the page showed.
    assert record["tokens"] == prompt + shown, (record, stopped)
    d.save_screenshot(str(ARTIFACTS / "stopped.png"))
    return stop_id


def _cache_panel(d, srv, ids, parent_rec):
    conv_id, fork_id, stop_id = ids
    # The cache panel lists this tenant's request_ids; delete one there.
    d.find_element("css selector", "#cache-refresh").click()
    for rid in (conv_id, fork_id, stop_id):
        wait_for(d, f"document.querySelector('#cache-table tr[data-request-id=\"{rid}\"]')",
                 what=f"{rid} listed")
    tokens = d.execute_script(
        f"return document.querySelector('#cache-table tr[data-request-id=\"{conv_id}\"] .tokens')"
        ".textContent")
    assert int(tokens) == parent_rec.json()["tokens"]
    d.save_screenshot(str(ARTIFACTS / "playground.png"))
    d.find_element("css selector", f"#cache-table tr[data-request-id=\"{fork_id}\"] .cache-delete").click()
    wait_for(d, f"!document.querySelector('#cache-table tr[data-request-id=\"{fork_id}\"]')",
             what="the delete")
    assert requests.get(f"{srv.url}/api/cache/{fork_id}", timeout=10).status_code == 404


def _delete_and_phone_width(d, srv, stop_id):
    # Deleting a conversation from the list removes its record too.
    d.execute_script(f"document.querySelector('#conversations button.open[data-request-id=\"{stop_id}\"]')"
                     ".parentElement.querySelector('.delete-conv').click()")
    wait_for(d, f"!document.querySelector('#conversations button.open[data-request-id=\"{stop_id}\"]')",
             what="the conversation delete")
    assert requests.get(f"{srv.url}/api/cache/{stop_id}", timeout=10).status_code == 404

    # Phone width: no horizontal scrolling.
    d.set_window_size(390, 844)
    time.sleep(0.3)
    assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    d.save_screenshot(str(ARTIFACTS / "phone.png"))
    d.set_window_size(1280, 900)


KEY = "playground-key"


@pytest.fixture(scope="module")
def keyed_srv(keyed_server):
    return keyed_server  # KEY is one of its SHARED_KEYS (tests/e2e/conftest.py)


def test_playground_asks_for_a_key_on_401_and_keeps_it_for_the_tab(browser, keyed_srv):
    d = browser
    d.get(keyed_srv.url + "/playground")
    wait_for(d, "document.querySelector('#key-dialog').open", what="the key dialog")
    assert "401" in d.find_element("css selector", "#key-reason").text
    d.save_screenshot(str(ARTIFACTS / "key-dialog.png"))
    set_value(d, "#key-input", KEY)
    d.find_element("css selector", "#key-save").click()
    wait_for(d, MODEL_SHOWN, what="the model name")
    assert d.execute_script("return sessionStorage.getItem('kvbento.apiKey')") == KEY
    assert d.execute_script("return localStorage.length") == 0  # the key never outlives the tab
    set_value(d, "#max-tokens", "8")
    send(d, "Hello with a key.")
    wait_for(d, f"{LAST_ANSWER} && {IDLE}", what="the answer")
    assert int(answer_stats(d)["completion"]) == 8
    # A wrong key: the answer is an error message and the dialog asks again.
    d.execute_script(f"sessionStorage.setItem('kvbento.apiKey', 'wrong')")
    send(d, "And now?")
    wait_for(d, "document.querySelector('#messages .msg.error')", what="the 401 message")
    assert "401" in d.find_element("css selector", "#messages .msg.error").text
    assert d.execute_script("return document.querySelector('#key-dialog').open")
    # The refused requests are the only console errors.
    errors = [e for e in console_errors(d) if "status of 401" not in e["message"]]
    assert errors == []
