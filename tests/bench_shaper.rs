//! The `compare` bench's shaping relay (`benches/support/shaped.rs`, issue 13) keeps its rate
//! and its delay: its clock on made-up instants, and its pipe on in-memory streams under a
//! paused tokio clock, so the figures are exact whatever the machine is doing.

#[allow(dead_code)] // the relay itself is the bench's; the tests use the clock and the pipe
#[path = "../benches/support/shaped.rs"]
mod shaped;

use std::time::Duration;

use shaped::{pipe, Pacer, Shape, CHUNK};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};

/// 1 Gbit/s, 2 ms each way: the bench's default link.
fn gigabit() -> Shape {
    Shape::from_mbit(1000, Duration::from_millis(2))
}

#[test]
fn pacer_serialises_chunks_at_the_rate_then_adds_the_delay() {
    let shape = gigabit();
    assert_eq!(shape.bytes_per_sec, 125_000_000);
    let wire = shape.wire_time(CHUNK); // 65536 B at 125 MB/s = 524.288 µs
    assert_eq!(wire, Duration::from_nanos(524_288));
    let mut pacer = Pacer::new(shape);
    let t0 = Instant::now();
    // Three chunks read at once: each waits for the wire after the one before.
    for k in 1..=3u32 {
        assert_eq!(pacer.schedule(t0, CHUNK), t0 + wire * k + shape.delay);
    }
    // Read while the wire is still busy: queued behind them.
    assert_eq!(
        pacer.schedule(t0 + wire, CHUNK),
        t0 + wire * 4 + shape.delay
    );
    // After an idle second the link has earned no credit: from the read time on.
    let later = t0 + Duration::from_secs(1);
    assert_eq!(pacer.schedule(later, CHUNK), later + wire + shape.delay);
    // The end of a stream takes no wire time but is not delivered before what came first.
    assert_eq!(
        pacer.schedule(later, 0),
        later + wire + shape.delay,
        "a FIN overtook data"
    );
}

/// Sends `len` bytes through a shaped pipe; returns when the first and the last byte arrived
/// (paused clock: the times are the shaper's own, plus tokio's millisecond timer steps).
async fn through_pipe(shape: Shape, len: usize) -> (Duration, Duration) {
    let (mut source, relay_in) = tokio::io::duplex(CHUNK);
    let (relay_out, mut sink) = tokio::io::duplex(CHUNK);
    let relay = tokio::spawn(pipe(relay_in, relay_out, shape));
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let data = vec![7u8; len];
        source.write_all(&data).await.unwrap();
        source.shutdown().await.unwrap();
        source // kept open until the reader is done, so the end comes from the shutdown
    });
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    let mut first = None;
    loop {
        let n = sink.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| start.elapsed());
        got += n;
    }
    let last = start.elapsed();
    assert_eq!(got, len);
    drop(writer.await.unwrap());
    relay.await.unwrap();
    (first.unwrap(), last)
}

#[tokio::test(start_paused = true)]
async fn one_byte_takes_the_delay() {
    let shape = gigabit();
    let (first, last) = through_pipe(shape, 1).await;
    // 2 ms, rounded up to tokio's next millisecond tick at most.
    assert!(
        first >= shape.delay && first <= shape.delay + Duration::from_millis(1),
        "first byte after {first:?}"
    );
    assert!(
        last <= shape.delay + Duration::from_millis(2),
        "end after {last:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_large_transfer_takes_its_size_over_the_rate_plus_the_delay() {
    let shape = gigabit();
    let len = 64 << 20; // 64 MiB: 536.9 ms at 125 MB/s
    let (first, last) = through_pipe(shape, len).await;
    let ideal = shape.wire_time(len) + shape.delay;
    assert!(first >= shape.delay, "first byte after {first:?}");
    assert!(
        last >= ideal && last <= ideal + Duration::from_millis(2),
        "64 MiB took {last:?}, the link {ideal:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_rate_is_configurable() {
    // 100 Mbit/s, 10 ms: 8 MiB in 671 ms + 10 ms.
    let shape = Shape::from_mbit(100, Duration::from_millis(10));
    let len = 8 << 20;
    let (_, last) = through_pipe(shape, len).await;
    let ideal = shape.wire_time(len) + shape.delay;
    assert!(
        last >= ideal && last <= ideal + Duration::from_millis(2),
        "8 MiB took {last:?}, the link {ideal:?}"
    );
}
