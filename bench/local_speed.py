#!/usr/bin/env python3
"""Local inference speed: experient's local backend against llama.cpp's own server
(llama-server) on the same GGUF and CPU, both over HTTP, measured in one run.

    bench/llama_server.sh                 # builds llama-server from the llama-cpp-python sdist
    cargo build --release
    python3 bench/local_speed.py [--tokens 128] [--threads 2] [--max-seqs 8]

Fair by construction:
- Both servers get the same requests: the same chat messages, greedy (temperature 0), the same
  max_tokens, streamed with usage. Nothing suppresses EOS on either side (no logit_bias, no
  ignore_eos), so each engine stops where the model stops; decode speed is computed from the
  tokens each engine actually produced, after its first token, and the token counts are
  printed so that the work can be compared.
- Neither reuses an earlier prompt's KV state: experient runs with prefix_cache = 0 and
  llama-server with --no-cache-prompt, so every request pays its full prefill on both.
- Concurrency uses each engine's own batching: llama-server with --parallel N slots and
  continuous batching; experient with max_seqs = N (its engine batch).

For each engine, at 1 and at N concurrent streams: mean decode tokens/s per stream, median time
to first token, prompt tokens/s, aggregate tokens/s, and then the ratios.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

PROMPTS = [
    "Tell me a story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe a walk through a forest in autumn.",
    "Write about the history of bread.",
    "What makes a good friend?",
    "Describe the ocean at night.",
    "Explain why the sky is blue.",
    "Tell me about a day in a busy kitchen.",
]


# The experient binary every bench script starts; bench/cuda_check.sh points it at a CUDA build.
EXPERIENT = os.environ.get("EXPERIENT_BIN", "target/release/experient")


def model_path():
    out = subprocess.run([EXPERIENT, "fetch-model"], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def wait_healthy(base, proc):
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if urllib.request.urlopen(base + "/health").status == 200:
                return
        except Exception:
            time.sleep(0.2)
    raise SystemExit("server never became healthy")


class Server:
    """An OpenAI-compatible server process, driven with identical streaming requests."""

    def stream(self, prompt, tokens):
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": tokens, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        req = urllib.request.Request(self.base + "/v1/chat/completions", body,
                                     {"content-type": "application/json"})
        t0 = time.perf_counter()
        first, usage = None, None
        with urllib.request.urlopen(req) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk.get("choices", []):
                    if c.get("delta", {}).get("content") and first is None:
                        first = time.perf_counter()
        end = time.perf_counter()
        return t0, first, end, usage["prompt_tokens"], usage["completion_tokens"]

    def close(self):
        self.proc.terminate()
        self.proc.wait()


class Experient(Server):
    name = "experient"
    model = "m"

    def __init__(self, path, max_seqs, extra=""):
        """`extra`: more lines for the model's config table (bench/prefill_stall.py's chunk)."""
        cfg = (f'[[models]]\nkind = "local"\nid = "m"\ngguf = "{path}"\nmax_seqs = {max_seqs}\n'
               f'max_concurrent = {max(8, max_seqs)}\nprefix_cache = 0\n{extra}')
        cfg_path = f"/tmp/experient-bench-{os.getpid()}.toml"
        with open(cfg_path, "w") as f:
            f.write(cfg)
        self.proc = subprocess.Popen(
            [EXPERIENT, "serve", "--addr", "127.0.0.1:0", "--config", cfg_path,
             "--experience-dir", f"/tmp/experient-bench-exp-{os.getpid()}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.base = self.proc.stdout.readline().strip().rsplit(" ", 1)[-1]
        wait_healthy(self.base, self.proc)


class LlamaServer(Server):
    name = "llama-server"
    model = "m"

    def __init__(self, exe, path, threads, parallel, port=18089, gpu_layers=0):
        """`gpu_layers`: layers offloaded to a GPU (`-ngl`), for a CUDA build of both engines."""
        self.proc = subprocess.Popen(
            [exe, "-m", path, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
             "-tb", str(threads), "--parallel", str(parallel), "--cont-batching",
             "-c", str(2048 * parallel), "--no-cache-prompt", "--no-webui",
             "-ngl", str(gpu_layers)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        wait_healthy(self.base, self.proc)


def run(engine, streams, tokens):
    results = [None] * streams

    def one(i):
        results[i] = engine.stream(PROMPTS[i % len(PROMPTS)], tokens)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    decode = [(c - 1) / (e - f) for (s, f, e, p, c) in results if c > 1 and f]
    ttft = [f - s for (s, f, e, p, c) in results if f]
    prompt_tps = [p / (f - s) for (s, f, e, p, c) in results if f]
    total = sum(c for (*_, c) in results)
    return {"decode_tok_s": statistics.mean(decode), "ttft_s": statistics.median(ttft),
            "prompt_tok_s": statistics.median(prompt_tps), "aggregate_tok_s": total / wall,
            "completion_tokens": total, "prompt_tokens": sum(p for (_, _, _, p, _) in results)}


def measure(engine, streams, tokens, repeats):
    """Best of `repeats` runs at each concurrency (by aggregate tokens/s), after a warm-up."""
    engine.stream(PROMPTS[0], 8)
    rows = {}
    for s in (1, streams):
        runs = [run(engine, s, tokens) for _ in range(repeats)]
        rows[s] = max(runs, key=lambda r: r["aggregate_tok_s"])
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-seqs", type=int, default=None,
                    help="experient's engine batch size (default: the configuration's default)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--llama-server", default="target/peers/build/bin/llama-server")
    ap.add_argument("--gpu", action="store_true",
                    help="both engines on the GPU: a CUDA build of each (EXPERIENT_BIN, "
                         "--llama-server), llama-server with every layer offloaded")
    ap.add_argument("--skip-llama", action="store_true", help="measure experient alone")
    args = ap.parse_args()
    path = model_path()
    rows = {}
    exp = Experient(path, args.max_seqs if args.max_seqs is not None else args.streams)
    try:
        rows["experient"] = measure(exp, args.streams, args.tokens, args.repeats)
    finally:
        exp.close()
    if not args.skip_llama:
        peer = LlamaServer(args.llama_server, path, args.threads, args.streams,
                           gpu_layers=999 if args.gpu else 0)
        try:
            rows["llama-server"] = measure(peer, args.streams, args.tokens, args.repeats)
        finally:
            peer.close()
    print(f"model {os.path.basename(path)}, max_tokens {args.tokens}, greedy, no EOS suppression, "
          f"{args.threads} threads, best of {args.repeats}; experient max_seqs="
          f"{args.max_seqs if args.max_seqs is not None else args.streams}, llama-server --parallel {args.streams}"
          f"{', both on the GPU' if args.gpu else ''}")
    print(f"{'engine':<13} {'streams':>7} {'decode tok/s':>13} {'TTFT s':>8} {'prompt tok/s':>13} "
          f"{'aggregate tok/s':>16} {'tokens out':>11}")
    for name, by in rows.items():
        for s, r in by.items():
            print(f"{name:<13} {s:>7} {r['decode_tok_s']:>13.1f} {r['ttft_s']:>8.3f} {r['prompt_tok_s']:>13.1f} "
                  f"{r['aggregate_tok_s']:>16.1f} {r['completion_tokens']:>11}")
    for s in (1, args.streams) if "llama-server" in rows else ():
        e, l = rows["experient"][s], rows["llama-server"][s]
        print(f"experient/llama-server at {s} stream(s): decode {e['decode_tok_s'] / l['decode_tok_s']:.2f}x, "
              f"aggregate {e['aggregate_tok_s'] / l['aggregate_tok_s']:.2f}x, "
              f"TTFT {e['ttft_s'] / l['ttft_s']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
