#!/usr/bin/env bash
# Compatibility suite: real agent clients (curl, Python, Node, git, Java, a
# WebSocket client) run under `keygate run` against local stand-ins for
# api.openai.com, api.anthropic.com and github.com. The stand-ins echo what
# they received, so each client checks that the real key arrived and the
# placeholder did not. Writes the results table to docs/compatibility.md.
#
# Needs: python3 with compat/python/requirements.txt, openssl, git, curl;
# node + `npm ci` in compat/node (done here when node_modules is missing)
# and java/keytool (their rows are skipped when absent).
# .ci/compat.sh installs all of it and runs this script.
# Extra arguments go to pytest (e.g. `-k git`); the table is only written
# by a full run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# KEYGATE_COMPAT_BIN_DIR: use prebuilt keygate + echo-upstream from there.
if [ -n "${KEYGATE_COMPAT_BIN_DIR:-}" ]; then
  bin=$(cd "$KEYGATE_COMPAT_BIN_DIR" && pwd)
else
  cargo build --quiet --bin keygate --bin echo-upstream
  bin="${CARGO_TARGET_DIR:-$root/target}/debug"
fi
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

wait_for() { # file pattern
  for _ in $(seq 1 300); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1:"; cat "$1"; return 1
}

if command -v node >/dev/null && [ ! -d compat/node/node_modules ]; then
  (cd compat/node && npm ci --no-audit --no-fund --loglevel=error)
fi

export KEYGATE_COMPAT_OPENAI_KEY="sk-compat-openai-5e1f0a9b"
export KEYGATE_COMPAT_ANTHROPIC_KEY="sk-ant-compat-77d2c3e4"
export KEYGATE_COMPAT_GITHUB_TOKEN="ghp_compat0c4f9e21d7a6b3"
github_basic=$(printf 'x-access-token:%s' "$KEYGATE_COMPAT_GITHUB_TOKEN" | base64 -w0)

# Rust echo upstream (HTTP/1.1 + HTTP/2) for api.anthropic.com.
"$bin/echo-upstream" api.anthropic.com >"$work/upstream.out" 2>&1 &
pids+=($!)
wait_for "$work/upstream.out" "tls="
read -r echo_tls echo_plain echo_ca < <(sed -E 's/tls=([^ ]+) plain=([^ ]+) ca=(.*)/\1 \2 \3/' "$work/upstream.out")

# Python stand-in (compat/upstream.py) for api.openai.com (echo, SSE
# streaming, WebSocket) and github.com (git http-backend), with its own CA.
pki="$work/pki"
mkdir -p "$pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -keyout "$pki/ca.key" -out "$pki/ca.pem" -subj "/CN=keygate compat upstream CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$pki/leaf.key" -out "$pki/leaf.csr" -subj "/CN=compat upstream" 2>/dev/null
printf 'subjectAltName=DNS:api.openai.com,DNS:github.com\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n' >"$pki/leaf.ext"
openssl x509 -req -in "$pki/leaf.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" -CAcreateserial \
  -days 2 -extfile "$pki/leaf.ext" -out "$pki/leaf.pem" 2>/dev/null

# A bare repository acme/widgets.git with one commit on main.
export GIT_AUTHOR_NAME=compat GIT_AUTHOR_EMAIL=compat@example.test
export GIT_COMMITTER_NAME=compat GIT_COMMITTER_EMAIL=compat@example.test
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null
mkdir -p "$work/git/acme"
git init -q -b main "$work/git-seed"
echo "# widgets" >"$work/git-seed/README.md"
git -C "$work/git-seed" add README.md
git -C "$work/git-seed" commit -q -m "initial"
git clone -q --bare "$work/git-seed" "$work/git/acme/widgets.git"
git -C "$work/git/acme/widgets.git" config http.receivepack true

export KEYGATE_COMPAT_UPSTREAM_LOG="$work/upstream-requests.jsonl"
python3 compat/upstream.py --cert "$pki/leaf.pem" --key "$pki/leaf.key" \
  --log "$KEYGATE_COMPAT_UPSTREAM_LOG" --git-root "$work/git" \
  --git-auth "Basic $github_basic" >"$work/pyupstream.out" 2>&1 &
pids+=($!)
wait_for "$work/pyupstream.out" "tls="
py_tls=$(sed -nE 's/^tls=([^ ]+)$/\1/p' "$work/pyupstream.out")

