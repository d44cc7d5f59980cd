"""Stand-in HTTPS upstream for the compatibility suite (aiohttp, HTTP/1.1).

One TLS listener whose certificate names every stand-in host; keygate reaches
it through `--resolve HOST:443=ADDR` and trusts its CA with `--upstream-ca`.
What it answers depends on the request:

- WebSocket upgrade (any host): the first message is the JSON echo of the
  upgrade request; every later text message is echoed back.
- Host `github.com`: git smart HTTP (`git http-backend` as a CGI) for the
  bare repositories under --git-root. Requests whose Authorization is not
  exactly --git-auth get 401 (as GitHub does), so an un-injected request fails.
- `POST .../chat/completions` with `"stream": true`: an OpenAI-style SSE
  stream whose content deltas concatenate to the JSON echo; the chunks are
  sent 0.3 s apart so that a client can tell that nothing buffered them.
- `GET .../download?bytes=N`: N bytes of data, with the JSON echo of the
  request in the `x-compat-echo` response header (large downloads).
- Everything else: the JSON echo, same shape as test-support's echo-upstream
  (method, target, version, headers as [name, value] pairs, body_len).

Every request is appended as one JSON line to --log (assertions on what the
upstream saw, e.g. for git, whose client does not show response bodies).

Prints `tls=HOST:PORT` once listening.
"""

import argparse
import asyncio
import gzip
import json
import os
import ssl
import sys

from aiohttp import WSMsgType, web

ARGS = None


def echo_of(request, body_len):
    return {
        "method": request.method,
        "target": request.path_qs,
        "version": f"HTTP/{request.version.major}.{request.version.minor}",
        "headers": [[k.lower(), v] for k, v in request.headers.items()],
        "body_len": body_len,
        "host": request.host,
    }


def log(entry):
    with open(ARGS.log, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


async def handle(request):
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await websocket(request)
    body = await request.read()
    echo = echo_of(request, len(body))
    log(echo)
    host = request.host.rsplit(":", 1)[0] if not request.host.startswith("[") else request.host
    if host == "github.com":
        return await git(request, body)
    if request.path.endswith("/download") and "bytes" in request.query:
        n = int(request.query["bytes"])
        return web.Response(
            body=bytes(range(256)) * (n // 256) + b"\0" * (n % 256),
            content_type="application/octet-stream",
            headers={"x-compat-echo": json.dumps(echo)},
        )
    if request.method == "POST" and request.path.endswith("/chat/completions"):
        try:
            stream = bool(json.loads(body or b"{}").get("stream"))
        except ValueError:
            stream = False
        if stream:
            return await sse(request, echo)
    return web.json_response(echo)


async def websocket(request):
    echo = echo_of(request, 0)
    echo["websocket"] = True
    log(echo)
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_str(json.dumps(echo))
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def sse(request, echo):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    text = json.dumps(echo)
    third = len(text) // 3 + 1
    pieces = [text[i : i + third] for i in range(0, len(text), third)]

    def chunk(delta, finish=None):
        return {
            "id": "chatcmpl-compat",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "gpt-test",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": p}) for p in pieces]
    events.append(chunk({}, "stop"))
    for i, ev in enumerate(events):
        if i > 0:
            await asyncio.sleep(0.3)
        await resp.write(f"data: {json.dumps(ev)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def git(request, body):
    if request.headers.get("Authorization") != ARGS.git_auth:
        return web.Response(
            status=401,
            text="authentication required\n",
            headers={"WWW-Authenticate": 'Basic realm="GitHub"'},
        )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GIT_PROJECT_ROOT": ARGS.git_root,
        "GIT_HTTP_EXPORT_ALL": "1",
        "REMOTE_USER": "x-access-token",
        "REMOTE_ADDR": "127.0.0.1",
        "REQUEST_METHOD": request.method,
        "PATH_INFO": request.path,
        "QUERY_STRING": request.query_string,
        "CONTENT_TYPE": request.headers.get("Content-Type", ""),
        "CONTENT_LENGTH": str(len(body)),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "GATEWAY_INTERFACE": "CGI/1.1",
    }
    if "Git-Protocol" in request.headers:
        env["GIT_PROTOCOL"] = request.headers["Git-Protocol"]
    # aiohttp may already have decoded a gzip body; tell http-backend only
    # when the bytes are still compressed.
    if request.headers.get("Content-Encoding", "").lower() == "gzip" and body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
        env["CONTENT_LENGTH"] = str(len(body))
    proc = await asyncio.create_subprocess_exec(
        "git",
        "http-backend",
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(body)
    if err:
        sys.stderr.write(err.decode(errors="replace"))
    sep = out.find(b"\r\n\r\n")
    skip = 4
    if sep < 0:
        sep, skip = out.find(b"\n\n"), 2
    head, payload = out[:sep].decode("latin-1"), out[sep + skip :]
    status, headers = 200, {}
    for line in head.splitlines():
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = int(value.strip().split()[0])
        elif name:
            headers[name.strip()] = value.strip()
    return web.Response(status=status, body=payload, headers=headers)


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--git-root", required=True)
    p.add_argument("--git-auth", required=True, help="the exact Authorization value git must send")
    ARGS = p.parse_args()

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(ARGS.cert, ARGS.key)
    ctx.set_alpn_protocols(["http/1.1"])

    async def run():
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(f"tls=127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
