#!/usr/bin/env python3
"""What a library's prior costs per request, with mistral.rs's prefix cache off and on, in one run.

Every request to `MODEL@LIBRARY` carries the library's experiences in its system prompt. With the
prefix cache on, the KV state of a finished request is kept and the next request that starts
with the same tokens (the same prior) prefills only what follows them. This starts two servers
on the embedded model, identical but for `prefix_cache` (0 and the given number), gives each the
same library (`--experiences` of them: 100 make a 3,074-token prompt), and sends both the same sequence of
greedy streaming requests, each a different question under the same prior. It measures the
time to the first content token of the first request (nothing cached) and of the later ones,
and checks that both servers answered every request with the same text.

    cargo build --release
    python3 bench/prefix_cache.py [--experiences 100] [--requests 5] [--cache 16]

Prints one JSON object.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server import started  # noqa: E402 - the benches' one way to start experient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = [
    "A shirt costs $20 and is 25% off. What does it cost?",
    "Tom has 3 boxes of 12 eggs and breaks 5. How many are left?",
    "A train goes 60 km in 45 minutes. What is its speed in km/h?",
    "What is 15% of 80?",
    "Anna reads 12 pages a day. How many days for a 180-page book?",
    "A rectangle is 7 m by 4 m. What is its area?",
    "If 4 pens cost $6, what do 10 pens cost?",
    "What is the sum of the angles of a triangle?",
]
# Experiences in the shape Training-Free GRPO learns them, repeated with a number.
RULES = [
    "Units: convert every quantity to one unit before adding or comparing.",
    "Percentages: a discount of p% leaves (100 - p)% of the price; multiply, do not subtract p.",
    "Rates: distance over time gives speed; turn minutes into hours before dividing.",
    "Totals: multiply groups by their size first, then add or take away the rest.",
    "Check: put the answer back into the question and see that it fits.",
    "Proportions: find the price of one, then scale to the number asked for.",
    "Areas: length times width, in square units of the same unit.",
    "Words: 'each' and 'per' mean multiply; 'left' and 'remain' mean subtract.",
]


def call(base, method, path, body=None, timeout=600):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def start(binary, work, cache):
    s = started(f'[[models]]\nkind = "local"\nid = "smollm2-135m"\nprefix_cache = {cache}\n',
                binary=binary, experience_dir=os.path.join(work, "experience"))
    return s.proc, s.base


def stream(base, question, max_tokens):
    """Time to the first content delta, total time, the text and the prompt's token count."""
    body = {"model": "smollm2-135m@bench", "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": question}]}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    t = time.monotonic()
    first, text, prompt_tokens = None, "", None
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices", []):
                piece = c.get("delta", {}).get("content")
                if piece:
                    if first is None:
                        first = time.monotonic() - t
                    text += piece
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    return first, time.monotonic() - t, text, prompt_tokens


def library(base, experiences):
    call(base, "POST", "/v1/libraries", {"name": "bench"})
    for i in range(experiences):
        rule = RULES[i % len(RULES)]
        call(base, "POST", "/v1/libraries/bench/experiences", {"text": f"{rule} (rule {i + 1})"})


def run(base, questions, max_tokens):
    out = []
    for q in questions:
        ttft, total, text, prompt = stream(base, q, max_tokens)
        out.append({"ttft": round(ttft or total, 3), "total": round(total, 3),
                    "prompt_tokens": prompt, "text": text})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiences", type=int, default=100)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--cache", type=int, default=16, help="prefix_cache of the second server")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/experient"))
    a = ap.parse_args()
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(a.requests)]
    work = tempfile.mkdtemp()
    report = {"experiences": a.experiences, "requests": a.requests,
              "max_tokens": a.max_tokens}
    results = {}
    # One server at a time, so that the two never share the 2 cores.
    for name, cache in [("off", 0), ("on", a.cache)]:
        proc, base = start(a.binary, os.path.join(work, name), cache)
        try:
            library(base, a.experiences)
            results[name] = run(base, questions, a.max_tokens)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    for name, rs in results.items():
        later = [r["ttft"] for r in rs[1:]]
        report[name] = {"prompt_tokens": rs[0]["prompt_tokens"], "first_ttft": rs[0]["ttft"],
                        "later_ttft_median": round(statistics.median(later), 3) if later else None,
                        "ttft": [r["ttft"] for r in rs]}
    on, off = report["on"], report["off"]
    if on["later_ttft_median"] and on["first_ttft"]:
        report["on"]["repeated_over_first"] = round(on["later_ttft_median"] / on["first_ttft"], 3)
    if on["later_ttft_median"] and off["later_ttft_median"]:
        report["repeated_on_over_off"] = round(on["later_ttft_median"] / off["later_ttft_median"], 3)
    same = [a_["text"] == b_["text"] for a_, b_ in zip(results["off"], results["on"])]
    report["same_text"] = all(same)
    report["same_text_per_request"] = same
    if not all(same):
        report["texts"] = {k: [r["text"] for r in v] for k, v in results.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
