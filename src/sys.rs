//! The few calls into the C library that std does not wrap: tuning glibc's allocator for
//! streaming (`tune_allocator`, `release_memory`), reserving a fill's disk space up front
//! (`reserve`), the descriptor limit (`raise_fd_limit`, `fd_limit`), `sendfile` and `splice`
//! (`Pipe`). The only `unsafe` outside `cache::mapped`; each call says why it is sound.
//!
//! Why the allocator needs tuning (measured in BENCHMARKS.md, "Where a cold pull's CPU goes"):
//! the upstream body arrives in hyper read buffers of ~400 KiB, held while followers and the
//! disk catch up and then freed. With glibc's defaults those buffers come from `mmap` (above
//! the 128 KiB threshold) or from arena tops that are trimmed back to the kernel as soon as
//! they free, so every received page was faulted in and zeroed again: ~9% of a cold pull's
//! CPU. A fixed 4 MiB mmap threshold and a 64 MiB trim threshold keep that memory in the
//! process for the next buffer; `release_memory` gives it back when nothing is streaming.

use std::fs::File;
use std::io;

/// Allocations below this size come from the allocator's arenas, never a fresh mapping.
const MMAP_THRESHOLD: usize = 4 << 20;
/// Free memory at an arena's top kept for reuse rather than returned at once.
const TRIM_THRESHOLD: usize = 64 << 20;
/// At most this many arenas (glibc's default is 8 per core): each keeps up to
/// `TRIM_THRESHOLD` free, and blocking-pool threads would otherwise each get their own. With
/// 16 cold clients, peak RSS went from 26-64 MiB (default) to 33-35 MiB with 2 arenas.
fn arena_max() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

/// Sets the allocator's thresholds (see the module doc). Call once, before other threads
/// start allocating. Harmless where it does not apply.
pub fn tune_allocator() {
    // The way back to glibc's defaults (or to an operator's own GLIBC_TUNABLES).
    if std::env::var_os("ENTREPOT_MALLOC_DEFAULTS").is_some_and(|v| v != "0") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets glibc's tunables; the values are in range for int and glibc
    // validates them. It is called before the runtime's threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
        libc::mallopt(libc::M_ARENA_MAX, arena_max() as libc::c_int);
    }
}

/// Returns free memory kept by the allocator to the kernel (after start-up, and when no fill
/// is streaming), so a quiet process's RSS is what it uses.
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim takes a padding size and only operates on glibc's own state; it is
    // thread-safe (it locks each arena in turn).
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Reserves `len` bytes of disk for `file` without changing its size, so a blob that will not
/// fit fails before its bytes are fetched, and the filesystem allocates its extents once
/// instead of block by block. `Ok` where the filesystem cannot reserve (the write path then
/// finds out as it goes); `Err` only when it says there is no room (or no quota).
pub fn reserve(file: &File, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let Ok(len) = libc::off_t::try_from(len) else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        // What cannot fit is refused before asking: ext4 fails a reservation larger than its
        // free space only once it has taken all of it, and keeps what it took until the file
        // goes, so every other writer on the disk (fills, commits, records) found it full
        // meanwhile (an upstream announcing a huge Content-Length was enough).
        if free_bytes(file).is_some_and(|free| len as u64 > free) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        #[allow(unsafe_code)]
        // SAFETY: the descriptor is open for writing and owned by `file`, which outlives the
        // call; fallocate reads nothing from our memory.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
                // Another writer took the room meanwhile: give back what was taken past the
                // file's end (nothing is written there).
                let size = file.metadata().map_or(0, |m| m.len()) as libc::off_t;
                #[allow(unsafe_code)]
                // SAFETY: as above; the range lies past every written byte.
                unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
                        size,
                        len.saturating_sub(size).max(1),
                    )
                };
                return Err(e);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, len);
    Ok(())
}

