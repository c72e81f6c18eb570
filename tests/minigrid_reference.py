#!/usr/bin/env python3
"""Runs MiniGrid levels in the real `minigrid` package for tests/minigrid.rs.

Reads a JSON list of {"id", "seed", "actions"} on stdin; for each, resets the level with the
seed, steps the actions (stopping at the end of the episode) and prints what the package saw:
the encoded grid, the agent and what it carries, and every step's reward and flags.
"""
import json
import sys

import gymnasium as gym
import minigrid  # noqa: F401  (registers the MiniGrid-* ids)


def state(env):
    u = env.unwrapped
    return {
        "grid": u.grid.encode().tolist(),
        "agent": [int(v) for v in u.agent_pos],
        "dir": int(u.agent_dir),
        "carrying": list(u.carrying.encode()) if u.carrying else None,
    }


def main():
    out = []
    for case in json.load(sys.stdin):
        env = gym.make(case["id"])
        env.reset(seed=case["seed"])
        run = {"initial": state(env), "steps": []}
        for a in case["actions"]:
            _, reward, terminated, truncated, _ = env.step(a)
            step = state(env)
            step.update(reward=float(reward), terminated=bool(terminated), truncated=bool(truncated))
            run["steps"].append(step)
            if terminated or truncated:
                break
        out.append(run)
        env.close()
    # One write: json.dump writes every small piece of the encoding with its own call.
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    main()
