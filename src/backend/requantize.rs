//! Rewriting a GGUF's Q4_1 tensors as Q8_0 before loading it.
//!
//! candle (mistral.rs's tensor library) has SIMD kernels for Q8_0 but none for Q4_1, whose
//! scalar dot product dominated CPU decoding in our profiles. Q8_0 holds every Q4_1 weight with
//! a rounding error far below Q4_1's own (8 bits instead of 4 per weight, one scale per 32), so
//! the rewrite costs a little memory and buys speed. The greedy output is compared in
//! README's speed section.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

/// Returns the path to load: `src` itself when it has no Q4_1 tensor, otherwise a Q8_0
/// rewrite cached beside it (made once; reused while it is newer than the source).
pub fn prefer_q8_0(src: &Path) -> anyhow::Result<PathBuf> {
    let dst = src.with_extension("q8_0-from-q4_1.gguf");
    if let (Ok(d), Ok(s)) = (dst.metadata(), src.metadata()) {
        if d.modified()? >= s.modified()? {
            return Ok(dst);
        }
    }
    let mut reader = BufReader::new(File::open(src).with_context(|| format!("opening {}", src.display()))?);
    let content = gguf_file::Content::read(&mut reader).with_context(|| format!("reading {}", src.display()))?;
    if !content.tensor_infos.values().any(|t| t.ggml_dtype == GgmlDType::Q4_1) {
        return Ok(src.to_owned());
    }
    let t = std::time::Instant::now();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let q = content.tensor(&mut reader, name, &Device::Cpu)?;
        let q = if q.dtype() == GgmlDType::Q4_1 {
            QTensor::quantize(&q.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?
        } else {
            q
        };
        tensors.push((name.clone(), q));
    }
    let mut metadata: Vec<(&str, &gguf_file::Value)> =
        content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    // llama.cpp's file-type code for "mostly Q8_0", so that tools reading the header agree.
    let ftype = gguf_file::Value::U32(7);
    metadata.retain(|(k, _)| *k != "general.file_type");
    metadata.push(("general.file_type", &ftype));
    metadata.sort_by_key(|(k, _)| *k);
    let partial = dst.with_extension("partial");
    {
        let mut w = BufWriter::new(File::create(&partial)?);
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
        gguf_file::write(&mut w, &metadata, &refs)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    std::fs::rename(&partial, &dst)?;
    tracing::info!(from = %src.display(), to = %dst.display(), secs = t.elapsed().as_secs_f32(), "rewrote Q4_1 tensors as Q8_0");
    Ok(dst)
}
