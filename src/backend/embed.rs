//! Sentence embeddings, computed in-process: a BERT-family sentence-transformers model (the
//! embedded default is all-MiniLM-L6-v2) run with candle on the CPU, mean-pooled over the
//! tokens and L2-normalised, as sentence-transformers computes them for that model.
//!
//! One forward pass embeds a batch of inputs padded to the longest; the attention mask keeps
//! padding out of every real token's attention and out of the mean, so an input's vector does
//! not depend on what it was batched with (up to float rounding).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::Tokenizer;

use super::{Admission, Priority};
use crate::error::{Error, Result};

/// One input as a client gave it: text, or this model's own token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Text(String),
    Tokens(Vec<u32>),
}

/// An input that cannot be embedded: its position and why.
#[derive(Debug, Clone, PartialEq)]
pub struct BadInput {
    pub index: usize,
    pub why: String,
}

impl BadInput {
    fn new(index: usize, why: String) -> BadInput {
        BadInput { index, why }
    }
}

/// Vectors for a request's inputs, in order, and the tokens they took.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: usize,
}

/// How the model is run and bounded.
#[derive(Debug, Clone)]
pub struct EmbedSettings {
    /// The name clients use for it.
    pub id: String,
    /// Inputs one forward pass takes at most.
    pub batch: usize,
    /// The most tokens one input may have, [CLS] and [SEP] included (the model's own
    /// sequence length; longer inputs are refused, as OpenAI refuses them, never cut).
    pub max_tokens: usize,
    /// Requests embedded at once, and requests that may wait (then 429).
    pub max_concurrent: usize,
    pub queue: usize,
}

/// Raises its flag when dropped: the embedding request's future owns it, the blocking work
/// reads it between batches.
#[derive(Default)]
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A loaded embedding model.
pub struct Embedder {
    settings: EmbedSettings,
    model: BertModel,
    tokenizer: Tokenizer,
    dimensions: usize,
    vocab: usize,
    cls: u32,
    sep: u32,
    admission: Admission,
}

impl Embedder {
    /// Loads the sentence-transformers folder `dir` (`config.json`, `model.safetensors`,
    /// `tokenizer.json`).
    pub fn load(dir: &Path, settings: EmbedSettings) -> anyhow::Result<Arc<Embedder>> {
        let config: Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("tokenizer.json").display()))?;
        // The file pads every input to 128 tokens and cuts longer ones there; here inputs are
        // padded per batch, and one over the limit is refused rather than cut unseen.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let weights = dir.join("model.safetensors");
        // SAFETY: the file is mapped read-only and was checked by its digest when fetched; it
        // is not modified while the server runs.
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu)?
        };
        let model = BertModel::load(vb, &config)?;
        let special = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| anyhow::anyhow!("the tokenizer has no {t}"))
        };
        let admission =
            Admission::with_background(&settings.id, settings.max_concurrent, settings.queue, 1);
        Ok(Arc::new(Embedder {
            cls: special("[CLS]")?,
            sep: special("[SEP]")?,
            dimensions: config.hidden_size,
            vocab: config.vocab_size,
            model,
            tokenizer,
            admission,
            settings,
        }))
    }

    pub fn id(&self) -> &str {
        &self.settings.id
    }

    /// The length of every vector.
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Each input as the model's token ids, [CLS] and [SEP] around them; `Err` names the
    /// first input that cannot be embedded.
    fn tokenize(&self, inputs: &[Input]) -> std::result::Result<Vec<Vec<u32>>, BadInput> {
        let max = self.settings.max_tokens;
        inputs
            .iter()
            .enumerate()
            .map(|(i, input)| {
                let ids = match input {
                    Input::Text(t) => self
                        .tokenizer
                        .encode(t.as_str(), true)
                        .map_err(|e| BadInput::new(i, format!("cannot be tokenized: {e}")))?
                        .get_ids()
                        .to_vec(),
                    Input::Tokens(ids) => {
                        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.vocab) {
                            return Err(BadInput::new(
                                i,
                                format!(
                                    "token {bad} is not in this model's vocabulary of {}",
                                    self.vocab
                                ),
                            ));
                        }
                        [&[self.cls][..], ids, &[self.sep]].concat()
                    }
                };
                if ids.len() > max {
                    return Err(BadInput::new(
                        i,
                        format!(
                            "is {} tokens long; this model takes at most {max}",
                            ids.len()
                        ),
                    ));
                }
                Ok(ids)
            })
            .collect()
    }

    /// Tokenizes and embeds `inputs`, a batch at a time, once admitted, on a blocking thread:
    /// both are CPU work that grows with what the client sent, so neither runs on an async
    /// worker nor outside the admission bound. `Ok(Err(bad))` is an input that cannot be
    /// embedded (the caller names it to the client). Dropping the future (the client left)
    /// stops the work at the next batch.
    pub async fn embed(
        self: &Arc<Self>,
        inputs: Vec<Input>,
    ) -> Result<std::result::Result<Embedded, BadInput>> {
        let _permit = self.admission.admit(1, Priority::Interactive).await?;
        let this = self.clone();
        let stop = StopOnDrop::default();
        let flag = stop.0.clone();
        tokio::task::spawn_blocking(move || match this.tokenize(&inputs) {
            Ok(ids) => this.embed_now(&ids, &flag).map(Ok),
            Err(bad) => Ok(Err(bad)),
        })
        .await
        .map_err(|e| Error::internal(format!("the embedding task failed: {e}")))?
    }

    /// Embeds `texts` cut to the model's length (as sentence-transformers cuts them), for the
    /// server's own use: retrieving experiences, where a long question is not an error.
    /// `Background` work (vectors of a library) waits behind clients.
    pub async fn embed_texts(
        self: &Arc<Self>,
        texts: Vec<String>,
        priority: Priority,
    ) -> Result<Vec<Vec<f32>>> {
        let _permit = self.admission.admit(1, priority).await?;
        let this = self.clone();
        let stop = StopOnDrop::default();
        let flag = stop.0.clone();
        tokio::task::spawn_blocking(move || {
            let ids = texts
                .iter()
                .map(|t| this.cut_ids(t))
                .collect::<Result<Vec<_>>>()?;
            this.embed_now(&ids, &flag).map(|e| e.vectors)
        })
        .await
        .map_err(|e| Error::internal(format!("the embedding task failed: {e}")))?
    }

    /// `text`'s token ids, cut to the model's length with its [SEP] kept last.
    fn cut_ids(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::internal(format!("cannot tokenize: {e}")))?
            .get_ids()
            .to_vec();
        let max = self.settings.max_tokens.max(2);
        if ids.len() > max {
            ids.truncate(max - 1);
            ids.push(self.sep);
        }
        Ok(ids)
    }

    /// Inputs of like length are batched together (sorted by length, as sentence-transformers
    /// does), so that a short input is not padded to a long one's length; the vectors are put
    /// back in the inputs' order.
    fn embed_now(&self, ids: &[Vec<u32>], stop: &AtomicBool) -> Result<Embedded> {
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut vectors = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(self.settings.batch.max(1)) {
            if stop.load(Ordering::Relaxed) {
                return Err(Error::Timeout(
                    "the client left before its embeddings were done".into(),
                ));
            }
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            let out = self
                .forward(&batch)
                .map_err(|e| Error::internal(format!("embedding failed: {e}")))?;
            for (&i, v) in chunk.iter().zip(out) {
                vectors[i] = v;
            }
        }
        Ok(Embedded {
            vectors,
            tokens: ids.iter().map(Vec::len).sum(),
        })
    }

    /// One batch: padded ids and mask in, mean-pooled unit vectors out.
    fn forward(&self, batch: &[Vec<u32>]) -> candle_core::Result<Vec<Vec<f32>>> {
        let len = batch.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(batch.len() * len);
        let mut mask = Vec::with_capacity(batch.len() * len);
        for seq in batch {
            ids.extend(
                seq.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, len - seq.len())),
            );
            mask.extend((0..len).map(|k| u32::from(k < seq.len())));
        }
        let shape = (batch.len(), len);
        let ids = Tensor::from_vec(ids, shape, &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, shape, &Device::Cpu)?;
        let hidden = self.model.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
        // Mean over the real tokens only.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        mean.broadcast_div(&norms)?.to_vec2::<f32>()
    }
}

