//! Sentence vectors of one library's experiences, for finding a lesson by meaning.
//!
//! Like the full-text index, vectors are derived data: they live beside the log in
//! `.vectors.safetensors`, each row tagged with the id and a digest of the text it was made
//! from, and a row whose text has changed (or whose model is not the one serving) is stale and
//! made again. Nothing is lost when the file is: it is rebuilt from the log.
//!
//! A library is searched exactly (one dot product per experience) up to
//! `store.exact_search_up_to` experiences; past that an HNSW graph (instant-distance) answers,
//! rebuilt in the background once a tenth of the rows have changed since it was built, and the
//! rows changed since are searched exactly beside it, so a new lesson is found at once.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use instant_distance::{Builder, HnswMap, Search};
use parking_lot::{Mutex, RwLock};
use sha2::{Digest, Sha256};

use super::log::write_atomic;
use crate::error::{Error, Result};

/// The file a library's vectors are kept in.
pub const FILE: &str = ".vectors.safetensors";

/// Rows up to which a library is searched exactly, unless `embeddings.exact_search_up_to` says
/// otherwise: the scan is bound by memory (1.5 KB a row), some 1.2 ms at 5,000 rows on the
/// 2-core CI machine and 2.5 ms at 10,000 (benches/experience.rs).
pub const DEFAULT_EXACT_UP_TO: usize = 5_000;

/// Rows past which a write of the vectors waits for the next quiet moment (a minute) rather
/// than following every change: the file of 100,000 experiences is some 150 MB.
const SAVE_EVERY_CHANGE_UP_TO: usize = 10_000;

/// What turns texts into unit vectors: the server's embedding model, local or upstream.
#[async_trait::async_trait]
pub trait Embed: Send + Sync {
    /// The model's name; vectors made by another model are stale.
    fn model(&self) -> String;
    /// Unit vectors for `texts`, in order. Texts longer than the model takes are cut, as
    /// sentence-transformers cuts them. `background` work waits behind clients.
    async fn embed(&self, texts: Vec<String>, background: bool) -> Result<Vec<Vec<f32>>>;
}

/// The digest a row is tagged with: the first 8 bytes of the text's SHA-256.
pub fn text_hash(text: &str) -> u64 {
    let d = Sha256::digest(text.as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("a digest has 32 bytes"))
}

/// The last `chars` characters of `text`: what a question's vector is made from when it is
/// long, since its end holds what is being asked now.
pub fn tail(text: &str, chars: usize) -> &str {
    match text.char_indices().rev().nth(chars) {
        Some((cut, _)) => &text[cut..],
        None => text,
    }
}

/// The dot product, in eight lanes so that the compiler vectorises it (the exact search's
/// whole cost).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// A vector as the HNSW graph holds it; the distance of unit vectors is 1 - cosine.
#[derive(Clone)]
struct Unit(Arc<[f32]>);

impl instant_distance::Point for Unit {
    fn distance(&self, other: &Self) -> f32 {
        1.0 - dot(&self.0, &other.0)
    }
}

/// The rows, one contiguous matrix so that the exact search streams through memory.
#[derive(Default)]
struct Table {
    model: String,
    dims: usize,
    ids: Vec<String>,
    hashes: Vec<u64>,
    data: Vec<f32>,
    pos: HashMap<String, usize>,
    /// Counts changes; `changed` says at which count each row last changed, so that rows
    /// newer than the graph are searched exactly.
    changes: u64,
    changed: HashMap<String, u64>,
}

impl Table {
    fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dims..(i + 1) * self.dims]
    }

    fn remove(&mut self, id: &str) {
        let Some(i) = self.pos.remove(id) else { return };
        let last = self.ids.len() - 1;
        if i != last {
            self.ids.swap(i, last);
            self.hashes.swap(i, last);
            let d = self.dims;
            let (head, tail) = self.data.split_at_mut(last * d);
            head[i * d..(i + 1) * d].copy_from_slice(&tail[..d]);
            self.pos.insert(self.ids[i].clone(), i);
        }
        self.ids.pop();
        self.hashes.pop();
        self.data.truncate(last * self.dims);
        self.changed.remove(id);
    }

    fn insert(&mut self, id: String, hash: u64, v: &[f32]) {
        self.changes += 1;
        self.changed.insert(id.clone(), self.changes);
        match self.pos.get(&id) {
            Some(&i) => {
                self.hashes[i] = hash;
                let d = self.dims;
                self.data[i * d..(i + 1) * d].copy_from_slice(v);
            }
            None => {
                self.pos.insert(id.clone(), self.ids.len());
                self.ids.push(id);
                self.hashes.push(hash);
                self.data.extend_from_slice(v);
            }
        }
    }
}

