"""Node clients under `keygate run`: each compat/node/*.test.mjs file runs
with `node --test` and the environment keygate run set (HTTPS_PROXY,
NODE_EXTRA_CA_CERTS, NODE_USE_ENV_PROXY=1)."""

import os
import shutil
import subprocess

import pytest

from conftest import NODE_DIR

compat = pytest.mark.compat
pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_DIR / "node_modules").is_dir(),
    reason="node or compat/node/node_modules (npm ci) missing",
)


def node_has_env_proxy():
    """NODE_USE_ENV_PROXY arrived with --use-env-proxy; Node 20 has neither."""
    try:
        return subprocess.run(["node", "--use-env-proxy", "-e", "0"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_node(name):
    out = subprocess.run(
        ["node", "--test", "--test-reporter=spec", name],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    print(out.stdout[-4000:], out.stderr[-2000:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


@compat("Node fetch (NODE_USE_ENV_PROXY=1 only)", "node", "HTTP/1.1 via CONNECT")
@pytest.mark.xfail(
    shutil.which("node") is not None and not node_has_env_proxy(),
    reason="this Node has no NODE_USE_ENV_PROXY support: its built-in fetch ignores HTTPS_PROXY and "
    "connects directly. Use undici's EnvHttpProxyAgent (next row) or a newer Node",
    strict=True,
)
def test_node_fetch_env_only():
    run_node("fetch-env.test.mjs")


@compat("Node fetch + undici EnvHttpProxyAgent", "npm:undici", "HTTP/1.1 via CONNECT")
def test_node_fetch_undici():
    run_node("fetch-undici.test.mjs")


@compat("axios", "npm:axios", "absolute-form https:// to the proxy (no CONNECT), incl. SSE and 4 MiB upload")
def test_node_axios():
    run_node("axios.test.mjs")


@compat("openai (npm SDK)", "npm:openai", "HTTP/1.1 via CONNECT, incl. SSE streaming")
def test_node_openai():
    run_node("openai.test.mjs")


@compat("ws", "npm:ws", "WebSocket (wss://) via CONNECT (https-proxy-agent)")
@pytest.mark.usefixtures("websocket_or_xfail")
def test_node_ws():
    run_node("ws.test.mjs")
