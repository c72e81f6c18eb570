#!/usr/bin/env python3
"""Does rewriting Q4_1 as Q8_0 (`requantize_q4_1`, off by default) change answers? Runs the same
BIG-Bench Hard questions greedily through two experient servers, one per setting, and reports
accuracy for each and how many answers are identical.

    cargo build --release
    python3 bench/requantize_quality.py [--limit 60]
"""
import argparse
import json
import os
import re
import sys
import urllib.request
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server import started  # noqa: E402 - the benches' one way to start experient

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "bbh")
TASKS = {
    "boolean_expressions": ("Evaluate the expression. Answer with only True or False.", r"\b(True|False)\b"),
    "sports_understanding": ("Answer with only yes or no.", r"\b(yes|no)\b"),
    "web_of_lies": ("Answer with only Yes or No.", r"\b(Yes|No)\b"),
}


def serve(requantize):
    s = started(f'[[models]]\nkind = "local"\nid = "m"\nrequantize_q4_1 = {"true" if requantize else "false"}\n',
                binary="target/release/experient")
    return s.proc, s.base


def ask(base, text):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}],
                       "max_tokens": 16, "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)["choices"][0]["message"]["content"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=60)
    args = ap.parse_args()
    answers = {}
    for requantize in (False, True):
        p, base = serve(requantize)
        try:
            for task, (instruction, pattern) in TASKS.items():
                with open(os.path.join(DATA, f"{task}.json")) as f:
                    examples = json.load(f)["examples"][: args.limit]
                for i, ex in enumerate(examples):
                    out = ask(base, f"{instruction}\n\n{ex['input']}")
                    m = re.search(pattern, out, re.IGNORECASE)
                    got = m.group(1).lower() if m else None
                    answers[(requantize, task, i)] = (out, got == ex["target"].lower())
        finally:
            p.terminate()
            p.wait()
    print(f"{'task':<22} {'Q4_1 correct':>12} {'Q8_0 correct':>12} {'same output':>12}")
    for task in TASKS:
        n = sum(1 for k in answers if k[0] and k[1] == task)
        q4 = sum(answers[(False, task, i)][1] for i in range(n))
        q8 = sum(answers[(True, task, i)][1] for i in range(n))
        same = sum(answers[(False, task, i)][0] == answers[(True, task, i)][0] for i in range(n))
        print(f"{task:<22} {q4:>9}/{n:<2} {q8:>9}/{n:<2} {same:>9}/{n:<2}")


if __name__ == "__main__":
    sys.exit(main())
