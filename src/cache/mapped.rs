//! Stored blobs mapped into memory for serving. A blob in the store is complete, verified and
//! never written again (fills write temp files and rename them in), so a read-only mapping of it
//! is stable for as long as it lives; serving a range is slicing `Bytes`, which hyper writes
//! straight from the page cache: no read into a buffer, no blocking-pool hop per chunk.
//!
//! Each mapping of a stored blob also keeps its file open and is listed in a registry by
//! address, so a connection that is about to write a slice of one can ask which file and
//! offset it is (`file_of`) and send it with `sendfile` instead of copying it into the socket
//! (`crate::http::conn`): the copy was a third of a 100 KiB hit's CPU (BENCHMARKS.md).
//!
//! A fill whose body arrives by `splice` maps its temp file the same way (`Growing`): it
//! hashes the bytes there, and its followers' slices of the written part go out by `sendfile`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use bytes::Bytes;

/// Maps a whole stored blob. Empty files cannot be mapped and need not be.
pub fn map_file(path: &Path) -> io::Result<Bytes> {
    let file = File::open(path)?;
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
    let map = unsafe { memmap2::Mmap::map(&file)? };
    // Sequential readers are the common case; let the kernel read ahead.
    let _ = map.advise(memmap2::Advice::Sequential);
    Ok(Bytes::from_owner(Registered::new(map, file, false)))
}

/// Where the bytes of a mapped slice are in their file.
pub struct InFile {
    pub file: Arc<File>,
    pub offset: u64,
    /// A fill's temp file (`Growing`), whose pages the process should not touch: copying
    /// from it would make them resident here one by one, where `sendfile` leaves them out.
    pub growing: bool,
}

/// The file and offset of `slice` when it lies within one mapping of a stored blob (or of a
/// spliced fill's temp file) whose file is kept open: the same bytes as the slice, readable
/// with `pread` or `sendfile` while the caller holds the slice (which keeps the mapping, and
/// so its entry, alive).
pub fn file_of(slice: &[u8]) -> Option<InFile> {
    let start = slice.as_ptr() as usize;
    let end = start.checked_add(slice.len())?;
    let regions = REGIONS.read().unwrap_or_else(|e| e.into_inner());
    let (&base, region) = regions.range(..=start).next_back()?;
    (end <= region.end).then(|| InFile {
        file: region.file.clone(),
        offset: (start - base) as u64,
        growing: region.growing,
    })
}

/// A registered mapping: where it is, and its file.
struct Region {
    end: usize,
    file: Arc<File>,
    growing: bool,
}

/// Live mappings of stored blobs whose files are kept open, by start address. An entry is
/// added once its mapping exists and removed before it is unmapped, so an address found
/// here while a slice of it is held is that slice's mapping.
static REGIONS: RwLock<BTreeMap<usize, Region>> = RwLock::new(BTreeMap::new());
/// Open files kept by mappings, against `fd_budget`.
static HELD: AtomicUsize = AtomicUsize::new(0);

/// How many files mappings may keep open: a quarter of the process's descriptor limit, so a
/// low limit (1024 is common) is never used up by cached mappings; beyond it, mappings work
/// as before, without `sendfile`.
fn fd_budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| (crate::sys::fd_limit() / 4) as usize)
}

/// The owner of a mapping in its `Bytes`: the map, and its registry entry while it has one.
struct Registered {
    map: memmap2::Mmap,
    listed: bool,
}

impl Registered {
    fn new(map: memmap2::Mmap, file: File, growing: bool) -> Registered {
        let listed = HELD
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < fd_budget()).then_some(n + 1)
            })
            .is_ok();
        if listed {
            let start = map.as_ptr() as usize;
            let region = Region {
                end: start + map.len(),
                file: Arc::new(file),
                growing,
            };
            REGIONS
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(start, region);
        }
        Registered { map, listed }
    }
}

impl AsRef<[u8]> for Registered {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        // Before the map field is dropped (unmapped): no later mapping at this address can
        // be listed while this entry still is.
        if self.listed {
            REGIONS
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(self.map.as_ptr() as usize));
            HELD.fetch_sub(1, Ordering::AcqRel);
        }
    }
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

/// A read-only mapping of a fill's temp file, whose bytes arrive in order by `splice` and never
/// pass through user memory otherwise (`cache::spliced`): the fill hashes them here and hands
/// slices of the written part to followers. Registered like a stored blob's mapping, so those
/// slices go to clients with `sendfile`.
pub struct Growing {
    bytes: Bytes,
}

impl Growing {
    /// Maps `len` bytes of `file`, which grows to that length as it is written: only its
    /// written part, which is within the file's size, may be read.
    pub fn new(file: &File, len: u64) -> io::Result<Growing> {
        if len == 0 {
            return Ok(Growing {
                bytes: Bytes::new(),
            });
        }
        let held = file.try_clone()?;
        // SAFETY: the file is a fill's temp file; bytes are written once, in order, by the
        // fill that owns the mapping, and only its written part (within the file's size, so
        // backed by its pages) is ever read or handed out: the pages past the end, which
        // would fault, are never touched. Nothing truncates it: a failed fill unlinks it,
        // which leaves the mapping valid. (Making the file its full length first would also
        // back those pages, but a file-size limit or a full disk would then fail the fill
        // before its first byte instead of where the disk gave out.)
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::MmapOptions::new().len(len as usize).map(&held)? };
        Ok(Growing {
            bytes: Bytes::from_owner(Registered::new(map, held, true)),
        })
    }

    /// The whole mapping, to be sliced only where the file is written.
    pub fn whole(&self) -> Bytes {
        self.bytes.clone()
    }

    /// Bytes `range` of the file, which must be written already.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Bytes {
        self.bytes.slice(range)
    }

    /// Unmaps the whole pages of `range` from the process (they stay in the page cache and
    /// are mapped again if touched): hashing a blob through the mapping would otherwise make
    /// all of it resident here.
    pub fn release(&self, range: std::ops::Range<usize>) {
        const PAGE: usize = 4096;
        let base = self.bytes.as_ptr() as usize;
        let start = (base + range.start).next_multiple_of(PAGE);
        let end = (base + range.end.min(self.bytes.len())) & !(PAGE - 1);
        if end > start {
            // SAFETY: the range lies within this mapping, shared and backed by the file:
            // after MADV_DONTNEED its pages read the same file contents again (only private
            // mappings lose data), so no slice of it held anywhere sees a change.
            #[allow(unsafe_code)]
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_of_a_mapping_name_their_file_and_offset_until_it_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let map = map_file(&p).unwrap();
        let part = map.slice(70_000..170_000);
        let InFile {
            file,
            offset,
            growing,
        } = file_of(&part).expect("a slice of a stored blob's mapping");
        assert!(!growing);
        assert_eq!(offset, 70_000);
        let mut read = vec![0u8; part.len()];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut read, offset).unwrap();
        assert_eq!(read, &part[..]);
        // Heap memory is no file's; the whole mapping is its file from offset 0.
        assert!(file_of(&data[10..20]).is_none());
        assert_eq!(file_of(&map).unwrap().offset, 0);
        let addr = map.as_ptr() as usize;
        drop((map, part));
        let regions = REGIONS.read().unwrap();
        assert!(
            !regions.contains_key(&addr),
            "dropped mappings leave the registry"
        );
    }

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
