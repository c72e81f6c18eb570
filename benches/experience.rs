//! Experience store benchmarks: search latency (p50/p99) at 1k, 10k and 100k experiences,
//! with and without the search cache, and write throughput (each write fsynced and indexed).
//!
//! Run: `cargo bench --bench experience`. Criterion reports the mean and median; the p50/p99
//! lines are printed from 5,000 timed searches per size.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use experient::experience::{Change, Provenance, Source, Store, StoreOptions};

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

fn percentiles(store: &Store, queries: &[String]) -> (Duration, Duration) {
    let mut times: Vec<Duration> = queries
        .iter()
        .map(|q| {
            let t = Instant::now();
            let hits = store.search("bench", Some(q), None, 8).unwrap();
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
        for (label, cache) in [("uncached", 0), ("cached", 64 << 20)] {
            let (_dir, store) = library(n, cache);
            // Warm the cache (when there is one) and the OS page cache.
            let _ = percentiles(&store, &queries);
            let (p50, p99) = percentiles(&store, &queries);
            println!("search {label} n={n}: p50 {p50:?} p99 {p99:?}");
            let mut i = 0;
            group.bench_with_input(BenchmarkId::new(label, n), &n, |b, _| {
                b.iter(|| {
                    i = (i + 1) % queries.len();
                    store.search("bench", Some(&queries[i]), None, 8).unwrap()
                })
            });
        }
    }
    group.finish();
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
