# A hand-written solve(obs) for the MiniGrid levels, used as the ceiling a model-written
# program can reach: breadth-first search over (position, direction, key taken, door open).
from collections import deque

DIRS = {"right": 0, "down": 1, "left": 2, "up": 3}
STEP = [(1, 0), (0, 1), (-1, 0), (0, -1)]


def solve(obs):
    grid = obs["grid"]
    x0, y0 = obs["agent"]
    d0 = DIRS[obs["direction"]]
    open_only = obs["mission"] == "open the door"
    start = (x0, y0, d0, False, False)
    prev = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        x, y, d, key, door = state
        fx, fy = x + STEP[d][0], y + STEP[d][1]
        front = grid[fy][fx]
        if front == "KEY" and key:
            front = ""
        if front in ("LOCKED_DOOR", "CLOSED_DOOR") and door:
            front = "OPEN_DOOR"
        moves = [("left", (x, y, (d + 3) % 4, key, door)), ("right", (x, y, (d + 1) % 4, key, door))]
        if front in ("", "GOAL", "OPEN_DOOR"):
            moves.append(("forward", (fx, fy, d, key, door)))
        if front == "KEY" and not key:
            moves.append(("pickup", (x, y, d, True, door)))
        if (front == "LOCKED_DOOR" and key) or front == "CLOSED_DOOR":
            moves.append(("toggle", (x, y, d, key, True)))
        for action, nxt in moves:
            if nxt in prev:
                continue
            prev[nxt] = (state, action)
            won = (action == "forward" and front == "GOAL") or (open_only and action == "toggle")
            if won:
                actions = []
                s = nxt
                while prev[s] is not None:
                    s, a = prev[s]
                    actions.append(a)
                actions.reverse()
                return actions
            queue.append(nxt)
    return []
