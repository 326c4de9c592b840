//! Stored blobs mapped into memory for serving. A blob in the store is complete, verified and
//! never written again (fills write temp files and rename them in), so a read-only mapping of it
//! is stable for as long as it lives; serving a range is slicing `Bytes`, which hyper writes
//! straight from the page cache: no read into a buffer, no blocking-pool hop per chunk.

use std::fs::File;
use std::io;
use std::path::Path;

use bytes::Bytes;

/// Maps a whole stored blob. Empty files cannot be mapped and need not be.
pub fn map_file(path: &Path) -> io::Result<Bytes> {
    map(&File::open(path)?)
}

/// Maps a whole file that is complete and will not change (a verified blob or spool file).
pub fn map(file: &File) -> io::Result<Bytes> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the mapping is read-only and of a file entrepot never modifies after it is
    // committed: blobs are written to temp files and renamed into place, and removal (unlink)
    // leaves an existing mapping valid. Only another process truncating the file in place
    // could invalidate it, and nothing in entrepot does that. Measured reason for `unsafe`
    // here: warm blob serving without a read copy or a blocking-pool round trip per chunk.
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(file)? };
    // Sequential readers are the common case; let the kernel read ahead.
    let _ = map.advise(memmap2::Advice::Sequential);
    Ok(Bytes::from_owner(map))
}

/// Maps `range` of a file that is complete and will not change: the pages of one piece (an
/// upload's part), released from the process when the returned bytes are dropped.
pub fn map_range(file: &File, range: std::ops::Range<u64>) -> io::Result<Bytes> {
    if range.is_empty() {
        return Ok(Bytes::new());
    }
    // SAFETY: as in `map`: a verified blob or spool file, never written again.
    #[allow(unsafe_code)]
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(range.start)
            .len((range.end - range.start) as usize)
            .map(file)?
    };
    let _ = map.advise(memmap2::Advice::Sequential);
    Ok(Bytes::from_owner(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_whole_files_and_empty_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b");
        std::fs::write(&p, b"hello blob").unwrap();
        assert_eq!(&map_file(&p).unwrap()[..], b"hello blob");
        std::fs::write(&p, b"").unwrap();
        assert!(map_file(&p).unwrap().is_empty());
        assert!(map_file(&dir.path().join("missing")).is_err());
        std::fs::write(&p, vec![7u8; 10_000]).unwrap();
        let f = File::open(&p).unwrap();
        assert_eq!(
            &map_range(&f, 4097..9000).unwrap()[..],
            &vec![7u8; 4903][..]
        );
    }
}
