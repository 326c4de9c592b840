//! One process at a time on a store: the server, `prefetch` in direct mode and `import` hold an
//! exclusive lock on `<root>/lock` (an advisory file lock the kernel drops when the process
//! ends, so a crash leaves no stale lock). Without it, a second process would empty the first
//! one's temp folder at start-up and number journal entries on its own. The `entrepot cache`
//! commands do not take it: they work beside a running server.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::Path;

/// Held for as long as the store is open.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

pub fn acquire(root: &Path) -> io::Result<StoreLock> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(super::layout::lock_file(root))?;
    match file.try_lock() {
        Ok(()) => Ok(StoreLock { _file: file }),
        Err(TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "{} is in use by another entrepot process (a server, a prefetch or an import); \
                 stop it first, or prefetch through it with `entrepot prefetch --server URL`",
                root.display()
            ),
        )),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(dir.path()).unwrap();
        let err = acquire(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(err
            .to_string()
            .contains("in use by another entrepot process"));
        drop(first);
        acquire(dir.path()).unwrap();
    }
}
