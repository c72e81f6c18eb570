//! Choosing experiences for a query: BM25 and vector candidates pooled and scored by their
//! similarity plus a small share of their relative BM25 score, those unlike the query dropped,
//! and a diverse few picked by maximal marginal relevance.
//!
//! Why each step: vectors find a lesson that says the same in other words, BM25 one that
//! shares a rare word (a name, an identifier) the embedding model blurs. Reciprocal rank
//! fusion was tried first and measured worse than vectors alone on the paraphrase set
//! (bench/retrieval.py: MRR 0.53 against 0.79), because it gives BM25's first hit, often a
//! match on one common word, the same weight as the nearest meaning; relative score fusion
//! with `lexical_weight` 0.1 keeps the vectors' ranking (MRR 0.79) and lets the words break
//! ties. A lexical hit whose meaning is far from the question is dropped by the minimum
//! similarity. Near-duplicate lessons would crowd a small prompt, so each pick is penalised
//! by its likeness to those already picked.

use serde::{Deserialize, Serialize};

use super::vectors::dot;
use crate::error::{Error, Result};

/// Which evidence ranks experiences.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Embeddings and BM25 together (BM25 alone while the embedding model is not loaded).
    #[default]
    Hybrid,
    /// BM25 over the words alone.
    Lexical,
    /// Embeddings alone.
    Semantic,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Hybrid => "hybrid",
            Mode::Lexical => "lexical",
            Mode::Semantic => "semantic",
        }
    }

    /// Whether the mode uses vectors.
    pub fn semantic(self) -> bool {
        self != Mode::Lexical
    }
}

/// How a library retrieves, in its settings; each field may be overridden per request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Retrieval {
    pub mode: Mode,
    /// The least cosine similarity to the query an experience needs to be chosen (when both
    /// have vectors).
    pub min_score: f64,
    /// How much likeness to an experience already chosen counts against the next (0: rank
    /// alone, 1: likeness alone).
    pub diversity: f64,
    /// The largest share of the model's context window the prior may take.
    pub max_share: f64,
    /// Under `inject: auto`, a library of at most this many experiences is injected whole, in
    /// a fixed order, so that the prior is the same prefix on every request.
    pub whole_up_to: usize,
    /// Cosine similarity at which two experiences count as duplicates.
    pub duplicate_at: f64,
    /// Under `hybrid`, what a BM25 score (relative to the best candidate's) adds to the
    /// cosine similarity.
    pub lexical_weight: f64,
}

impl Default for Retrieval {
    fn default() -> Self {
        Retrieval {
            mode: Mode::Hybrid,
            min_score: 0.25,
            diversity: 0.3,
            max_share: 0.1,
            whole_up_to: 8,
            duplicate_at: 0.9,
            lexical_weight: 0.1,
        }
    }
}

/// A request's overrides of its library's [`Retrieval`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrievalOverride {
    pub mode: Option<Mode>,
    pub min_score: Option<f64>,
    pub diversity: Option<f64>,
    pub lexical_weight: Option<f64>,
}

impl Retrieval {
    /// The settings with a request's overrides applied.
    pub fn with(mut self, o: &RetrievalOverride) -> Retrieval {
        self.mode = o.mode.unwrap_or(self.mode);
        self.min_score = o.min_score.unwrap_or(self.min_score);
        self.diversity = o.diversity.unwrap_or(self.diversity);
        self.lexical_weight = o.lexical_weight.unwrap_or(self.lexical_weight);
        self
    }

    /// Refuses values outside their ranges, naming the field under `prefix`.
    pub fn check(&self, prefix: &str) -> Result<()> {
        let unit = |v: f64, name: &str, lo: f64| {
            if (lo..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::invalid_param(
                    format!("{prefix}{name} must be from {lo} to 1, got {v}"),
                    format!("{prefix}{name}"),
                ))
            }
        };
        unit(self.min_score, "min_score", -1.0)?;
        unit(self.diversity, "diversity", 0.0)?;
        unit(self.max_share, "max_share", 0.0)?;
        unit(self.duplicate_at, "duplicate_at", 0.0)?;
        unit(self.lexical_weight, "lexical_weight", 0.0)
    }
}

