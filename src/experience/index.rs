//! The full-text index of one library (tantivy, BM25), derived from the log.
//!
//! The index records the library version it reflects as its commit payload; when it is missing,
//! unreadable or behind the log, it is rebuilt from the replayed state. It is a cache of the
//! log, never a source of truth.

use std::path::Path;

use parking_lot::Mutex;

use tantivy::collector::TopDocs;
use tantivy::directory::MmapDirectory;
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value, STORED, STRING,
};
use tantivy::tokenizer::{
    Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, StopWordFilter, TextAnalyzer,
    TokenStream,
};
use tantivy::{doc, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use super::Experience;
use crate::error::{Error, Result};

/// The most characters of a query that are searched; the rest is ignored. A prior's query is a
/// whole user message, and its first few thousand characters say what it is about.
pub const MAX_QUERY_CHARS: usize = 4096;
/// The most distinct terms one query becomes (a flat disjunction, scored by BM25).
pub const MAX_QUERY_TERMS: usize = 256;

/// One library's index. Its writer exists only while a change is written: an open tantivy
/// writer holds an indexing thread and a merge pool, about six OS threads, and a server with
/// a couple of hundred libraries ran out of threads when each kept one open. Writes are rare
/// (curation, one per learning step), so paying a writer's start per write is cheap.
pub struct Index {
    index: tantivy::Index,
    reader: IndexReader,
    /// Serialises writers: tantivy allows one per index at a time.
    writing: Mutex<()>,
    id: Field,
    text: Field,
    tags: Field,
}

/// The analyzer of experience texts and queries: words, lowercased, without English stop
/// words. Stop words carried no meaning but did carry BM25 weight: "the" and "that" made a
/// lesson a lexical match for any question, which rank fusion then counted as evidence.
const ANALYZER: &str = "experient_en";

fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(40))
        .filter(LowerCaser)
        .filter(StopWordFilter::new(Language::English).expect("tantivy ships English stop words"))
        .build()
}

fn schema() -> (Schema, Field, Field, Field) {
    let mut b = Schema::builder();
    let id = b.add_text_field("id", STRING | STORED);
    let indexing = TextFieldIndexing::default()
        .set_tokenizer(ANALYZER)
        .set_index_option(IndexRecordOption::WithFreqsAndPositions);
    let text = b.add_text_field(
        "text",
        TextOptions::default().set_indexing_options(indexing),
    );
    let tags = b.add_text_field("tags", STRING);
    (b.build(), id, text, tags)
}

fn ierr(e: tantivy::TantivyError) -> Error {
    Error::internal(format!("search index: {e}"))
}

