#!/usr/bin/env python3
"""Code-driven planning with and without its grammars, on the embedded model.

Runs `experient plan` twice on the same family, seeds and settings, once with `[methods]
constrain = false` (programs and direct action lists written freely, read by extraction) and
once with the default (each program one ```python block that closes within the token limit;
each direct reply a list of the family's own actions).

    cargo build --release
    python3 bench/plan_grammar.py [--env MiniGrid-Empty-5x5-v0] [--episodes 10] [--rounds 2]

Prints, per arm: the programs written (first and refinements) and how many of them ran on
at least one training instance without raising, the direct replies and how many of them held
no legal action or an unknown one, the success rates of direct elicitation and of the kept
program, and model calls and tokens.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.environ.get("EXPERIENT_BINARY", os.path.join(ROOT, "target/release/experient"))


def arm(name, args):
    work = tempfile.mkdtemp()
    cfg = os.path.join(work, "config.toml")
    with open(cfg, "w") as f:
        f.write(f"[methods]\nconstrain = {'true' if name == 'grammar' else 'false'}\n")
    out = os.path.join(work, "report.json")
    subprocess.run([BINARY, "plan", "--config", cfg, "--experience-dir", os.path.join(work, "exp"),
                    "--env", args.env, "--episodes", str(args.episodes), "--train", str(args.train),
                    "--rounds", str(args.rounds), "--refresh", "--out", out],
                   check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, EXPERIENT_LOG="warn"))
    with open(out) as f:
        r = json.load(f)
    rounds = r["rounds"]
    direct = r["direct"]["runs"]
    bad_direct = [d for d in direct if not d["actions"] or "unknown action" in d["played"].get("note", "")]
    return {
        "arm": name,
        "programs": len(rounds),
        "programs_that_ran": sum(1 for x in rounds if x["train"]["errors"] < x["train"]["instances"]),
        "first_errors": [e["error"][:80] for e in r["refined_program"]["runs"] if e.get("error")][:2],
        "program_success": r["refined_program"]["summary"]["success_rate"],
        "direct_replies": len(direct),
        "direct_unusable": len(bad_direct),
        "direct_success": r["direct"]["summary"]["success_rate"],
        "direct_mean_reward": round(r["direct"]["summary"]["mean_reward"], 3),
        "program_calls": r["model_calls"],
        "program_tokens": r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"],
        "direct_completion_tokens": r["direct_usage"]["completion_tokens"],
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--env", default="MiniGrid-Empty-5x5-v0")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--train", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--arms", default="free,grammar")
    args = p.parse_args()
    for name in args.arms.split(","):
        print(json.dumps(arm(name, args)), flush=True)


if __name__ == "__main__":
    main()
