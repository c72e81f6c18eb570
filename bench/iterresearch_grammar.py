#!/usr/bin/env python3
"""IterResearch with and without its round grammar, against the direct method, in one run.

Three arms on the same GSM8K problems (held out: they come after the first 100 lines of the
file, which learning tests use), greedy, on the embedded model unless --config names another:
- direct: the plain model;
- iterresearch, free text: `[methods] constrain = false`, replies parsed and retried as on an
  upstream;
- iterresearch, grammar: replies decoded under the round grammar (the default on local models).
IterResearch is offered the `calculate` tool only (`experient.tools`). Reports, per arm:
answers right with a 95% interval, rounds per problem, the share of rounds that act (call a
tool), tokens per problem, and unreadable replies and retries per 100 model calls.

    cargo build --release
    python3 bench/iterresearch_grammar.py [--tasks 30] [--rounds 4] [--max-tokens 96]
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iterresearch import number  # noqa: E402
from server import ROOT, Server  # noqa: E402


def wilson(k, n, z=1.96):
    if n == 0:
        return [0.0, 0.0]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(max(0.0, c - h), 3), round(min(1.0, c + h), 3)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=30)
    ap.add_argument("--skip", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--config", help="a TOML file to start from (models, limits)")
    ap.add_argument("--arms", default="direct,free,grammar",
                    help="which arms to run, comma-separated: direct, free, grammar")
    ap.add_argument("--data", default=os.path.join(ROOT, "tests/data/gsm8k_train_head500.jsonl"))
    a = ap.parse_args()
    with open(a.data) as f:
        rows = [json.loads(l) for l in f][a.skip: a.skip + a.tasks]
    tasks = [(r["question"], float(r["answer"].split("####")[-1].replace(",", ""))) for r in rows]
    base = open(a.config).read() if a.config else ""
    base += "\n[server]\nrequest_timeout_secs = 7200\n"

    def ask(s, model, q, extra):
        body = {"model": model, "temperature": 0, "max_tokens": a.max_tokens,
                "messages": [{"role": "user", "content": q}]}
        if extra:
            body["experient"] = extra
        return s.post("/v1/chat/completions", body)

    arms = {}
    chosen = set(a.arms.split(","))
    for key, arm, constrain in [("direct", "direct", True),
                                ("free", "iterresearch, free text", False),
                                ("grammar", "iterresearch, grammar", True)]:
        if key not in chosen:
            continue
        config = base + f"\n[methods]\nconstrain = {'true' if constrain else 'false'}\n"
        right = rounds = acting = calls = unreadable = retries = tokens = 0
        with Server(config) as s:
            for i, (q, gold) in enumerate(tasks):
                if arm == "direct":
                    r = ask(s, a.model, q, None)
                    calls += 1
                else:
                    r = ask(s, f"iterresearch:{a.model}", q,
                            {"max_rounds": a.rounds, "tools": ["calculate"]})
                    trace = r["experient"]["trace"]
                    for rd in trace["rounds"]:
                        rounds += 1
                        acting += "tool" in rd
                        # Each retry followed an unreadable reply; a malformed round's last
                        # reply was unreadable too.
                        unreadable += rd.get("retries", 0) + bool(rd.get("malformed"))
                        retries += rd.get("retries", 0)
                        calls += 1 + rd.get("retries", 0)
                got = number(r["choices"][0]["message"]["content"])
                right += got is not None and abs(got - gold) < 1e-6
                tokens += r["usage"]["total_tokens"]
                print(f"{arm}: {i + 1}/{len(tasks)} answer {got} gold {gold}", file=sys.stderr)
        n = len(tasks)
        arms[arm] = {
            "right": right, "accuracy": round(right / n, 3), "ci95": wilson(right, n),
            "rounds_per_problem": round(rounds / n, 2) if rounds else None,
            "acting_rounds": round(acting / rounds, 3) if rounds else None,
            "tokens_per_problem": round(tokens / n, 1),
            "unreadable_per_100_calls": round(100 * unreadable / calls, 1),
            "retries_per_100_calls": round(100 * retries / calls, 1),
        }
    print(json.dumps({"model": a.model, "tasks": len(tasks), "max_rounds": a.rounds,
                      "max_tokens": a.max_tokens, "arms": arms}, indent=2))


if __name__ == "__main__":
    main()
