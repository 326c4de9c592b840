//! A plain TCP connection as hyper sees it, with one difference: a write that starts with a
//! slice of a stored blob's mapping is sent from the blob's file with `sendfile` instead of
//! being copied from the mapping into the socket. hyper hands its body frames (slices of the
//! mapped blob, `cache::read::slices`) to `poll_write_vectored` as they are, after the
//! response head; the head goes out first (`MSG_MORE`: in the same segments as what
//! follows), the body from the page cache.
//! The kernel then sends pages it already has, as nginx does: the copy was a third of the CPU
//! of a 100 KiB hit (BENCHMARKS.md, "Where a hit's CPU goes").
//!
//! Only the bytes are taken from elsewhere, never their order or count: `cache::file_of`
//! names the file and offset holding exactly the slice's bytes (stored blobs are never
//! written again), and whatever it does not know (heap buffers, the head, TLS records) is
//! written as before.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Body slices smaller than this are copied: a `sendfile` call (and the head's own send)
/// costs more than their copy. HTTP/2's 16 KiB DATA frames stay below it.
const SENDFILE_MIN: usize = 32 * 1024;

pub struct Conn {
    stream: TcpStream,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        Conn { stream }
    }

    /// Runs the socket call `f` once the socket has room, again whenever it had none after all.
    fn poll_io<T>(
        &self,
        cx: &mut Context<'_>,
        mut f: impl FnMut(std::os::fd::BorrowedFd<'_>) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        use std::os::fd::AsFd;
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self
                .stream
                .try_io(Interest::WRITABLE, || f(self.stream.as_fd()))
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    /// Sends what it can of the file's bytes that `slice` shows.
    fn poll_sendfile(
        &mut self,
        cx: &mut Context<'_>,
        slice: &[u8],
        file: &std::fs::File,
        offset: u64,
    ) -> Poll<io::Result<usize>> {
        let sent = ready!(self.poll_io(cx, |sock| {
            crate::sys::sendfile(sock, file, offset, slice.len())
        }));
        match sent {
            // The file ends before the slice does: it cannot be this slice's file after all.
            // Never the case for a stored blob; write the slice itself.
            Ok(0) => Pin::new(&mut self.stream).poll_write(cx, slice),
            Ok(n) => {
                crate::metrics::sendfile_bytes(n as u64);
                Poll::Ready(Ok(n))
            }
            // A socket or file that sendfile does not take: copy, as before.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                Pin::new(&mut self.stream).poll_write(cx, slice)
            }
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Up to the first slice that a file holds; that slice alone when it comes first.
        let mut plain = bufs.len();
        for (i, b) in bufs.iter().enumerate() {
            // Small slices of a stored blob are copied; a fill's temp file is never copied
            // from (its pages would become resident here: see `cache::InFile::growing`).
            let Some(at) = crate::cache::file_of(b) else {
                continue;
            };
            if b.len() < SENDFILE_MIN && !at.growing {
                continue;
            }
            if i == 0 {
                return this.poll_sendfile(cx, b, &at.file, at.offset);
            }
            plain = i;
            break;
        }
        if plain == bufs.len() {
            return Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        }
        // The head before a file's bytes: held back until they follow, so both leave in the
        // same segments (alone, the head cost a packet and its receipt: a fifth of a hit).
        this.poll_io(cx, |sock| crate::sys::send_more(sock, &bufs[..plain]))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