/// The approximate index over the rows as they were at change count `built_at`.
struct Ann {
    map: HnswMap<Unit, String>,
    built_at: u64,
}

/// One library's vectors.
pub struct Vectors {
    path: Option<PathBuf>,
    table: RwLock<Table>,
    /// Shared with the thread that builds the next graph, which puts it here when done.
    ann: Arc<RwLock<Option<Ann>>>,
    /// Rows up to which search is exact.
    exact_up_to: std::sync::atomic::AtomicUsize,
    building: Arc<AtomicBool>,
    /// Set when the library changed and its vectors may be behind.
    stale: AtomicBool,
    /// Counts updates, for caches of search results.
    generation: AtomicU64,
    last_save: Mutex<Option<std::time::Instant>>,
    unsaved: AtomicBool,
}

/// A library's vectors as the API shows them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// The model that made them; none before the first are made.
    pub model: Option<String>,
    pub count: usize,
    /// `exact` up to `embeddings.exact_search_up_to` experiences, `approximate` (HNSW) past it.
    pub search: &'static str,
}

/// What a refresh has to do: rows to make (id, digest, text) and rows to drop.
pub struct Work {
    pub model: String,
    pub missing: Vec<(String, u64, String)>,
    pub gone: Vec<String>,
}

impl Vectors {
    /// The vectors kept at `path` (none when it is missing or unreadable: they are rebuilt),
    /// or held in memory only when `path` is `None`.
    pub fn open(path: Option<PathBuf>, exact_up_to: usize) -> Vectors {
        let table = path
            .as_ref()
            .and_then(|p| match read(p) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(file = %p.display(), error = %e, "rebuilding unreadable vectors");
                    None
                }
            })
            .unwrap_or_default();
        Vectors {
            path,
            table: RwLock::new(table),
            ann: Arc::new(RwLock::new(None)),
            exact_up_to: exact_up_to.into(),
            building: Arc::new(AtomicBool::new(false)),
            stale: AtomicBool::new(true),
            generation: AtomicU64::new(0),
            last_save: Mutex::new(None),
            unsaved: AtomicBool::new(false),
        }
    }

    /// Rows up to which search is exact.
    pub fn exact_up_to(&self) -> usize {
        self.exact_up_to.load(Ordering::Relaxed)
    }

    /// Sets the rows up to which search is exact (a graph is built past it).
    pub fn set_exact_up_to(&self, n: usize) {
        self.exact_up_to.store(n, Ordering::Relaxed);
        self.maybe_build_ann();
    }

    /// Marks the vectors as possibly behind the library.
    pub fn mark_stale(&self) {
        self.stale.store(true, Ordering::SeqCst);
    }

    /// Clears the stale mark, returning whether it was set.
    pub fn take_stale(&self) -> bool {
        self.stale.swap(false, Ordering::SeqCst)
    }

    /// Counts updates: a search result cached under another generation may be out of date.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// How many rows there are, the model that made them, and how they are searched.
    pub fn status(&self) -> Status {
        let t = self.table.read();
        Status {
            model: (!t.model.is_empty()).then(|| t.model.clone()),
            count: t.ids.len(),
            search: match self.ann.read().is_some() && t.ids.len() > self.exact_up_to() {
                true => "approximate",
                false => "exact",
            },
        }
    }

    /// What must change for the rows to match `current` (id, text) as `model` embeds them.
    pub fn work<'a>(&self, model: &str, current: impl Iterator<Item = (&'a str, &'a str)>) -> Work {
        let t = self.table.read();
        let same_model = t.model == model;
        let mut seen = HashSet::new();
        let mut missing = Vec::new();
        for (id, text) in current {
            seen.insert(id);
            let hash = text_hash(text);
            let fresh = same_model && t.pos.get(id).is_some_and(|&i| t.hashes[i] == hash);
            if !fresh {
                missing.push((id.to_owned(), hash, text.to_owned()));
            }
        }
        let gone = t
            .ids
            .iter()
            .filter(|id| !seen.contains(id.as_str()))
            .cloned()
            .collect();
        Work {
            model: model.to_owned(),
            missing,
            gone,
        }
    }

    /// Drops the rows of `gone` and sets those of `made` (id, digest, vector). Rows of another
    /// model or length are all dropped first.
    pub fn update(&self, model: &str, gone: &[String], made: Vec<(String, u64, Vec<f32>)>) {
        {
            let mut t = self.table.write();
            let dims = made.first().map(|m| m.2.len()).unwrap_or(t.dims);
            if t.model != model || (t.dims != dims && !made.is_empty()) {
                // The change count goes on, so that a graph of the old rows never passes for
                // one of the new.
                *t = Table {
                    model: model.to_owned(),
                    dims,
                    changes: t.changes,
                    ..Default::default()
                };
                *self.ann.write() = None;
            }
            for id in gone {
                t.remove(id);
            }
            for (id, hash, v) in made {
                if v.len() == t.dims {
                    t.insert(id, hash, &v);
                }
            }
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.unsaved.store(true, Ordering::SeqCst);
    }

    /// Called once a refresh is done: builds the graph when one is due (not after every
    /// batch, which during a bulk import would rebuild it again and again).
    pub fn settle(&self) {
        self.maybe_build_ann();
    }

    /// Drops the rows of `ids` at once, when their experiences change: until the refresher
    /// makes the new vectors, a search must not rank them by their old text.
    pub fn forget(&self, ids: &[&str]) {
        let mut t = self.table.write();
        if !ids.iter().any(|id| t.pos.contains_key(*id)) {
            return;
        }
        for id in ids {
            t.remove(id);
        }
        drop(t);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.unsaved.store(true, Ordering::SeqCst);
    }

    /// The vector of experience `id` when it was made from `text`.
    pub fn get(&self, id: &str, text: &str) -> Option<Vec<f32>> {
        let t = self.table.read();
        let &i = t.pos.get(id)?;
        (t.hashes[i] == text_hash(text)).then(|| t.row(i).to_vec())
    }

    /// The `k` rows nearest to unit vector `q` that `keep` admits, best first, with their
    /// cosine similarity.
    pub fn nearest(&self, q: &[f32], k: usize, keep: &dyn Fn(&str) -> bool) -> Vec<(String, f32)> {
        let t = self.table.read();
        if t.dims != q.len() || k == 0 {
            return Vec::new();
        }
        let ann = self.ann.read();
        let mut best = TopK::new(k);
        match ann.as_ref() {
            Some(a) if t.ids.len() > self.exact_up_to() => {
                let mut search = Search::default();
                for item in a.map.search(&Unit(q.into()), &mut search) {
                    if let Some(&i) = t.pos.get(item.value.as_str()) {
                        if keep(&t.ids[i]) {
                            best.push(dot(q, t.row(i)), i);
                        }
                    }
                }
                // Rows changed since the graph was built are not in it (or are there with
                // their old vector): they are searched exactly.
                for (id, &at) in &t.changed {
                    if at > a.built_at && keep(id) {
                        let i = t.pos[id];
                        best.push(dot(q, t.row(i)), i);
                    }
                }
            }
            _ => {
                for i in 0..t.ids.len() {
                    let s = dot(q, t.row(i));
                    if best.admits(s) && keep(&t.ids[i]) {
                        best.push(s, i);
                    }
                }
            }
        }
        best.into_sorted()
            .into_iter()
            .map(|(s, i)| (t.ids[i].clone(), s))
            .collect()
    }

    /// Starts building the graph in the background when the library is past the exact bound
    /// and a tenth of its rows have changed since the last graph (or there is none).
    fn maybe_build_ann(&self) {
        let (points, values, at) = {
            let t = self.table.read();
            let n = t.ids.len();
            if n <= self.exact_up_to() {
                return;
            }
            let built_at = self.ann.read().as_ref().map(|a| a.built_at);
            if let Some(b) = built_at {
                let since = t.changed.values().filter(|&&c| c > b).count();
                if since * 10 < n {
                    return;
                }
            }
            if self.building.swap(true, Ordering::SeqCst) {
                return;
            }
            let points: Vec<Unit> = (0..n).map(|i| Unit(t.row(i).into())).collect();
            (points, t.ids.clone(), t.changes)
        };
        // The graph is built from a copy; searches go on against the old one meanwhile.
        let (building, slot) = (self.building.clone(), self.ann.clone());
        let started = std::thread::Builder::new()
            .name("experient-hnsw".into())
            .spawn(move || {
                // Without the neighbour-selection heuristic and with a small construction
                // beam: 20,000 rows of 384 dimensions built in 5 s instead of 90 on two cores
                // (measured), the searches' beam (128) making up the recall.
                let map = Builder::default()
                    .ef_construction(40)
                    .select_heuristic(None)
                    .ef_search(128)
                    .seed(7)
                    .build(points, values);
                let mut s = slot.write();
                if s.as_ref().is_none_or(|a| a.built_at < at) {
                    *s = Some(Ann { map, built_at: at });
                }
                building.store(false, Ordering::SeqCst);
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "could not start building the vector graph");
            self.building.store(false, Ordering::SeqCst);
        }
    }

    /// Whether a graph build is running (tests and benchmarks wait for it).
    pub fn building(&self) -> bool {
        self.building.load(Ordering::SeqCst)
    }

    /// Writes the rows to the file when they changed: after every change while the library is
    /// small, at most once a minute past that (and always when `force`d, at shutdown).
    pub fn save(&self, force: bool) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.unsaved.load(Ordering::SeqCst) {
            return Ok(());
        }
        let t = self.table.read();
        let mut last = self.last_save.lock();
        let recent = last.is_some_and(|l| l.elapsed().as_secs() < 60);
        if !force && recent && t.ids.len() > SAVE_EVERY_CHANGE_UP_TO {
            return Ok(());
        }
        self.unsaved.store(false, Ordering::SeqCst);
        let bytes: Vec<u8> = t.data.iter().flat_map(|f| f.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![t.ids.len(), t.dims],
            &bytes,
        )
        .map_err(|e| Error::internal(format!("vectors: {e}")))?;
        let meta = HashMap::from([
            ("model".to_owned(), t.model.clone()),
            (
                "ids".to_owned(),
                serde_json::to_string(&t.ids).map_err(Error::internal)?,
            ),
            (
                "hashes".to_owned(),
                serde_json::to_string(&t.hashes).map_err(Error::internal)?,
            ),
        ]);
        let out = safetensors::serialize([("vectors", view)], Some(meta))
            .map_err(|e| Error::internal(format!("vectors: {e}")))?;
        drop(t);
        *last = Some(std::time::Instant::now());
        write_atomic(path, &out)
    }
}

