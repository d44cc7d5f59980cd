#!/usr/bin/env bash
# One command: build release binaries, then measure direct vs through keygate
# (injection + audit on) on loopback. Arguments go to bench.py
# (--seconds N, --quick, --out DIR). Results: bench/results/latest.{md,json}.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
cargo build --release --quiet --bin keygate --bin stream-upstream --bin tls-pipe --bin paced-load
for tool in oha nginx openssl curl python3; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (see bench/README.md)" >&2; exit 2; }
done
exec python3 "$root/bench/bench.py" --bin "$target/release" "$@"