impl Index {
    /// Opens the index in `dir`, rebuilding it from `experiences` when it was built from
    /// another `version` of the library (the log is the truth; the index only follows it).
    pub fn open<'a>(
        dir: &Path,
        experiences: impl Iterator<Item = &'a Experience>,
        version: u64,
    ) -> Result<Index> {
        let (schema, id, text, tags) = schema();
        let opened = std::fs::create_dir_all(dir)
            .map_err(Error::from)
            .and_then(|()| MmapDirectory::open(dir).map_err(Error::internal))
            .and_then(|d| tantivy::Index::open_or_create(d, schema.clone()).map_err(ierr));
        let (index, fresh) = match opened {
            Ok(i) => {
                let current = i
                    .load_metas()
                    .ok()
                    .and_then(|m| m.payload)
                    .is_some_and(|p| p == version.to_string());
                (i, current)
            }
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "rebuilding an unreadable index");
                let _ = std::fs::remove_dir_all(dir);
                std::fs::create_dir_all(dir)?;
                let d = MmapDirectory::open(dir).map_err(Error::internal)?;
                (
                    tantivy::Index::open_or_create(d, schema).map_err(ierr)?,
                    false,
                )
            }
        };
        let me = Index::wrap(index, id, text, tags)?;
        if !fresh {
            me.rebuild(experiences, version)?;
        }
        Ok(me)
    }

    /// An index of `experiences` held in memory only: for sets that are served but are not
    /// the library's newest version (a pinned version, a trial's candidate).
    pub fn in_memory<'a>(experiences: impl Iterator<Item = &'a Experience>) -> Result<Index> {
        let (schema, id, text, tags) = schema();
        let me = Index::wrap(tantivy::Index::create_in_ram(schema), id, text, tags)?;
        me.rebuild(experiences, 0)?;
        Ok(me)
    }

    /// A tantivy index with its manually reloaded reader and the schema's fields.
    fn wrap(index: tantivy::Index, id: Field, text: Field, tags: Field) -> Result<Index> {
        index.tokenizers().register(ANALYZER, analyzer());
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(ierr)?;
        Ok(Index {
            index,
            reader,
            writing: Mutex::new(()),
            id,
            text,
            tags,
        })
    }

    fn document(&self, e: &Experience) -> TantivyDocument {
        let mut d = doc!(self.id => e.id.clone(), self.text => e.text.clone());
        for t in &e.tags {
            d.add_text(self.tags, t);
        }
        d
    }

    fn rebuild<'a>(
        &self,
        experiences: impl Iterator<Item = &'a Experience>,
        version: u64,
    ) -> Result<()> {
        self.write(version, |w| {
            w.delete_all_documents().map_err(ierr)?;
            for e in experiences {
                w.add_document(self.document(e)).map_err(ierr)?;
            }
            Ok(())
        })
    }

    /// Opens a writer, lets `change` fill it, commits as of `version`, and closes the writer,
    /// waiting for its threads (merges included) to end.
    fn write(&self, version: u64, change: impl FnOnce(&IndexWriter) -> Result<()>) -> Result<()> {
        let _one = self.writing.lock();
        // One indexing thread with tantivy's smallest budget: documents are a few hundred bytes.
        let mut w: IndexWriter = self
            .index
            .writer_with_num_threads(1, 15_000_000)
            .map_err(ierr)?;
        change(&w)?;
        let mut prepared = w.prepare_commit().map_err(ierr)?;
        prepared.set_payload(&version.to_string());
        prepared.commit().map_err(ierr)?;
        w.wait_merging_threads().map_err(ierr)?;
        self.reader.reload().map_err(ierr)
    }

    /// Replaces the documents of `removed` ids with `current` experiences, as of `version`.
    pub fn apply(&self, removed: &[&str], current: &[Experience], version: u64) -> Result<()> {
        self.write(version, |w| {
            for id in removed {
                w.delete_term(Term::from_field_text(self.id, id));
            }
            for e in current {
                w.add_document(self.document(e)).map_err(ierr)?;
            }
            Ok(())
        })
    }

    /// Ids of the best matches for `q` (BM25), optionally restricted to a tag.
    ///
    /// The user's words are never parsed as tantivy's query language: its grammar recurses
    /// once per `(`, and a chat message of some 800 of them overflowed a tokio worker's stack
    /// and aborted the process. Instead the text is cut to [`MAX_QUERY_CHARS`], run through the
    /// field's own analyzer, and its distinct terms (at most [`MAX_QUERY_TERMS`]) become one
    /// flat disjunction of term queries, which is what a lenient parse of plain words gave.
    pub fn search(&self, q: &str, tag: Option<&str>, limit: usize) -> Result<Vec<(String, f32)>> {
        let searcher = self.reader.searcher();
        // tantivy sizes its collector for the limit before it looks at a document; there are
        // never more hits than documents.
        let limit = (limit as u64).min(searcher.num_docs()).max(1) as usize;
        let terms = self.terms(q)?;
        if terms.is_empty() {
            return Ok(Vec::new());
        }
        let text_query: Box<dyn Query> = Box::new(BooleanQuery::new(
            terms
                .into_iter()
                .map(|t| {
                    let q: Box<dyn Query> =
                        Box::new(TermQuery::new(t, IndexRecordOption::WithFreqs));
                    (Occur::Should, q)
                })
                .collect(),
        ));
        let query: Box<dyn Query> = match tag {
            Some(t) => Box::new(BooleanQuery::new(vec![
                (Occur::Must, text_query),
                (
                    Occur::Must,
                    Box::new(TermQuery::new(
                        Term::from_field_text(self.tags, t),
                        IndexRecordOption::Basic,
                    )),
                ),
            ])),
            None => text_query,
        };
        let top = searcher
            .search(&query, &TopDocs::with_limit(limit).order_by_score())
            .map_err(ierr)?;
        let mut out = Vec::with_capacity(top.len());
        for (score, addr) in top {
            let d: TantivyDocument = searcher.doc(addr).map_err(ierr)?;
            if let Some(id) = d.get_first(self.id).and_then(|v| v.as_str()) {
                out.push((id.to_owned(), score));
            }
        }
        Ok(out)
    }

    /// The distinct terms of `q` as the text field's analyzer makes them, in order.
    fn terms(&self, q: &str) -> Result<Vec<Term>> {
        let q = match q.char_indices().nth(MAX_QUERY_CHARS) {
            Some((cut, _)) => &q[..cut],
            None => q,
        };
        let mut analyzer = self.index.tokenizer_for_field(self.text).map_err(ierr)?;
        let mut stream = analyzer.token_stream(q);
        let mut seen = std::collections::HashSet::new();
        let mut terms = Vec::new();
        while terms.len() < MAX_QUERY_TERMS && stream.advance() {
            let text = &stream.token().text;
            if seen.insert(text.clone()) {
                terms.push(Term::from_field_text(self.text, text));
            }
        }
        Ok(terms)
    }
}
