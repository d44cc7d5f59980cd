#!/usr/bin/env bash
# Compatibility suite: real agent clients run under `keygate run` against a
# local upstream that stands in for api.openai.com / api.anthropic.com.
# The upstream echoes what it received, so each client checks that the real
# key arrived and the placeholder did not. Needs: python3 with the packages
# in compat/python/requirements.txt (.ci/run installs them).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --quiet --bin keygate --bin echo-upstream
bin="$root/target/debug"
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

"$bin/echo-upstream" api.openai.com api.anthropic.com >"$work/upstream.out" 2>&1 &
pids+=($!)
wait_for "$work/upstream.out" "tls="
read -r tls plain ca < <(sed -E 's/tls=([^ ]+) plain=([^ ]+) ca=(.*)/\1 \2 \3/' "$work/upstream.out")

export KEYGATE_DATA_DIR="$work/data"
"$bin/keygate" serve --proxy-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --upstream-ca "$ca" --allow-net 127.0.0.0/8 \
  --resolve "api.openai.com:443=$tls" --resolve "api.anthropic.com:443=$tls" \
  >"$work/keygate.log" 2>&1 &
pids+=($!)
wait_for "$work/keygate.log" "proxy on http://"
proxy=$(sed -nE 's/^keygate: proxy on (http:\/\/[^ ]+) +admin API on (http:\/\/[^ ]+).*/\1/p' "$work/keygate.log")
admin=$(sed -nE 's/^keygate: proxy on (http:\/\/[^ ]+) +admin API on (http:\/\/[^ ]+).*/\2/p' "$work/keygate.log")
export KEYGATE_ADMIN_URL="$admin"

export KEYGATE_COMPAT_OPENAI_KEY="sk-compat-openai-5e1f0a9b"
export KEYGATE_COMPAT_ANTHROPIC_KEY="sk-ant-compat-77d2c3e4"
printf '%s' "$KEYGATE_COMPAT_OPENAI_KEY" | "$bin/keygate" secret add openai --host api.openai.com --path '/v1/*'
printf '%s' "$KEYGATE_COMPAT_ANTHROPIC_KEY" | "$bin/keygate" secret add anthropic --host api.anthropic.com --header x-api-key --format '{secret}'
token=$("$bin/keygate" agent create compat --grant openai --grant anthropic)

status=0
"$bin/keygate" run --proxy "$proxy" --token "$token" -- \
  python3 -m pytest -q -p no:cacheprovider compat/python "$@" || status=$?

if grep -q -e "$KEYGATE_COMPAT_OPENAI_KEY" -e "$KEYGATE_COMPAT_ANTHROPIC_KEY" "$work/keygate.log"; then
  echo "FAIL: a secret value appeared in keygate's log"; status=1
fi
exit $status
