#!/usr/bin/env bash
# Browser end-to-end tests of the web dashboard: installs Debian's Chromium
# and chromedriver if missing, builds keygate, then runs the #[ignore]d
# browser tests in headless Chromium and the million-record audit test.
# Screenshots (and the failing page's source) land in
# target/browser-screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
fi
chromium --version || true
chromedriver --version || true

cargo build --locked -p keygate
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null || echo "$PWD/target")
export KEYGATE_BIN="$target_dir/debug/keygate"
export CHROMIUM="${CHROMIUM:-$(command -v chromium)}"
export CHROMEDRIVER="${CHROMEDRIVER:-$(command -v chromedriver)}"
rm -rf "$target_dir/browser-screenshots"
cargo test --locked -p browser-tests -- --ignored --nocapture --test-threads 1
# The audit pages at a million records (keyset paging over the chunks a
# filter needs), after moving them from the pre-0007 per-record table.
cargo test --locked -p keygate-admin --test scale -- --ignored --nocapture
echo "screenshots: $target_dir/browser-screenshots"