export KEYGATE_DATA_DIR="$work/data"
"$bin/keygate" serve --proxy-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --upstream-ca "$echo_ca" --upstream-ca "$pki/ca.pem" --allow-net 127.0.0.0/8 \
  --resolve "api.anthropic.com:443=$echo_tls" --resolve "plain.example.test:80=$echo_plain" \
  --resolve "api.openai.com:443=$py_tls" --resolve "github.com:443=$py_tls" \
  >"$work/keygate.log" 2>&1 &
pids+=($!)
wait_for "$work/keygate.log" "proxy on http://"
proxy=$(sed -nE 's/^keygate: proxy on (http:\/\/[^ ]+) +admin API on (http:\/\/[^ ]+).*/\1/p' "$work/keygate.log")
admin=$(sed -nE 's/^keygate: proxy on (http:\/\/[^ ]+) +admin API on (http:\/\/[^ ]+).*/\2/p' "$work/keygate.log")
export KEYGATE_ADMIN_URL="$admin"

printf '%s' "$KEYGATE_COMPAT_OPENAI_KEY" | "$bin/keygate" secret add openai --host api.openai.com --path '/v1/*'
printf '%s' "$KEYGATE_COMPAT_ANTHROPIC_KEY" | "$bin/keygate" secret add anthropic --host api.anthropic.com --header x-api-key --format '{secret}'
# anthropic SDKs since 2.x send the key as `Authorization: Bearer` as well.
printf '%s' "$KEYGATE_COMPAT_ANTHROPIC_KEY" | "$bin/keygate" secret add anthropic-bearer --host api.anthropic.com
printf '%s' "$github_basic" | "$bin/keygate" secret add github --host github.com --format 'Basic {secret}'
token=$("$bin/keygate" agent create compat --grant openai --grant anthropic --grant anthropic-bearer --grant github)

export KEYGATE_COMPAT_WORK="$work"
export KEYGATE_COMPAT_BIN="$bin/keygate"
export KEYGATE_COMPAT_SUMMARY="$work/summary"
if [ $# -eq 0 ]; then
  export KEYGATE_COMPAT_TABLE="$root/docs/compatibility.md"
fi
status=0
checks_failed=0
"$bin/keygate" run --proxy "$proxy" --token "$token" -- \
  python3 -m pytest -q -rfExX -p no:cacheprovider compat/python "$@" || status=$?

# The audit trail: records for the suite's requests, an intact hash chain,
# no secret value. Records are written in batches: give the writer a moment.
sleep 1
"$bin/keygate" audit --json --limit 10000 >"$work/audit.jsonl" || true
if ! grep -q '"decision":"injected"' "$work/audit.jsonl"; then
  echo "FAIL: no injected request in the audit log"; checks_failed=$((checks_failed + 1))
fi
"$bin/keygate" audit verify || { echo "FAIL: keygate audit verify"; checks_failed=$((checks_failed + 1)); }

secrets=(-e "$KEYGATE_COMPAT_OPENAI_KEY" -e "$KEYGATE_COMPAT_ANTHROPIC_KEY" \
  -e "$KEYGATE_COMPAT_GITHUB_TOKEN" -e "$github_basic")
if grep -q "${secrets[@]}" "$work/keygate.log"; then
  echo "FAIL: a secret value appeared in keygate's log"; checks_failed=$((checks_failed + 1))
fi
if grep -q "${secrets[@]}" "$work/audit.jsonl"; then
  echo "FAIL: a secret value appeared in the audit log"; checks_failed=$((checks_failed + 1))
fi
[ "$checks_failed" -eq 0 ] || status=1
if [ "$status" -ne 0 ]; then
  for f in keygate.log pyupstream.out upstream.out; do
    echo "--- last lines of $f"; tail -n 30 "$work/$f"
  done
fi
if [ -n "${KEYGATE_COMPAT_TABLE:-}" ]; then
  echo "compatibility table written to docs/compatibility.md"
fi
read -r passed failed xfailed skipped 2>/dev/null <"$work/summary" || { passed=0 failed=1 xfailed=0 skipped=0; }
echo "compat: $((passed + 4 - checks_failed)) passed, $((failed + checks_failed)) failed," \
  "$xfailed expected failures, $skipped skipped (clients + 4 log/audit checks)"
exit $status
