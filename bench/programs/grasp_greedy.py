# A hand-written solve(obs) for GRASP, the ceiling for model-written programs: go to the
# nearest energy that can still be brought home within the action budget, take it, and
# return to drop everything when nothing more fits (or the carry limit is reached).
from collections import deque


def solve(obs):
    grid = obs["grid"]
    h, w = len(grid), len(grid[0])
    moves = [("UP", 0, -1), ("DOWN", 0, 1), ("LEFT", -1, 0), ("RIGHT", 1, 0)]
    if obs["diagonals"]:
        moves += [("UP_LEFT", -1, -1), ("UP_RIGHT", 1, -1), ("DOWN_LEFT", -1, 1), ("DOWN_RIGHT", 1, 1)]

    def search(x, y):
        prev = {(x, y): None}
        queue = deque([(x, y)])
        while queue:
            cx, cy = queue.popleft()
            for name, dx, dy in moves:
                nx, ny = cx + dx, cy + dy
                if 0 <= nx < w and 0 <= ny < h and grid[ny][nx] != "O" and (nx, ny) not in prev:
                    prev[(nx, ny)] = ((cx, cy), name)
                    queue.append((nx, ny))
        return prev

    def path(prev, target):
        out = []
        while prev[target] is not None:
            target, name = prev[target]
            out.append(name)
        out.reverse()
        return out

    sx, sy = obs["start"]
    home = search(sx, sy)
    left = {(x, y) for y in range(h) for x in range(w) if grid[y][x] == "E"}
    budget = obs["max_actions"]
    actions = []
    x, y, carried = sx, sy, 0
    while carried < obs["carry_limit"]:
        prev = search(x, y)
        best = None
        for cell in left:
            if cell in prev and cell in home:
                there = path(prev, cell)
                back = len(path(home, cell))
                if len(actions) + len(there) + 1 + back + 1 <= budget:
                    if best is None or len(there) < len(best[1]):
                        best = (cell, there)
        if best is None:
            break
        cell, there = best
        actions += there + ["TAKE"]
        left.remove(cell)
        x, y = cell
        carried += 1
    if carried > 0:
        back = path(search(x, y), (sx, sy))
        actions += back + ["DROP"]
    return actions
