"""Real Python clients under `keygate run`: each reaches the stand-in API and
the upstream reports the headers it received. The process environment is
exactly what `keygate run` set (HTTPS_PROXY, SSL_CERT_FILE, ...)."""

import asyncio
import json
import os
import time
import urllib.request

import httpx
import pytest
import requests

from conftest import assert_anthropic, assert_openai

compat = pytest.mark.compat


def test_environment_is_wired():
    assert os.environ["HTTPS_PROXY"].startswith("http://agent:kg_")
    assert os.path.exists(os.environ["SSL_CERT_FILE"])
    assert os.environ["REQUESTS_CA_BUNDLE"] == os.environ["SSL_CERT_FILE"]


@compat("Python requests", "py:requests", "HTTP/1.1 via CONNECT")
def test_requests():
    r = requests.get(
        "https://api.openai.com/v1/models",
        headers={"Authorization": "Bearer placeholder"},
        timeout=20,
    )
    assert r.status_code == 200
    assert_openai(r.json())


@compat("Python requests", "py:requests", "HTTP/1.1 via CONNECT, POST body")
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


@compat("Python requests", "py:requests", "HTTP/1.1 via CONNECT, chunked upload, keep-alive session")
def test_requests_chunked_upload_session():
    def gen():
        for _ in range(64):
            yield b"c" * 16384

    with requests.Session() as s:
        for _ in range(3):
            r = s.post(
                "https://api.openai.com/v1/uploads/u1/parts",
                headers={"Authorization": "Bearer placeholder"},
                data=gen(),
                timeout=30,
            )
            assert r.status_code == 200
            echo = r.json()
            assert_openai(echo, "/v1/uploads/u1/parts")
            assert echo["body_len"] == 64 * 16384


@compat("Python httpx (sync, http2=True)", "py:httpx", "HTTP/2 via CONNECT, 32 MiB streamed download")
def test_httpx_http2_download():
    n = 32 * 1024 * 1024
    got = 0
    with httpx.Client(http2=True, timeout=60) as c:
        with c.stream("GET", f"https://api.openai.com/v1/files/f2/download?bytes={n}") as r:
            assert r.http_version == "HTTP/2"
            for chunk in r.iter_bytes():
                got += len(chunk)
            assert_openai(json.loads(r.headers["x-compat-echo"]), "/v1/files/f2/download")
    assert got == n


@compat("Python urllib (stdlib)", "python", "HTTP/1.1 via CONNECT")
def test_urllib():
    req = urllib.request.Request(
        "https://api.openai.com/v1/models", headers={"Authorization": "Bearer placeholder"}
    )
    with urllib.request.urlopen(req, timeout=20) as resp:
        assert_openai(json.loads(resp.read()))


@compat("Python httpx (sync)", "py:httpx", "HTTP/1.1 via CONNECT")
def test_httpx_sync():
    with httpx.Client(timeout=20) as c:
        r = c.get("https://api.openai.com/v1/models", headers={"Authorization": "Bearer placeholder"})
    assert r.status_code == 200
    assert r.http_version == "HTTP/1.1"
    assert_openai(r.json())


@compat("Python httpx (async)", "py:httpx", "HTTP/1.1 via CONNECT")
def test_httpx_async():
    async def go():
        async with httpx.AsyncClient(timeout=20) as c:
            return await c.get("https://api.openai.com/v1/models")

    r = asyncio.run(go())
    assert_openai(r.json())


@compat("Python httpx (sync, http2=True)", "py:httpx", "HTTP/2 (ALPN h2) via CONNECT")
def test_httpx_http2_sync():
    with httpx.Client(http2=True, timeout=20) as c:
        r1 = c.get("https://api.openai.com/v1/models", headers={"Authorization": "Bearer placeholder"})
        r2 = c.post("https://api.openai.com/v1/embeddings", json={"input": "x" * 1000})
    assert r1.http_version == "HTTP/2" and r2.http_version == "HTTP/2"
    assert_openai(r1.json())
    assert_openai(r2.json(), "/v1/embeddings")
    assert r2.json()["body_len"] > 1000


@compat("Python httpx (async, http2=True)", "py:httpx", "HTTP/2 (ALPN h2) via CONNECT, concurrent streams")
def test_httpx_http2_async_concurrent():
    async def go():
        async with httpx.AsyncClient(http2=True, timeout=20) as c:
            return await asyncio.gather(
                *[c.get(f"https://api.openai.com/v1/models/m{i}") for i in range(8)]
            )

    for i, r in enumerate(asyncio.run(go())):
        assert r.http_version == "HTTP/2"
        assert_openai(r.json(), f"/v1/models/m{i}")


