"""git over HTTPS under `keygate run`: clone, fetch and push against a
stand-in github.com (git http-backend). keygate injects
`Authorization: Basic base64(x-access-token:TOKEN)`; the stand-in answers
401 to anything else, as GitHub does."""

import base64
import os
import subprocess

import pytest

from conftest import GITHUB_TOKEN, upstream_log

compat = pytest.mark.compat
URL = "https://github.com/acme/widgets.git"
WORK = os.path.join(os.environ.get("KEYGATE_COMPAT_WORK", "/tmp"), "git-client")


def git(*args, cwd=None):
    env = dict(os.environ)
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_ASKPASS="/bin/false",
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL="/dev/null",
        GIT_AUTHOR_NAME="compat",
        GIT_AUTHOR_EMAIL="compat@example.test",
        GIT_COMMITTER_NAME="compat",
        GIT_COMMITTER_EMAIL="compat@example.test",
    )
    out = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"git {' '.join(args)}: {out.stderr}{out.stdout}"
    return out.stdout


def git_requests_since(n):
    seen = [e for e in upstream_log()[n:] if e.get("host", "").startswith("github.com")]
    assert seen, "no git request reached the upstream"
    want = "Basic " + base64.b64encode(f"x-access-token:{GITHUB_TOKEN}".encode()).decode()
    for e in seen:
        auth = [v for k, v in e["headers"] if k == "authorization"]
        assert auth == [want], e
        assert "proxy-authorization" not in [k for k, _ in e["headers"]], e
        assert "placeholder" not in str(e), e
    return seen


@compat("git clone", "git", "smart HTTP v2 via CONNECT")
def test_git_clone():
    os.makedirs(WORK, exist_ok=True)
    n = len(upstream_log())
    git("clone", "-q", URL, os.path.join(WORK, "a"))
    assert os.path.exists(os.path.join(WORK, "a", "README.md"))
    seen = git_requests_since(n)
    assert any("git-upload-pack" in e["target"] for e in seen)


@compat("git clone (placeholder in URL)", "git", "smart HTTP v2 via CONNECT")
def test_git_clone_with_placeholder_credentials():
    n = len(upstream_log())
    url = URL.replace("https://", "https://x-access-token:placeholder@")
    git("-c", "credential.helper=", "clone", "-q", url, os.path.join(WORK, "b"))
    git_requests_since(n)


@compat("git push", "git", "smart HTTP (receive-pack) via CONNECT, 3 MiB chunked pack")
def test_git_push():
    a = os.path.join(WORK, "a")
    with open(os.path.join(a, "pushed.txt"), "w") as f:
        f.write("pushed through keygate\n")
    # Incompressible and larger than http.postBuffer (1 MiB): git streams the
    # pack with Transfer-Encoding: chunked.
    with open(os.path.join(a, "asset.bin"), "wb") as f:
        f.write(os.urandom(3 * 1024 * 1024))
    git("add", "pushed.txt", "asset.bin", cwd=a)
    git("commit", "-q", "-m", "push through keygate", cwd=a)
    n = len(upstream_log())
    git("push", "-q", "origin", "HEAD:main", cwd=a)
    seen = git_requests_since(n)
    assert any("git-receive-pack" in e["target"] and e["method"] == "POST" for e in seen)


@compat("git fetch / pull", "git", "smart HTTP v2 via CONNECT")
def test_git_fetch():
    b = os.path.join(WORK, "b")
    n = len(upstream_log())
    git("fetch", "-q", "origin", cwd=b)
    git("merge", "-q", "--ff-only", "origin/main", cwd=b)
    assert os.path.getsize(os.path.join(b, "asset.bin")) == 3 * 1024 * 1024
    git_requests_since(n)
