#!/usr/bin/env python3
"""What a long prompt costs the streams that are already decoding, with chunked prefill off and
on, and llama.cpp's own server beside them, in one run.

A few streams decode short greedy answers; once each has its first token, one request arrives
with a long prompt (a library's prior is the usual one: `--prompt-tokens` of numbered notes).
An engine that prefills that prompt in one step stops every decoding stream until it is done.
With `prefill_chunk = N`, experient prefills N tokens at a time and the decoding streams take
their turns between the pieces. For each server this measures the long prompt's time to first
token alone, and beside the decoding streams; and over the time it waits for its first token
there, the longest gap between two tokens of a decoding stream (median over the streams) and
the decoding streams' tokens per second. Requests are identical on every server (greedy, the same messages, no EOS suppression,
no prompt cache: experient `prefix_cache = 0`, llama-server `--no-cache-prompt`).

    cargo build --release
    bench/llama_server.sh                  # optional: builds llama-server (skipped if absent)
    python3 bench/prefill_stall.py [--prompt-tokens 2000] [--streams 4] [--chunks 0,64,128,256]

Prints a table and one JSON object.
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from local_speed import PROMPTS, Experient, LlamaServer, model_path  # noqa: E402


def long_prompt(tokens):
    """About `tokens` tokens of numbered notes (about 24 tokens a note), then a question."""
    notes = [f"Note {i}: the ferry from pier {i % 7} leaves at {6 + i % 12} and carries "
             f"{10 + i % 40} cars." for i in range(tokens // 24)]
    return "\n".join(notes) + "\nWhich pier has the most ferries? Answer in one sentence."


def stream(base, model, prompt, max_tokens, out, started=None):
    """Streams one greedy chat answer; appends (send time, [content chunk times], usage) to
    `out`, and sets `started` at its first content token."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", body,
                                 {"content-type": "application/json"})
    sent, times, usage = time.perf_counter(), [], None
    with urllib.request.urlopen(req, timeout=900) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                times.append(time.perf_counter())
                if started is not None:
                    started.set()
    out.append((sent, times, usage))


def trial(base, model, streams, decode_tokens, prompt):
    """The long prompt alone; then the decoding streams, and the long prompt again once each
    stream has its first token."""
    alone = []
    stream(base, model, prompt, 16, alone)
    alone_ttft = alone[0][1][0] - alone[0][0]
    decoders, threads, started = [], [], [threading.Event() for _ in range(streams)]
    for i in range(streams):
        t = threading.Thread(target=stream, args=(base, model, PROMPTS[i % len(PROMPTS)],
                                                  decode_tokens, decoders, started[i]))
        t.start()
        threads.append(t)
    for s in started:
        s.wait(300)
    time.sleep(0.5)
    long = []
    stream(base, model, prompt, 16, long)
    for t in threads:
        t.join()
    sent, times, usage = long[0]
    first = times[0] if times else time.perf_counter()
    gaps, during = [], 0
    for _, ts, _ in decoders:
        inside = [t for t in ts if sent <= t <= first]
        during += len(inside)
        # The longest wait a decoding stream saw while the long prompt was being prefilled,
        # counting from its last token before the long prompt arrived.
        before = [t for t in ts if t < sent]
        marks = ([before[-1]] if before else []) + inside + [t for t in ts if t > first][:1]
        gaps.append(max((b - a for a, b in zip(marks, marks[1:])), default=0.0))
    return {"alone_ttft_s": alone_ttft, "long_ttft_s": first - sent, "long_prompt_tokens": usage["prompt_tokens"],
            "max_gap_s": statistics.median(gaps), "decode_tokens_during": during,
            "decode_tok_s_during": during / max(first - sent, 1e-9)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--chunks", default="0,64,128,256", help="experient prefill_chunk values to run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--llama-server", default="target/peers/build/bin/llama-server")
    args = ap.parse_args()
    path, prompt = model_path(), long_prompt(args.prompt_tokens)
    servers = [(f"experient prefill_chunk={c}", lambda c=int(c): Experient(path, 8, f"prefill_chunk = {c}\n"))
               for c in args.chunks.split(",")]
    if os.path.exists(args.llama_server):
        servers.append(("llama-server", lambda: LlamaServer(
            args.llama_server, path, args.threads, args.streams + 1)))
    rows = {}
    for name, make in servers:
        server = make()
        try:
            stream(server.base, "m", PROMPTS[0], 8, [])  # warm-up
            runs = [trial(server.base, "m", args.streams, args.decode_tokens, prompt)
                    for _ in range(args.repeats)]
            rows[name] = runs
        finally:
            server.close()
    print(f"{args.streams} decoding streams (max_tokens {args.decode_tokens}), then one "
          f"~{args.prompt_tokens}-token prompt; {args.repeats} runs per server")
    print(f"{'server':<28} {'prompt tokens':>13} {'TTFT alone s':>13} {'TTFT beside s':>14} "
          f"{'longest gap s':>14} {'decode tok/s meanwhile':>23}")
    for name, runs in rows.items():
        for r in runs:
            print(f"{name:<28} {r['long_prompt_tokens']:>13} {r['alone_ttft_s']:>13.2f} "
                  f"{r['long_ttft_s']:>14.2f} {r['max_gap_s']:>14.2f} "
                  f"{r['decode_tok_s_during']:>23.1f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    sys.exit(main())
