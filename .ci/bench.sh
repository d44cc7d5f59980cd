#!/usr/bin/env bash
# Bounded smoke of the benchmark harness (about a minute with a warm build):
# builds the release binaries, runs every scenario for 1 s (the keep-alive
# and HTTP/2 ones also through the tls-pipe floor, the HTTP/1.1 ones through
# its HTTP/1.1 model) and checks that each one
# completed without errors. Needs oha (cargo install oha --locked),
# nginx, openssl, curl, python3; installs oha and nginx when missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
command -v oha >/dev/null || cargo install oha --locked --quiet
command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx-light >/dev/null; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
pipe="${CARGO_TARGET_DIR:-$root/target}/release/tls-pipe"
./bench/run.sh --quick --paced --out "$out" --floor "$pipe" --h1-model "$pipe"
python3 - "$out/latest.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
bad = []
for r in d["scenarios"]:
    if "skipped" in r:
        bad.append(f"{r['scenario']}: skipped: {r['skipped']}")
        continue
    for leg in ("direct", "keygate", "floor", "h1-model"):
        x = r.get(leg)
        if x is None:
            peered = r["scenario"].startswith("HTTP/") and "half" not in r["scenario"]
            if leg == "floor" and peered:
                bad.append(f"{r['scenario']}: no run through the floor (tls-pipe)")
            if leg == "h1-model" and peered and r["scenario"].startswith("HTTP/1.1"):
                bad.append(f"{r['scenario']}: no run through the HTTP/1.1 model (tls-pipe HEADER)")
            continue
        if "skipped" in x:
            bad.append(f"{r['scenario']} {leg}: skipped: {x['skipped']}")
            continue
        if x["ok"] == 0 or x["errors"] or x["non_2xx"]:
            bad.append(f"{r['scenario']} {leg}: ok={x['ok']} errors={x['errors']} non_2xx={x['non_2xx']}")
if not any(r["scenario"].endswith("evenly paced") for r in d["scenarios"]):
    bad.append("no evenly paced half-load run (paced-load)")
targets = d.get("targets") or []
if len(targets) != 11 or any(t["verdict"] not in ("met", "missed", "not measured") for t in targets):
    bad.append(f"issue 5 targets section missing or malformed: {targets!r:.300}")
if bad:
    print("bench smoke failed:\n" + "\n".join(bad)); sys.exit(1)
print("bench smoke ok:", len(d["scenarios"]), "scenarios")
PY
