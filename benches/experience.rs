//! Experience store benchmarks: search latency (p50/p99) at 1k, 10k and 100k experiences,
//! lexical (BM25) with and without the search cache, and hybrid (BM25 and 384-dimensional
//! vectors fused, exact search up to 5,000 rows, HNSW past it); write throughput (each write
//! fsynced and indexed).
//!
//! Run: `cargo bench --bench experience`. Criterion reports the mean and median; the p50/p99
//! lines are printed from 5,000 timed searches per size. The hybrid figures leave out making
//! the query's vector (the embedding model's forward pass, measured by bench/retrieval.py):
//! vectors here are random unit vectors, which cost the search what real ones do.

use std::time::{Duration, Instant};

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use experient::experience::retrieve::{Mode, RetrievalOverride};
use experient::experience::vectors::{text_hash, Embed};
use experient::experience::{Change, Provenance, Query, Source, Store, StoreOptions};

/// Random unit vectors of all-MiniLM-L6-v2's length, seeded by the text.
struct Random;

#[async_trait::async_trait]
impl Embed for Random {
    fn model(&self) -> String {
        "random-384".into()
    }
    async fn embed(&self, texts: Vec<String>, _: bool) -> experient::error::Result<Vec<Vec<f32>>> {
        Ok(texts
            .iter()
            .map(|t| {
                let mut rng = Rng(text_hash(t) | 1);
                let v: Vec<f32> = (0..384)
                    .map(|_| (rng.next() % 2001) as f32 - 1000.0)
                    .collect();
                let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.into_iter().map(|x| x / n).collect()
            })
            .collect())
    }
}

const WORDS: &[&str] = &[
    "units",
    "convert",
    "minutes",
    "hours",
    "percent",
    "discount",
    "price",
    "total",
    "average",
    "ratio",
    "fraction",
    "divide",
    "multiply",
    "subtract",
    "remainder",
    "interest",
    "rate",
    "distance",
    "speed",
    "time",
    "area",
    "perimeter",
    "volume",
    "weight",
    "cost",
    "profit",
    "loss",
    "share",
    "equal",
    "groups",
    "twice",
    "half",
    "double",
    "triple",
    "each",
    "every",
    "per",
    "week",
    "month",
    "year",
    "day",
    "people",
    "students",
    "apples",
    "boxes",
    "pages",
    "check",
    "verify",
    "estimate",
    "restate",
    "question",
    "answer",
    "step",
    "equation",
    "carefully",
    "first",
    "before",
    "after",
    "compare",
    "largest",
    "smallest",
    "difference",
];

/// A small deterministic generator, so every run indexes the same texts.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 as usize
    }
    fn words(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| WORDS[self.next() % WORDS.len()])
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn library(n: usize, cache_bytes: u64) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreOptions {
            cache_bytes,
            ..Default::default()
        },
    )
    .unwrap();
    store.create("bench").unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let changes = (0..n)
        .map(|i| Change::Add {
            text: format!("Lesson {i}: {}.", rng.words(14)),
            tags: vec![format!("t{}", i % 10)],
            source: Source::Imported,
            provenance: Provenance::default(),
        })
        .collect();
    store.commit("bench", "bulk import", changes).unwrap();
    (dir, store)
}

/// A search of `q` for 8, lexical, or hybrid with the query's vector.
fn ask<'a>(q: &'a str, vector: Option<&'a [f32]>) -> Query<'a> {
    Query {
        vector,
        retrieval: RetrievalOverride {
            mode: Some(if vector.is_some() {
                Mode::Hybrid
            } else {
                Mode::Lexical
            }),
            ..Default::default()
        },
        ..Query::text(q, 8)
    }
}

fn percentiles(
    store: &Store,
    queries: &[String],
    vectors: &[Option<Vec<f32>>],
) -> (Duration, Duration) {
    let mut times: Vec<Duration> = queries
        .iter()
        .zip(vectors)
        .map(|(q, v)| {
            let t = Instant::now();
            let hits = store.search("bench", &ask(q, v.as_deref())).unwrap();
            let e = t.elapsed();
            std::hint::black_box(hits);
            e
        })
        .collect();
    times.sort();
    (times[times.len() / 2], times[times.len() * 99 / 100])
}

fn search(c: &mut Criterion) {
    let mut group = c.benchmark_group("search");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(3));
    for n in [1_000, 10_000, 100_000] {
        let mut rng = Rng(42);
        let queries: Vec<String> = (0..5000).map(|_| rng.words(3)).collect();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let none = vec![None; queries.len()];
        let vectors: Vec<Option<Vec<f32>>> = runtime
            .block_on(Random.embed(queries.clone(), false))
            .unwrap()
            .into_iter()
            .map(Some)
            .collect();
        for (label, cache, hybrid) in [
            ("uncached", 0, false),
            ("cached", 64 << 20, false),
            ("hybrid", 0, true),
        ] {
            let (_dir, store) = library(n, cache);
            let store = Arc::new(store);
            let qv = if hybrid {
                runtime.block_on(embed_all(&store, n));
                &vectors
            } else {
                &none
            };
            // Warm the cache (when there is one) and the OS page cache.
            let _ = percentiles(&store, &queries, qv);
            let (p50, p99) = percentiles(&store, &queries, qv);
            println!("search {label} n={n}: p50 {p50:?} p99 {p99:?}");
            let mut i = 0;
            group.bench_with_input(BenchmarkId::new(label, n), &n, |b, _| {
                b.iter(|| {
                    i = (i + 1) % queries.len();
                    store
                        .search("bench", &ask(&queries[i], qv[i].as_deref()))
                        .unwrap()
                })
            });
        }
    }
    group.finish();
}

/// Gives every experience its vector, and waits for the graph when one is built.
async fn embed_all(store: &Arc<Store>, n: usize) {
    let t = Instant::now();
    store.start_embedding(Arc::new(Random));
    let lib = store.library("bench").unwrap();
    while lib.vector_status().count < n || lib.vectors_building() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "vectors n={n}: made and indexed in {:?}, searched {}",
        t.elapsed(),
        lib.vector_status().search
    );
}

fn writes(c: &mut Criterion) {
    let mut group = c.benchmark_group("write");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for n in [1_000, 100_000] {
        let (_dir, store) = library(n, 64 << 20);
        let mut rng = Rng(7);
        group.bench_with_input(BenchmarkId::new("add", n), &n, |b, _| {
            b.iter(|| {
                store
                    .add("bench", &format!("New lesson: {}.", rng.words(12)), vec![])
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, search, writes);
criterion_main!(benches);
