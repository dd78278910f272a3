"""The chat page at / of `dllama-run serve`, in a real headless Chromium (Debian's chromium and
chromium-driver, driven by selenium) against a real server on SmolLM2: a question typed on the
page streams its answer, the stop button ends it, the conversation survives a reload.

CHAT_PAGE_SCREENSHOT=docs/chat-page.png python -m pytest tests/test_chat_page.py  refreshes the
picture in docs/ (every run takes one into its temporary folder)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from conftest import CONFORMANCE, _missing, require_fixtures
from serve_helpers import LOOPBACK, ServerProcess, start_worker

from dllama.tokenizer.from_hf import convert_tokenizer

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
API_KEY = "page-test-key"
CONTEXT = 1024
WAIT_S = 30  # bound on every wait below; each normally ends in well under a second or two
# a greedy SmolLM2 answers this with a story that loops until the context is full (~950 tokens), so the
# answer is surely still streaming when the test presses stop, and the server is busy until it sees that
LONG_QUESTION = "Write a story about a robot who learns to paint."
SHORT_QUESTION = "What is the capital of France?"
# without the background-networking flags chromium tries the network (updates, sync, QUIC probes)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1280,860")


@pytest.fixture(scope="module")
def server(smollm2_files):
    proc = ServerProcess("--model", str(smollm2_files["q80"]), "--tokenizer", str(smollm2_files["tokenizer"]),
                         "--max-seq-len", str(CONTEXT), "--api-key", API_KEY)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        _missing("Debian's chromium and chromium-driver are not installed: apt-get install chromium chromium-driver "
                 "(.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")  # both paths are given; never let Selenium Manager fetch a driver
        driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture
def page(server, browser):
    return open_page(browser, server.url)


def open_page(driver, url: str):
    """The page, opened fresh (nothing in localStorage from an earlier test), once it shows the server ready."""
    driver.get(f"{url}/")
    driver.execute_script("localStorage.clear()")
    driver.refresh()
    wait_until(driver, lambda d: health_shown(d) == "pill ok", "the page never showed the server as ready")
    return driver


def health_shown(driver) -> str:
    return driver.find_element("id", "health-pill").get_attribute("class")


def wait_until(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition, message)


def configure(driver, **fields: str) -> None:
    """Opens the settings dialog, fills the fields by id, closes it with Done."""
    driver.find_element("id", "settings-open").click()
    for field, value in fields.items():
        box = driver.find_element("id", field)
        box.clear()
        box.send_keys(value)
    driver.find_element("id", "settings-save").click()
    wait_until(driver, lambda d: not d.find_element("id", "settings").get_attribute("open"), "settings stayed open")


def ask(driver, question: str) -> None:
    from selenium.webdriver.common.keys import Keys

    driver.find_element("id", "input").send_keys(question, Keys.ENTER)


def last_answer(driver) -> tuple[str, str]:
    """(text, state) of the newest assistant message: state is waiting, streaming, done, length, stopped or error."""
    return tuple(driver.execute_script("""
        const rows = document.querySelectorAll('.message.assistant');
        const row = rows[rows.length - 1];
        return row ? [row.querySelector('.text').textContent, row.dataset.state] : ['', ''];"""))


def send_button_is_back(driver) -> bool:
    return driver.find_element("id", "send").is_displayed() and not driver.find_element("id", "stop").is_displayed()


def wait_until_idle(url: str) -> dict:
    """/health once the server runs no generation (polled, bounded)."""
    deadline = time.monotonic() + WAIT_S
    while (health := httpx.get(f"{url}/health", timeout=5).json())["busy"]:
        assert time.monotonic() < deadline, f"the server still generates {WAIT_S} s after the page stopped"
        time.sleep(0.05)
    return health


def test_page_streams_an_answer_stops_it_and_keeps_the_conversation(server, page, tmp_path, smollm2_files):
    model_id = smollm2_files["q80"].stem
    wait_until(page, lambda d: d.find_element("id", "model-name").text == model_id, "no model name on the page")
    configure(page, api_key=API_KEY, system="You are a helpful assistant.", temperature="0", max_tokens="1000")

    ask(page, SHORT_QUESTION)  # a whole answer first: it ends by itself and the page says how fast it came
    wait_until(page, lambda d: last_answer(d)[1] == "done", "the short answer never finished")
    assert "Paris" in last_answer(page)[0]
    assert "tok/s" in page.find_elements("css selector", ".message.assistant .stats")[-1].text

    ask(page, LONG_QUESTION)
    wait_until(page, lambda d: last_answer(d)[0] and last_answer(d)[1] == "streaming", "no streamed text appeared")
    first_seen = len(last_answer(page)[0])
    wait_until(page, lambda d: len(last_answer(d)[0]) > first_seen + 100, "the streamed answer did not grow")
    assert page.find_element("id", "stop").is_displayed() and not page.find_element("id", "send").is_displayed()
    assert health_shown(page) in ("pill busy", "pill ok")

    page.find_element("id", "stop").click()
    wait_until(page, send_button_is_back, "the send button did not come back after stop")
    stopped_text, stopped_state = last_answer(page)
    assert stopped_state == "stopped" and len(stopped_text) > first_seen + 100
    assert wait_until_idle(server.url)["status"] == "ok"  # the server saw the disconnect and freed the model
    wait_until(page, lambda d: health_shown(d) == "pill ok", "the page still shows the server busy")
    assert last_answer(page) == (stopped_text, "stopped")  # nothing more arrived

    screenshot(page, tmp_path)

    page.refresh()  # the conversation is kept in the browser
    wait_until(page, lambda d: len(d.find_elements("css selector", ".message")) == 4, "the conversation is gone")
    assert [m.text for m in page.find_elements("css selector", ".message.user .text")] == [SHORT_QUESTION,
                                                                                          LONG_QUESTION]
    assert last_answer(page) == (stopped_text, "stopped")
    assert page.find_element("css selector", ".conversation.active").text.startswith(SHORT_QUESTION[:20])


def test_page_asks_for_the_api_key_and_answers_once_it_is_set(page):
    ask(page, "Hello")
    wait_until(page, lambda d: last_answer(d)[1] == "error", "no error without the API key")
    assert "set the API key in Settings" in page.find_element("css selector", ".message.assistant .error").text
    configure(page, api_key=API_KEY, temperature="0", max_tokens="4")
    ask(page, "Hello")
    wait_until(page, lambda d: last_answer(d)[1] in ("done", "length"), "no answer once the key was set")
    assert last_answer(page)[0]


def test_page_shows_the_cluster_workers_and_one_that_is_lost(browser, tmp_path):
    model_dir = require_fixtures(CONFORMANCE / "tiny-llama")
    tokenizer = tmp_path / "tiny-llama.t"
    tokenizer.write_bytes(convert_tokenizer(model_dir).to_bytes())
    worker, port = start_worker()
    server = None
    try:
        server = ServerProcess("--model", str(model_dir / "expected_f32.m"), "--tokenizer", str(tokenizer),
                               "--max-seq-len", "256", "--workers", f"{LOOPBACK}:{port}")
        open_page(browser, server.url)
        shown = browser.find_elements("css selector", "#workers .worker")
        assert [(w.text, w.get_attribute("class")) for w in shown] == [(f"{LOOPBACK}:{port}", "worker ok")]
        assert "root + 1 worker" in browser.find_element("id", "model-detail").text
        worker.kill()
        worker.wait()
        wait_until(browser, lambda d: health_shown(d) == "pill down", "the page never showed the cluster down")
        assert "closed the connection" in browser.find_element("id", "health-text").text
        assert browser.find_element("css selector", "#workers .worker").get_attribute("class") == "worker down"
    finally:
        if server is not None:
            server.stop()
        worker.kill()
        worker.wait()


def screenshot(driver, tmp_path: Path) -> None:
    path = tmp_path / "chat-page.png"
    assert driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if target := os.environ.get("CHAT_PAGE_SCREENSHOT"):
        Path(target).write_bytes(path.read_bytes())
