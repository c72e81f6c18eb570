"""One way for benches to start experient: `with Server(config_toml) as s: s.post(...)`.

The server runs on a free port in a temporary experience directory, with the embedded model
unless the configuration names others, and is stopped when the block ends.
"""
import json
import os
import subprocess
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.environ.get("EXPERIENT_BINARY", os.path.join(ROOT, "target/release/experient"))


class Server:
    def __init__(self, config="", binary=BINARY, experience_dir=None, log="warn"):
        """`config` is the TOML text of the configuration."""
        self.work = tempfile.mkdtemp()
        self.exp = experience_dir or os.path.join(self.work, "experience")
        cfg = os.path.join(self.work, "config.toml")
        with open(cfg, "w") as f:
            f.write(config)
        self.cmd = [binary, "serve", "--addr", "127.0.0.1:0", "--experience-dir", self.exp,
                    "--config", cfg]
        self.env = dict(os.environ, EXPERIENT_LOG=log)

    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, text=True, env=self.env)
        self.base = next(l.split()[-1] for l in self.proc.stdout
                         if l.startswith("experient: listening on "))
        deadline = time.time() + 600
        while True:
            try:
                with urllib.request.urlopen(self.base + "/health") as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            if time.time() > deadline:
                raise RuntimeError("the server never became ready")
            time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()

    def call(self, method, path, body=None, timeout=3600):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def post(self, path, body, timeout=3600):
        return self.call("POST", path, body, timeout)

    def stop(self):
        self.__exit__(None, None, None)


def started(config="", **kw):
    """A running server, for benches that stop it themselves (`s.stop()`); `s.proc` and
    `s.base` as a Popen and a base URL."""
    return Server(config, **kw).__enter__()
