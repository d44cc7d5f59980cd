"""Shared helpers of the compatibility suite and the writer of the table in
docs/compatibility.md.

Every test carries `@pytest.mark.compat(client, version_key, protocol)`. When
KEYGATE_COMPAT_TABLE names a file (compat/run.sh sets it for a full run), the
results are written there as the compatibility table at the end of the
session. Expected failures (`xfail`) appear with their reason.
"""

import importlib.metadata
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "compat" / "node"

OPENAI_KEY = os.environ.get("KEYGATE_COMPAT_OPENAI_KEY", "")
ANTHROPIC_KEY = os.environ.get("KEYGATE_COMPAT_ANTHROPIC_KEY", "")
GITHUB_TOKEN = os.environ.get("KEYGATE_COMPAT_GITHUB_TOKEN", "")


WS_REASON = (
    "keygate does not forward WebSocket upgrades yet: it drops Upgrade/Connection and sends the "
    "handshake upstream as a plain GET, so the client gets 200 instead of 101 (gateway issue)"
)


def websocket_upgrade_status():
    """Status keygate answers to a raw WebSocket handshake inside a CONNECT
    tunnel to the stand-in api.openai.com (101 once upgrades are forwarded)."""
    import base64
    import socket
    import ssl
    from urllib.parse import urlsplit

    proxy = urlsplit(os.environ["HTTPS_PROXY"])
    auth = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
    with socket.create_connection((proxy.hostname, proxy.port), timeout=10) as raw:
        raw.sendall(
            f"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n"
            f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(4096)
            if not chunk:
                return 0
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            return 0
        ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
        ctx.set_alpn_protocols(["http/1.1"])
        with ctx.wrap_socket(raw, server_hostname="api.openai.com") as tls:
            tls.sendall(
                b"GET /v1/realtime HTTP/1.1\r\nHost: api.openai.com\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: a2V5Z2F0ZS1jb21wYXQtMQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            line = tls.recv(4096).split(b"\r\n", 1)[0].split()
            return int(line[1]) if len(line) > 1 and line[1].isdigit() else 0


_WS_STATUS = []


@pytest.fixture
def websocket_or_xfail(request):
    """The WebSocket tests run as strict expected failures while keygate
    does not answer a handshake with 101, and as plain tests once it does, so
    the table follows the gateway without editing marks."""
    if not _WS_STATUS:
        try:
            _WS_STATUS.append(websocket_upgrade_status())
        except OSError:
            _WS_STATUS.append(0)
    if _WS_STATUS[0] != 101:
        request.applymarker(pytest.mark.xfail(reason=WS_REASON, strict=True))


def headers_of(echo):
    out = {}
    for name, value in echo["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def assert_openai(echo, path="/v1/models"):
    """The real key arrived, the placeholder and the proxy credentials did not."""
    h = headers_of(echo)
    assert h.get("authorization") == [f"Bearer {OPENAI_KEY}"], h
    assert "proxy-authorization" not in h, h
    assert "placeholder" not in json.dumps(echo), echo
    assert echo["target"].startswith(path), echo["target"]


def assert_anthropic(echo, path="/v1/messages"):
    h = headers_of(echo)
    assert h.get("x-api-key") == [ANTHROPIC_KEY], h
    # Newer SDKs also send the key as a bearer token; run.sh stores both.
    assert h.get("authorization", [f"Bearer {ANTHROPIC_KEY}"]) == [f"Bearer {ANTHROPIC_KEY}"], h
    assert "proxy-authorization" not in h, h
    assert "placeholder" not in json.dumps(echo), echo
    assert echo["target"].startswith(path), echo["target"]


def upstream_log():
    """Requests the Python stand-in upstream received, oldest first."""
    path = os.environ["KEYGATE_COMPAT_UPSTREAM_LOG"]
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- versions

def _cmd_version(args, pattern):
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else "?"


def _npm_version(name):
    try:
        return json.loads((NODE_DIR / "node_modules" / name / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return "not installed"


_VERSIONS = {}


def version_of(key):
    """`py:DIST`, `npm:PKG`, `node`, `curl`, `git`, `java`, `python`."""
    if key in _VERSIONS:
        return _VERSIONS[key]
    kind, _, name = key.partition(":")
    if kind == "py":
        try:
            v = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            v = "not installed"
    elif kind == "npm":
        v = _npm_version(name) + " (node " + version_of("node") + ")"
    elif key == "node":
        v = _cmd_version(["node", "--version"], r"v(\S+)")
    elif key == "curl":
        v = _cmd_version(["curl", "--version"], r"curl (\S+)")
    elif key == "git":
        v = _cmd_version(["git", "--version"], r"git version (\S+)")
    elif key == "java":
        v = _cmd_version(["java", "-version"], r'version "([^"]+)"')
    elif key == "python":
        import platform

        v = "Python " + platform.python_version()
    else:
        v = "?"
    _VERSIONS[key] = v
    return v


# ------------------------------------------------------------------- table

_ROWS = []


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compat(client, version_key, protocol): a row of docs/compatibility.md"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    mark = item.get_closest_marker("compat")
    if mark is None:
        return
    # One row per test: the call phase, or setup when it did not get that far.
    if report.when == "call" or (report.when == "setup" and not report.passed):
        client, version_key, protocol = mark.args
        xfail = getattr(report, "wasxfail", None)
        if report.skipped and xfail is not None:
            result = f"expected failure: {xfail}"
        elif report.passed and xfail is not None:
            result = f"UNEXPECTED PASS (remove the expected-failure mark): {xfail}"
        elif report.passed:
            result = "pass"
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            result = f"skipped: {reason}"
        else:
            result = "FAIL"
        _ROWS.append(
            {
                "test": item.nodeid.split("::")[-1],
                "client": client,
                "version": version_of(version_key),
                "protocol": protocol,
                "result": result,
            }
        )


HEADER = """\
# Compatibility

<!-- Generated by compat/run.sh (compat/python/conftest.py) from the suite's
results; do not edit by hand. Re-run `bash compat/run.sh` to refresh. -->

Each client runs unchanged under `keygate run` (or with the documented
variables) against local stand-ins for `api.openai.com`,
`api.anthropic.com` and `github.com` (keygate `--resolve` + `--upstream-ca`).
The stand-in echoes what it received and every test checks that the real
key arrived and that neither the placeholder nor `Proxy-Authorization` did;
the suite also checks that no secret value appears in keygate's log or
audit records and that the audit hash chain verifies.

Run it with `bash .ci/compat.sh` (installs git, Java, Node, the Python and
npm packages, then runs `compat/run.sh`) or `bash compat/run.sh` when the
clients are already installed. "expected failure" rows are marked in the
tests (strict: if one starts passing, the suite fails until the mark and this
table are updated).
"""

FOOTER = """
## Notes per client

- **curl, Python requests/httpx/aiohttp/urllib, openai, anthropic, git**:
  nothing beyond `keygate run` (proxy variables and `SSL_CERT_FILE`,
  `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`, `GIT_SSL_CAINFO`; see
  [usage.md](usage.md#keygate-run)). aiohttp needs `trust_env=True`; httpx
  HTTP/2 needs `httpx[http2]`.
- **anthropic SDK**: recent versions send the API key both as `x-api-key`
  and as `Authorization: Bearer`. Store the key twice (`--header x-api-key
  --format '{secret}'`, and the default `Authorization: Bearer {secret}`)
  so that neither header carries the placeholder upstream.
- **git**: store the token as `base64("x-access-token:TOKEN")` with
  `--format 'Basic {secret}'`; the agent's remote URL needs no credentials.
  A placeholder in the URL is harmless: git sends URL credentials only after
  a 401, and with the injected header the server never answers 401.
- **Node 20**: the built-in `fetch` ignores the proxy variables
  (`NODE_USE_ENV_PROXY`, which `keygate run` sets, needs a newer Node). Add
  `setGlobalDispatcher(new EnvHttpProxyAgent())` from the `undici` package
  once at start-up; the `openai` npm SDK then works unchanged. axios reads
  the variables itself and sends absolute-form `https://` requests to the
  proxy, which keygate serves over TLS. `ws` needs an agent
  (`new HttpsProxyAgent(process.env.HTTPS_PROXY)` from `https-proxy-agent`).
  Node trusts the keygate CA through `NODE_EXTRA_CA_CERTS`.
- **Java**: the JDK reads neither `HTTPS_PROXY` nor PEM bundles. Build a
  truststore from `keygate ca cert` with
  `keytool -importcert -noprompt -alias keygate -file ca.pem -keystore keygate.p12 -storetype PKCS12 -storepass changeit`,
  and start the JVM with `-Djavax.net.ssl.trustStore=keygate.p12
  -Djavax.net.ssl.trustStorePassword=changeit -Dhttps.proxyHost=127.0.0.1
  -Dhttps.proxyPort=10255 -Djdk.http.auth.tunneling.disabledSchemes=`. The
  last flag is needed because the JDK refuses Basic proxy authentication for
  CONNECT by default; the application installs an `Authenticator` that
  answers proxy challenges with user `agent` and the token as password
  (`java.net.http.HttpClient` and `HttpURLConnection` alike). The truststore
  replaces the JDK's default roots: import the system roots too when the
  agent also talks to hosts keygate does not intercept.
- **WebSocket** (Python `websockets`, Node `ws`): `websockets` (15+) reads
  the proxy variables itself; `ws` needs `https-proxy-agent`. Both use an
  HTTP/1.1 Upgrade inside the tunnel. Clients that open WebSockets over
  HTTP/2 (RFC 8441 extended CONNECT, as browsers do) are served too; that
  path is covered by the Rust end-to-end suite
  (`websocket_over_http2_extended_connect_gets_the_credential_and_pipes_bytes`),
  since none of the clients above speaks it.
"""


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("KEYGATE_COMPAT_TABLE")
    if not target or not _ROWS:
        return
    lines = [HEADER, "| client | version | protocol | test | result |", "|---|---|---|---|---|"]
    for r in _ROWS:
        cells = [r["client"], r["version"], r["protocol"], f"`{r['test']}`", r["result"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    Path(target).write_text("\n".join(lines) + "\n" + FOOTER, encoding="utf-8")


def pytest_terminal_summary(terminalreporter):
    """Counts for compat/run.sh's closing line."""
    target = os.environ.get("KEYGATE_COMPAT_SUMMARY")
    if not target:
        return
    stats = terminalreporter.stats
    count = lambda key: len([r for r in stats.get(key, []) if getattr(r, "when", "call") in ("call", "setup")])
    Path(target).write_text(
        f"{count('passed')} {count('failed') + count('error') + count('xpassed')} {count('xfailed')} {count('skipped')}\n",
        encoding="utf-8",
    )
