#!/usr/bin/env python3
"""Training-Free GRPO's learner with and without its grammars, on the embedded model.

Runs the same learning job twice on BIG-Bench Hard tasks, once with `[methods] constrain =
false` (the learner writes freely; replies are parsed and retried) and once with the default
(summaries free, but the group comparison, the operations and the consolidation decoded under
`learn::ops`'s grammars). Each run is gated as every library is by default: a step's candidate
goes live only if it beats its parent on the held-out fifth of the tasks.

    cargo build --release
    python3 bench/learner_grammar.py [--tasks 40] [--task boolean_expressions] [--arms free,grammar]

Prints, per arm: mixed groups, groups whose operations reply yielded at least one checked
operation, operations proposed, the gate's outcomes, the learner's calls and unreadable replies
by kind (and per 100 calls), model calls and tokens in all, and wall time.
"""
import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server import Server  # noqa: E402 - the benches' one way to start experient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ["summary", "comparison", "operations", "consolidation"]


def job(s, body):
    j = s.post("/v1/libraries/bbh/learn", body)
    while True:
        r = s.call("GET", f"/v1/jobs/{j['id']}")
        if r.get("status") in ("succeeded", "failed", "cancelled"):
            return r
        time.sleep(3)


def groups_of(run_dir):
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "step-*", "groups.json"))):
        with open(path) as f:
            out.extend(json.load(f))
    return out


def arm(name, args):
    constrain = "true" if name == "grammar" else "false"
    with Server(f"[methods]\nconstrain = {constrain}\n") as s:
        s.post("/v1/libraries", {"name": "bbh"})
        t = time.monotonic()
        r = job(s, {
            "dataset": os.path.join(ROOT, f"../shared/data/bbh/{args.task}.json"),
            "limit": args.tasks, "split_seed": 7, "epochs": 1, "batch_size": 8,
            "group_size": args.group_size, "temperature": 1.0, "max_tokens": 8,
            "learner_max_tokens": args.learner_max_tokens, "retries": 2,
            "verifier": r"regex:(?i)^\W*{answer}\b",
        })
        wall = time.monotonic() - t
    if r["status"] != "succeeded":
        return {"arm": name, "status": r["status"], "error": r.get("error")}
    result = r["result"]
    steps = result["steps"]
    groups = groups_of(result["dir"])
    replies = {k: {"calls": 0, "unreadable": 0} for k in KINDS}
    for st in steps:
        for k in KINDS:
            for f in ("calls", "unreadable"):
                replies[k][f] += st.get("replies", {}).get(k, {}).get(f, 0)
    calls = sum(v["calls"] for v in replies.values())
    unreadable = sum(v["unreadable"] for v in replies.values())
    return {
        "arm": name,
        "steps": len(steps),
        "mixed_groups": sum(st["mixed_groups"] for st in steps),
        "groups_with_operation": sum(1 for g in groups if g.get("proposals")),
        "operations_proposed": sum(len(g.get("proposals", [])) for g in groups),
        "operations_rejected": sum(len(g.get("rejected", [])) for g in groups),
        "gate": [st["gate"]["outcome"] for st in steps if st.get("gate")],
        "gate_reasons": [st["gate"]["reason"] for st in steps if st.get("gate")],
        "experiences_live": result["experiences"],
        "learner_replies": replies,
        "unreadable_per_100_calls": round(100 * unreadable / calls, 1) if calls else None,
        "model_calls": result["cost"]["model_calls"],
        "completion_tokens": result["cost"]["completion_tokens"],
        "wall_secs": round(wall, 1),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="boolean_expressions")
    p.add_argument("--tasks", type=int, default=40)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--learner-max-tokens", type=int, default=192)
    p.add_argument("--arms", default="free,grammar")
    args = p.parse_args()
    for name in args.arms.split(","):
        print(json.dumps(arm(name, args)), flush=True)


if __name__ == "__main__":
    main()