/// Bytes an unprivileged writer may still take on `file`'s filesystem; `None` if unknown.
#[cfg(target_os = "linux")]
fn free_bytes(file: &File) -> Option<u64> {
    use std::os::fd::AsRawFd;
    #[allow(unsafe_code)]
    // SAFETY: an all-zero statvfs is a valid value; fstatvfs only writes into it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    #[allow(unsafe_code)]
    // SAFETY: `st` is a valid, writable statvfs; the descriptor is owned by `file`.
    let r = unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) };
    // The fields are 32 bits wide on some targets.
    #[allow(clippy::useless_conversion)]
    (r == 0).then(|| u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

/// The most descriptors the limit may ever allow here, whatever the hard limit says.
const FD_CEILING: u64 = 1 << 20;

/// The process's soft limit on open descriptors.
pub fn fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: getrlimit writes one rlimit into the struct it is given, which lives across
    // the call.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if r != 0 {
        return 1024;
    }
    lim.rlim_cur.min(FD_CEILING)
}

/// Raises the soft limit on open descriptors to the hard one (as Go's runtime and nginx's
/// `worker_rlimit_nofile` do): a server holding thousands of client connections, fills and
/// cached blob files would run out at the usual soft 1024 long before the hard limit.
/// Returns the soft limit in force afterwards.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: as in `fd_limit`; setrlimit only reads the struct, which lives across the call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            let want = lim.rlim_max.min(FD_CEILING);
            if lim.rlim_cur < want {
                lim.rlim_cur = want;
                let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    }
    fd_limit()
}

