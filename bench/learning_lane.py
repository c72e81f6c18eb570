#!/usr/bin/env python3
"""Chat latency while a learning job runs, against the same chats on an idle server, in one run.

Learning and evaluation send their model calls through a background lane of admission (at most
`background_slots` of a model's slots, admitted only while no client request waits). This
measures what a client feels: the same sequential chat requests on the idle server, then while
a Training-Free GRPO job with `concurrency` model calls in flight learns on the same model.

    cargo build --release
    python3 bench/learning_lane.py [--requests 8] [--concurrency 16] [--max-tokens 32]

Prints one JSON object: the latencies of each phase (seconds), their medians and p90s, and the
ratio of the medians.
"""
import argparse
import json
import os
import statistics
import sys
import time
import urllib.request
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server import started  # noqa: E402 - the benches' one way to start experient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "Name a colour of the sky.",
    "What is two plus three?",
    "Say hello in French.",
    "Name a fruit that is yellow.",
    "What do bees make?",
    "Name a planet.",
    "What is the opposite of cold?",
    "Name a farm animal.",
]


def call(base, method, path, body=None, timeout=600):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def chats(base, n, max_tokens):
    out = []
    for i in range(n):
        body = {"model": "smollm2-135m", "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
        t = time.monotonic()
        call(base, "POST", "/v1/chat/completions", body)
        out.append(time.monotonic() - t)
    return out


def summary(xs):
    xs = sorted(xs)
    return {"median": round(statistics.median(xs), 3),
            "p90": round(xs[min(len(xs) - 1, int(0.9 * len(xs)))], 3),
            "all": [round(x, 3) for x in xs]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=16, help="the job's model calls in flight")
    ap.add_argument("--max-tokens", type=int, default=32, help="per chat request")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/experient"))
    ap.add_argument("--data", default=os.path.join(ROOT, "tests/data/gsm8k_train_head500.jsonl"))
    a = ap.parse_args()

    tasks = []
    with open(a.data) as f:
        for line in f:
            row = json.loads(line)
            tasks.append({"question": row["question"],
                          "answer": row["answer"].split("####")[-1].strip()})
            if len(tasks) == 32:
                break

    server = started(binary=a.binary, log="info")
    proc, base = server.proc, server.base
    try:
        call(base, "POST", "/v1/libraries", {"name": "bench", "settings": {"promote": "always"}})
        chats(base, 2, a.max_tokens)  # warm-up
        idle = chats(base, a.requests, a.max_tokens)

        job = call(base, "POST", "/v1/libraries/bench/learn", {
            "tasks": tasks, "epochs": 1, "batch_size": 16, "group_size": 4,
            "concurrency": a.concurrency, "max_tokens": 256, "learner_max_tokens": 128,
            "temperature": 0.7})
        time.sleep(3)  # let the job fill its lane
        busy = chats(base, a.requests, a.max_tokens)
        state = call(base, "GET", "/v1/jobs/" + job["id"])
        call(base, "DELETE", "/v1/jobs/" + job["id"])
        report = {
            "requests": a.requests, "max_tokens": a.max_tokens,
            "job_concurrency": a.concurrency,
            "job_still_running": state["status"] == "running",
            "job_progress": state.get("progress"),
            "idle": summary(idle), "during_job": summary(busy),
            "median_ratio": round(statistics.median(busy) / statistics.median(idle), 2),
        }
        print(json.dumps(report, indent=2))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
