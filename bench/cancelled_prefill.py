#!/usr/bin/env python3
"""What a client that gives up on a long prompt still costs the server, with chunked prefill
off and on, in one run.

For each `prefill_chunk`, a server on the embedded model is sent one streaming request with a
long prompt (`--prompt-tokens`); the client closes its connection `--leave-after` seconds in,
well inside the prefill. The server's CPU time (user + system, from /proc) is then read every
2 s: a server still prefilling for nobody keeps its cores busy, an idle one uses next to none.

    cargo build --release
    python3 bench/cancelled_prefill.py [--prompt-tokens 2000] [--chunks 0,64] [--leave-after 1.5]
"""
import argparse
import json
import os
import socket
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from local_speed import Experient, model_path  # noqa: E402
from prefill_stall import long_prompt  # noqa: E402


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def leave_during_prefill(base, prompt, leave_after):
    """Sends a streaming request and closes the connection after `leave_after` seconds."""
    url = urllib.parse.urlparse(base)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": 16, "stream": True}).encode()
    s = socket.create_connection((url.hostname, url.port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    time.sleep(leave_after)
    s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--chunks", default="0,64")
    ap.add_argument("--leave-after", type=float, default=1.5)
    ap.add_argument("--samples", type=int, default=6)
    args = ap.parse_args()
    path, prompt = model_path(), long_prompt(args.prompt_tokens)
    for chunk in args.chunks.split(","):
        server = Experient(path, 8, f"prefill_chunk = {chunk}\n")
        try:
            leave_during_prefill(server.base, prompt, args.leave_after)
            start, marks = cpu_seconds(server.proc.pid), []
            for _ in range(args.samples):
                time.sleep(2)
                marks.append(round(cpu_seconds(server.proc.pid) - start, 1))
        finally:
            server.close()
        print(f"prefill_chunk={chunk}: server CPU seconds since the client left, every 2 s: {marks}")


if __name__ == "__main__":
    sys.exit(main())
