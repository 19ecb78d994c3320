"""End to end in a real browser: headless Debian Chromium, driven by Playwright, against the
app served by `app.py` on the embedded model, with sign-in on.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
USER, PASSWORD = "tester", "a long enough password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed")
    data = tmp_path_factory.mktemp("data")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    subprocess.run([sys.executable, "-m", "personalign", "user", "add", USER, "--password-stdin", "--data-dir", str(data)],
                   input=PASSWORD + "\n", text=True, check=True, cwd=ROOT, env=env, capture_output=True)
    port = free_port()
    log = open(data / "server.log", "w")  # noqa: SIM115 -- the server writes to it until teardown closes it
    proc = subprocess.Popen([sys.executable, "app.py", "--auth", "--data-dir", str(data), "--device", "cpu"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**env, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 600  # the first run converts the embedded model
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app exited early:\n{(data / 'server.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("app did not start in time")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def set_slider(page, index: int, value: float) -> None:
    """Set a slider, again if the tab's on-load fill (still running after sign-in) overwrote it."""
    box = page.locator(f"#dim-{index} input[type=number]")
    for _ in range(20):
        box.fill(str(value))
        box.press("Enter")
        time.sleep(1)
        if float(box.input_value()) == value:
            return
    raise AssertionError(f"slider {index} would not keep {value}")


def signed_in(server, browser):
    page = browser.new_page()
    page.goto(server)
    page.get_by_label("username").fill(USER)
    page.get_by_label("password").fill(PASSWORD)
    page.get_by_role("button", name="Login").click()
    page.locator("#chatbot").wait_for()
    return page


def wait_for_text(locator, text: str, seconds: float = 180) -> str:
    deadline = time.time() + seconds
    while time.time() < deadline:
        shown = locator.inner_text()
        if text in shown:
            return shown
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared; last seen: {locator.inner_text()[:300]!r}")


def test_login_persona_chat_and_reload(server, browser):
    page = signed_in(server, browser)

    page.get_by_role("tab", name="Persona").click()
    set_slider(page, 16, 1)  # concise: its group starts open
    page.get_by_label("Filter dimensions").fill("young")  # the filter opens the Demographics group
    page.locator("#dim-1").wait_for(state="hidden")
    set_slider(page, 0, 0.9)
    page.get_by_label("Name").fill("Browser kid")
    page.locator("#save-persona").click()
    page.locator("#persona-status").get_by_text("Saved Browser kid as version 1").wait_for(timeout=30_000)
    assert "Young, Concise communication style" in page.locator("#profile-preview").inner_text()

    page.get_by_role("tab", name="Chat").click()
    page.locator("#message textarea").fill("What is the capital of France?")
    page.locator("#send").click()
    bot = page.locator("#chatbot .message.bot").last
    seen = set()
    deadline = time.time() + 120
    while time.time() < deadline and "Done" not in page.locator("#chat-status").inner_text():
        if bot.count():
            seen.add(bot.inner_text())
        time.sleep(0.05)
    final = bot.inner_text().strip()
    assert final and "Done" in page.locator("#chat-status").inner_text()
    partial = {s.strip() for s in seen} - {"", "…", final}
    assert partial, "the reply should appear in pieces while it streams"
    assert any(final.startswith(s) for s in partial)

    page.reload()
    page.locator("#conversations").get_by_text("What is the capital of France?").wait_for(timeout=30_000)
    page.locator("#chatbot .message.bot").last.wait_for(timeout=30_000)
    assert page.locator("#chatbot .message.bot").last.inner_text().strip() == final


def test_streaming_memory_meter_and_studio_compare(server, browser):
    page = signed_in(server, browser)
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("button", name="New chat").click()
    page.locator("#memory-policy input").click()
    page.get_by_role("option", name="StreamingDialogue: conversational sinks").click()
    for question in ("My sister is called Clara.", "What is her name?"):
        page.locator("#message textarea").fill(question)
        page.locator("#send").click()
        wait_for_text(page.locator("#chat-status"), "Done")
    meter = wait_for_text(page.locator("#memory-meter"), "Memory (streaming-dialogue)")
    assert "dense would hold" in meter
    page.locator("#chatbot .message.bot").last.wait_for()

    page.get_by_role("tab", name="Studio").click()
    page.locator("#studio-question textarea").fill("How do I brew green tea?")
    page.locator("#studio-compare").click()
    assert "Seed" in wait_for_text(page.locator("#studio-figures"), "Seed", seconds=300)


def test_tuning_a_persona_on_its_choices(server, browser, tmp_path):
    from personalign.persona import PairwiseItem, Persona, dumps

    choices = tuple(PairwiseItem(f"Name a colour ({n}).", "Red.", "Well, there are many colours, such as red.")
                    for n in range(4))
    upload = tmp_path / "Chooser.json"
    upload.write_text(dumps(Persona(pairwise=choices)), encoding="utf-8")
    page = signed_in(server, browser)
    page.get_by_role("tab", name="Persona").click()
    page.locator("#persona-import input[type=file]").set_input_files(str(upload))
    page.locator("#persona-status").get_by_text("Imported Chooser").wait_for(timeout=30_000)
    page.get_by_text("Tune the model to this persona").click()
    assert "4 pairwise choices saved" in wait_for_text(page.locator("#tuning-status"), "Not tuned")

    page.locator("#tune-persona").click()
    tuned = wait_for_text(page.locator("#tuning-status"), "Replies with this persona in ICA or PBA use it", 300)
    assert "Tuned" in tuned and "on 4 choices" in tuned
    page.locator("#untune-persona").click()
    wait_for_text(page.locator("#tuning-status"), "Not tuned")
