"""Replicas on PostgreSQL against the file store, in one run on identical work.

    python3 bench/replicas.py [--writes 200] [--writers 4] [--searches 300] [--lag 100]

Starts a PostgreSQL cluster in a temporary directory (Debian's binaries; as the postgres user
when run as root), one experient on the file store and two on the database, then measures on
each store: commit throughput (concurrent writers adding experiences to one library), the
latency of one write, the latency of a search, and for the database the replication lag (a
write on replica A until a search on replica B finds it). Prints a Markdown table.
"""
import argparse
import concurrent.futures as cf
import glob
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

from server import Server


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A throwaway cluster: initdb, pg_ctl start on a free port, stopped at exit."""

    def __init__(self):
        self.bin = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
        self.dir = tempfile.mkdtemp()
        self.root = os.geteuid() == 0
        if self.root:
            subprocess.run(["chown", "-R", "postgres:postgres", self.dir], check=True)
        self.port = free_port()

    def run(self, tool, *args):
        cmd = [os.path.join(self.bin, tool), *args]
        if self.root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    def __enter__(self):
        data = os.path.join(self.dir, "data")
        self.run("initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8")
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self.run("pg_ctl", "-D", data, "-o", opts, "-l", os.path.join(self.dir, "log"), "-w",
                 "start")
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def __exit__(self, *exc):
        self.run("pg_ctl", "-D", os.path.join(self.dir, "data"), "-m", "fast", "stop")


def call(base, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"null")


def timed(f):
    t0 = time.perf_counter()
    f()
    return (time.perf_counter() - t0) * 1000


def writes(base, lib, n, writers):
    """Commits per second with `writers` at once, and each write's latency in ms."""
    def one(i):
        return timed(lambda: call(base, "POST", f"/v1/libraries/{lib}/experiences",
                                  {"text": f"Lesson {i}: check the unit of quantity{i} first."}))
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(writers) as ex:
        lat = list(ex.map(one, range(n)))
    return n / (time.perf_counter() - t0), lat


def searches(base, lib, n):
    return [timed(lambda i=i: call(base, "GET",
                                   f"/v1/libraries/{lib}/experiences?q=quantity{i % 200}&limit=4"))
            for i in range(n)]


def lag(a, b, lib, n):
    """ms from a write acknowledged on A until B's search finds it."""
    out = []
    for i in range(n):
        word = f"lagword{i}x"
        call(a, "POST", f"/v1/libraries/{lib}/experiences", {"text": f"Follow {word} closely."})
        t0 = time.perf_counter()
        while True:
            hits = call(b, "GET", f"/v1/libraries/{lib}/experiences?q={word}&mode=lexical")
            if hits["data"]:
                break
            if time.perf_counter() - t0 > 5:
                raise RuntimeError(f"{word} not on B after 5 s")
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--writes", type=int, default=200)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--searches", type=int, default=300)
    ap.add_argument("--lag", type=int, default=100)
    a = ap.parse_args()
    rows = []
    with Postgres() as url:
        files = Server()
        shared = [Server(), Server()]
        for s in shared:
            s.env["EXPERIENT_DATABASE_URL"] = url
        with files, shared[0], shared[1]:
            for name, s in [("files", files), ("postgres", shared[0])]:
                call(s.base, "POST", "/v1/libraries", {"name": "bench"})
                rate, wl = writes(s.base, "bench", a.writes, a.writers)
                _, single = writes(s.base, "bench", a.writes // 4, 1)
                sl = searches(s.base, "bench", a.searches)
                row = {"store": name, "commits/s": rate, "write p50": pct(single, 50),
                       "write p99": pct(single, 99), "search p50": pct(sl, 50),
                       "search p99": pct(sl, 99)}
                if name == "postgres":
                    ll = lag(shared[0].base, shared[1].base, "bench", a.lag)
                    row["lag p50"], row["lag p99"] = pct(ll, 50), pct(ll, 99)
                rows.append(row)
    print(f"\n{a.writes} writes by {a.writers} writers; single-writer latency over "
          f"{a.writes // 4}; {a.searches} searches; lag over {a.lag} writes (ms)\n")
    cols = ["store", "commits/s", "write p50", "write p99", "search p50", "search p99",
            "lag p50", "lag p99"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [r["store"]] + [f"{r[c]:.1f}" if c in r else "n/a" for c in cols[1:]]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
