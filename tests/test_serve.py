"""`qrb serve`: the official openai client talks to it (streaming included); limits; the web page in Chromium."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time

import pytest

from helpers import REPO, ask_page, chromium, running

QUESTION = "What does the paper 'Quantum error correction' say?"


@pytest.fixture(scope="module")
def url(bot):
    from apps.serve import create_app

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

    from apps.serve import create_app

    with running(create_app(bot, api_key="s3cret")) as u:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{u}/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=f"{u}/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == "quantum-research-bot"


def test_invalid_utf8_and_unparsable_bodies_are_400_in_openai_format(url):
    import httpx

    bodies = {
        "UTF-8": b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',  # latin-1, not UTF-8
        "JSON": b"[" * 30000 + b"]" * 30000,  # nesting deeper than the parser's recursion limit
        "object": b'["a list, not an object"]',
    }
    for what, body in bodies.items():
        r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"},
                       timeout=30)
        assert r.status_code == 400, (what, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and what in err["message"], (what, err)
        assert set(err) == {"message", "type", "param", "code"}


def test_api_key_scheme_is_case_insensitive_and_the_page_never_holds_the_key(bot):
    import httpx

    from apps.serve import create_app

    with running(create_app(bot, api_key="s3cret")) as u:
        for header in ("Bearer s3cret", "bearer s3cret", "BEARER s3cret", "Bearer  s3cret"):
            r = httpx.get(f"{u}/v1/models", headers={"Authorization": header}, timeout=30)
            assert r.status_code == 200, (header, r.text)
        for header in ("Bearer wrong", "Basic s3cret", "s3cret", "Bearer", "Bearer s3cret2", ""):
            r = httpx.get(f"{u}/v1/models", headers={"Authorization": header} if header else {}, timeout=30)
            assert r.status_code == 401, header
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        page = httpx.get(f"{u}/", timeout=30)
        assert page.status_code == 200 and "s3cret" not in page.text  # the page loads; the key is typed by the user
        assert 'id="api-key"' in page.text


def test_base_bot_behind_the_api(base_bot):
    import httpx
    from openai import OpenAI

    from apps.serve import create_app

    conv = [{"role": "user", "content": QUESTION}]
    with running(create_app(base_bot)) as u:
        c = OpenAI(base_url=f"{u}/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="quantum-research-bot", max_tokens=16, messages=conv)
        assert r.choices[0].message.content == base_bot.generate(conv, max_new_tokens=16).text
        assert httpx.get(f"{u}/health", timeout=30).json()["base_only"] is True
        assert "base model" in httpx.get(f"{u}/", timeout=30).text  # the page says which model answers


@pytest.mark.slow
def test_web_page_answers_a_question_in_headless_chromium(url, bot):
    from selenium.webdriver.common.by import By

    expected = bot.generate([{"role": "user", "content": QUESTION}]).text
    with chromium() as driver:
        driver.get(url + "/")
        assert "Quantum Research Bot" in driver.title
        assert not driver.find_element(By.ID, "api-key").is_displayed()  # no key needed: no key field in the way
        done = ask_page(driver, QUESTION)
        assert "error" not in done.get_attribute("class"), done.text
        assert done.text.strip() == expected and expected
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == QUESTION


@pytest.mark.slow
def test_web_page_sends_the_api_key_the_user_enters(bot):
    """With QRB_SERVE_API_KEY set the page asks for the key, keeps it in the tab's sessionStorage (never in the
    served HTML) and sends it as a Bearer token; a reload keeps it."""
    from selenium.webdriver.common.by import By

    from apps.serve import create_app

    expected = bot.generate([{"role": "user", "content": QUESTION}]).text
    with running(create_app(bot, api_key="s3cret")) as u, chromium() as driver:
        driver.get(u + "/")
        key = driver.find_element(By.ID, "api-key")
        assert key.is_displayed() and key.get_attribute("value") == ""
        done = ask_page(driver, QUESTION)
        assert "error" in done.get_attribute("class") and "API key" in done.text
        key.send_keys("wrong")
        assert "API key" in ask_page(driver, QUESTION).text
        key.clear()
        key.send_keys("s3cret")
        done = ask_page(driver, QUESTION)
        assert "error" not in done.get_attribute("class"), done.text
        assert done.text.strip() == expected and expected
        assert driver.execute_script("return sessionStorage.getItem('qrb-api-key')") == "s3cret"
        assert driver.execute_script("return localStorage.length") == 0  # not kept beyond the tab
        driver.refresh()
        assert driver.find_element(By.ID, "api-key").get_attribute("value") == "s3cret"
        done = ask_page(driver, QUESTION)
        assert "error" not in done.get_attribute("class") and done.text.strip() == expected, done.text


@contextlib.contextmanager
def qrb_serve(cwd, *args: str):
    """`qrb serve --port 0 …` in a fresh process; yields (host, port) once uvicorn listens."""
    proc = subprocess.Popen([sys.executable, "-m", "qrb.cli", "serve", "--port", "0", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                                 "OMP_NUM_THREADS": "1"})
    try:
        found = None
        deadline = time.time() + 180
        lines = []
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"Uvicorn running on http://(\S+):(\d+)", line)
            if m:
                found = m.group(1), int(m.group(2))
                break
            assert time.time() < deadline
        assert found, "qrb serve did not start:\n" + "".join(lines)[-2000:]
        yield found
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], ["--base"]], ids=["adapter", "base"])
def test_qrb_serve_cli_binds_loopback_and_answers(adapter_ws, args):
    import openai

    with qrb_serve(adapter_ws, *args) as (host, port):
        assert host == "127.0.0.1"  # serve.host: local only by default
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="quantum-research-bot", max_tokens=8,
                                      messages=[{"role": "user", "content": "What is a qubit?"}])
        assert r.choices[0].message.content


@pytest.mark.slow
def test_qrb_serve_base_on_smollm2_streams(tmp_path, smol_model_dir):
    """The real base (pad = eos, tied embeddings) behind the API, no adapter needed: streamed and whole replies
    agree and end at its end-of-turn."""
    import openai
    import yaml

    from flows.workspace import profile_params

    params = profile_params("tiny", REPO, overrides={"base": {"model": str(smol_model_dir)}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with qrb_serve(tmp_path, "--base") as (_, port):
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        kw = {"model": "quantum-research-bot", "max_tokens": 32,
              "messages": [{"role": "user", "content": "What is 2 + 2? Answer with a number only."}]}
        whole = c.chat.completions.create(**kw)
        chunks = list(c.chat.completions.create(**kw, stream=True))
    text = whole.choices[0].message.content
    assert "4" in text and whole.choices[0].finish_reason == "stop" and whole.usage.completion_tokens < 32
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).strip() == text
