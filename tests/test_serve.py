"""`qrb serve`: the official openai client talks to it (streaming included); limits; the web page in Chromium."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from helpers import REPO

CHROMIUM_APT = "apt-get update && apt-get install -y chromium chromium-driver"
QUESTION = "What does the paper 'Quantum error correction' say?"


@contextlib.contextmanager
def running(app):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def url(bot):
    from qrb.app.serve import create_app

    with running(create_app(bot)) as u:
        yield u


@pytest.fixture()
def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_lists_the_model_and_gets_the_adapters_answer(client, bot):
    assert [m.id for m in client.models.list().data] == ["quantum-research-bot"]
    r = client.chat.completions.create(model="quantum-research-bot", max_tokens=24,
                                       messages=[{"role": "user", "content": QUESTION}])
    expected = bot.generate([{"role": "user", "content": QUESTION}], max_new_tokens=24)
    assert r.choices[0].message.content == expected.text and expected.text
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == expected.prompt_tokens
    assert r.usage.completion_tokens == expected.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_client_streams(client):
    kw = {"model": "quantum-research-bot", "max_tokens": 24, "messages": [{"role": "user", "content": QUESTION}]}
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces).strip() == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    # the SDK's streaming helper sees the same text (its final-completion parse refuses finish_reason "length")
    with client.chat.completions.stream(**kw) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "content.delta")
    assert deltas.strip() == whole


def test_limits_and_errors_in_openai_format(client, url, bot):
    import httpx
    import openai

    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match=r"max_tokens must be between 1 and 64"):
        client.chat.completions.create(model="quantum-research-bot", messages=user, max_tokens=65)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="quantum-research-bot",
                                       messages=[{"role": "user", "content": "qubit " * 2000}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="gpt-4", messages=user)
    with pytest.raises(openai.BadRequestError, match="last message must be the user"):
        client.chat.completions.create(model="quantum-research-bot", messages=[{"role": "assistant", "content": "x"}])
    big = "x" * (bot.limits.max_request_bytes + 1)
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": big}]}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    # the server still answers after all that
    assert client.chat.completions.create(model="quantum-research-bot", messages=user, max_tokens=2).choices


def test_api_key_when_set(bot):
    import openai

    from qrb.app.serve import create_app

    with running(create_app(bot, api_key="s3cret")) as u:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{u}/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=f"{u}/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == "quantum-research-bot"


def _chromium() -> tuple[str, str] | None:
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.slow
def test_web_page_answers_a_question_in_headless_chromium(url, bot):
    found = _chromium()
    if found is None:
        pytest.skip(f"chromium/chromedriver not installed: add `{CHROMIUM_APT}` to .ci/run")
    pytest.importorskip("selenium", reason="pip install selenium (dev dependency)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = found
    expected = bot.generate([{"role": "user", "content": QUESTION}]).text
    with tempfile.TemporaryDirectory(prefix="qrb-chromium-") as profile:
        opts = webdriver.ChromeOptions()
        opts.binary_location = browser
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service(driver_path), options=opts)
        try:
            driver.get(url + "/")
            assert "Quantum Research Bot" in driver.title
            driver.find_element(By.ID, "input").send_keys(QUESTION)
            driver.find_element(By.ID, "send").click()
            done = WebDriverWait(driver, 120).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true'], .msg.error"))
            assert "error" not in done[0].get_attribute("class"), done[0].text
            assert done[0].text.strip() == expected and expected
            assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == QUESTION
        finally:
            driver.quit()


@pytest.mark.slow
def test_qrb_serve_cli_binds_loopback_and_answers(adapter_ws):
    import openai

    proc = subprocess.Popen([sys.executable, "-m", "qrb.cli", "serve", "--port", "0"], cwd=adapter_ws,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    try:
        port = None
        deadline = time.time() + 120
        for line in proc.stdout:
            m = re.search(r"Uvicorn running on http://(\S+):(\d+)", line)
            if m:
                assert m.group(1) == "127.0.0.1"  # serve.host: local only by default
                port = int(m.group(2))
                break
            assert time.time() < deadline
        assert port, "qrb serve did not start"
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="quantum-research-bot", max_tokens=8,
                                      messages=[{"role": "user", "content": "What is a qubit?"}])
        assert r.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=30)
