#!/usr/bin/env bash
# The `cuda` feature on a machine with an NVIDIA GPU, in one script: serve the embedded model on
# the GPU, run the end-to-end chat and local-model tests against that server, and measure decode
# speed against llama.cpp's llama-server built for CUDA, in the same run (bench/local_speed.py
# --gpu).
#
#     bench/cuda_check.sh [OUT_DIR]          # default OUT_DIR: target/cuda-check
#
# With cargo and the CUDA toolkit on the machine it builds what it needs itself
# (`cargo build/test --release --features cuda`). A GPU machine that only runs what was built
# elsewhere gives it the files instead:
#   target/release/experient   experient built with `--features cuda`
#   E2E_BIN                    the e2e test binary (`cargo test --release --no-run`); its tests
#                              start target/release/experient
#   LLAMA_SERVER               llama-server built with -DGGML_CUDA=ON (optional: without it the
#                              speed step measures experient alone)
#   EXPERIENT_MODEL_CACHE      a cache that already holds the default model (no pip there)
# The CUDA libraries the binaries were linked against (cuBLAS, cuRAND, NVRTC, the runtime) are
# looked up wherever they are installed, pip wheels included, when the loader cannot find them.
set -uo pipefail
OUT=${1:-target/cuda-check}
mkdir -p "$OUT"
BIN=target/release/experient
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

if command -v cargo >/dev/null && [ -z "${E2E_BIN:-}" ]; then
  cargo build --release --locked --features cuda || exit 1
  E2E_BIN=$(cargo test --release --locked --features cuda --test e2e --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys; print([j["executable"] for j in map(json.loads, sys.stdin) if j.get("executable")][-1])')
fi

# Libraries the loader cannot resolve: add the folder of the first copy found on the machine.
for bin in "$BIN" ${E2E_BIN:-} ${LLAMA_SERVER:-}; do
  for lib in $(ldd "$bin" 2>/dev/null | awk '/not found/ {print $1}'); do
    found=$(find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o -name "$lib" -print 2>/dev/null | head -1)
    [ -n "$found" ] && export LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
done
ldd "$BIN" | grep -E 'cuda|cublas|curand|nvrtc|not found' >"$OUT/libraries.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/summary.txt"

# 1. Serve: the model must load on the GPU and answer.
log "serve"
WORK=$(mktemp -d)
EXPERIENT_LOG=experient=info,mistralrs_core=info "$BIN" serve --addr 127.0.0.1:0 \
  --experience-dir "$WORK/experience" >"$WORK/stdout" 2>"$OUT/serve.log" &
PID=$!
python3 - "$WORK/stdout" "$OUT/chat.json" "$PID" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys, time, urllib.request
base = None
for _ in range(600):
    with open(f"/proc/{sys.argv[3]}/stat") as f:
        if f.read().split(")")[-1].split()[0] == "Z":
            sys.exit("the server exited: see serve.log")
    lines = [l for l in open(sys.argv[1]) if l.startswith("experient: listening on ")]
    if lines:
        base = lines[0].split()[-1]
        try:
            if urllib.request.urlopen(base + "/health").status == 200:
                break
        except Exception:
            pass
    time.sleep(0.2)
body = {"model": "smollm2-135m", "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]}
req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                             {"content-type": "application/json"})
answer = urllib.request.urlopen(req).read().decode()
open(sys.argv[2], "w").write(answer)
print(answer)
PY
echo | tee -a "$OUT/summary.txt"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv | tee -a "$OUT/summary.txt"
grep -iE 'device|cuda|gpu|dtype|loaded' "$OUT/serve.log" | head -20 | tee -a "$OUT/summary.txt"
kill $PID; wait $PID 2>/dev/null

# 2. The end-to-end chat and local-model tests, each starting this build's server.
if [ -n "${E2E_BIN:-}" ]; then
  log "tests: chat:: local_model::"
  timeout 400 "$E2E_BIN" --test-threads 2 chat:: local_model:: >"$OUT/tests.txt" 2>&1
  echo "tests exit $?" | tee -a "$OUT/summary.txt"
  grep -E '^test |test result' "$OUT/tests.txt" | tee -a "$OUT/summary.txt"
fi

# 3. Decode speed, against llama-server on the same GPU when there is one.
log "speed"
if [ -n "${LLAMA_SERVER:-}" ]; then
  python3 bench/local_speed.py --gpu --llama-server "$LLAMA_SERVER" 2>&1 | tee -a "$OUT/summary.txt"
else
  python3 bench/local_speed.py --gpu --skip-llama 2>&1 | tee -a "$OUT/summary.txt"
fi

# 4. Does a greedy answer depend on what else is batched with it, on this GPU? With max_seqs 8
#    (the default) and with 1 (each request decoded alone).
for seqs in 8 1; do
  log "batch invariance, max_seqs = $seqs"
  timeout 300 python3 bench/batch_invariance.py --max-seqs $seqs --reps 1 2>&1 | tee -a "$OUT/summary.txt"
done

# 5. Where a decoding step's time goes: the server's CPU time per token against the wall time
#    per token, one stream. Equal means the host (engine loop, launches) bounds decoding.
log "host time per decoded token"
python3 - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import os, sys, time
sys.path.insert(0, "bench")
from local_speed import Experient, model_path

def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

e = Experient(model_path(), 1)
try:
    e.stream("Tell me a long story about a lighthouse keeper.", 8)
    c0, w0 = cpu(e.proc.pid), time.perf_counter()
    _, first, end, _, tokens = e.stream("Tell me a long story about a lighthouse keeper.", 512)
    c1, w1 = cpu(e.proc.pid), time.perf_counter()
    print(f"{tokens} tokens: wall {1000 * (w1 - w0) / tokens:.2f} ms/token, "
          f"server CPU {1000 * (c1 - c0) / tokens:.2f} ms/token")
finally:
    e.close()
PY
