#!/usr/bin/env python3
"""The LLM judge with and without its grammar, on the embedded model as its own judge.

Evaluates 6 one-line sums with `verifier: judge` (no library on either side), once with
`[methods] constrain = true` and once false, and prints each evaluation. OFF=5 shifts every
reference by 5, so a judge that tracks correctness should then grade the answers INCORRECT.

    cargo build --release
    python3 bench/judge_grammar.py            # right references, both arms
    OFF=5 ARMS=true python3 bench/judge_grammar.py
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server import Server  # noqa: E402 - the benches' one way to start experient
tasks = [{"question": f"What is {a} + {b}?", "answer": str(a + b + int(os.environ.get("OFF", "0")))} for a, b in [(2, 3), (10, 7), (6, 6), (1, 8), (4, 9), (12, 5)]]
for constrain in os.environ.get("ARMS", "true,false").split(","):
    with Server(f"[methods]\nconstrain = {constrain}\n") as s:
        s.post("/v1/libraries", {"name": "j"})
        ev = s.post("/v1/libraries/j/evaluations", {"baseline": "none", "candidate": "none", "tasks": tasks, "verifier": "judge", "max_tokens": 24})
        while True:
            r = s.call("GET", f"/v1/libraries/j/evaluations/{ev['id']}")
            if r.get("status") in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(2)
        print(constrain, json.dumps(r)[:1500], flush=True)