@compat("Python httpx (sync, http2=True)", "py:httpx", "HTTP/2 via CONNECT, SSE streaming")
def test_httpx_http2_sse():
    body = {"model": "gpt-test", "messages": [], "stream": True}
    parts, times = [], []
    with httpx.Client(http2=True, timeout=20) as c:
        with c.stream("POST", "https://api.openai.com/v1/chat/completions", json=body) as r:
            assert r.http_version == "HTTP/2"
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    parts.append(delta["content"])
                    times.append(time.monotonic())
    assert times[-1] - times[0] >= 0.4, times
    assert_openai(json.loads("".join(parts)), "/v1/chat/completions")


@compat("Python aiohttp (trust_env=True)", "py:aiohttp", "HTTP/1.1 via CONNECT")
def test_aiohttp():
    import aiohttp

    async def go():
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(trust_env=True, timeout=timeout) as s:
            async with s.post(
                "https://api.openai.com/v1/chat/completions",
                headers={"Authorization": "Bearer placeholder"},
                json={"model": "gpt-test", "messages": []},
            ) as r:
                assert r.status == 200
                return await r.json()

    assert_openai(asyncio.run(go()), "/v1/chat/completions")


@compat("Python openai SDK", "py:openai", "HTTP/1.1 via CONNECT (httpx2)")
def test_openai_sdk():
    from openai import OpenAI

    client = OpenAI(api_key="placeholder", max_retries=0, timeout=20)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}]
    )
    echo = json.loads(raw.http_response.text)
    assert_openai(echo, "/v1/chat/completions")


@compat("Python openai SDK", "py:openai", "SSE streaming via CONNECT (httpx2)")
def test_openai_sdk_streaming():
    from openai import OpenAI

    client = OpenAI(api_key="placeholder", max_retries=0, timeout=20)
    stream = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    parts, times = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            times.append(time.monotonic())
    assert len(parts) >= 3
    # The upstream sends the chunks 0.3 s apart: nothing in between buffered them.
    assert times[-1] - times[0] >= 0.4, times
    assert_openai(json.loads("".join(parts)), "/v1/chat/completions")


@compat("Python openai SDK (async)", "py:openai", "SSE streaming via CONNECT (httpx2 async)")
def test_openai_sdk_async_streaming():
    from openai import AsyncOpenAI

    async def go():
        client = AsyncOpenAI(api_key="placeholder", max_retries=0, timeout=20)
        stream = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        return [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]

    assert_openai(json.loads("".join(asyncio.run(go()))), "/v1/chat/completions")


@compat("Python anthropic SDK", "py:anthropic", "HTTP/1.1 via CONNECT (httpx2)")
def test_anthropic_sdk():
    from anthropic import Anthropic

    client = Anthropic(api_key="placeholder", max_retries=0, timeout=20)
    raw = client.messages.with_raw_response.create(
        model="claude-test", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
    )
    assert_anthropic(json.loads(raw.http_response.text))


@compat("Python requests", "py:requests", "plain http:// needing a credential: refused (403)")
def test_plaintext_is_refused():
    r = requests.get("http://api.openai.com/v1/models", timeout=20)
    assert r.status_code == 403
    assert r.headers["keygate-error"] == "plaintext_refused"
    assert r.json()["error"]["code"] == "plaintext_refused"


@compat("Python requests", "py:requests", "plain http:// without a credential: forwarded (absolute-form)")
def test_plain_http_passthrough():
    r = requests.get("http://plain.example.test/status?x=1", headers={"Authorization": "Bearer own"}, timeout=20)
    assert r.status_code == 200
    echo = r.json()
    assert echo["target"] == "/status?x=1"
    h = {k: v for k, v in echo["headers"]}
    assert h.get("authorization") == "Bearer own"
    assert "proxy-authorization" not in h


@compat("Python websockets", "py:websockets", "WebSocket (wss://) via CONNECT")
@pytest.mark.usefixtures("websocket_or_xfail")
def test_websockets():
    from websockets.asyncio.client import connect

    async def go():
        async with connect(
            "wss://api.openai.com/v1/realtime?model=gpt-test",
            additional_headers={"Authorization": "Bearer placeholder"},
            open_timeout=15,
        ) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await ws.send("ping-42")
            again = await asyncio.wait_for(ws.recv(), 10)
            return first, again

    first, again = asyncio.run(go())
    assert first.get("websocket") is True
    assert_openai(first, "/v1/realtime")
    assert again == "ping-42"
