#!/usr/bin/env python3
"""Local inference speed: experient's local backend (through its HTTP API) against llama.cpp
(llama-cpp-python) on the same GGUF and CPU, measured in one run.

For each engine, at 1 and at 8 concurrent streams: decode tokens/s after the first token, time
to first token, prompt tokens/s, and aggregate tokens/s; then the ratios, and the server's peak
resident memory. Greedy, EOS suppressed so every stream generates exactly --tokens tokens.

    pip install llama-cpp-python==0.3.36   # builds llama.cpp; CMAKE_ARGS="-DGGML_NATIVE=ON"
    cargo build --release
    python3 bench/local_speed.py [--tokens 128] [--threads 2]

Both engines prefill every prompt in full (llama.cpp's prompt-prefix reuse is reset per request).
llama-cpp-python runs one generation at a time per model object, so its "8 streams" are served
one after another through a lock, as its own server does by default; experient's are real
concurrent HTTP streams.
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
EOS_BIAS = {0: -100.0, 2: -100.0}  # SmolLM2's <|endoftext|> and <|im_end|>
PROMPT_TOKENS = {}  # prompt -> tokens, as experient's usage reported them


def model_path():
    out = subprocess.run(["target/release/experient", "fetch-model"], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


class Experient:
    name = "experient"

    def __init__(self, max_seqs, requantize):
        cfg = (f'[[models]]\nkind = "local"\nid = "m"\nmax_seqs = {max_seqs}\nmax_concurrent = 8\n'
               f'requantize_q4_1 = {"true" if requantize else "false"}\n')
        self.cfg_path = f"/tmp/experient-bench-{os.getpid()}.toml"
        with open(self.cfg_path, "w") as f:
            f.write(cfg)
        self.proc = subprocess.Popen(
            ["target/release/experient", "serve", "--addr", "127.0.0.1:0", "--config", self.cfg_path,
             "--experience-dir", f"/tmp/experient-bench-exp-{os.getpid()}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        self.base = line.strip().rsplit(" ", 1)[-1]
        while True:
            try:
                if urllib.request.urlopen(self.base + "/health").status == 200:
                    break
            except Exception:
                time.sleep(0.1)

    def stream(self, prompt, tokens):
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": tokens, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True},
                           "logit_bias": {str(k): v for k, v in EOS_BIAS.items()}}).encode()
        req = urllib.request.Request(self.base + "/v1/chat/completions", body,
                                     {"content-type": "application/json"})
        t0 = time.perf_counter()
        first = None
        usage = None
        with urllib.request.urlopen(req) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk["choices"]:
                    if c["delta"].get("content") and first is None:
                        first = time.perf_counter()
        end = time.perf_counter()
        PROMPT_TOKENS[prompt] = usage["prompt_tokens"]
        return t0, first, end, usage["prompt_tokens"], usage["completion_tokens"]

    def peak_rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024

    def close(self):
        self.proc.terminate()
        self.proc.wait()


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path, threads):
        from llama_cpp import Llama
        self.llm = Llama(model_path=path, n_threads=threads, n_ctx=2048, verbose=False)
        self.lock = threading.Lock()

    def stream(self, prompt, tokens):
        with self.lock:
            # llama-cpp-python keeps the last prompt's KV state and evaluates only the tokens
            # after the longest common prefix. experient serves with mistral.rs's prefix cache
            # off, so to compare prefill with prefill, every request starts from an empty cache.
            self.llm.reset()
            t0 = time.perf_counter()
            first = None
            n = 0
            for chunk in self.llm.create_chat_completion(
                    messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0,
                    stream=True, logit_bias=EOS_BIAS):
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    n += 1
                    if first is None:
                        first = time.perf_counter()
            end = time.perf_counter()
        # Both engines render the same chat template from the GGUF, so the prompt lengths that
        # experient reported for the same prompts apply here too.
        return t0, first, end, PROMPT_TOKENS.get(prompt, 0), n


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
    decode = [(c - 1) / (e - f) for (s, f, e, p, c) in results if c > 1]
    ttft = [f - s for (s, f, e, p, c) in results]
    prompt_tps = [p / (f - s) for (s, f, e, p, c) in results]
    total = sum(c for (*_, c) in results)
    return {"decode_tok_s": statistics.mean(decode), "ttft_s": statistics.median(ttft),
            "prompt_tok_s": statistics.median(prompt_tps), "aggregate_tok_s": total / wall,
            "completion_tokens": total}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-seqs", type=int, default=1, help="experient's engine batch size")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--requantize", action="store_true", help="rewrite the Q4_1 tensors as Q8_0 first")
    args = ap.parse_args()
    path = model_path()
    rows = {}
    exp = Experient(args.max_seqs, args.requantize)
    try:
        exp.stream(PROMPTS[0], 8)  # warm-up
        for s in (1, 8):
            rows[("experient", s)] = run(exp, s, args.tokens)
        rss = exp.peak_rss_mib()
    finally:
        exp.close()
    if not args.skip_llama:
        llama = LlamaCpp(path, args.threads)
        llama.stream(PROMPTS[0], 8)
        for s in (1, 8):
            rows[("llama.cpp", s)] = run(llama, s, args.tokens)
    print(f"model {os.path.basename(path)}, {args.tokens} tokens per stream, greedy, "
          f"{args.threads} threads, experient max_seqs={args.max_seqs}, "
          f"requantize_q4_1={args.requantize}")
    print(f"{'engine':<10} {'streams':>7} {'decode tok/s':>13} {'TTFT s':>8} {'prompt tok/s':>13} {'aggregate tok/s':>16}")
    for (name, s), r in rows.items():
        print(f"{name:<10} {s:>7} {r['decode_tok_s']:>13.1f} {r['ttft_s']:>8.3f} {r['prompt_tok_s']:>13.1f} {r['aggregate_tok_s']:>16.1f}")
    if not args.skip_llama:
        for s in (1, 8):
            e, l = rows[("experient", s)], rows[("llama.cpp", s)]
            print(f"ratio experient/llama.cpp at {s} stream(s): decode {e['decode_tok_s'] / l['decode_tok_s']:.2f}x, "
                  f"aggregate {e['aggregate_tok_s'] / l['aggregate_tok_s']:.2f}x, TTFT {e['ttft_s'] / l['ttft_s']:.2f}x")
    print(f"experient peak resident memory: {rss:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