impl RetrievalOverride {
    /// Refuses values outside their ranges, naming the field under `prefix`.
    pub fn check(&self, prefix: &str) -> Result<()> {
        Retrieval::default().with(self).check(prefix)
    }
}

/// One chosen experience and the evidence for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    pub id: String,
    /// The score it was ranked by: BM25 (lexical), cosine (semantic), or the cosine plus
    /// `lexical_weight` times the BM25 score relative to the best candidate's (hybrid).
    pub score: f32,
    pub lexical: Option<f32>,
    pub similarity: Option<f32>,
}

/// Candidates from each side, best first, and how to reach a candidate's vector.
pub struct Candidates<'a> {
    pub lexical: Vec<(String, f32)>,
    pub dense: Vec<(String, f32)>,
    pub query: Option<&'a [f32]>,
    pub vector: &'a dyn Fn(&str) -> Option<Vec<f32>>,
}

/// The `k` experiences to use, best first.
pub fn rank(c: Candidates<'_>, r: &Retrieval, k: usize) -> Vec<Ranked> {
    let mut pool: Vec<(Ranked, Option<Vec<f32>>)> = Vec::new();
    let mut add = |id: &str, lexical: Option<f32>, similarity: Option<f32>| match pool
        .iter_mut()
        .find(|(p, _)| p.id == id)
    {
        Some((p, _)) => {
            p.lexical = p.lexical.or(lexical);
            p.similarity = p.similarity.or(similarity);
        }
        None => pool.push((
            Ranked {
                id: id.to_owned(),
                score: 0.0,
                lexical,
                similarity,
            },
            None,
        )),
    };
    if r.mode != Mode::Semantic {
        for (id, s) in &c.lexical {
            add(id, Some(*s), None);
        }
    }
    if r.mode.semantic() {
        for (id, s) in &c.dense {
            add(id, None, Some(*s));
        }
    }
    let best_lexical = c.lexical.iter().map(|h| h.1).fold(0.0f32, f32::max);
    let weight = r.lexical_weight as f32;
    for (p, v) in &mut pool {
        if r.mode.semantic() {
            *v = (c.vector)(&p.id);
            if let (None, Some(q), Some(v)) = (p.similarity, c.query, v.as_deref()) {
                p.similarity = Some(dot(q, v));
            }
        }
        let relative = match best_lexical > 0.0 {
            true => p.lexical.unwrap_or(0.0) / best_lexical,
            false => 0.0,
        };
        p.score = match r.mode {
            Mode::Lexical => p.lexical.unwrap_or(0.0),
            Mode::Semantic => p.similarity.unwrap_or(0.0),
            // Without a query vector this is BM25's own order.
            Mode::Hybrid => p.similarity.unwrap_or(0.0) + weight * relative,
        };
    }
    if r.mode.semantic() {
        pool.retain(|(p, _)| p.similarity.is_none_or(|s| f64::from(s) >= r.min_score));
    }
    pool.sort_by(|a, b| b.0.score.total_cmp(&a.0.score));
    diverse(pool, r.diversity, k)
}

