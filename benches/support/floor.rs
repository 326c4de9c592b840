//! The floor of a cold pull's CPU on this machine (issue 13): a program doing only what any
//! caching proxy must do with a blob's bytes, the plainest way: one thread and one reused
//! 400 KiB buffer (hyper's largest read) receive the body from the upstream, write it to a
//! temp file (its space reserved first, as entrepot does), hash it with the same `sha2` as
//! entrepot, and send it to the client; then the digest is checked, the file made durable and
//! renamed into place. No HTTP library, no tasks, no other client, no tail kept for followers.
//!
//! The bench runs it as a process of its own (this bench binary, with [`ENV`] set), started
//! fresh for every round like the proxies, and reads its CPU the same way, so entrepot's CPU
//! per GiB has a reference: what these four passes over the bytes cost here at the least.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest as _;

/// Set to `<listen port> <upstream host:port> <folder>` to make this process the floor.
pub const ENV: &str = "COMPARE_FLOOR";

const BUFFER: usize = 400 << 10;

/// If this process was started as the floor ([`command`]), serves until killed: never returns.
pub fn serve_if_asked() {
    let Ok(spec) = std::env::var(ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split_whitespace().collect();
    let [port, upstream, dir] = parts[..] else {
        eprintln!("floor: {ENV}={spec:?}: want `<port> <upstream host:port> <folder>`");
        std::process::exit(2);
    };
    let listener = match TcpListener::bind(format!("127.0.0.1:{port}")) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("floor: binding 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    for conn in listener.incoming() {
        let served = conn.and_then(|c| serve(c, upstream, Path::new(dir)));
        if let Err(e) = served {
            eprintln!("floor: {e}");
        }
    }
    std::process::exit(0);
}

/// The command that starts the floor on `port`, fetching from `upstream` (`host:port`) and
/// keeping blobs in `dir`.
pub fn command(port: u16, upstream: &str, dir: &Path) -> io::Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env(ENV, format!("{port} {upstream} {}", dir.display()));
    Ok(cmd)
}

fn serve(mut client: TcpStream, upstream: &str, dir: &Path) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    let (head, _) = read_head(&mut client, &mut buf)?;
    let path = head
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("GET "))
        .and_then(|l| l.split(' ').next())
        .ok_or_else(|| io::Error::other(format!("not a GET: {head:?}")))?
        .to_owned();
    if path == "/v2/" {
        return client
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
    }
    let hex = path
        .rsplit_once("/blobs/sha256:")
        .map(|(_, h)| h.to_owned())
        .ok_or_else(|| io::Error::other(format!("not a sha256 blob: {path}")))?;

    let mut up = TcpStream::connect(upstream)?;
    write!(
        up,
        "GET {path} HTTP/1.1\r\nHost: {upstream}\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
    )?;
    let (head, (body_at, read)) = read_head(&mut up, &mut buf)?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!("upstream answered {head:?}")));
    }
    let len: u64 = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .ok_or_else(|| io::Error::other("no Content-Length"))?;
    write!(
        client,
        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    )?;

    let temp: PathBuf = dir.join(format!("tmp-{hex}"));
    let mut file = std::fs::File::create(&temp)?;
    // SAFETY: fallocate on a file this function owns; no memory is passed.
    let reserved = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            0,
            len as libc::off_t,
        )
    };
    if reserved != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut hasher = sha2::Sha256::new();
    let mut total = 0u64;
    let mut consume = |bytes: &[u8]| -> io::Result<()> {
        file.write_all(bytes)?;
        hasher.update(bytes);
        client.write_all(bytes)?;
        total += bytes.len() as u64;
        Ok(())
    };
    consume(&buf[body_at..read])?;
    loop {
        let n = up.read(&mut buf)?;
        if n == 0 {
            break;
        }
        consume(&buf[..n])?;
    }
    if total != len {
        return Err(io::Error::other(format!(
            "upstream sent {total} of {len} bytes"
        )));
    }
    let actual = hex::encode(hasher.finalize());
    if actual != hex {
        return Err(io::Error::other(format!("digest mismatch: {actual}")));
    }
    file.sync_all()?;
    std::fs::rename(&temp, dir.join(&hex))
}

/// Reads until the end of an HTTP head; returns it and where the bytes after it lie in `buf`
/// (`buf[start..end]`).
fn read_head(conn: &mut TcpStream, buf: &mut [u8]) -> io::Result<(String, (usize, usize))> {
    let mut read = 0;
    loop {
        let n = conn.read(&mut buf[read..])?;
        if n == 0 {
            return Err(io::Error::other("closed before the end of the head"));
        }
        read += n;
        if let Some(end) = buf[..read].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return Ok((head, (end + 4, read)));
        }
        if read == buf.len() {
            return Err(io::Error::other("head too long"));
        }
    }
}
