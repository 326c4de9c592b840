//! Reading blob bytes out of the store: a range of a complete file, or a fill in progress
//! followed behind its writer. Reads are positional (`pread`), so any number of readers share
//! one open file without seeking.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use http::{header, HeaderMap, HeaderValue, Method};

use super::fill::{Fill, FillError, Progress};
use super::tail::Located;
use crate::upstream::UpstreamRequest;

/// How much one read hands to the client at a time.
const CHUNK: u64 = 256 * 1024;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Reads `len` bytes at `pos` on the blocking pool.
pub async fn read_at(file: Arc<File>, pos: u64, len: u64) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = BytesMut::zeroed(len as usize);
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], pos + filled as u64) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob file shorter than expected",
                    ))
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(buf.freeze())
    })
    .await
    .map_err(io::Error::other)?
}

/// How much of a mapped blob goes into one body frame: large enough for few wake-ups, small
/// enough that many clients share a connection's worth of socket buffer fairly.
const SLICE: usize = 1 << 20;

/// A mapped blob (or a range of it) as body frames: slices, no copies.
pub fn slices(data: Bytes) -> impl Stream<Item = Result<Bytes, BoxError>> + Send {
    let n = data.len().div_ceil(SLICE);
    futures_util::stream::iter(
        (0..n).map(move |i| Ok(data.slice(i * SLICE..((i + 1) * SLICE).min(data.len())))),
    )
}

struct Follower {
    fill: Arc<Fill>,
    rx: tokio::sync::watch::Receiver<Progress>,
    pos: u64,
    end: Option<u64>,
    /// The most one item carries.
    chunk: u64,
    /// Set when the store failed mid-fill: the rest comes straight from upstream.
    bypass: Option<futures_util::stream::BoxStream<'static, Result<Bytes, BoxError>>>,
    /// Counts this reader among the fill's live followers (the status page shows them).
    _following: super::fill::Following,
}

/// The bytes `start..end` (or `start..` the end of the blob) of a fill in progress, read from its
/// temp file as the writer publishes them. A failed fill ends the stream with an error, never a
/// clean end; a fill whose *storage* failed is continued straight from the upstream.
pub fn follow(
    fill: Arc<Fill>,
    start: u64,
    end: Option<u64>,
) -> impl Stream<Item = Result<Bytes, BoxError>> + Send {
    follow_in_chunks(fill, start, end, CHUNK)
}

/// [`follow`], handing out at most `chunk` bytes at a time.
fn follow_in_chunks(
    fill: Arc<Fill>,
    start: u64,
    end: Option<u64>,
    chunk: u64,
) -> impl Stream<Item = Result<Bytes, BoxError>> + Send {
    let rx = fill.subscribe();
    let st = Follower {
        _following: fill.following(),
        fill,
        rx,
        pos: start,
        end,
        chunk,
        bypass: None,
    };
    futures_util::stream::try_unfold(st, |mut st| async move {
        loop {
            if let Some(b) = st.bypass.as_mut() {
                return match b.next().await {
                    Some(Ok(bytes)) => {
                        st.pos += bytes.len() as u64;
                        Ok(Some((bytes, st)))
                    }
                    Some(Err(e)) => Err(e),
                    None => match st.end {
                        Some(end) if st.pos < end => {
                            Err(BoxError::from("upstream ended the transfer early"))
                        }
                        _ => Ok(None),
                    },
                };
            }
            let progress = st.rx.borrow_and_update().clone();
            let (file, available, complete) = match progress {
                Progress::Connecting => {
                    if st.rx.changed().await.is_err() {
                        return Err("fill ended without a result".into());
                    }
                    continue;
                }
                // The last byte of the blob is held back until the fill is verified, so a
                // client never receives a complete-looking body whose digest then fails. Without
                // a Content-Length any byte may be the last: the newest is held back.
                Progress::Streaming {
                    file,
                    written,
                    total,
                } => (file, held_back(written, total), false),
                Progress::Done { file, size } => (file, size, true),
                Progress::Failed(FillError::Storage(_)) => {
                    st.bypass = Some(bypass(&st.fill, st.pos, st.end).await?);
                    continue;
                }
                Progress::Failed(e) => return Err(Box::new(e)),
            };
            let limit = st.end.map_or(available, |e| e.min(available));
            if st.pos < limit {
                // At the live edge the bytes are still in the fill's tail: no read, no copy.
                // Older ones are read from the file, never past what has been written to it.
                let want = (limit - st.pos).min(st.chunk);
                let bytes = match st.fill.locate(st.pos, want) {
                    Located::Memory(b) => b,
                    Located::File(n) => read_at(file, st.pos, n).await?,
                    // Published bytes are always in memory or on disk; if not, fail loudly
                    // rather than wait or end short.
                    Located::Pending => return Err("fill lost published bytes".into()),
                };
                st.pos += bytes.len() as u64;
                return Ok(Some((bytes, st)));
            }
            if complete || st.end.is_some_and(|e| st.pos >= e) {
                return Ok(None);
            }
            if st.rx.changed().await.is_err() {
                return Err("fill ended without a result".into());
            }
        }
    })
}

