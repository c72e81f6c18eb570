#!/usr/bin/env python3
"""Learning from traffic on the embedded model, measured: serve BBH boolean_expressions tasks
through a recording library, give each answer feedback with the right answer, then offline
evaluate on that traffic (with and without the library), learn from it with the shipped
learner prompts, and evaluate again.

    cargo build --release
    python3 bench/traffic_loop.py [--tasks 40] [--eval 20]

The first --eval scored records are held out for evaluation; learning uses the rest. Prints
one JSON object with both evaluations and what learning changed.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

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
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--eval", type=int, default=20)
    a = ap.parse_args()
    with open(os.path.join(ROOT, "tests/data/boolean_expressions.json")) as f:
        examples = json.load(f)["examples"][: a.tasks]

    work = tempfile.mkdtemp()
    exp = os.path.join(work, "experience")
    # One client gives all the feedback here, faster than the default per-key rate allows.
    config = os.path.join(work, "config.toml")
    with open(config, "w") as f:
        f.write("[traffic]\nfeedback_per_minute = 100000\n")
    proc = subprocess.Popen([BINARY, "serve", "--addr", "127.0.0.1:0", "--experience-dir", exp,
                             "--config", config], stdout=subprocess.PIPE, text=True)
    base = next(l.split()[-1] for l in proc.stdout if l.startswith("experient: listening on "))
    while True:
        try:
            call(base, "GET", "/health")
            break
        except Exception:
            time.sleep(0.3)
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

    common = ["--library", "bool", "--from-traffic"]
    before = cli(exp, "eval", *common, "--limit", str(a.eval), "--max-tokens", "6",
                 "--verifier", FIRST_WORD)
    learned = cli(exp, "learn", *common, "--offset", str(a.eval), "--epochs", "1",
                  "--batch-size", "8", "--group-size", "4", "--temperature", "1.0",
                  "--max-tokens", "6", "--learner-max-tokens", "128", "--verifier", FIRST_WORD)
    after = cli(exp, "eval", *common, "--limit", str(a.eval), "--max-tokens", "6",
                "--verifier", FIRST_WORD)
    arms = lambda r: {("library" if x["library"] else "none"): {"accuracy": x["accuracy"], "ci95": x["ci95"], "experiences": x["experiences"]} for x in r["arms"]}
    print(json.dumps({
        "served": len(examples), "served_right": served_right,
        "eval_tasks": a.eval,
        "before": arms(before),
        "learning": {"steps": len(learned["steps"]), "version": learned["version"],
                     "experiences": learned["experiences"],
                     "mixed_groups": sum(s["mixed_groups"] for s in learned["steps"])},
        "after": arms(after),
    }, indent=2))


if __name__ == "__main__":
    main()