/// Sends up to `len` bytes of `file` from `offset` into `socket` (a non-blocking TCP socket:
/// `WouldBlock` when its buffer is full); returns how many were sent.
pub fn sendfile(
    socket: std::os::fd::BorrowedFd<'_>,
    file: &File,
    offset: u64,
    len: usize,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    #[allow(unsafe_code)]
    // SAFETY: both descriptors are open for the call (borrowed from owners that outlive it);
    // the kernel reads and updates `off`, a local, and touches no other memory of ours.
    let n = unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut off, len) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Writes `bufs` into `socket` with `MSG_MORE`: more follows at once (a response's head
/// before its body goes out with `sendfile`), so the kernel sends them in the same segments
/// rather than the head alone in a packet of its own. Returns how many bytes were taken.
pub fn send_more(
    socket: std::os::fd::BorrowedFd<'_>,
    bufs: &[io::IoSlice<'_>],
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY (all fields): a zeroed msghdr is valid (no name, no control data).
    #[allow(unsafe_code)]
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with iovec on Unix (std documents it), and the kernel only
    // reads the buffers, which `bufs` borrows across the call.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
    #[allow(unsafe_code)]
    // SAFETY: `msg` points at `bufs` (see above) and lives across the call; the descriptor is
    // borrowed from its owner for the call.
    let n = unsafe {
        libc::sendmsg(
            socket.as_raw_fd(),
            &msg,
            libc::MSG_MORE | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A pipe for `splice`: a fill moves an upstream body from the socket into its temp file
/// through it, the kernel handing over pages, never copying them to user memory
/// (`cache::spliced`).
pub struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
    /// How many bytes it holds at most.
    pub capacity: usize,
}

impl Pipe {
    /// A pipe holding up to `size` bytes where the system allows it (`/proc/sys/fs/
    /// pipe-max-size`, 1 MiB by default), else the default 64 KiB.
    pub fn new(size: usize) -> io::Result<Pipe> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let mut fds = [0 as libc::c_int; 2];
        #[allow(unsafe_code)]
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        #[allow(unsafe_code)]
        // SAFETY: pipe2 succeeded: both are open descriptors owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let want = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        #[allow(unsafe_code)]
        // SAFETY: F_SETPIPE_SZ / F_GETPIPE_SZ on a descriptor `write` owns; no memory passed.
        let capacity = unsafe {
            libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, want);
            libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        Ok(Pipe {
            read,
            write,
            capacity: usize::try_from(capacity).unwrap_or(0).max(4096),
        })
    }

    /// Moves up to `len` bytes from `socket` (blocking, or with a receive timeout: then
    /// `WouldBlock`) into the pipe, which must be empty; 0 at the end of the stream.
    pub fn fill_from(&self, socket: std::os::fd::BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let len = len.min(self.capacity);
        #[allow(unsafe_code)]
        // SAFETY: both descriptors are open for the call; no offsets (null), no user memory.
        let n = unsafe {
            libc::splice(
                socket.as_raw_fd(),
                std::ptr::null_mut(),
                self.write.as_raw_fd(),
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Moves exactly `len` bytes held in the pipe into `file` at `offset`.
    pub fn drain_into(&self, file: &File, mut offset: u64, mut len: usize) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        while len > 0 {
            let mut off = libc::loff_t::try_from(offset).map_err(io::Error::other)?;
            #[allow(unsafe_code)]
            // SAFETY: both descriptors are open for the call; the kernel reads and updates
            // `off`, a local, and touches no other memory of ours.
            let n = unsafe {
                libc::splice(
                    self.read.as_raw_fd(),
                    std::ptr::null_mut(),
                    file.as_raw_fd(),
                    &mut off,
                    len,
                    libc::SPLICE_F_MOVE,
                )
            };
            match n {
                n if n > 0 => {
                    offset += n as u64;
                    len -= n as usize;
                }
                0 => return Err(io::ErrorKind::WriteZero.into()),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_keeps_the_size_and_allocates_the_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        reserve(&file, 8 << 20).unwrap();
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), 0, "the size stays what was written");
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::MetadataExt;
            // tmpfs and ext4 both allocate; a filesystem that cannot would leave 0 blocks,
            // which `reserve` accepts, so only check where the test directory allocates.
            if meta.blocks() > 0 {
                assert!(meta.blocks() * 512 >= 8 << 20, "blocks: {}", meta.blocks());
            }
        }
        reserve(&file, 0).unwrap();
    }

    #[test]
    fn reserve_says_when_the_disk_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        reserve(&file, 1 << 20).unwrap();
        let reserves = std::os::unix::fs::MetadataExt::blocks(&file.metadata().unwrap()) > 0;
        // 4 TiB: more than this machine's disk, less than ext4's largest file.
        match reserve(&file, 4 << 40) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}"),
            Ok(()) => assert!(!reserves, "a filesystem that reserves must refuse 4 TiB"),
        }
        // Regression: the refused reservation took the disk's free space and kept it (other
        // tests writing meanwhile failed with ENOSPC). It takes nothing now.
        let taken = std::os::unix::fs::MetadataExt::blocks(&file.metadata().unwrap()) * 512;
        assert!(taken <= 2 << 20, "a refused reservation kept {taken} bytes");
    }

    #[test]
    fn the_descriptor_limit_only_goes_up() {
        let before = fd_limit();
        assert!(before > 0);
        assert!(raise_fd_limit() >= before);
    }

    #[test]
    fn sendfile_sends_the_files_bytes_from_the_offset() {
        use std::io::Read;
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let out = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut inp, _) = listener.accept().unwrap();
        let mut sent = 0;
        while sent < 100_000 {
            sent += sendfile(out.as_fd(), &file, 50_000 + sent as u64, 100_000 - sent).unwrap();
        }
        drop(out);
        let mut got = Vec::new();
        inp.read_to_end(&mut got).unwrap();
        assert!(got == data[50_000..150_000], "other bytes than the file's");
        // Past the end of the file there is nothing to send.
        let (a, _b) = (
            std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap(),
            listener.accept().unwrap(),
        );
        assert_eq!(sendfile(a.as_fd(), &file, 200_000, 10).unwrap(), 0);
    }

    #[test]
    fn allocator_calls_are_harmless() {
        tune_allocator();
        let v = vec![1u8; 1 << 20];
        drop(v);
        release_memory();
    }
}
