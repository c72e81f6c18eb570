//! A real PostgreSQL for the replica tests: Debian's `postgresql` binaries, a cluster made in
//! a temporary directory and started on a free port, stopped when the test binary ends. As
//! root (CI), it runs as the `postgres` user, since PostgreSQL refuses to run as root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

/// The directory holding `initdb` and `pg_ctl`: `$PG_BIN`, or the newest under
/// /usr/lib/postgresql.
fn bin_dir() -> PathBuf {
    if let Ok(b) = std::env::var("PG_BIN") {
        return b.into();
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (apt-get install postgresql, or set PG_BIN)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().expect("no initdb under /usr/lib/postgresql")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    fn run(&self, tool: &str, args: &[&str]) {
        let (ok, said) = self.try_run(tool, args);
        assert!(ok, "{tool} {args:?}: {said}");
    }

    fn try_run(&self, tool: &str, args: &[&str]) -> (bool, String) {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        match cmd.args(args).output() {
            Ok(out) => (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ),
            Err(e) => (false, e.to_string()),
        }
    }

    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let as_postgres = unsafe { libc::geteuid() } == 0;
        if as_postgres {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(st.success(), "chown the cluster directory to postgres");
        }
        let c = Cluster {
            dir,
            bin: bin_dir(),
            port: free_port(),
            as_postgres,
        };
        let data = c.data().display().to_string();
        c.run(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "-E", "UTF8"],
        );
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=on",
            c.port,
            c.dir.path().display()
        );
        let log = c.dir.path().join("log").display().to_string();
        c.run(
            "pg_ctl",
            &["-D", &data, "-o", &opts, "-l", &log, "-w", "start"],
        );
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A new, empty database and its URL.
    pub fn database(&self, name: &str) -> String {
        let psql = self.bin.join("psql");
        let port = self.port.to_string();
        let out = Command::new(psql)
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-c"])
            .arg(format!("CREATE DATABASE {name}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "CREATE DATABASE {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(name)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Stops the server at once (no checkpoint), as a crash would.
    pub fn stop(&self) {
        let data = self.data().display().to_string();
        let _ = self.try_run("pg_ctl", &["-D", &data, "-m", "immediate", "stop"]);
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// One cluster per test binary; every test makes its own database in it.
pub fn cluster() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(|| {
        let c = Cluster::start();
        // Stop it when the test binary exits, or it would outlive the run.
        extern "C" fn stop_at_exit() {
            if let Some(c) = C.get() {
                c.stop();
            }
        }
        unsafe {
            libc::atexit(stop_at_exit);
        }
        c
    })
}
