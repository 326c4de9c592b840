//! A fill's body from a plain-HTTP upstream, moved from the socket into the temp file with
//! `splice`: the kernel hands the received pages to the file without the copy into a user
//! buffer and the copy back out that `recv` and `write` make. The fill then hashes the bytes
//! through a mapping of the file (`mapped::Growing`), and followers get slices of that mapping,
//! which their connections send with `sendfile`: the body never passes through user memory
//! except for the hash to read it. Measured in BENCHMARKS.md ("Where a cold pull's CPU goes").
//!
//! The loop runs on one blocking-pool thread from the first byte to the last: no hand-off per
//! chunk between a receiving task and a writing one. It publishes progress to followers as
//! the stream path does (the tail, then the watch), so `read::follow` does not know which path
//! a fill took.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::fill::{Fill, FillError, Progress};
use super::mapped::Growing;
use crate::oci::{Digest, Hasher};
use crate::upstream::{RawBody, UpstreamErrorKind};

/// How much one `splice` from the socket moves at most (the pipe's size, where allowed).
const STEP: usize = 1 << 20;
/// How many bytes around a faulting address the kernel maps at once (`fault_around_bytes`).
const FAULT_AROUND: usize = 64 << 10;
/// How long one wait for the upstream lasts before the fill looks at its stop flag again.
const WAIT: Duration = Duration::from_millis(250);

/// Receives `body` into `file` (reserved for it, empty); returns the bytes received (fewer
/// than `body.len` when the upstream closed early) and their digest. Stops within [`WAIT`]
/// once the returned future is dropped (the fill was cancelled).
pub(super) async fn receive(
    fill: &Arc<Fill>,
    tx: &watch::Sender<Progress>,
    file: Arc<File>,
    body: RawBody,
) -> Result<(u64, Digest), FillError> {
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_when_dropped = StopOnDrop(stop.clone());
    let (fill, tx) = (fill.clone(), tx.clone());
    tokio::task::spawn_blocking(move || run(&fill, &tx, &file, body, &stop))
        .await
        .map_err(|e| FillError::Storage(e.to_string().into()))?
}

