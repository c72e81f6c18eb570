//! Rewriting a GGUF's Q4_1 tensors as Q8_0 before loading it.
//!
//! candle (mistral.rs's tensor library) has SIMD kernels for Q8_0 but none for Q4_1, whose
//! scalar dot product dominated CPU decoding in our profiles. Q8_0 holds every Q4_1 weight with
//! a rounding error far below Q4_1's own (8 bits instead of 4 per weight, one scale per 32), so
//! the rewrite costs a little memory and buys speed. The greedy output is compared in
//! docs/performance.md.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

/// Returns the path to load: `src` itself when it has no Q4_1 tensor, otherwise a Q8_0
/// rewrite cached beside it (made once; reused while it was made from this very file). Where the
/// rewrite cannot be written (a read-only image without it), the original is used.
pub fn prefer_q8_0(src: &Path) -> anyhow::Result<PathBuf> {
    match rewrite(src) {
        Ok(p) => Ok(p),
        Err(e) if is_read_only(&e) => {
            tracing::warn!(file = %src.display(), error = %e, "cannot write the Q8_0 rewrite; loading Q4_1 as is (slower)");
            Ok(src.to_owned())
        }
        Err(e) => Err(e),
    }
}

fn is_read_only(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied
            )
        })
    })
}

/// The rewrite records the SHA-256 of the file it was made from under this key; a rewrite whose
/// source changed is made again. (Timestamps would not do: copies into images change them.)
const SOURCE_KEY: &str = "experient.requantized_from_sha256";

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    std::io::copy(&mut BufReader::new(File::open(path)?), &mut h)?;
    Ok(hex::encode(h.finalize()))
}

fn recorded_source(dst: &Path) -> Option<String> {
    let mut r = BufReader::new(File::open(dst).ok()?);
    let c = gguf_file::Content::read(&mut r).ok()?;
    match c.metadata.get(SOURCE_KEY)? {
        gguf_file::Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

fn rewrite(src: &Path) -> anyhow::Result<PathBuf> {
    let dst = src.with_extension("q8_0-from-q4_1.gguf");
    let source_sha = sha256_file(src).with_context(|| format!("reading {}", src.display()))?;
    if recorded_source(&dst).as_deref() == Some(source_sha.as_str()) {
        return Ok(dst);
    }
    let mut reader =
        BufReader::new(File::open(src).with_context(|| format!("opening {}", src.display()))?);
    let content = gguf_file::Content::read(&mut reader)
        .with_context(|| format!("reading {}", src.display()))?;
    if !content
        .tensor_infos
        .values()
        .any(|t| t.ggml_dtype == GgmlDType::Q4_1)
    {
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
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    // llama.cpp's file-type code for "mostly Q8_0", so that tools reading the header agree.
    let ftype = gguf_file::Value::U32(7);
    let source = gguf_file::Value::String(source_sha);
    metadata.retain(|(k, _)| *k != "general.file_type" && *k != SOURCE_KEY);
    metadata.push(("general.file_type", &ftype));
    metadata.push((SOURCE_KEY, &source));
    metadata.sort_by_key(|(k, _)| *k);
    // Several servers may start at once on one cache: each writes its own file, and the
    // atomic rename makes whichever finishes last the one that stays (they are identical).
    let partial = dst.with_extension(format!("partial-{}", uuid::Uuid::new_v4().simple()));
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