/// The best `k` (score, row) pairs seen.
struct TopK {
    k: usize,
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(Score, usize)>>,
}

/// An f32 score with a total order (NaN never occurs: vectors are finite).
#[derive(Clone, Copy, PartialEq)]
struct Score(f32);
impl Eq for Score {}
impl PartialOrd for Score {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Score {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

impl TopK {
    fn new(k: usize) -> TopK {
        TopK {
            k,
            heap: std::collections::BinaryHeap::with_capacity(k + 1),
        }
    }

    fn admits(&self, s: f32) -> bool {
        self.heap.len() < self.k || self.heap.peek().is_some_and(|m| s > m.0 .0 .0)
    }

    fn push(&mut self, s: f32, i: usize) {
        if !self.admits(s) {
            return;
        }
        self.heap.push(std::cmp::Reverse((Score(s), i)));
        if self.heap.len() > self.k {
            self.heap.pop();
        }
    }

    fn into_sorted(self) -> Vec<(f32, usize)> {
        let mut v: Vec<(f32, usize)> = self.heap.into_iter().map(|r| (r.0 .0 .0, r.0 .1)).collect();
        v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        v
    }
}

/// The table kept at `path`: `Ok(None)` when there is no file.
fn read(path: &std::path::Path) -> Result<Option<Table>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let bad = |e: String| Error::internal(format!("{}: {e}", path.display()));
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let info = meta.metadata().clone().unwrap_or_default();
    let field = |k: &str| info.get(k).cloned().ok_or_else(|| bad(format!("no {k}")));
    let model = field("model")?;
    let ids: Vec<String> = serde_json::from_str(&field("ids")?).map_err(|e| bad(e.to_string()))?;
    let hashes: Vec<u64> =
        serde_json::from_str(&field("hashes")?).map_err(|e| bad(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let view = st.tensor("vectors").map_err(|e| bad(e.to_string()))?;
    let &[n, dims] = view.shape() else {
        return Err(bad("vectors is not a matrix".into()));
    };
    if n != ids.len() || n != hashes.len() || view.dtype() != safetensors::Dtype::F32 {
        return Err(bad("rows, ids and digests disagree".into()));
    }
    let data: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("chunks of 4")))
        .collect();
    let pos = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), i))
        .collect();
    Ok(Some(Table {
        model,
        dims,
        ids,
        hashes,
        data,
        pos,
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unit vectors from a small deterministic generator (xorshift), so runs repeat.
    fn random_units(n: usize, dims: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut x = seed.max(1);
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f32 / (1u64 << 53) as f32 - 0.5
        };
        (0..n)
            .map(|_| {
                let v: Vec<f32> = (0..dims).map(|_| next()).collect();
                let norm = dot(&v, &v).sqrt();
                v.into_iter().map(|a| a / norm).collect()
            })
            .collect()
    }

    fn filled(n: usize, exact_up_to: usize) -> Vectors {
        let v = Vectors::open(None, exact_up_to);
        let rows = random_units(n, 32, 42)
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("E{i}"), i as u64, v))
            .collect();
        v.update("m", &[], rows);
        v.settle();
        v
    }

    fn wait_for_graph(v: &Vectors) {
        while v.building() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn the_graph_finds_what_the_exact_search_finds_and_rows_changed_since() {
        let exact = filled(3000, usize::MAX);
        let approx = filled(3000, 1000);
        wait_for_graph(&approx);
        assert_eq!(approx.status().search, "approximate");
        assert_eq!(exact.status().search, "exact");
        let all = |_: &str| true;
        let mut found = 0;
        for q in random_units(50, 32, 7) {
            let want: HashSet<String> = exact
                .nearest(&q, 10, &all)
                .into_iter()
                .map(|h| h.0)
                .collect();
            found += approx
                .nearest(&q, 10, &all)
                .into_iter()
                .filter(|h| want.contains(&h.0))
                .count();
        }
        assert!(found >= 450, "recall@10 {found}/500");

        // A row added after the graph was built is found at once, exactly.
        let q = random_units(1, 32, 99).pop().unwrap();
        approx.update("m", &[], vec![("new".into(), 1, q.clone())]);
        let top = approx.nearest(&q, 1, &all);
        assert_eq!(top[0].0, "new");
        assert!((top[0].1 - 1.0).abs() < 1e-5);
        // A deleted one never comes back from the graph.
        approx.update("m", &["new".into(), "E5".into()], vec![]);
        let again = approx.nearest(&q, 3000, &all);
        assert!(again.iter().all(|h| h.0 != "new" && h.0 != "E5"));
    }

    #[test]
    fn rows_are_kept_in_a_file_and_a_changed_text_or_model_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let v = Vectors::open(Some(path.clone()), 100);
        let rows = vec![
            ("E1".into(), text_hash("one"), vec![1.0, 0.0]),
            ("E2".into(), text_hash("two"), vec![0.0, 1.0]),
        ];
        v.update("m", &[], rows);
        v.save(false).unwrap();
        let back = Vectors::open(Some(path), 100);
        assert_eq!(back.get("E2", "two"), Some(vec![0.0, 1.0]));
        assert_eq!(back.get("E2", "changed"), None);
        let current = [("E1", "one"), ("E2", "changed"), ("E3", "three")];
        let w = back.work("m", current.into_iter());
        let missing: Vec<&str> = w.missing.iter().map(|m| m.0.as_str()).collect();
        assert_eq!(missing, ["E2", "E3"]);
        assert!(w.gone.is_empty());
        let other = back.work("other-model", current[..1].iter().copied());
        assert_eq!(other.missing.len(), 1);
        assert_eq!(back.work("m", std::iter::empty()).gone.len(), 2);
    }
}
