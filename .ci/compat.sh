#!/usr/bin/env bash
# Compatibility suite for CI: installs the clients it exercises (curl,
# openssl, git, Java 17 + keytool, Node + npm, the Python packages in
# compat/python/requirements.txt, the npm packages locked in
# compat/node/package-lock.json), then runs compat/run.sh, which writes
# docs/compatibility.md. Exits non-zero on any unexpected result.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
command -v git >/dev/null || need+=(git)
command -v python3 >/dev/null || need+=(python3 python3-pip)
{ command -v java >/dev/null && command -v keytool >/dev/null; } || need+=(openjdk-17-jdk-headless)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
# git http-backend (the stand-in github.com) ships with git.
test -x "$(git --exec-path)/git-http-backend"

python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
  -r compat/python/requirements.txt
(cd compat/node && npm ci --no-audit --no-fund --loglevel=error)

echo "clients: $(curl --version | head -1 | cut -d' ' -f1-2), $(git --version)," \
  "node $(node --version), $(java -version 2>&1 | head -1), python $(python3 --version)"
bash compat/run.sh
