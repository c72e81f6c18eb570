//! Kept programs, one JSON file per task family in `<experience-dir>/.programs`: a program that
//! solves a family once is played on every later instance of it without calling the model, so
//! the model's cost is paid once per family.

use parking_lot::Mutex;
use std::path::{Path, PathBuf};

use super::ipp::Cached;

/// Read-modify-write of one file happens under this lock, so concurrent requests neither lose
/// a better program nor tear a file.
static LOCK: Mutex<()> = Mutex::new(());

/// The best program kept per task family, so later instances cost no model call.
pub struct ProgramCache {
    dir: PathBuf,
    /// A cache read where this one has no program for a family (a key's own cache reads the
    /// server's shared one), never written.
    fallback: Option<PathBuf>,
}

impl ProgramCache {
    /// A cache in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> ProgramCache {
        ProgramCache {
            dir: dir.into(),
            fallback: None,
        }
    }

    /// The server's shared cache beside an experience directory's libraries.
    pub fn beside(experience_dir: &Path) -> ProgramCache {
        ProgramCache::new(experience_dir.join(".programs"))
    }

    /// One key's own cache (`owner` is the key's digest tag), reading the shared one where it
    /// has no program of its own.
    pub fn of_key(experience_dir: &Path, owner: &str) -> ProgramCache {
        let shared = experience_dir.join(".programs");
        let tag: String = owner
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(32)
            .collect();
        ProgramCache {
            dir: shared.join(format!("key-{tag}")),
            fallback: Some(shared),
        }
    }

    fn path(&self, family: &str) -> PathBuf {
        let name: String = family
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || ".-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("{name}.json"))
    }

    /// The kept program of a family, this cache's own or else its fallback's.
    pub fn get(&self, family: &str) -> Option<Cached> {
        self.own(family).or_else(|| {
            let shared = ProgramCache::new(self.fallback.clone()?);
            shared.own(family)
        })
    }

    /// The program this cache itself keeps for a family; an unreadable file counts as none
    /// (and is logged).
    fn own(&self, family: &str) -> Option<Cached> {
        let path = self.path(family);
        let text = std::fs::read_to_string(&path).ok()?;
        match serde_json::from_str(&text) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable cached program");
                None
            }
        }
    }

    /// Keeps `program` unless the family already has one that did better on its training
    /// instances. Returns whether it was kept.
    pub fn offer(&self, program: &Cached) -> std::io::Result<bool> {
        let _guard = LOCK.lock();
        if let Some(old) = self.own(&program.family) {
            let old_key = (old.train.success_rate, old.train.mean_reward);
            if old_key >= (program.train.success_rate, program.train.mean_reward) {
                return Ok(false);
            }
        }
        self.write(program)?;
        Ok(true)
    }

    /// Counts instances played with the family's kept program.
    pub fn served(&self, family: &str, instances: u64) -> std::io::Result<()> {
        let _guard = LOCK.lock();
        if let Some(mut c) = self.own(family) {
            c.instances_served += instances;
            self.write(&c)?;
        }
        Ok(())
    }

    /// Forgets a family's program.
    pub fn remove(&self, family: &str) -> std::io::Result<bool> {
        let _guard = LOCK.lock();
        match std::fs::remove_file(self.path(family)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn write(&self, c: &Cached) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(&c.family);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(c)?)?;
        std::fs::rename(&tmp, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(family: &str, success_rate: f64) -> Cached {
        Cached {
            family: family.to_owned(),
            program: "def solve(obs):\n    return ['left']\n".into(),
            model: "m".into(),
            train: crate::planning::ipp::Summary {
                instances: 2,
                success_rate,
                mean_reward: success_rate,
                errors: 0,
            },
            model_calls: 1,
            usage: Default::default(),
            instances_served: 0,
            created: "2026-12-07T00:00:00Z".into(),
        }
    }

    #[test]
    fn a_keys_programs_never_replace_the_shared_ones() {
        let dir = tempfile::tempdir().unwrap();
        let shared = ProgramCache::beside(dir.path());
        assert!(shared.offer(&program("grid", 0.5)).unwrap());
        let user = ProgramCache::of_key(dir.path(), "ab12");
        // The user key reads the shared program until it has its own.
        assert_eq!(user.get("grid").unwrap().train.success_rate, 0.5);
        // A "better" program it shows goes to its own cache only.
        assert!(user.offer(&program("grid", 1.0)).unwrap());
        assert_eq!(user.get("grid").unwrap().train.success_rate, 1.0);
        assert_eq!(shared.get("grid").unwrap().train.success_rate, 0.5);
        let other = ProgramCache::of_key(dir.path(), "cd34");
        assert_eq!(other.get("grid").unwrap().train.success_rate, 0.5);
    }
}
