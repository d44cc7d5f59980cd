"""curl under `keygate run`: it reads HTTPS_PROXY (credentials in the URL
become Proxy-Authorization on the CONNECT) and CURL_CA_BUNDLE."""

import json
import subprocess

import pytest

from conftest import assert_anthropic, assert_openai

compat = pytest.mark.compat


def curl(*args, data=None):
    out = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "--max-time", "30", "-w", "\n%{http_version}", *args],
        input=data,
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace") + out.stdout.decode(errors="replace")
    body, _, version = out.stdout.decode().rpartition("\n")
    return json.loads(body), version


@compat("curl", "curl", "HTTP/1.1 via CONNECT")
def test_curl_http1():
    echo, version = curl("--http1.1", "-H", "Authorization: Bearer placeholder", "https://api.openai.com/v1/models")
    assert version == "1.1"
    assert_openai(echo)


@compat("curl --http2", "curl", "HTTP/2 (ALPN h2) via CONNECT")
def test_curl_http2():
    echo, version = curl("--http2", "-H", "Authorization: Bearer placeholder", "https://api.openai.com/v1/models")
    assert version == "2"
    assert_openai(echo)


@compat("curl --http2", "curl", "HTTP/2 via CONNECT, 2 MiB upload")
def test_curl_http2_upload():
    body = b"y" * (2 * 1024 * 1024)
    echo, version = curl(
        "--http2",
        "-H", "x-api-key: placeholder",
        "-H", "content-type: application/octet-stream",
        "--data-binary", "@-",
        "https://api.anthropic.com/v1/messages",
        data=body,
    )
    assert version == "2"
    assert_anthropic(echo)
    assert echo["body_len"] == len(body)


@compat("curl", "curl", "HTTP/1.1 via CONNECT, POST")
def test_curl_post_anthropic():
    echo, _ = curl(
        "--http1.1",
        "-H", "x-api-key: placeholder",
        "-H", "anthropic-version: 2023-06-01",
        "--json", '{"model":"claude-test","max_tokens":8,"messages":[]}',
        "https://api.anthropic.com/v1/messages",
    )
    assert echo["method"] == "POST"
    assert_anthropic(echo)


@compat("curl", "curl", "HTTP/1.1 via CONNECT, 2 MiB upload (Expect: 100-continue)")
def test_curl_http1_upload_expect_continue():
    body = b"u" * (2 * 1024 * 1024)
    echo, version = curl(
        "--http1.1",
        "-H", "Authorization: Bearer placeholder",
        "-H", "content-type: application/octet-stream",
        "--data-binary", "@-",
        "https://api.openai.com/v1/files",
        data=body,
    )
    assert version == "1.1"
    assert_openai(echo, "/v1/files")
    assert echo["body_len"] == len(body)


@pytest.mark.parametrize("proto", ["--http1.1", "--http2"])
@compat("curl", "curl", "16 MiB download via CONNECT (HTTP/1.1 and HTTP/2)")
def test_curl_download(proto, tmp_path):
    n = 16 * 1024 * 1024
    out = subprocess.run(
        ["curl", "-sS", "--fail", "--max-time", "60", proto, "-D", str(tmp_path / "h"), "-o", str(tmp_path / "b"),
         "-w", "%{http_version}", "-H", "Authorization: Bearer placeholder",
         f"https://api.openai.com/v1/files/f1/download?bytes={n}"],
        capture_output=True, timeout=90,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "b").stat().st_size == n
    headers = (tmp_path / "h").read_text()
    line = next(l for l in headers.splitlines() if l.lower().startswith("x-compat-echo:"))
    assert_openai(json.loads(line.split(":", 1)[1]), "/v1/files/f1/download")
