#!/usr/bin/env python3
"""Batch invariance: is a greedy answer the same alone and beside other requests?

    cargo build --release
    python3 bench/batch_invariance.py [--tokens 160] [--max-seqs 8] [--reps 2]

Eight prompts of one token length (so that the engine batches them) are answered one at a
time, greedy, with log probabilities: the reference. Then four mixes are sent, each --reps
times: the eight greedy prompts at once; the same 0.3 s apart; and both again with three of the
eight sampled (temperature 0.9). For every greedy answer it prints whether the text and the
log probabilities are exactly the reference's, and where they first differ.
"""
import argparse
import json
import os
import sys
import subprocess
import threading
import time
import urllib.request
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server import started  # noqa: E402 - the benches' one way to start experient

SUBJECTS = ["cat", "dog", "king", "ship", "bird", "tree", "lamp", "fish"]


def prompt(subject):
    return f"Tell me a story about a {subject}."


def start(max_seqs):
    path = subprocess.run(["target/release/experient", "fetch-model"], capture_output=True,
                          text=True, check=True).stdout.strip().splitlines()[-1]
    cfg = (f'[[models]]\nkind = "local"\nid = "m"\ngguf = "{path}"\nmax_seqs = {max_seqs}\n'
           f'max_concurrent = 16\nprefix_cache = 0\n')
    s = started(cfg, binary="target/release/experient")
    return s.proc, s.base


def ask(base, text, temperature, tokens):
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": tokens,
            "temperature": temperature, "logprobs": temperature == 0}
    req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    r = json.load(urllib.request.urlopen(req, timeout=900))
    choice = r["choices"][0]
    lp = [(t["token"], t["logprob"]) for t in ((choice.get("logprobs") or {}).get("content") or [])]
    return choice["message"]["content"], r["usage"], lp


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def send(base, jobs, stagger, tokens):
    out = [None] * len(jobs)

    def run(i, subject, temperature):
        out[i] = ask(base, prompt(subject), temperature, tokens)

    threads = []
    for i, (subject, temperature) in enumerate(jobs):
        t = threading.Thread(target=run, args=(i, subject, temperature))
        t.start()
        threads.append(t)
        time.sleep(stagger)
    for t in threads:
        t.join()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--max-seqs", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    proc, base = start(args.max_seqs)
    try:
        ref = {s: ask(base, prompt(s), 0, args.tokens) for s in SUBJECTS}
        lengths = sorted({ref[s][1]["prompt_tokens"] for s in SUBJECTS})
        print(f"prompt tokens {lengths}, max_seqs {args.max_seqs}, {args.tokens} tokens", flush=True)
        greedy = [(s, 0) for s in SUBJECTS]
        mixed = [(s, 0.9 if i % 3 == 1 else 0) for i, s in enumerate(SUBJECTS)]
        cases = [("greedy, at once", greedy, 0.0), ("greedy, 0.3 s apart", greedy, 0.3),
                 ("3 sampled beside, at once", mixed, 0.0), ("3 sampled beside, 0.3 s apart", mixed, 0.3)]
        for name, jobs, stagger in cases:
            for rep in range(args.reps):
                out = send(base, jobs, stagger, args.tokens)
                same, drift = 0, []
                for (subject, temperature), answer in zip(jobs, out):
                    if temperature:
                        continue
                    text = first_difference(ref[subject][0], answer[0])
                    lp = first_difference(ref[subject][2], answer[2])
                    if text is None and lp is None:
                        same += 1
                    else:
                        drift.append(f"{subject}: log probabilities from token {lp}, text from character {text}")
                total = sum(1 for _, t in jobs if not t)
                print(f"{name} (run {rep + 1}): {same} of {total} identical" + "".join(f"\n  {d}" for d in drift), flush=True)
    finally:
        proc.kill()


if __name__ == "__main__":
    main()
