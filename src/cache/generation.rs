//! Changes made behind a running server's back (`entrepot cache`, and with shared storage other
//! replicas' tools): announced in the store's generation record, which servers watch, dropping
//! what they hold in memory when it moves.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{layout, usage, Store};

impl Store {
    /// Tells running servers that content was removed behind their back (by `entrepot cache`):
    /// they drop what they hold in memory and look at storage again.
    pub async fn bump_generation(&self) -> io::Result<()> {
        let stamp = format!("{} {}", usage::unix_now_ms(), std::process::id());
        self.meta.put(layout::GENERATION, Bytes::from(stamp)).await
    }

    /// Watches the generation record until `stopping`: when a tool bumps it, every in-memory
    /// mapping, manifest and tag is dropped, so removed content is fetched again and its space
    /// freed once the last reader is done.
    pub async fn watch_generation(
        self: Arc<Self>,
        every: std::time::Duration,
        stopping: CancellationToken,
    ) {
        let mut seen = self.meta.get(layout::GENERATION).await.ok().flatten();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stopping.cancelled() => return,
            }
            let now = match self.meta.get(layout::GENERATION).await {
                Ok(g) => g,
                Err(e) => {
                    tracing::debug!(error = %e, "could not read the store generation");
                    continue;
                }
            };
            if now != seen {
                tracing::info!("store changed by another process; dropping in-memory caches");
                self.forget_cached();
                seen = now;
            }
        }
    }

    /// Drops every in-memory copy of stored state; storage is read again on the next request.
    pub(super) fn forget_cached(&self) {
        self.mapped.invalidate_all();
        self.shared_seen.invalidate_all();
        self.manifest_cache.invalidate_all();
        // Invalidation is lazy: drop the mappings now, so removed files' space is freed.
        self.mapped.run_pending_tasks();
        self.manifest_cache.run_pending_tasks();
        self.tags.forget_all();
        self.links.forget_all();
    }

    /// How often to look for changes made by other processes (`entrepot cache`, and with
    /// shared storage other replicas' tools): a file is cheap to look at, a bucket less so.
    pub fn generation_check_interval(&self) -> std::time::Duration {
        if self.tiered {
            std::time::Duration::from_secs(5)
        } else {
            std::time::Duration::from_millis(500)
        }
    }
}
