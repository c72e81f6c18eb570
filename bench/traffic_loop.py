#!/usr/bin/env python3
"""Learning from traffic on the embedded model, measured, gated and ungated: serve BBH
boolean_expressions tasks through a recording library, give each answer feedback with the right
answer, then learn from that traffic twice with the shipped learner prompts, once under the
gate (`promote: gain`, the default) and once without it (`promote: always`), and evaluate each
result on the same held-out records.

    cargo build --release
    python3 bench/traffic_loop.py [--tasks 60] [--eval 20] [--learn 24]

Records are split in order: the first --eval are held out for the final evaluation, the next
--learn are learned from, and the rest are the gate's validation tasks (both arms learn from the
same tasks; only the gated arm uses the rest). Prints one JSON object: the served accuracy, the
held-out accuracy without the library and with each arm's library, every gate decision, and
what each arm's learning cost.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server import started  # noqa: E402 - the benches' one way to start experient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target/release/experient")
FIRST_WORD = r"regex:(?i)^\W*{answer}\b"


def call(base, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read() or b"null")


def cli(exp, *args):
    out = subprocess.run([BINARY, *args, "--experience-dir", exp], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=60)
    ap.add_argument("--eval", type=int, default=20)
    ap.add_argument("--learn", type=int, default=24)
    a = ap.parse_args()
    with open(os.path.join(ROOT, "tests/data/boolean_expressions.json")) as f:
        examples = json.load(f)["examples"][: a.tasks]

    work = tempfile.mkdtemp()
    exp = os.path.join(work, "experience")
    # One client gives all the feedback here, faster than the default per-key rate allows.
    server = started("[traffic]\nfeedback_per_minute = 100000\n", binary=BINARY,
                     experience_dir=exp)
    proc, base = server.proc, server.base
    call(base, "POST", "/v1/libraries", {"name": "bool", "settings": {"record": True}})
    served_right = 0
    for e in examples:
        r = call(base, "POST", "/v1/chat/completions", {
            "model": "smollm2-135m@bool", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": e["input"]}]})
        answer = r["choices"][0]["message"]["content"]
        right = answer.strip().lower().startswith(e["target"].lower())
        served_right += right
        call(base, "POST", "/v1/feedback", {"id": r["id"], "label": "good" if right else "bad",
                                            "expected": e["target"]})
    proc.terminate()
    proc.wait()

    # The same recorded traffic, twice: the gated arm as created, the ungated one with
    # `promote: always` written into its copy's settings.
    ungated = os.path.join(work, "ungated")
    shutil.copytree(exp, ungated)
    settings = os.path.join(ungated, "bool", "library.json")
    with open(settings) as f:
        s = json.load(f)
    s["promote"] = "always"
    with open(settings, "w") as f:
        json.dump(s, f)

    common = ["--library", "bool", "--from-traffic"]
    held_out = ["--limit", str(a.eval), "--max-tokens", "6", "--verifier", FIRST_WORD]
    arms = lambda r: {("library" if x["library"] else "none"): {"accuracy": x["accuracy"], "ci95": x["ci95"], "experiences": x["experiences"]} for x in r["arms"]}
    report = {"served": len(examples), "served_right": served_right, "eval_tasks": a.eval,
              "learn_tasks": a.learn, "gate_tasks": a.tasks - a.eval - a.learn,
              "before": arms(cli(exp, "eval", *common, *held_out))}
    for name, d, extra in [("gated", exp, ["--validation", str(a.tasks - a.eval - a.learn)]),
                           ("ungated", ungated, [])]:
        started = time.time()
        learned = cli(d, "learn", *common, "--offset", str(a.eval), "--limit", str(a.learn),
                      "--epochs", "1", "--batch-size", "8", "--group-size", "4",
                      "--temperature", "1.0", "--max-tokens", "6", "--learner-max-tokens", "128",
                      "--verifier", FIRST_WORD, *extra)
        wall = time.time() - started
        gates = [s.get("gate") for s in learned["steps"]]
        gate_calls = sum(g["comparison"]["cost"]["model_calls"] for g in gates
                         if g and g.get("comparison"))
        report[name] = {
            "steps": [{"step": s["step"], "version": s["version"], "added": s["added"],
                       "updated": s["updated"], "deleted": s["deleted"],
                       "gate": s["gate"]["outcome"] if s.get("gate") else None,
                       "reason": s["gate"]["reason"] if s.get("gate") else None}
                      for s in learned["steps"]],
            "version": learned["version"], "experiences": learned["experiences"],
            "cost": {**learned["cost"], "gate_model_calls": gate_calls, "wall_secs_total": round(wall, 1)},
            "after": arms(cli(d, "eval", *common, *held_out)),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