/// Maximal marginal relevance: each pick maximises (1 - diversity) x its relevance (the score
/// scaled to the best) - diversity x its likeness to the nearest pick so far.
fn diverse(mut pool: Vec<(Ranked, Option<Vec<f32>>)>, diversity: f64, k: usize) -> Vec<Ranked> {
    let diversity = diversity as f32;
    let top = pool
        .first()
        .map(|p| p.0.score)
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0);
    let mut picked: Vec<(Ranked, Option<Vec<f32>>)> = Vec::with_capacity(k);
    while picked.len() < k && !pool.is_empty() {
        let value = |(p, v): &(Ranked, Option<Vec<f32>>)| {
            let likeness = match v {
                Some(v) if diversity > 0.0 => picked
                    .iter()
                    .filter_map(|(_, w)| w.as_deref().map(|w| dot(v, w)))
                    .fold(0.0f32, f32::max),
                _ => 0.0,
            };
            (1.0 - diversity) * (p.score / top) - diversity * likeness
        };
        let best = (0..pool.len())
            .max_by(|&a, &b| value(&pool[a]).total_cmp(&value(&pool[b])).then(b.cmp(&a)))
            .expect("the pool is not empty");
        picked.push(pool.remove(best));
    }
    picked.into_iter().map(|(p, _)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    fn vectors() -> std::collections::HashMap<&'static str, Vec<f32>> {
        [
            ("e1", unit(&[1.0, 0.0, 0.0])),
            ("e2", unit(&[0.99, 0.1, 0.0])),
            ("e3", unit(&[0.6, 0.8, 0.0])),
            ("e4", unit(&[0.0, 0.0, 1.0])),
        ]
        .into_iter()
        .collect()
    }

    fn ids(r: &[Ranked]) -> Vec<&str> {
        r.iter().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn fusion_keeps_the_words_and_the_meaning_and_drops_what_is_unlike_the_query() {
        let vs = vectors();
        let q = unit(&[1.0, 0.05, 0.0]);
        let vector = |id: &str| vs.get(id).cloned();
        let c = || Candidates {
            // e4 shares the query's words but means something else.
            lexical: vec![("e4".into(), 9.0), ("e3".into(), 4.0)],
            dense: vec![
                ("e1".into(), dot(&q, &vs["e1"])),
                ("e3".into(), dot(&q, &vs["e3"])),
            ],
            query: Some(&q),
            vector: &vector,
        };
        let r = Retrieval {
            diversity: 0.0,
            ..Default::default()
        };
        // e4 matched the words but not the meaning: dropped. e3 has both, e1 meaning alone.
        let hybrid = rank(c(), &r, 3);
        assert_eq!(ids(&hybrid), ["e1", "e3"], "{hybrid:?}");
        assert!(hybrid[1].lexical.is_some() && hybrid[1].similarity.is_some());
        let wordy = rank(
            c(),
            &Retrieval {
                lexical_weight: 1.0,
                ..r
            },
            3,
        );
        assert_eq!(ids(&wordy), ["e3", "e1"], "{wordy:?}");
        let lexical = rank(
            c(),
            &Retrieval {
                mode: Mode::Lexical,
                ..r
            },
            3,
        );
        assert_eq!(ids(&lexical), ["e4", "e3"]);
        let semantic = rank(
            c(),
            &Retrieval {
                mode: Mode::Semantic,
                ..r
            },
            3,
        );
        assert_eq!(ids(&semantic), ["e1", "e3"]);
    }

    #[test]
    fn diversity_passes_over_a_near_duplicate_of_a_pick() {
        let vs = vectors();
        let q = unit(&[1.0, 0.3, 0.0]);
        let vector = |id: &str| vs.get(id).cloned();
        let dense: Vec<(String, f32)> = ["e1", "e2", "e3"]
            .iter()
            .map(|id| (id.to_string(), dot(&q, &vs[id])))
            .collect();
        let c = |dense: Vec<(String, f32)>| Candidates {
            lexical: vec![],
            dense,
            query: Some(&q),
            vector: &vector,
        };
        let plain = Retrieval {
            mode: Mode::Semantic,
            diversity: 0.0,
            ..Default::default()
        };
        assert_eq!(ids(&rank(c(dense.clone()), &plain, 2)), ["e2", "e1"]);
        let varied = Retrieval {
            diversity: 0.5,
            ..plain
        };
        assert_eq!(ids(&rank(c(dense), &varied, 2)), ["e2", "e3"]);
    }

    #[test]
    fn out_of_range_settings_are_refused_by_name() {
        let bad = RetrievalOverride {
            diversity: Some(1.5),
            ..Default::default()
        };
        let e = bad.check("experient.retrieval.").unwrap_err();
        assert!(
            e.to_string().contains("experient.retrieval.diversity"),
            "{e}"
        );
        assert!(Retrieval::default().check("").is_ok());
    }
}
