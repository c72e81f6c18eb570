#!/usr/bin/env python3
"""Finding a lesson by meaning: experient's retrieval against BM25 alone and a peer's, on a
paraphrase set written for the purpose (bench/data/paraphrase.jsonl: 40 lessons, and for each
two questions that ask what the lesson answers, mostly in other words).

    cargo build --release
    pip install numpy rank_bm25
    python3 bench/retrieval.py

The lessons go into one library of the real server; every question is searched through
`GET /v1/libraries/{name}/experiences` in each mode. Ranking quality is measured with the
minimum similarity and diversity off (`min_score=-1`, `diversity=0`): recall@1/3/5 and MRR of
the question's own lesson. "As served" is the prior a request gets with the library's
defaults (at most `top_k` = 4, minimum similarity 0.25, diversity 0.3): how often its lesson
is in it, and how many lessons come with it.

The peers, on the same texts: Okapi BM25 from `rank_bm25` (what LangChain's BM25Retriever
runs), cosine over the same all-MiniLM-L6-v2 vectors (what a vector store returns), and
LangChain's EnsembleRetriever recipe (the two fused by reciprocal rank, equal weights).
Also printed: the latency of one search through the HTTP API, query embedding included.
"""
import json
import os
import re
import statistics
import sys
import time
import urllib.parse

import numpy as np
from rank_bm25 import BM25Okapi

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server import Server  # noqa: E402 - the benches' one way to start experient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "bench/data/paraphrase.jsonl")


def metrics(ranks):
    """recall@1/3/5 and MRR from each question's rank of its lesson (None: not found)."""
    n = len(ranks)
    at = lambda k: sum(1 for r in ranks if r is not None and r < k) / n
    mrr = sum(1 / (r + 1) for r in ranks if r is not None) / n
    return {"r@1": at(1), "r@3": at(3), "r@5": at(5), "mrr": mrr}


def rank_of(ids, want):
    return ids.index(want) if want in ids else None


def search(s, q, **params):
    query = urllib.parse.urlencode({"q": q, **params})
    return [h["id"] for h in s.call("GET", f"/v1/libraries/para/experiences?{query}")["data"]]


def words(t):
    return re.findall(r"\w+", t.lower())


def main():
    rows = [json.loads(l) for l in open(DATA)]
    lessons = [r["lesson"] for r in rows]
    questions = [(q, i) for i, r in enumerate(rows) for q in r["questions"]]
    results = {}
    with Server() as s:
        s.post("/v1/libraries", {"name": "para"})
        ids = [s.post("/v1/libraries/para/experiences", {"text": t})["id"] for t in lessons]
        while s.call("GET", "/v1/libraries/para")["vectors"]["count"] < len(ids):
            time.sleep(0.2)
        for mode in ["lexical", "semantic", "hybrid"]:
            ranks, times = [], []
            for q, i in questions:
                t = time.perf_counter()
                got = search(s, q, mode=mode, limit=10, min_score=-1, diversity=0)
                times.append(time.perf_counter() - t)
                ranks.append(rank_of(got, ids[i]))
            results[f"experient {mode}"] = metrics(ranks)
            results[f"experient {mode}"]["p50 ms"] = 1000 * statistics.median(times)
        served = [search(s, q, limit=4) for q, _ in questions]
        hit = sum(ids[i] in got for got, (_, i) in zip(served, questions)) / len(questions)
        mean_n = statistics.mean(len(g) for g in served)
        vectors = s.post("/v1/embeddings", {"model": "all-minilm-l6-v2",
                                            "input": lessons + [q for q, _ in questions]})
    v = np.array([d["embedding"] for d in vectors["data"]], dtype=np.float32)
    lv, qv = v[: len(lessons)], v[len(lessons):]
    bm25 = BM25Okapi([words(t) for t in lessons])
    peer = {"bm25": [], "dense": [], "ensemble": []}
    for (q, i), vec in zip(questions, qv):
        lex = list(np.argsort(-bm25.get_scores(words(q)), kind="stable")[:10])
        den = list(np.argsort(-(lv @ vec), kind="stable")[:10])
        fused = {}
        for ranking in (lex, den):
            for r, d in enumerate(ranking):
                fused[d] = fused.get(d, 0) + 1 / (60 + r + 1)
        ens = sorted(fused, key=lambda d: -fused[d])[:10]
        for name, ranking in (("bm25", lex), ("dense", den), ("ensemble", ens)):
            peer[name].append(rank_of([int(x) for x in ranking], i))
    results["rank_bm25 (Okapi)"] = metrics(peer["bm25"])
    results["dense cosine (vector store)"] = metrics(peer["dense"])
    results["LangChain ensemble (BM25+dense RRF)"] = metrics(peer["ensemble"])

    print(f"{len(questions)} questions, {len(lessons)} lessons\n")
    print(f"{'retriever':38} {'r@1':>6} {'r@3':>6} {'r@5':>6} {'MRR':>6} {'p50 ms':>7}")
    for name, m in results.items():
        p50 = f"{m['p50 ms']:7.1f}" if "p50 ms" in m else ""
        print(f"{name:38} {m['r@1']:6.3f} {m['r@3']:6.3f} {m['r@5']:6.3f} {m['mrr']:6.3f} {p50}")
    print(f"\nas served (hybrid, top_k 4, min_score 0.25, diversity 0.3): lesson in the prior "
          f"{hit:.3f}, {mean_n:.2f} lessons per prior")


if __name__ == "__main__":
    main()