/// Sets the flag when the fill's future is dropped, so the blocking loop ends.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn run(
    fill: &Fill,
    tx: &watch::Sender<Progress>,
    file: &File,
    body: RawBody,
    stop: &AtomicBool,
) -> Result<(u64, Digest), FillError> {
    let up = &fill.source().upstream;
    let storage = |e: io::Error| FillError::Storage(e.to_string().into());
    let upstream = |kind: UpstreamErrorKind| FillError::from(up.error(kind));
    let RawBody { socket, early, len } = body;
    let map = Growing::new(file, len).map_err(storage)?;
    // Followers behind the tail slice what is on disk from here too (`Fill::locate`).
    fill.mapped(map.whole());
    let mut hasher = Hasher::new(fill.digest.algorithm());
    let mut received = 0u64;
    let publish = |from: u64, to: u64, hasher: &mut Hasher| {
        let chunk = map.slice(from as usize..to as usize);
        hasher.update(&chunk);
        // From a little before: the faults of the hash map neighbouring pages too (up to 64
        // KiB around), those of the step before among them.
        map.release((from as usize).saturating_sub(FAULT_AROUND)..to as usize);
        let n = to - from;
        crate::metrics::upstream_bytes(up.name(), n);
        crate::metrics::spliced_bytes(n);
        up.stats().fetched(n);
        fill.receive(chunk);
        fill.wrote(n);
        tx.send_modify(|p| {
            if let Progress::Streaming { written, .. } = p {
                *written = to;
            }
        });
    };
    if !early.is_empty() {
        file.write_all_at(&early, 0).map_err(storage)?;
        received = early.len() as u64;
        publish(0, received, &mut hasher);
    }
    let pipe = crate::sys::Pipe::new(STEP).map_err(storage)?;
    socket.set_read_timeout(Some(WAIT)).map_err(storage)?;
    let read_timeout = up.config().read_timeout;
    let mut silent = Duration::ZERO;
    while received < len {
        if stop.load(Ordering::Relaxed) {
            return Err(FillError::Cancelled);
        }
        let want = usize::try_from(len - received).unwrap_or(usize::MAX);
        match pipe.fill_from(socket.as_fd(), want) {
            // The upstream closed early: the caller compares the length.
            Ok(0) => break,
            Ok(n) => {
                silent = Duration::ZERO;
                pipe.drain_into(file, received, n).map_err(storage)?;
                publish(received, received + n as u64, &mut hasher);
                received += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                silent += WAIT;
                if silent >= read_timeout {
                    return Err(upstream(UpstreamErrorKind::Timeout));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "upstream body error");
                return Err(upstream(UpstreamErrorKind::Truncated));
            }
        }
    }
    Ok((received, hasher.finish()))
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    use bytes::Bytes;
    use sha2::Digest as _;

    use super::*;
    use crate::cache::fill::{new_fill_keeping, FillSource};
    use crate::cache::tail::Located;
    use crate::upstream::Upstream;

    /// A fill source whose upstream gives up after `read_timeout` of silence.
    fn source(read_timeout: &str) -> FillSource {
        let config = crate::Config::parse(&format!(
            "[[upstream]]\nname = \"test\"\nurl = \"http://127.0.0.1:9\"\n\
             read_timeout = \"{read_timeout}\"\n"
        ))
        .expect("test config");
        FillSource {
            upstream: Arc::new(
                Upstream::new(config.upstreams[0].clone(), Default::default(), false).unwrap(),
            ),
            repo: "test/repo".parse().unwrap(),
            via: None,
        }
    }

    fn digest_of(data: &[u8]) -> Digest {
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
            .parse()
            .unwrap()
    }

    /// A socket whose peer runs `serve` on another thread; the peer's result comes back from
    /// the handle.
    fn upstream<T: Send + 'static>(
        serve: impl FnOnce(TcpStream) -> T + Send + 'static,
    ) -> (TcpStream, std::thread::JoinHandle<T>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = std::thread::spawn(move || serve(listener.accept().unwrap().0));
        (TcpStream::connect(addr).unwrap(), peer)
    }

    struct Setup {
        fill: Arc<Fill>,
        tx: watch::Sender<Progress>,
        file: Arc<File>,
        _dir: tempfile::TempDir,
    }

    fn setup(digest: Digest, read_timeout: &str, len: u64) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(dir.path().join("temp"))
                .unwrap(),
        );
        let (fill, tx) = new_fill_keeping(digest, source(read_timeout), 1 << 20);
        tx.send_replace(Progress::Streaming {
            file: file.clone(),
            total: Some(len),
            written: 0,
        });
        Setup {
            fill,
            tx,
            file,
            _dir: dir,
        }
    }

    #[tokio::test]
    async fn a_body_in_pieces_lands_in_the_file_and_the_tail_with_its_digest() {
        let data: Vec<u8> = (0..3 * STEP + 12_345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let early = Bytes::copy_from_slice(&data[..1000]);
        let rest = data[1000..].to_vec();
        let (socket, peer) = upstream(move |mut s| {
            // Pieces of every size around the pipe's, some after a pause.
            let mut at = 0;
            for (i, size) in [1, 4095, 70_000, STEP, 3, STEP + 1]
                .iter()
                .cycle()
                .enumerate()
            {
                let end = (at + size).min(rest.len());
                s.write_all(&rest[at..end]).unwrap();
                at = end;
                if at == rest.len() {
                    break;
                }
                if i % 3 == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        let len = data.len() as u64;
        let s = setup(digest_of(&data), "10s", len);
        let body = RawBody { socket, early, len };
        let (received, digest) = receive(&s.fill, &s.tx, s.file.clone(), body).await.unwrap();
        peer.join().unwrap();
        assert_eq!(received, len);
        assert_eq!(digest, digest_of(&data));
        assert_eq!(std::fs::read(s._dir.path().join("temp")).unwrap(), data);
        match &*s.tx.borrow() {
            Progress::Streaming { written, .. } => assert_eq!(*written, len),
            _ => panic!("progress is no longer streaming"),
        }
        // The newest bytes are in the tail, as slices of the file's mapping; the oldest (long
        // out of the 1 MiB tail) are sliced from the mapping too, not read from the file.
        for pos in [len - 1000, 0, 5000] {
            match s.fill.locate(pos, 1000) {
                Located::Memory(b) => {
                    assert_eq!(b.len(), 1000);
                    assert_eq!(&b[..], &data[pos as usize..pos as usize + 1000]);
                }
                other => panic!("bytes at {pos} are not in memory: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn an_upstream_that_closes_early_leaves_what_it_sent() {
        let data = vec![5u8; 300_000];
        let sent = data[..100_000].to_vec();
        let (socket, peer) = upstream(move |mut s| s.write_all(&sent).unwrap());
        let len = data.len() as u64;
        let s = setup(digest_of(&data), "10s", len);
        let body = RawBody {
            socket,
            early: Bytes::new(),
            len,
        };
        let (received, digest) = receive(&s.fill, &s.tx, s.file.clone(), body).await.unwrap();
        peer.join().unwrap();
        assert_eq!(received, 100_000);
        assert_eq!(digest, digest_of(&data[..100_000]));
    }

    #[tokio::test]
    async fn a_silent_upstream_fails_the_fill_after_its_read_timeout() {
        let (socket, _peer) = upstream(|mut s| {
            s.write_all(b"0123456789").unwrap();
            std::thread::sleep(Duration::from_secs(5));
        });
        let s = setup(digest_of(b"x"), "1s", 100);
        let body = RawBody {
            socket,
            early: Bytes::new(),
            len: 100,
        };
        let started = Instant::now();
        let e = receive(&s.fill, &s.tx, s.file.clone(), body)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, FillError::Upstream(u) if matches!(u.kind, UpstreamErrorKind::Timeout)),
            "{e:?}"
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(4),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_cancelled_fill_lets_go_of_the_upstream() {
        // The upstream sends a little, then waits to see the connection closed.
        let (socket, peer) = upstream(|mut s| {
            s.write_all(b"0123456789").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let started = Instant::now();
            let closed = matches!(s.read(&mut [0u8; 16]), Ok(0));
            (closed, started.elapsed())
        });
        let s = setup(digest_of(b"x"), "60s", 100);
        let body = RawBody {
            socket,
            early: Bytes::new(),
            len: 100,
        };
        let receiving = receive(&s.fill, &s.tx, s.file.clone(), body);
        // Dropped (as `run` drops the fill on shutdown) while the upstream is silent.
        assert!(tokio::time::timeout(Duration::from_millis(300), receiving)
            .await
            .is_err());
        let (closed, took) = tokio::task::spawn_blocking(move || peer.join().unwrap())
            .await
            .unwrap();
        assert!(closed, "the connection stayed open");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
}
