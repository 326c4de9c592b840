//! The users file (`[auth] htpasswd`): `user:hash` lines as `htpasswd -B` writes them, bcrypt
//! only, and the stamp that tells a changed file from the one already loaded.
//!
//! Errors name the line and the user, never the hash or the line itself (a line without a ':'
//! may be a password pasted in by mistake).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::SystemTime;

/// bcrypt cost of the stand-in hash when the file has no entry to take it from (`htpasswd -B`'s
/// default is 5; bcrypt's own 12).
const FALLBACK_COST: u32 = 10;

/// The parsed file: each user's bcrypt hash.
pub struct Htpasswd {
    users: HashMap<String, String>,
    /// The cost of the file's first entry, for the stand-in hash.
    cost: u32,
    /// A hash of nothing at `cost`, checked for users the file does not list, so an unknown
    /// user costs as much as a wrong password and timing does not tell which names exist.
    stand_in: OnceLock<String>,
}

/// What is wrong with one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct ParseError {
    pub line: usize,
    pub problem: String,
}

/// Why the file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} {source}")]
    Parse { path: String, source: ParseError },
}

impl Htpasswd {
    /// Parses the file's text. Blank lines and lines starting with `#` are skipped; every other
    /// line is `user:hash` with a bcrypt hash (`$2y$`, `$2b$`, `$2a$`, `$2x$`).
    pub fn parse(text: &str) -> Result<Htpasswd, ParseError> {
        let mut users: HashMap<String, String> = HashMap::new();
        let mut first_line: HashMap<String, usize> = HashMap::new();
        let mut cost = None;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |problem: String| ParseError { line, problem };
            let entry = raw.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = entry.split_once(':') else {
                return Err(err(
                    "is not user:hash (not shown, in case it holds a password)".into(),
                ));
            };
            if user.is_empty() {
                return Err(err("has no user name before the ':'".into()));
            }
            let hash_cost =
                bcrypt_cost(hash).map_err(|why| err(format!("user {user:?}: {why}")))?;
            if let Some(first) = first_line.get(user) {
                return Err(err(format!(
                    "user {user:?} is listed twice (first on line {first})"
                )));
            }
            cost.get_or_insert(hash_cost);
            first_line.insert(user.to_string(), line);
            users.insert(user.to_string(), hash.to_string());
        }
        Ok(Htpasswd {
            users,
            cost: cost.unwrap_or(FALLBACK_COST),
            stand_in: OnceLock::new(),
        })
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<(Htpasswd, FileStamp), LoadError> {
        let shown = || path.display().to_string();
        let read = |source| LoadError::Read {
            path: shown(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let text = std::fs::read_to_string(path).map_err(read)?;
        let file = Htpasswd::parse(&text).map_err(|source| LoadError::Parse {
            path: shown(),
            source,
        })?;
        Ok((file, FileStamp::of(&meta)))
    }

    /// The bcrypt hash of `user`, if the file lists them.
    pub fn hash(&self, user: &str) -> Option<&str> {
        self.users.get(user).map(String::as_str)
    }

    /// What to check a password of an unlisted user against (computed once, on first use:
    /// call it off the async threads).
    pub fn stand_in_hash(&self) -> &str {
        self.stand_in.get_or_init(|| {
            bcrypt::hash_with_salt(b"", self.cost, [0x5a; 16])
                .map(|h| h.to_string())
                .unwrap_or_default()
        })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

impl std::fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&str> = self.users.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Htpasswd").field("users", &names).finish()
    }
}

/// The cost of a bcrypt hash, or why it is not one entrepot accepts.
fn bcrypt_cost(hash: &str) -> Result<u32, String> {
    let other = |what: &str| {
        Err(format!(
            "{what}: entrepot accepts bcrypt hashes only (make them with `htpasswd -B`)"
        ))
    };
    let bcrypt_prefix = ["$2y$", "$2b$", "$2a$", "$2x$"]
        .iter()
        .any(|p| hash.starts_with(p));
    if !bcrypt_prefix {
        return if hash.starts_with("$apr1$") {
            other("an Apache MD5 ($apr1$) hash")
        } else if hash.starts_with("{SHA}") {
            other("a SHA-1 ({SHA}) hash")
        } else if hash.starts_with("$1$") || hash.starts_with("$5$") || hash.starts_with("$6$") {
            other("a crypt(3) MD5 or SHA-2 hash")
        } else if hash.is_empty() {
            other("no hash after the ':'")
        } else {
            other("not a bcrypt hash (plain text or crypt(3) DES?)")
        };
    }
    let parts =
        bcrypt::HashParts::from_str(hash).map_err(|e| format!("a malformed bcrypt hash ({e})"))?;
    let cost = parts.get_cost();
    if !(4..=31).contains(&cost) {
        return Err(format!(
            "a bcrypt hash with cost {cost}, outside bcrypt's 4..=31"
        ));
    }
    Ok(cost)
}

/// What tells a rewritten file from the one loaded: modification time, size and (on Unix)
/// inode, so a file replaced by rename counts as changed even within the same second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    pub fn of(meta: &std::fs::Metadata) -> FileStamp {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cost 4, bcrypt's lowest: fast enough for unit tests.
    fn entry(user: &str, password: &str) -> String {
        format!("{user}:{}", bcrypt::hash(password, 4).unwrap())
    }

    #[test]
    fn parses_bcrypt_entries_comments_and_blank_lines() {
        let text = format!(
            "# the team\n\n{}\n   \n  # indented comment\n{}\r\n{}  \n",
            entry("alice", "a"),
            entry("ci", "c"),
            // `htpasswd -B` writes $2y$; other tools $2b$ / $2a$.
            entry("bob", "b").replace("$2b$", "$2a$"),
        );
        let f = Htpasswd::parse(&text).unwrap();
        assert_eq!(f.len(), 3);
        let hash = f.hash("ci").unwrap();
        assert!(bcrypt::verify("c", hash).unwrap());
        assert!(bcrypt::verify("b", f.hash("bob").unwrap()).unwrap());
        assert!(f.hash("carol").is_none());
        assert!(
            !format!("{f:?}").contains("$2"),
            "Debug shows no hash: {f:?}"
        );
    }

    #[test]
    fn an_empty_file_has_no_users() {
        let f = Htpasswd::parse("# nobody yet\n").unwrap();
        assert!(f.is_empty());
    }

    #[test]
    fn other_hash_formats_are_refused_naming_the_line_and_user() {
        let cases = [
            ("bob:$apr1$abcdefgh$0123456789abcdefghijkl", "$apr1$"),
            ("bob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA-1"),
            ("bob:$6$salt$hash", "crypt(3)"),
            ("bob:plaintext-password", "not a bcrypt hash"),
            ("bob:", "no hash"),
            ("bob:$2y$05$tooshort", "malformed bcrypt"),
        ];
        for (line, why) in cases {
            let text = format!("{}\n# comment\n{line}\n", entry("alice", "a"));
            let e = Htpasswd::parse(&text).unwrap_err();
            assert_eq!(e.line, 3, "{line}");
            let shown = e.to_string();
            assert!(shown.starts_with("line 3: user \"bob\": "), "{shown}");
            assert!(shown.contains(why), "{line}: {shown}");
            assert!(shown.contains("bcrypt"), "{shown}");
        }
    }

    #[test]
    fn bad_lines_are_refused_without_showing_them() {
        let e = Htpasswd::parse("alice-s3cret-password\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let e = Htpasswd::parse(&format!(":{}", &entry("x", "y")[2..])).unwrap_err();
        assert!(e.problem.contains("no user name"), "{e}");
        let text = format!("{}\n{}\n", entry("alice", "a"), entry("alice", "b"));
        let e = Htpasswd::parse(&text).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.problem.contains("listed twice (first on line 1)"), "{e}");
        let cost_99 = entry("c", "p").replacen("$04$", "$99$", 1);
        let e = Htpasswd::parse(&cost_99).unwrap_err();
        assert!(e.problem.contains("cost 99"), "{e}");
    }

    #[test]
    fn the_stand_in_hash_has_the_files_cost_and_matches_no_password() {
        let f = Htpasswd::parse(&entry("alice", "a")).unwrap();
        let stand_in = f.stand_in_hash();
        let parts = bcrypt::HashParts::from_str(stand_in).unwrap();
        assert_eq!(parts.get_cost(), 4);
        assert!(!bcrypt::verify("a", stand_in).unwrap());
    }

    #[test]
    fn load_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let e = Htpasswd::load(&path).unwrap_err().to_string();
        assert!(
            e.starts_with("cannot read ") && e.contains("htpasswd"),
            "{e}"
        );
        std::fs::write(&path, "bob:{SHA}x\n").unwrap();
        let e = Htpasswd::load(&path).unwrap_err().to_string();
        assert!(e.contains("htpasswd line 1: user \"bob\""), "{e}");
        std::fs::write(&path, entry("bob", "b")).unwrap();
        let (f, stamp) = Htpasswd::load(&path).unwrap();
        assert_eq!(f.len(), 1);
        std::fs::write(
            &path,
            format!("{}\n{}\n", entry("bob", "b"), entry("c", "c")),
        )
        .unwrap();
        let changed = FileStamp::of(&std::fs::metadata(&path).unwrap());
        assert_ne!(stamp, changed);
    }
}
