//! A shaping TCP relay: a link of a set rate and one-way delay in front of the counting relay, so
//! cold pulls are measured over something like a real network as well as over loopback (issue
//! 13).
//!
//! Each direction of a relayed connection is a delay line. What is read from one side is
//! stamped with its read time and queued in chunks of at most 64 KiB; the link's clock
//! ([`Pacer`]) serialises each chunk at the rate after the previous one (a token bucket with no
//! burst) and releases it to the other side `delay` after its last byte went on the wire. A
//! writer sleeps until the head chunk's release time and writes it. The queue holds at most a
//! few bandwidth-delay products (at least 1 MiB); when it is full the relay stops reading, so the
//! sender is held back the way TCP's window would.
//!
//! Only bytes are delayed: the TCP handshake stays local (a SYN cannot be held back in
//! userspace), but the first bytes each way are, so the first request on a connection pays the
//! whole round trip (2 × delay) as it would after a handshake. Not modelled: loss, TCP slow
//! start, and timers finer than tokio's millisecond (a release lands on the next millisecond
//! tick; the rate holds on average because the clock books the link, not the wake-ups).
//!
//! Self-contained (tokio and anyhow only): `tests/bench_shaper.rs` includes it to test the
//! pacing on a paused clock.

use std::time::Duration;

use anyhow::Result;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, Semaphore},
    task::{JoinHandle, JoinSet},
    time::Instant,
};

/// The largest chunk read, queued and released at once.
pub const CHUNK: usize = 64 * 1024;

/// A link: its rate each direction and the delay it adds each way.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub bytes_per_sec: u64,
    pub delay: Duration,
}

impl Shape {
    /// `mbit` megabits (10⁶ bits) per second each way: 1000 → 125 000 000 bytes/s.
    pub fn from_mbit(mbit: u64, delay: Duration) -> Self {
        Self {
            bytes_per_sec: mbit * 1_000_000 / 8,
            delay,
        }
    }

    /// How long `len` bytes occupy the link.
    pub fn wire_time(&self, len: usize) -> Duration {
        Duration::from_secs_f64(len as f64 / self.bytes_per_sec as f64)
    }

    /// The bytes one direction may hold queued: four bandwidth-delay products, at least 1 MiB,
    /// so the rate is reached whatever the delay.
    pub fn queue_budget(&self) -> usize {
        let bdp = self.bytes_per_sec as f64 * self.delay.as_secs_f64();
        ((4.0 * bdp) as usize).max(1 << 20)
    }
}

/// The clock of one direction of the link: when the wire is free again.
#[derive(Debug)]
pub struct Pacer {
    shape: Shape,
    /// When the last booked chunk's last byte is on the wire.
    free_at: Option<Instant>,
}

impl Pacer {
    pub fn new(shape: Shape) -> Self {
        Self {
            shape,
            free_at: None,
        }
    }

    /// Books the wire for `len` bytes read at `read_at` and returns when they reach the other
    /// side: serialised from `read_at` or when the wire is free (whichever is later) at the
    /// rate, then `delay` on the way. An idle link earns no credit: a chunk read after a pause
    /// starts at its read time.
    pub fn schedule(&mut self, read_at: Instant, len: usize) -> Instant {
        let start = self.free_at.map_or(read_at, |free| free.max(read_at));
        let done = start + self.shape.wire_time(len);
        self.free_at = Some(done);
        done + self.shape.delay
    }
}

/// A queued piece of one direction: bytes, or the end of the stream (the FIN is delayed too).
enum Piece {
    Data(Vec<u8>),
    End,
}

/// Copies `from` to `to` through the link `shape`, then shuts `to` down. Ends when `from` ends
/// and everything is delivered, or when `to` fails (then whatever is queued is dropped).
pub async fn pipe<R, W>(mut from: R, mut to: W, shape: Shape)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let budget = Semaphore::new(shape.queue_budget());
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Piece)>();
    let reading = async {
        let mut pacer = Pacer::new(shape);
        loop {
            // Room for a whole chunk first: a full queue stops the reading, as a full window would.
            let Ok(permit) = budget.acquire_many(CHUNK as u32).await else {
                return;
            };
            permit.forget();
            let mut buf = vec![0u8; CHUNK];
            let n = from.read(&mut buf).await.unwrap_or(0);
            let read_at = Instant::now();
            budget.add_permits(CHUNK - n);
            let piece = if n == 0 {
                Piece::End
            } else {
                buf.truncate(n);
                if n < CHUNK / 4 {
                    buf.shrink_to_fit();
                }
                Piece::Data(buf)
            };
            let end = matches!(piece, Piece::End);
            if tx.send((pacer.schedule(read_at, n), piece)).is_err() || end {
                return;
            }
        }
    };
    let writing = async {
        while let Some((at, piece)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            match piece {
                Piece::Data(data) => {
                    if to.write_all(&data).await.is_err() {
                        return;
                    }
                    budget.add_permits(data.len());
                }
                Piece::End => break,
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::pin!(reading, writing);
    tokio::select! {
        // The end is queued: deliver what is left.
        () = &mut reading => writing.await,
        // Everything delivered, or the other side is gone: nothing more to read for.
        () = &mut writing => {}
    }
}

/// A shaping relay on 127.0.0.1 that forwards every connection to `target` through the link
/// `shape`, each direction on its own. Dropping it stops accepting and closes every connection.
pub struct ShapedRelay {
    pub port: u16,
    task: JoinHandle<()>,
}

impl ShapedRelay {
    pub async fn start(target: u16, shape: Shape) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            // Owned here, so aborting the accept loop drops (aborts) every connection too.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        connections.spawn(connection(client, target, shape));
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Ok(Self { port, task })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for ShapedRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connection(client: TcpStream, target: u16, shape: Shape) {
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)).await else {
        return; // the client sees its connection closed, as if the upstream were down
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    tokio::join!(
        pipe(client_read, upstream_write, shape),
        pipe(upstream_read, client_write, shape),
    );
}