/// How many of `written` bytes a follower may have before the fill is verified: all but the
/// blob's last byte, or all but the newest when the size is unknown.
fn held_back(written: u64, total: Option<u64>) -> u64 {
    match total {
        Some(t) => written.min(t.saturating_sub(1)),
        None => written.saturating_sub(1),
    }
}

/// Continues a transfer from upstream at `pos` when the store could not keep the blob.
async fn bypass(
    fill: &Fill,
    pos: u64,
    end: Option<u64>,
) -> Result<futures_util::stream::BoxStream<'static, Result<Bytes, BoxError>>, BoxError> {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    if pos > 0 || end.is_some() {
        let last = end.map(|e| (e - 1).to_string()).unwrap_or_default();
        headers.insert(
            header::RANGE,
            HeaderValue::from_str(&format!("bytes={pos}-{last}"))?,
        );
    }
    let source = fill.source();
    let resp = source
        .upstream
        .send(&UpstreamRequest {
            method: Method::GET,
            repo: &source.repo,
            path: format!("blobs/{}", fill.digest),
            query: None,
            headers,
            streaming: true,
        })
        .await?;
    if pos > 0 && resp.status() != http::StatusCode::PARTIAL_CONTENT {
        return Err("upstream does not serve ranges; cannot resume the transfer".into());
    }
    Ok(resp
        .bytes_stream()
        .map(|r| r.map_err(BoxError::from))
        .boxed())
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::time::Duration;

    use proptest::prelude::*;
    use tokio::sync::watch;

    use super::*;
    use crate::cache::fill::{new_fill_keeping, test_source};
    use crate::oci::Digest;
    use crate::upstream::UpstreamErrorKind;

    /// The writer side of a fill, played by the test one step at a time, on the same `Fill`
    /// (tail, progress) the fill task drives: receive the next chunk, write the oldest
    /// unwritten one, end. Hashing is left out: it only decides when `Done` is sent.
    struct Writer {
        fill: Arc<Fill>,
        tx: watch::Sender<Progress>,
        file: Arc<File>,
        blob: Vec<u8>,
        /// Chunk boundaries in the order the upstream sends them.
        chunks: Vec<(usize, usize)>,
        received: usize,
        written: usize,
        total: Option<u64>,
        ended: bool,
    }

    impl Writer {
        fn new(blob: Vec<u8>, lens: &[usize], keep: usize, total_known: bool) -> Writer {
            let (fill, tx) = new_fill_keeping(Digest::sha256_of(&blob), test_source(), keep);
            let mut chunks = Vec::new();
            let mut off = 0;
            for len in lens.iter().cycle() {
                if off == blob.len() {
                    break;
                }
                let end = (off + len).min(blob.len());
                chunks.push((off, end));
                off = end;
            }
            let file = Arc::new(tempfile::tempfile().unwrap());
            let total = total_known.then_some(blob.len() as u64);
            tx.send_replace(Progress::Streaming {
                file: file.clone(),
                total,
                written: 0,
            });
            Writer {
                fill,
                tx,
                file,
                blob,
                chunks,
                received: 0,
                written: 0,
                total,
                ended: false,
            }
        }

        fn received_bytes(&self) -> u64 {
            self.chunks[..self.received]
                .last()
                .map_or(0, |&(_, end)| end as u64)
        }

        fn receive(&mut self) -> bool {
            let Some(&(start, end)) = self.chunks.get(self.received) else {
                return false;
            };
            self.received += 1;
            self.fill
                .receive(Bytes::copy_from_slice(&self.blob[start..end]));
            let now = self.received_bytes();
            self.tx.send_modify(|p| {
                if let Progress::Streaming { written, .. } = p {
                    *written = now;
                }
            });
            true
        }

        fn write(&mut self) -> bool {
            if self.written == self.received {
                return false;
            }
            let (start, end) = self.chunks[self.written];
            (&*self.file).write_all(&self.blob[start..end]).unwrap();
            self.written += 1;
            self.fill.wrote((end - start) as u64);
            true
        }

        /// Receives and writes the rest, then reports the fill verified or failed.
        fn end(&mut self, verified: bool) {
            while self.receive() {}
            while self.write() {}
            self.ended = true;
            self.tx.send_replace(if verified {
                Progress::Done {
                    file: self.file.clone(),
                    size: self.blob.len() as u64,
                }
            } else {
                let up = &self.fill.source().upstream;
                Progress::Failed(up.error(UpstreamErrorKind::DigestMismatch).into())
            });
        }

        /// Whether a follower at `pos` (stopping at `end`) would get an item now rather than
        /// wait for the writer.
        fn follower_can_move(&self, pos: u64, end: Option<u64>) -> bool {
            if self.ended {
                return true;
            }
            let available = held_back(self.received_bytes(), self.total);
            pos < end.map_or(available, |e| e.min(available)) || end.is_some_and(|e| pos >= e)
        }
    }

    async fn next_item(
        s: &mut (impl Stream<Item = Result<Bytes, BoxError>> + Unpin),
    ) -> Option<Result<Bytes, BoxError>> {
        tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("a follower stalled although its bytes were readable")
    }

    /// The bug behind "blob file shorter than expected": a follower whose position has just
    /// left the tail read a whole chunk from the temp file, past the bytes written to it and
    /// into bytes that were only in memory, and its transfer ended early.
    #[tokio::test]
    async fn regression_blob_file_shorter_than_expected_at_the_disk_tail_boundary() {
        let blob: Vec<u8> = (0..64u8).collect();
        // 8 chunks of 8 received, the writer held back after 4, 16 bytes kept: the file holds
        // 0..32, the tail exactly 32..64.
        let mut w = Writer::new(blob.clone(), &[8], 16, true);
        while w.receive() {}
        for _ in 0..4 {
            assert!(w.write());
        }
        let mut s = Box::pin(follow_in_chunks(w.fill.clone(), 30, Some(64), CHUNK));
        let first = next_item(&mut s).await.unwrap().expect("the first read");
        assert_eq!(
            &first[..],
            &blob[30..32],
            "only what is on disk comes from the file"
        );
        let mut got = first.to_vec();
        while got.len() < 33 {
            got.extend_from_slice(&next_item(&mut s).await.unwrap().unwrap());
        }
        // The last byte waits for the verdict.
        w.end(true);
        while let Some(item) = next_item(&mut s).await {
            got.extend_from_slice(&item.unwrap());
        }
        assert_eq!(got, &blob[30..]);
    }

    /// Drives a follower of `range` through a fill whose steps come in `ops` order
    /// (0: receive, 1: write, 2: let the follower take an item), then ends the fill.
    async fn follow_through(
        w: &mut Writer,
        start: u64,
        end: Option<u64>,
        step: u64,
        ops: &[u8],
        verified: bool,
    ) -> (Vec<u8>, Result<(), String>) {
        let mut s = Box::pin(follow_in_chunks(w.fill.clone(), start, end, step));
        let mut got = Vec::new();
        for op in ops {
            match op {
                0 => {
                    w.receive();
                }
                1 => {
                    w.write();
                }
                _ => {
                    if w.follower_can_move(start + got.len() as u64, end) {
                        match next_item(&mut s).await {
                            Some(Ok(b)) => got.extend_from_slice(&b),
                            Some(Err(e)) => return (got, Err(e.to_string())),
                            None => return (got, Ok(())),
                        }
                    }
                }
            }
        }
        w.end(verified);
        loop {
            match next_item(&mut s).await {
                Some(Ok(b)) => got.extend_from_slice(&b),
                Some(Err(e)) => return (got, Err(e.to_string())),
                None => return (got, Ok(())),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// For any interleaving of receive, write and trim (trimming follows each write), any
        /// start and Range: a follower of a verified fill gets exactly its bytes; a follower of
        /// a failed fill gets a prefix of them and an error, never a short clean end.
        #[test]
        fn a_follower_yields_exactly_its_bytes_or_an_error(
            len in 1usize..2000,
            lens in proptest::collection::vec(1usize..300, 1..6),
            keep in 0usize..800,
            step in 1u64..600,
            total_known in any::<bool>(),
            verified in any::<bool>(),
            start_seed in any::<u64>(),
            end_seed in proptest::option::of(any::<u64>()),
            ops in proptest::collection::vec(0u8..3, 0..300),
        ) {
            let blob: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let start = start_seed % len as u64;
            let end = end_seed.map(|e| start + 1 + e % (len as u64 - start));
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (got, result) = rt.block_on(async {
                let mut w = Writer::new(blob.clone(), &lens, keep, total_known);
                follow_through(&mut w, start, end, step, &ops, verified).await
            });
            let want = &blob[start as usize..end.map_or(len, |e| e as usize)];
            prop_assert!(want.starts_with(&got), "wrong bytes at {}", start as usize + got.len());
            if verified {
                prop_assert_eq!(&result, &Ok(()));
                prop_assert_eq!(got.len(), want.len());
            } else if result.is_ok() {
                // A range that stops before the last byte may finish before the verdict.
                prop_assert_eq!(got.len(), want.len());
                prop_assert!(end.is_some_and(|e| e < len as u64), "a failed fill ended cleanly");
            }
        }
    }
}
