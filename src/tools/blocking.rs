//! The store for tools written as plain sequential code (export, import): each call runs the
//! store's async operation to completion on a small runtime the tool owns.

use std::future::Future;
use std::io;
use std::path::Path;

use crate::cache::Store;
use crate::config::StorageBackend;

pub struct BlockingStore {
    rt: tokio::runtime::Runtime,
    store: Store,
}

impl BlockingStore {
    /// The store at `root`, beside any running server (see `Store::open_beside`); the caller
    /// holds the store lock when it writes.
    pub fn open_beside(root: &Path, backend: &StorageBackend) -> io::Result<BlockingStore> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let store = Store::open_beside_with(root, backend)?;
        Ok(BlockingStore { rt, store })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Runs `work` (usually a call on [`BlockingStore::store`]) to completion.
    pub fn wait<T>(&self, work: impl Future<Output = T>) -> T {
        self.rt.block_on(work)
    }
}
