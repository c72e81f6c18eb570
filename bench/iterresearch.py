#!/usr/bin/env python3
"""IterResearch against full-history ReAct on the same multi-step tasks, in one run.

Both run inside experient's `iterresearch` method, with the same prompt, tools (calculate,
search_experience) and model; only the workspace differs: "markovian" rebuilds each round's
prompt from the question, the report and the last action, "full" appends every reply and
result to the conversation (ReAct). Tasks are GSM8K problems (multi-step arithmetic), scored by
their final number. Reports accuracy and the mean prompt tokens per round as rounds grow.

    cargo build --release
    python3 bench/iterresearch.py [--tasks 12] [--rounds 6] [--model smollm2-135m] [--config FILE]

With --config, any configured model (local GGUF or upstream) can be measured the same way.
"""
import argparse
import json
import os
import re
import statistics
import sys
import urllib.request
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server import started  # noqa: E402 - the benches' one way to start experient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def number(text):
    nums = re.findall(r"-?\d[\d,]*\.?\d*", text or "")
    if not nums:
        return None
    try:
        return float(nums[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--config")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/experient"),
                    help="the experient executable (a copy keeps a long run safe from rebuilds)")
    ap.add_argument("--data", default=os.path.join(ROOT, "tests/data/gsm8k_train_head500.jsonl"))
    a = ap.parse_args()

    tasks = []
    with open(a.data) as f:
        for line in f:
            row = json.loads(line)
            tasks.append((row["question"], float(row["answer"].split("####")[-1].replace(",", ""))))
            if len(tasks) == a.tasks:
                break

    if a.config:
        with open(a.config) as f:
            config = f.read()
    else:
        # Many rounds on a CPU can outlast the default non-streaming deadline.
        config = "[server]\nrequest_timeout_secs = 7200\n"
    handle = started(config, binary=a.binary)
    server, base = handle.proc, handle.base

    def run(question, workspace):
        body = {
            "model": f"iterresearch:{a.model}", "temperature": 0, "max_tokens": a.max_tokens,
            "messages": [{"role": "user", "content": question}],
            "experient": {"workspace": workspace, "max_rounds": a.rounds},
        }
        req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
        return json.load(urllib.request.urlopen(req, timeout=3600))

    results = {}
    try:
        for workspace in ["full", "markovian"]:
            per_round = {}
            correct = 0
            tool_calls = 0
            for i, (q, gold) in enumerate(tasks):
                r = run(q, workspace)
                trace = r["experient"]["trace"]
                for rd in trace["rounds"]:
                    per_round.setdefault(rd["round"], []).append(rd["prompt_tokens"])
                tool_calls += trace["tool_calls"]
                got = number(r["choices"][0]["message"]["content"])
                correct += got is not None and abs(got - gold) < 1e-6
                print(f"{workspace:>9} task {i + 1}/{len(tasks)}: rounds {len(trace['rounds'])}, "
                      f"stopped {trace['stopped']}, answer {got}, gold {gold}", file=sys.stderr)
            results[workspace] = (correct, tool_calls, per_round)
    finally:
        server.terminate()
        server.wait()

    print(f"model {a.model}, {len(tasks)} GSM8K tasks, at most {a.rounds} rounds, "
          f"{a.max_tokens} tokens per round, greedy")
    print("workspace  | accuracy | tool calls | mean prompt tokens in round 1, 2, 3, ...")
    for workspace, (correct, calls, per_round) in results.items():
        means = [f"{statistics.mean(per_round[k]):.0f}" for k in sorted(per_round)]
        print(f"{workspace:<10} | {correct}/{len(tasks):<6} | {calls:>10} | {', '.join(means)}")


if __name__ == "__main__":
    main()
