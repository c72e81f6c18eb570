#!/usr/bin/env bash
# Fuzzes the whole HTTP API with schemathesis (PyPI) against a live server on the embedded
# model: every operation in GET /openapi.json, with valid and invalid inputs generated from the
# request types. The rule: no response is a 5xx and no connection is dropped.
#
#   cargo build --release
#   bench/fuzz_api.sh [EXAMPLES_PER_OPERATION]      # default 40
#
# schemathesis is installed into a virtual environment under target/ the first time. The
# server runs in a temporary directory with one library to aim at, and its own log is kept in
# target/fuzz/server.log.
set -euo pipefail
cd "$(dirname "$0")/.."
examples="${1:-40}"
venv=target/fuzz/venv
mkdir -p target/fuzz
if [ ! -x "$venv/bin/st" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q schemathesis==4.32.5
fi
work="$(mktemp -d)"
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
# Generations are kept short and the queue small, so that the fuzzer's many chat requests
# finish: past capacity is a 429, which is what a client should get.
cat >"$work/config.toml" <<'EOF'
[[models]]
kind = "local"
id = "smollm2-135m"
max_concurrent = 2
queue = 4
EOF
target/release/experient serve --addr 127.0.0.1:0 --config "$work/config.toml" \
  --experience-dir "$work/experience" >"$work/out" 2>target/fuzz/server.log &
server=$!
for _ in $(seq 600); do
  base="$(sed -n 's/^experient: listening on //p' "$work/out")"
  [ -n "$base" ] && curl -fs "$base/health" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fs "$base/health" >/dev/null
curl -fs -X POST "$base/v1/libraries" -H 'content-type: application/json' -d '{"name":"fuzz"}' >/dev/null
curl -fs -X POST "$base/v1/libraries/fuzz/experiences" -H 'content-type: application/json' \
  -d '{"text":"Check units before adding.","tags":["math"]}' >/dev/null
status=0
"$venv/bin/st" run "$base/openapi.json" \
  --checks not_a_server_error \
  --max-examples "$examples" \
  --request-timeout 120 \
  --seed 1 \
  --report junit --report-dir target/fuzz || status=$?
# A crash would have ended the server: it must still answer.
curl -fs "$base/health" >/dev/null || { echo "fuzz_api: the server is gone" >&2; exit 1; }
exit "$status"
