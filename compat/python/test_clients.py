"""Real Python clients under `keygate run`: each reaches the stand-in API and
the echo upstream reports the headers it received. The process environment
is exactly what `keygate run` set (HTTPS_PROXY, SSL_CERT_FILE, ...)."""

import json
import os
import urllib.request

import httpx
import pytest
import requests

OPENAI_KEY = os.environ["KEYGATE_COMPAT_OPENAI_KEY"]
ANTHROPIC_KEY = os.environ["KEYGATE_COMPAT_ANTHROPIC_KEY"]


def headers_of(echo):
    out = {}
    for name, value in echo["headers"]:
        out.setdefault(name, []).append(value)
    return out


def assert_openai(echo, path="/v1/models"):
    h = headers_of(echo)
    assert h.get("authorization") == [f"Bearer {OPENAI_KEY}"], h
    assert "proxy-authorization" not in h
    assert echo["target"].startswith(path), echo["target"]


def test_environment_is_wired():
    assert os.environ["HTTPS_PROXY"].startswith("http://agent:kg_")
    assert os.path.exists(os.environ["SSL_CERT_FILE"])
    assert os.environ["REQUESTS_CA_BUNDLE"] == os.environ["SSL_CERT_FILE"]


def test_requests():
    r = requests.get(
        "https://api.openai.com/v1/models",
        headers={"Authorization": "Bearer placeholder"},
        timeout=20,
    )
    assert r.status_code == 200
    assert_openai(r.json())


def test_requests_post_body():
    r = requests.post(
        "https://api.openai.com/v1/chat/completions",
        headers={"Authorization": "Bearer placeholder"},
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
        timeout=20,
    )
    assert r.status_code == 200
    echo = r.json()
    assert_openai(echo, "/v1/chat/completions")
    assert echo["method"] == "POST" and echo["body_len"] > 20


def test_urllib():
    req = urllib.request.Request(
        "https://api.openai.com/v1/models", headers={"Authorization": "Bearer placeholder"}
    )
    with urllib.request.urlopen(req, timeout=20) as resp:
        assert_openai(json.loads(resp.read()))


def test_httpx_sync():
    with httpx.Client(timeout=20) as c:
        r = c.get("https://api.openai.com/v1/models", headers={"Authorization": "Bearer placeholder"})
    assert r.status_code == 200
    assert_openai(r.json())


def test_httpx_async():
    import asyncio

    async def go():
        async with httpx.AsyncClient(timeout=20) as c:
            return await c.get("https://api.openai.com/v1/models")

    r = asyncio.run(go())
    assert_openai(r.json())


def test_openai_sdk():
    from openai import OpenAI

    client = OpenAI(api_key="placeholder", max_retries=0, timeout=20)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}]
    )
    echo = json.loads(raw.http_response.text)
    assert_openai(echo, "/v1/chat/completions")


def test_anthropic_sdk():
    from anthropic import Anthropic

    client = Anthropic(api_key="placeholder", max_retries=0, timeout=20)
    raw = client.messages.with_raw_response.create(
        model="claude-test", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
    )
    echo = json.loads(raw.http_response.text)
    h = headers_of(echo)
    assert h.get("x-api-key") == [ANTHROPIC_KEY], h
    assert echo["target"].startswith("/v1/messages")


def test_plaintext_is_refused():
    r = requests.get("http://api.openai.com/v1/models", timeout=20)
    assert r.status_code == 403
    assert r.headers["keygate-error"] == "plaintext_refused"
    assert r.json()["error"]["code"] == "plaintext_refused"
