#!/usr/bin/env python3
"""/v1/embeddings against an independent reference: all-MiniLM-L6-v2 computed here in NumPy.

The reference reads the same model folder (the cache's `models/all-minilm-l6-v2`), tokenizes
with Hugging Face's `tokenizers` (cut at 256 tokens, as sentence-transformers does) and runs
BERT in float64: embeddings, six post-norm encoder layers with exact GELU, mean pooling over
the tokens, L2 normalisation (the model's sentence-transformers modules). It then asks a
running experient for the same texts and prints the largest difference per text and the
cosine similarities the two agree on.

    pip install numpy tokenizers
    target/release/experient serve --addr 127.0.0.1:18181 --experience-dir /tmp/e &
    python3 bench/embedding_reference.py [--base http://127.0.0.1:18181]
"""
import argparse
import json
import os
import struct
import urllib.request

import numpy as np
from tokenizers import Tokenizer

TEXTS = [
    "A man is eating food.",
    "Someone eats a meal.",
    "The stock market fell sharply today.",
    "When a question has nested brackets, evaluate the innermost ones first.",
    "",  # replaced below: a long input
]
TEXTS[-1] = " ".join(["Lessons learned from many attempts at arithmetic word problems."] * 12)


def load(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in header.items():
        # Buffers (position ids, as I64) are not weights.
        if k == "__metadata__" or v["dtype"] != "F32":
            continue
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(data[a:b], dtype="<f4").reshape(v["shape"]).astype(np.float64)
    return out


def layer_norm(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x):
    from math import erf, sqrt
    return 0.5 * x * (1 + np.vectorize(erf)(x / sqrt(2)))


def embed(w, ids, heads=12):
    p = "" if "embeddings.word_embeddings.weight" in w else "bert."
    g = lambda k: w[p + k]
    x = g("embeddings.word_embeddings.weight")[ids] + g("embeddings.position_embeddings.weight")[: len(ids)] \
        + g("embeddings.token_type_embeddings.weight")[0]
    x = layer_norm(x, g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"))
    d = x.shape[1]
    hd = d // heads
    for i in range(6):
        L = lambda k: g(f"encoder.layer.{i}.{k}")
        lin = lambda h, k: h @ L(k + ".weight").T + L(k + ".bias")
        q, k, v = (lin(x, f"attention.self.{n}").reshape(-1, heads, hd).transpose(1, 0, 2) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(-1, d)
        x = layer_norm(lin(a, "attention.output.dense") + x, L("attention.output.LayerNorm.weight"), L("attention.output.LayerNorm.bias"))
        h = gelu(lin(x, "intermediate.dense"))
        x = layer_norm(lin(h, "output.dense") + x, L("output.LayerNorm.weight"), L("output.LayerNorm.bias"))
    m = x.mean(0)
    return m / np.linalg.norm(m)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:18181")
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    ap.add_argument("--model-dir", default=os.path.join(cache, "experient/models/all-minilm-l6-v2"))
    a = ap.parse_args()
    w = load(os.path.join(a.model_dir, "model.safetensors"))
    tok = Tokenizer.from_file(os.path.join(a.model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)
    ref = np.array([embed(w, tok.encode(t).ids) for t in TEXTS])
    body = json.dumps({"model": "all-minilm-l6-v2", "input": TEXTS}).encode()
    req = urllib.request.Request(a.base + "/v1/embeddings", data=body, headers={"content-type": "application/json"})
    got = np.array([d["embedding"] for d in json.load(urllib.request.urlopen(req))["data"]])
    for t, r, g in zip(TEXTS, ref, got):
        print(f"{len(tok.encode(t).ids):4d} tokens  max |difference| {np.abs(r - g).max():.2e}  cosine {r @ g:.6f}  {t[:50]!r}")
    print("cosine matrix, reference:\n", np.round(ref @ ref.T, 4))
    print("cosine matrix, experient:\n", np.round(got @ got.T, 4))


if __name__ == "__main__":
    main()
