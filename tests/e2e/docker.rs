//! Runs the built binary exactly as docker/Dockerfile's image does: the runtime stage's
//! ENTRYPOINT and CMD with exactly its ENV, as its USER, with the binary and the model where
//! the image puts them, the experience volume as the only writable place, and the root
//! filesystem read-only (a private mount namespace stands in for the container). No Docker
//! engine is needed.
//!
//! Needs root for the mount namespace, as CI has; elsewhere it says so and does nothing.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Image {
    env: Vec<(String, String)>,
    argv: Vec<String>,
    user: String,
    healthcheck: Vec<String>,
}

fn json_array(s: &str) -> Vec<String> {
    serde_json::from_str(s.trim()).expect("exec-form JSON array")
}

/// Reads the runtime stage (after the last FROM) of the Dockerfile.
fn image() -> Image {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/Dockerfile"))
            .unwrap();
    let joined = text.replace("\\\n", " ");
    let stage = joined.rsplit("\nFROM ").next().unwrap();
    let (mut env, mut entry, mut cmd, mut user, mut health) =
        (vec![], vec![], vec![], String::new(), vec![]);
    for line in stage.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("ENV ") {
            for kv in rest.split_whitespace() {
                let (k, v) = kv.split_once('=').expect("ENV key=value");
                env.push((k.to_owned(), v.to_owned()));
            }
        } else if let Some(rest) = line.strip_prefix("ENTRYPOINT ") {
            entry = json_array(rest);
        } else if let Some(rest) = line.strip_prefix("CMD ") {
            cmd = json_array(rest);
        } else if let Some(rest) = line.strip_prefix("USER ") {
            user = rest.trim().to_owned();
        } else if let Some(rest) = line.strip_prefix("HEALTHCHECK ") {
            health = json_array(rest.split_once("CMD ").unwrap().1);
        }
    }
    Image {
        env,
        argv: entry.into_iter().chain(cmd).collect(),
        user,
        healthcheck: health,
    }
}

fn env_of<'a>(img: &'a Image, key: &str) -> &'a str {
    &img.env
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("Dockerfile sets no {key}"))
        .1
}

/// The keys the deployment passes in, as compose.yaml takes them from the environment.
const USER_KEY: &str = "deploy-user-key";
const ADMIN_KEY: &str = "deploy-admin-key";

fn http(addr: &str, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, out))
}

#[test]
fn the_image_entrypoint_serves_on_a_read_only_root() {
    if unsafe { libc::geteuid() } != 0 {
        // CI runs as root; there a skip would hide that the image was never tried.
        assert!(
            std::env::var_os("CI").is_none(),
            "the docker test needs root in CI"
        );
        eprintln!("skipped: needs root for a private mount namespace (CI runs as root)");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_experient");
    let img = image();
    assert_eq!(img.argv, ["experient", "serve"]);

    // The image listens on every interface, so without keys it must refuse to start.
    let bare = Command::new(bin)
        .args(&img.argv[1..])
        .env_clear()
        .envs(img.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env(
            "EXPERIENT_EXPERIENCE_DIR",
            tempfile::tempdir().unwrap().path(),
        )
        .output()
        .unwrap();
    assert!(!bare.status.success());
    let said = String::from_utf8_lossy(&bare.stderr);
    assert!(
        said.contains("refusing to listen on 0.0.0.0:8080"),
        "{said}"
    );
    let uid: u32 = img.user.parse().expect("USER is numeric");

    // The image bakes the model in at build time; do the same here.
    let cache = tempfile::tempdir().unwrap();
    let host_cache = std::env::var("EXPERIENT_MODEL_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| experient::backend::fetch::default_cache_dir());
    let st = Command::new(bin)
        .args(["fetch-model", "--model-cache"])
        .arg(&host_cache)
        .status()
        .unwrap();
    assert!(st.success());
    let models = cache.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    for e in std::fs::read_dir(host_cache.join("models")).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().ends_with(".gguf") {
            std::fs::copy(e.path(), models.join(e.file_name())).unwrap();
        }
    }
    let volume = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(volume.path(), Some(uid), Some(uid)).unwrap();

    let model_dir = env_of(&img, "EXPERIENT_MODEL_CACHE");
    let exp_dir = env_of(&img, "EXPERIENT_EXPERIENCE_DIR");
    let script = format!(
        r#"set -e
mount --make-rprivate /
mount -t tmpfs tmpfs /opt
mount -t tmpfs tmpfs /var/lib
mkdir -p {model_dir} {exp_dir}
mount --bind -o ro "$1" {model_dir}
mount --bind "$2" {exp_dir}
mount -t tmpfs tmpfs /usr/local/bin
touch /usr/local/bin/experient
mount --bind -o ro "$3" /usr/local/bin/experient
mount -t tmpfs tmpfs /tmp
mount -o remount,bind,ro /
shift 3
exec setpriv --reuid={uid} --regid={uid} --clear-groups "$@""#
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "sh", "-c", &script, "sh"])
        .arg(cache.path())
        .arg(volume.path())
        .arg(bin)
        // The image's own argv, "experient" found on PATH where the image installs it.
        .args(&img.argv)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .envs(img.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("EXPERIENT_API_KEYS", USER_KEY)
        .env("EXPERIENT_ADMIN_KEYS", ADMIN_KEY)
        .stdout(Stdio::null());
    /// Kills the server if the test fails half-way, so it never outlives the test.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut guard = Reap(cmd.spawn().unwrap());
    let child = &mut guard.0;
    let addr = env_of(&img, "EXPERIENT_ADDR").replace("0.0.0.0", "127.0.0.1");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the entrypoint exited early: {st}");
        }
        if http(&addr, "GET", "/health", "").is_ok_and(|(c, _)| c == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "never healthy");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The image's HEALTHCHECK command agrees.
    let hc = Command::new(bin)
        .args(&img.healthcheck[1..])
        .env_clear()
        .envs(img.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .status()
        .unwrap();
    assert!(hc.success());

    // It serves, and writes land in the volume, the one writable place.
    let (code, _) = http(
        &addr,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"smollm2-135m","messages":[{"role":"user","content":"Hi"}],"max_tokens":3}"#,
    )
    .unwrap();
    assert_eq!(code, 200);
    let (code, body) = http(&addr, "POST", "/v1/libraries", r#"{"name":"deployed"}"#).unwrap();
    assert_eq!(code, 201, "{body}");

    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "no clean stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "SIGTERM ends the server cleanly: {status}"
    );
    assert!(volume.path().join("deployed/log.jsonl").is_file());
}
