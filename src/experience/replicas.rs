//! Following the other replicas of a shared store: each commit, creation, deletion or
//! settings change is announced on the database's channel with the library's name, and every
//! replica brings that library up to date from the rows. Notifications sent while a replica's
//! connection was down are lost, so it also compares every library's head with the database
//! after each reconnection and every `database.resync_secs`.

use std::sync::Arc;

use super::backing::Head;
use super::library::Library;
use super::store::{adopt, Store};
use crate::error::Result;

impl Store {
    /// Whether other replicas write the same libraries.
    pub fn shared(&self) -> bool {
        self.backing.shared()
    }

    /// Brings `name` up to date with the shared store: opened when another replica created
    /// it, dropped when it was deleted, reopened when it was deleted and created again, and
    /// otherwise given the versions and settings it lacks.
    pub fn sync(&self, name: &str) -> Result<()> {
        let head = self.backing.heads(Some(name))?.pop();
        self.sync_to(name, head.as_ref())
    }

    /// Compares every library with the shared store and brings the ones that differ up to
    /// date.
    pub fn sync_all(&self) -> Result<()> {
        if !self.shared() {
            return Ok(());
        }
        let heads = self.backing.heads(None)?;
        let held: Vec<String> = self.libraries.read().keys().cloned().collect();
        for gone in held.iter().filter(|n| !heads.iter().any(|h| &h.name == *n)) {
            self.sync_to(gone, None)?;
        }
        let held: Vec<Arc<Library>> = self.libraries.read().values().cloned().collect();
        for lib in held {
            // Use counts change with every request served anywhere, and are not announced.
            if let Err(e) = lib.refresh_uses() {
                tracing::warn!(library = %lib.name, error = %e, "could not read use counts");
            }
        }
        for head in &heads {
            let current = self.libraries.read().get(&head.name).map(|l| l.head());
            if current != Some((head.generation, head.version, head.settings_rev)) {
                if let Err(e) = self.sync_to(&head.name, Some(head)) {
                    tracing::warn!(library = %head.name, error = %e, "could not follow a library");
                }
            }
        }
        Ok(())
    }

    fn sync_to(&self, name: &str, head: Option<&Head>) -> Result<()> {
        let _one_at_a_time = self.following.lock();
        let held = self.libraries.read().get(name).cloned();
        match (held, head) {
            (None, None) => Ok(()),
            (Some(_), None) => {
                self.libraries.write().remove(name);
                let _ = std::fs::remove_dir_all(self.dir.join(name));
                tracing::info!(library = name, "deleted by another replica");
                Ok(())
            }
            (Some(lib), Some(h)) if lib.head().0 == h.generation => lib.catch_up().map(|_| ()),
            (_, Some(_)) => {
                let dir = self.dir.join(name);
                let max = self.options.max_top_k;
                let opened = self.backing.open(&dir, name, max)?;
                let lib = Arc::new(Library::load(&dir, name, max, opened)?);
                adopt(&lib, &self.options, &self.changed);
                self.libraries.write().insert(name.to_owned(), lib);
                tracing::info!(library = name, "opened from another replica");
                Ok(())
            }
        }
    }

    /// Follows the other replicas for as long as the server runs: a notification brings its
    /// library up to date, and a reconnection or the resync interval compares them all.
    pub fn follow(self: &Arc<Self>, db: crate::db::Db) {
        let store = self.clone();
        tokio::spawn(async move {
            loop {
                let mut listener = match db.listen().await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for other replicas; retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                };
                store.resync().await;
                let mut every = tokio::time::interval(db.resync());
                loop {
                    tokio::select! {
                        got = listener.try_recv() => match got {
                            Ok(Some(n)) => store.resync_one(n.payload().to_owned()).await,
                            // The connection was lost (and is made again on the next call):
                            // what was announced meanwhile is found by comparing.
                            Ok(None) => store.resync().await,
                            Err(e) => {
                                tracing::warn!(error = %e, "lost the replicas' channel");
                                break;
                            }
                        },
                        _ = every.tick() => store.resync().await,
                    }
                }
            }
        });
    }

    async fn resync(self: &Arc<Self>) {
        let store = self.clone();
        match tokio::task::spawn_blocking(move || store.sync_all()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "comparing with the shared store failed"),
            Err(e) => tracing::error!(error = %e, "the resync task failed"),
        }
    }

    async fn resync_one(self: &Arc<Self>, name: String) {
        let store = self.clone();
        let done = tokio::task::spawn_blocking(move || {
            let r = store.sync(&name);
            (name, r)
        })
        .await;
        if let Ok((name, Err(e))) = done {
            tracing::warn!(library = %name, error = %e, "could not follow a library");
        }
    }
}
