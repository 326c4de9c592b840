//! Where the received bytes of a fill in progress can be read: the newest from memory (the
//! tail), older ones from the temp file. The one rule followers depend on: a byte leaves the
//! tail only once it is on disk, and a file read never reaches past what has been written.

use std::collections::VecDeque;

use bytes::Bytes;

/// The received bytes of a fill: chunks in upstream order (oldest first) and how far the temp
/// file has been written.
///
/// Invariant: every byte in `0..received` is in `chunks` or below `on_disk`, or both.
pub(super) struct Tail {
    chunks: VecDeque<(u64, Bytes)>,
    /// Bytes held in `chunks`.
    bytes: usize,
    received: u64,
    on_disk: u64,
    /// Bytes already on disk to keep in memory anyway, for followers near the live edge.
    keep: usize,
}

/// Where a follower finds the bytes at its position.
#[derive(Debug, PartialEq, Eq)]
pub enum Located {
    /// In memory: the next bytes (at most the requested number), without a copy.
    Memory(Bytes),
    /// In the temp file: this many bytes (at least 1, at most the requested number) from the
    /// position are written there. The bytes after them may still be only in memory, so a read
    /// must not go further.
    File(u64),
    /// Not received yet.
    Pending,
}

impl Tail {
    pub(super) fn new(keep: usize) -> Tail {
        Tail {
            chunks: VecDeque::new(),
            bytes: 0,
            received: 0,
            on_disk: 0,
            keep,
        }
    }

    /// Appends a received chunk; its bytes are readable from here on.
    pub(super) fn receive(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        let len = chunk.len();
        self.chunks.push_back((self.received, chunk));
        self.received += len as u64;
        self.bytes += len;
    }

    /// `n` more bytes reached the temp file (in order). Drops the oldest chunks that are
    /// entirely on disk while more than `keep` bytes are held.
    pub(super) fn wrote(&mut self, n: u64) {
        self.on_disk += n;
        debug_assert!(self.on_disk <= self.received, "wrote bytes never received");
        while self.bytes > self.keep {
            match self.chunks.front() {
                Some((off, c)) if off + c.len() as u64 <= self.on_disk => {
                    self.bytes -= c.len();
                    self.chunks.pop_front();
                }
                _ => break,
            }
        }
    }

    /// Where up to `max` (≥ 1) bytes at `pos` are.
    pub(super) fn locate(&self, pos: u64, max: u64) -> Located {
        if pos >= self.received || max == 0 {
            return Located::Pending;
        }
        if let Some(&(first, _)) = self.chunks.front() {
            if pos >= first {
                let i = self.chunks.partition_point(|(off, _)| *off <= pos) - 1;
                let (off, chunk) = &self.chunks[i];
                let start = (pos - off) as usize;
                let end = chunk.len().min(start.saturating_add(max as usize));
                return Located::Memory(chunk.slice(start..end));
            }
        }
        // Older than the tail, so on disk (by the invariant) — but only up to `on_disk`: the
        // bytes after it are in the tail alone.
        match self.on_disk.saturating_sub(pos).min(max) {
            0 => Located::Pending,
            n => Located::File(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail_of(keep: usize, chunks: usize, chunk_len: usize, written: usize) -> Tail {
        let mut t = Tail::new(keep);
        for i in 0..chunks {
            t.receive(Bytes::from(vec![i as u8; chunk_len]));
        }
        for _ in 0..written {
            t.wrote(chunk_len as u64);
        }
        t
    }

    #[test]
    fn bytes_before_the_tail_are_read_from_the_file_up_to_what_is_written() {
        // 8 chunks of 8 received, 4 written, keep 16: the tail is exactly the 4 unwritten
        // chunks, so the file holds 0..32 and the tail 32..64.
        let t = tail_of(16, 8, 8, 4);
        assert_eq!(t.locate(30, 100), Located::File(2));
        assert_eq!(t.locate(0, 100), Located::File(32));
        assert_eq!(t.locate(0, 5), Located::File(5));
        assert_eq!(
            t.locate(32, 100),
            Located::Memory(Bytes::from(vec![4u8; 8]))
        );
        assert_eq!(t.locate(35, 2), Located::Memory(Bytes::from(vec![4u8; 2])));
        assert_eq!(t.locate(64, 1), Located::Pending);
    }

    #[test]
    fn written_bytes_stay_in_memory_up_to_keep() {
        let t = tail_of(24, 8, 8, 8);
        // 64 bytes on disk; the newest 24 are kept.
        assert_eq!(t.locate(39, 100), Located::File(25));
        assert_eq!(
            t.locate(40, 100),
            Located::Memory(Bytes::from(vec![5u8; 8]))
        );
    }

    #[test]
    fn a_chunk_partly_on_disk_stays_in_the_tail() {
        let mut t = tail_of(0, 2, 8, 0);
        t.wrote(12);
        assert_eq!(t.locate(0, 100), Located::File(12));
        assert_eq!(t.locate(8, 100), Located::Memory(Bytes::from(vec![1u8; 8])));
    }
}
