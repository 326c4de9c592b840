//! Where log lines go: stderr, one `write` a line, except access lines under load. Writing
//! each access line on its own cost a system call per request, ~6% of a 100 KiB hit's CPU
//! (BENCHMARKS.md, "Where a hit's CPU goes"). An access line that comes less than `QUIET`
//! after the last write waits, with any others arriving meanwhile, for a flusher thread that
//! writes them together `QUIET` later (at most `BATCH` bytes are held). An access line after a
//! quiet moment, every other line, and everything held when the process ends or panics, are
//! written at once, in order. On a terminal nothing waits.
//!
//! What a crash can lose: access lines of the last `QUIET`, as with any buffered access log
//! (nginx's `buffer=`, Envoy's flush interval).

use std::io::{self, Write};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// How long an access line may wait to share a write with others.
const QUIET: Duration = Duration::from_millis(5);
/// Held bytes that are written at once whatever the time.
const BATCH: usize = 64 * 1024;
/// The target of access lines (`http::access_log`).
const ACCESS: &str = "entrepot::access";

/// Lines for stderr, as a `MakeWriter` for the fmt subscriber.
pub struct Output {
    sink: &'static Sink,
}

impl Output {
    /// stderr; access lines are batched under load unless it is a terminal.
    pub fn stderr() -> Output {
        let batch = !std::io::IsTerminal::is_terminal(&io::stderr());
        Output {
            sink: sink(batch, Box::new(|b: &[u8]| io::stderr().write_all(b))),
        }
    }
}

/// Writes whatever access lines are held. Called as the process ends (`FlushOnDrop`) and
/// from the panic hook.
pub fn flush() {
    if let Some(s) = SINK.get() {
        s.flush();
    }
}

/// Flushes held lines when dropped: `main` keeps one until it returns.
pub struct FlushOnDrop;

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        flush();
    }
}

/// Makes the panic hook write held lines before the panic message.
pub fn flush_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flush();
        previous(info);
    }));
}

type WriteFn = Box<dyn Fn(&[u8]) -> io::Result<()> + Send + Sync>;

static SINK: OnceLock<Sink> = OnceLock::new();

fn sink(batch: bool, write: WriteFn) -> &'static Sink {
    let s = SINK.get_or_init(|| Sink::new(batch, write));
    s.start();
    s
}

struct Sink {
    batch: bool,
    held: Mutex<Held>,
    /// Wakes the flusher when a line is held.
    armed: Condvar,
    write: WriteFn,
    /// Whether the flusher thread runs (lines wait only then).
    flusher: OnceLock<bool>,
}

struct Held {
    buf: Vec<u8>,
    last_write: Option<Instant>,
    /// The flusher will write what is held.
    pending: bool,
}

impl Sink {
    fn new(batch: bool, write: WriteFn) -> Sink {
        Sink {
            batch,
            held: Mutex::new(Held {
                buf: Vec::new(),
                last_write: None,
                pending: false,
            }),
            armed: Condvar::new(),
            write,
            flusher: OnceLock::new(),
        }
    }

    fn line(&'static self, line: &[u8], deferrable: bool) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.buf.extend_from_slice(line);
        let now = Instant::now();
        let recent = held.last_write.is_some_and(|t| now - t < QUIET);
        let flusher = self.flusher.get().copied().unwrap_or(false);
        if flusher && deferrable && recent && held.buf.len() < BATCH {
            if !held.pending {
                held.pending = true;
                self.armed.notify_one();
            }
            return;
        }
        self.write_held(&mut held, now);
    }

    /// Writes what is held, under the lock (lines stay in order).
    fn write_held(&self, held: &mut Held, now: Instant) {
        if !held.buf.is_empty() {
            // Nothing useful to do if stderr is gone; the line is dropped like an unread one.
            let _ = (self.write)(&held.buf);
            held.buf.clear();
            if held.buf.capacity() > 4 * BATCH {
                held.buf.shrink_to(BATCH);
            }
        }
        held.last_write = Some(now);
    }

    fn flush(&self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        self.write_held(&mut held, Instant::now());
    }

    /// Starts the thread that writes held lines `QUIET` after the first of them (for the
    /// process's life, asleep while nothing is held), when lines may wait at all.
    fn start(&'static self) {
        self.flusher.get_or_init(|| {
            self.batch
                && std::thread::Builder::new()
                    .name("entrepot-log".into())
                    .spawn(move || loop {
                        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                        while !held.pending {
                            held = self.armed.wait(held).unwrap_or_else(|e| e.into_inner());
                        }
                        drop(held);
                        std::thread::sleep(QUIET);
                        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                        held.pending = false;
                        self.write_held(&mut held, Instant::now());
                    })
                    .is_ok()
        });
    }
}

/// One event's line.
pub struct Line {
    sink: &'static Sink,
    deferrable: bool,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sink.line(buf, self.deferrable);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Output {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            sink: self.sink,
            deferrable: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line {
        Line {
            sink: self.sink,
            deferrable: meta.target() == ACCESS && *meta.level() >= tracing::Level::INFO,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A sink of its own (not the process's) that records each write.
    fn recording(batch: bool) -> (&'static Sink, Arc<Mutex<Vec<String>>>) {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let w = writes.clone();
        let sink: &'static Sink = Box::leak(Box::new(Sink::new(
            batch,
            Box::new(move |b: &[u8]| {
                w.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(b).into_owned());
                Ok(())
            }),
        )));
        sink.start();
        (sink, writes)
    }

    #[test]
    fn access_lines_in_a_burst_share_writes_and_all_arrive_in_order() {
        let (sink, writes) = recording(true);
        for i in 0..1000 {
            sink.line(format!("access {i}\n").as_bytes(), true);
        }
        std::thread::sleep(QUIET * 20);
        let w = writes.lock().unwrap().clone();
        assert!(w.len() < 50, "{} writes for 1000 lines", w.len());
        let all: String = w.concat();
        let expected: String = (0..1000).map(|i| format!("access {i}\n")).collect();
        assert_eq!(all, expected);
    }

    #[test]
    fn other_lines_and_a_first_access_line_are_written_at_once_after_what_is_held() {
        let (sink, writes) = recording(true);
        sink.line(b"first access\n", true);
        assert_eq!(
            writes.lock().unwrap().len(),
            1,
            "after a quiet moment: at once"
        );
        sink.line(b"held access\n", true);
        sink.line(b"WARN something\n", false);
        let w = writes.lock().unwrap().clone();
        assert_eq!(w, ["first access\n", "held access\nWARN something\n"]);
    }

    #[test]
    fn flush_writes_what_is_held_and_nothing_waits_without_batching() {
        let (sink, writes) = recording(true);
        sink.line(b"a\n", true);
        sink.line(b"b\n", true);
        sink.flush();
        assert_eq!(writes.lock().unwrap().concat(), "a\nb\n");
        let (plain, writes) = recording(false);
        plain.line(b"a\n", true);
        plain.line(b"b\n", true);
        assert_eq!(*writes.lock().unwrap(), ["a\n", "b\n"]);
    }
}
