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
    /// Set when the store failed mid-fill: the rest comes straight from upstream.
    bypass: Option<futures_util::stream::BoxStream<'static, Result<Bytes, BoxError>>>,
}

/// The bytes `start..end` (or `start..` the end of the blob) of a fill in progress, read from its
/// temp file as the writer publishes them. A failed fill ends the stream with an error, never a
/// clean end; a fill whose *storage* failed is continued straight from the upstream.
pub fn follow(
    fill: Arc<Fill>,
    start: u64,
    end: Option<u64>,
) -> impl Stream<Item = Result<Bytes, BoxError>> + Send {
    let rx = fill.subscribe();
    let st = Follower {
        fill,
        rx,
        pos: start,
        end,
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
                // client never receives a complete-looking body whose digest then fails.
                Progress::Streaming {
                    file,
                    written,
                    total,
                } => (
                    file,
                    total.map_or(written, |t| written.min(t.saturating_sub(1))),
                    false,
                ),
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
                // Older bytes have left the tail only after reaching the file.
                let want = (limit - st.pos).min(CHUNK);
                let bytes = match st.fill.tail_slice(st.pos, want) {
                    Some(b) => b,
                    None => read_at(file, st.pos, want).await?,
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