/// Embeddings from another OpenAI-compatible server's `/embeddings` (vLLM, TEI, llama.cpp,
/// another experient): the request, checked here, goes on with the upstream's model id, and
/// the answer comes back under this server's name for the model.
pub struct UpstreamEmbedder {
    id: String,
    model: String,
    url: reqwest::Url,
    http: reqwest::Client,
    timeout: std::time::Duration,
    admission: Admission,
}

impl UpstreamEmbedder {
    /// A client for `{base_url}/embeddings`; `key` is sent as the bearer token when given.
    pub fn new(
        settings: &EmbedSettings,
        base_url: &str,
        model: &str,
        key: Option<String>,
        timeout: std::time::Duration,
    ) -> anyhow::Result<UpstreamEmbedder> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(k) = key {
            headers.insert(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {k}").parse()?,
            );
        }
        Ok(UpstreamEmbedder {
            id: settings.id.clone(),
            model: model.to_owned(),
            url: reqwest::Url::parse(&format!("{}/embeddings", base_url.trim_end_matches('/')))?,
            http: reqwest::Client::builder()
                .default_headers(headers)
                .connect_timeout(std::time::Duration::from_secs(5))
                .build()?,
            timeout,
            admission: Admission::with_background(
                &settings.id,
                settings.max_concurrent,
                settings.queue,
                1,
            ),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Sends `body` (a checked request, its `model` replaced by the upstream's) and returns
    /// the upstream's answer with `model` set back to this server's name. The upstream's own
    /// 4xx reaches the client as it was; its 5xx is a 502, no answer a 503, too slow a 504.
    pub async fn embed(&self, mut body: serde_json::Value) -> Result<serde_json::Value> {
        let _permit = self.admission.admit(1, Priority::Interactive).await?;
        body["model"] = self.model.clone().into();
        let sent = self
            .http
            .post(self.url.clone())
            .timeout(self.timeout)
            .json(&body)
            .send()
            .await;
        let r = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(Error::Timeout(format!(
                    "the embedding upstream {} timed out",
                    self.url
                )))
            }
            Err(e) => {
                return Err(Error::Unavailable(format!(
                    "the embedding upstream {} cannot be reached: {e}",
                    self.url
                )))
            }
        };
        let status = r.status().as_u16();
        let mut answer: serde_json::Value = r.json().await.map_err(|e| Error::Upstream {
            status: 502,
            message: format!("the embedding upstream sent something unreadable: {e}"),
            kind: Some("upstream_error".into()),
            param: None,
            code: None,
        })?;
        if status >= 400 {
            let e = &answer["error"];
            let text = |k: &str| e[k].as_str().map(str::to_owned);
            return Err(Error::Upstream {
                status: if status >= 500 { 502 } else { status },
                message: text("message")
                    .unwrap_or_else(|| format!("the embedding upstream answered {status}")),
                kind: text("type"),
                param: text("param"),
                code: text("code"),
            });
        }
        answer["model"] = self.id.clone().into();
        Ok(answer)
    }
}
