//! Client authentication and the read policy (DESIGN.md, "Who may read what"): who a request
//! comes from, and whether it may read what it asks for. Both come before the cache: a cache
//! hit is still a read.
//!
//! # Layout
//!
//! - `basic`: `Authorization: Basic` credentials (the password never displayed)
//! - `htpasswd`: the users file, bcrypt only, and its change stamp
//! - `verify`: password checks off the async threads, bounded, coalesced, remembered
//! - `policy`: `[[access]]` rules and which one decides a read
//! - this file: [`Auth`], the live whole (policy, users file reloaded when it changes,
//!   verifier), and the decision for one request
//!
//! # The decision for a read of `<upstream>/<repo>`
//!
//! 1. The most specific rule matching it decides (see `policy`). `anonymous = true`: allowed,
//!    and no credentials are looked at (so a flood of wrong passwords costs public pulls
//!    nothing).
//! 2. A verified client certificate whose common name the rule lists: allowed, no password.
//! 3. `Authorization: Basic` credentials: checked against the users file; wrong (or no users
//!    file) → 401. Right and listed by the rule → allowed; right but not listed → 403.
//! 4. Otherwise: with a client certificate → 403 (authenticated, not allowed); with nothing →
//!    401 and a `Basic` challenge. No matching rule is a refusal like a rule listing nobody.

pub mod basic;
pub mod htpasswd;
pub mod policy;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use http::{Extensions, HeaderMap, HeaderValue};
use tokio_util::sync::CancellationToken;

use self::basic::{Credentials, Presented};
use self::htpasswd::{FileStamp, Htpasswd};
use self::policy::Policy;
use self::verify::{Verdict, Verifier};

/// The verified certificate a client presented on a TLS connection (`[server.tls] client_ca`),
/// attached to every request of that connection. Its common name is a user for the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    pub common_name: String,
}

/// `Basic realm="<realm>"` (the realm was checked at load: printable ASCII without '"' or
/// '\\').
pub fn basic_challenge(realm: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("Basic realm=\"{realm}\"")).ok()
}

/// How often the users file is looked at for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Why a read (or the `/v2/` probe) is refused. `error.rs` turns it into a response.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// No credentials where some are needed: 401 with a `Basic` challenge.
    #[error("authentication required")]
    NoCredentials { realm: Arc<str> },
    /// Credentials that are wrong, malformed, or that nothing can check: 401.
    #[error("wrong user name or password")]
    BadCredentials { realm: Arc<str> },
    /// Authenticated, and not allowed to read this: 403.
    #[error("not allowed to read this repository")]
    NotAllowed,
    /// Too many password checks running or waiting: 429, retry shortly.
    #[error("too many password checks at once, retry shortly")]
    Busy,
}

/// Client authentication and the read policy, live: the users file is reloaded in place when
/// it changes (see [`Auth::watch`]). Clones share everything.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    realm: Arc<str>,
    policy: Policy,
    users: Option<UsersFile>,
    verifier: Verifier,
}

/// The htpasswd file, as last loaded successfully.
struct UsersFile {
    path: PathBuf,
    current: RwLock<Arc<Htpasswd>>,
    /// The stamp of the file last looked at, loaded or not: a broken file is reported once, not
    /// every poll.
    seen: Mutex<Option<FileStamp>>,
}

impl Auth {
    /// `users`: the htpasswd file's path, its contents as loaded at startup, and its stamp then.
    pub fn new(realm: &str, policy: Policy, users: Option<(PathBuf, Htpasswd, FileStamp)>) -> Auth {
        Auth {
            inner: Arc::new(Inner {
                realm: realm.into(),
                policy,
                users: users.map(|(path, file, stamp)| UsersFile {
                    path,
                    current: RwLock::new(Arc::new(file)),
                    seen: Mutex::new(Some(stamp)),
                }),
                verifier: Verifier::default(),
            }),
        }
    }

    pub fn realm(&self) -> &str {
        &self.inner.realm
    }

    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// The users file's path, if there is one.
    pub fn htpasswd_path(&self) -> Option<&Path> {
        self.inner.users.as_ref().map(|u| u.path.as_path())
    }

    /// bcrypt runs so far.
    pub fn password_checks(&self) -> u64 {
        self.inner.verifier.runs()
    }

    /// May the client of `headers` and `extensions` (where TLS puts a [`ClientCert`]) read
    /// `repo` through the upstream named `upstream`?
    pub async fn check_read(
        &self,
        headers: &HeaderMap,
        extensions: &Extensions,
        upstream: &str,
        repo: &str,
    ) -> Result<(), Refusal> {
        let rule = self.inner.policy.rule_for(upstream, repo);
        if rule.is_some_and(|r| r.anonymous()) {
            return Ok(());
        }
        let cert = extensions
            .get::<ClientCert>()
            .map(|c| c.common_name.as_str());
        if let (Some(rule), Some(cn)) = (rule, cert) {
            if rule.admits(cn) {
                return Ok(());
            }
        }
        let user = self.authenticate(headers).await?;
        match (user, cert) {
            (Some(user), _) if rule.is_some_and(|r| r.admits(&user)) => Ok(()),
            (Some(user), _) => {
                tracing::debug!(%user, upstream, repo, "read refused to an authenticated user");
                Err(Refusal::NotAllowed)
            }
            (None, Some(cn)) => {
                tracing::debug!(
                    common_name = cn,
                    upstream,
                    repo,
                    "read refused to a client certificate"
                );
                Err(Refusal::NotAllowed)
            }
            (None, None) => Err(Refusal::NoCredentials {
                realm: self.inner.realm.clone(),
            }),
        }
    }

    /// May this client see the status page (`/ui/`)? It names every cached repository, so it
    /// takes more than any one read: a user or certificate common name that some rule names
    /// (`anonymous = true` names nobody), or, when every rule lets anyone read, anyone. Wrong
    /// credentials are refused as for a read.
    pub async fn check_status_page(
        &self,
        headers: &HeaderMap,
        extensions: &Extensions,
    ) -> Result<(), Refusal> {
        let policy = &self.inner.policy;
        if policy.anonymous_everywhere() {
            return Ok(());
        }
        let cert = extensions
            .get::<ClientCert>()
            .map(|c| c.common_name.as_str());
        if cert.is_some_and(|cn| policy.names(cn)) {
            return Ok(());
        }
        match (self.authenticate(headers).await?, cert) {
            (Some(user), _) if policy.names(&user) => Ok(()),
            (Some(_), _) | (None, Some(_)) => Err(Refusal::NotAllowed),
            (None, None) => Err(Refusal::NoCredentials {
                realm: self.inner.realm.clone(),
            }),
        }
    }

    /// `GET /v2/`: credentials presented must be right (so `docker login` means something).
    /// Without any, it answers 200 when a certificate was presented or some rule lets anyone
    /// read, and 401 otherwise (so clients that probe `/v2/` send credentials).
    ///
    /// `Ok(Some(challenge))`: an anonymous 200 while some rule wants credentials; the 200
    /// carries the `Basic` challenge too. containers/image clients (skopeo, podman, CRI-O) take
    /// their challenge from this probe whatever its status and send credentials only when it
    /// has one; RFC 9110 §11.6.1 allows the header on any response for this purpose.
    pub async fn check_base(
        &self,
        headers: &HeaderMap,
        extensions: &Extensions,
    ) -> Result<Option<HeaderValue>, Refusal> {
        if self.authenticate(headers).await?.is_some() || extensions.get::<ClientCert>().is_some() {
            return Ok(None);
        }
        let policy = &self.inner.policy;
        if !policy.anonymous_somewhere() {
            return Err(Refusal::NoCredentials {
                realm: self.inner.realm.clone(),
            });
        }
        Ok(if policy.users_somewhere() {
            basic_challenge(&self.inner.realm)
        } else {
            None
        })
    }

    /// The user of the request's Basic credentials, checked; `None` without credentials.
    async fn authenticate(&self, headers: &HeaderMap) -> Result<Option<String>, Refusal> {
        let bad = || Refusal::BadCredentials {
            realm: self.inner.realm.clone(),
        };
        let creds: Credentials = match Presented::from_headers(headers) {
            Presented::Nothing => return Ok(None),
            Presented::Malformed => return Err(bad()),
            Presented::Basic(c) => c,
        };
        let Some(users) = &self.inner.users else {
            return Err(bad());
        };
        let file = users.current.read().expect("not poisoned").clone();
        match self.inner.verifier.check(&file, &creds).await {
            Ok(Verdict::Right) => Ok(Some(creds.user)),
            Ok(Verdict::Wrong) => Err(bad()),
            Err(verify::Busy) => {
                tracing::debug!("password check refused: too many at once");
                Err(Refusal::Busy)
            }
        }
    }

    /// Reloads the users file whenever it changes (polled every [`RELOAD_EVERY`]) until `stop`.
    /// A file that cannot be read or parsed leaves the users as they were; it is logged once.
    pub async fn watch(self, stop: CancellationToken) {
        if self.inner.users.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.reload_if_changed().await,
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Loads the users file again if its stamp changed since it was last looked at.
    pub async fn reload_if_changed(&self) {
        let Some(users) = &self.inner.users else {
            return;
        };
        let path = users.path.clone();
        let stamp = match tokio::fs::metadata(&path).await {
            Ok(meta) => Some(FileStamp::of(&meta)),
            Err(_) => None,
        };
        if *users.seen.lock().expect("not poisoned") == stamp {
            return;
        }
        let loaded = tokio::task::spawn_blocking(move || Htpasswd::load(&path)).await;
        let previous = users.current.read().expect("not poisoned").len();
        match loaded {
            Ok(Ok((file, stamp))) => {
                tracing::info!(
                    path = %users.path.display(),
                    users = file.len(),
                    previous,
                    "reloaded the htpasswd file"
                );
                *users.current.write().expect("not poisoned") = Arc::new(file);
                *users.seen.lock().expect("not poisoned") = Some(stamp);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, users = previous, "the htpasswd file changed but cannot be loaded: keeping the users loaded before");
                *users.seen.lock().expect("not poisoned") = stamp;
            }
            Err(e) => tracing::warn!(error = %e, "reloading the htpasswd file failed"),
        }
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("realm", &self.inner.realm)
            .field("htpasswd", &self.htpasswd_path())
            .field("rules", &self.inner.policy)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::policy::tests::{rule, users};
    use super::policy::{Readers, Rule};
    use super::*;
    use base64::Engine as _;

    fn htpasswd(entries: &[(&str, &str)]) -> String {
        entries
            .iter()
            .map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 4).unwrap()))
            .collect()
    }

    /// An `Auth` over a users file in `dir` (written from `entries`) and these rules.
    fn auth(dir: &Path, entries: &[(&str, &str)], rules: Vec<Rule>) -> Auth {
        let path = dir.join("htpasswd");
        std::fs::write(&path, htpasswd(entries)).unwrap();
        let (file, stamp) = Htpasswd::load(&path).unwrap();
        Auth::new(
            "test-realm",
            Policy::new(rules).unwrap(),
            Some((path, file, stamp)),
        )
    }

    fn basic(user: &str, password: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        h.insert(
            http::header::AUTHORIZATION,
            format!("Basic {v}").parse().unwrap(),
        );
        h
    }

    fn cert(cn: &str) -> Extensions {
        let mut e = Extensions::new();
        e.insert(ClientCert {
            common_name: cn.into(),
        });
        e
    }

    /// What a read of `ghcr.io/<repo>` comes to, as a word.
    async fn read(a: &Auth, headers: &HeaderMap, ext: &Extensions, repo: &str) -> &'static str {
        match a.check_read(headers, ext, "ghcr.io", repo).await {
            Ok(()) => "allowed",
            Err(Refusal::NoCredentials { .. }) => "401",
            Err(Refusal::BadCredentials { .. }) => "401 bad",
            Err(Refusal::NotAllowed) => "403",
            Err(Refusal::Busy) => "busy",
        }
    }

    #[tokio::test]
    async fn the_decision_for_each_kind_of_client() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(
            dir.path(),
            &[("alice", "a-pw"), ("bob", "b-pw")],
            vec![
                rule("ghcr.io/public/**", Readers::Anyone),
                rule("ghcr.io/acme/**", users(&["alice", "node-1"])),
            ],
        );
        let none = (HeaderMap::new(), Extensions::new());
        let alice = basic("alice", "a-pw");
        let bob = basic("bob", "b-pw");
        let wrong = basic("alice", "nope");
        let no_ext = Extensions::new();

        assert_eq!(read(&a, &none.0, &none.1, "public/x").await, "allowed");
        // Credentials are not even looked at where anyone may read.
        assert_eq!(read(&a, &wrong, &no_ext, "public/x").await, "allowed");
        assert_eq!(a.password_checks(), 0);

        assert_eq!(read(&a, &none.0, &none.1, "acme/app").await, "401");
        assert_eq!(read(&a, &alice, &no_ext, "acme/app").await, "allowed");
        assert_eq!(read(&a, &bob, &no_ext, "acme/app").await, "403");
        assert_eq!(read(&a, &wrong, &no_ext, "acme/app").await, "401 bad");
        assert_eq!(
            read(&a, &basic("eve", "x"), &no_ext, "acme/app").await,
            "401 bad"
        );

        // A client certificate's common name is a user; no password needed.
        assert_eq!(
            read(&a, &none.0, &cert("node-1"), "acme/app").await,
            "allowed"
        );
        assert_eq!(read(&a, &none.0, &cert("node-2"), "acme/app").await, "403");
        // A certificate not listed, with a listed user's password: the user gets in.
        assert_eq!(
            read(&a, &alice, &cert("node-2"), "acme/app").await,
            "allowed"
        );

        // No rule: refused whoever asks.
        assert_eq!(read(&a, &none.0, &none.1, "other/app").await, "401");
        assert_eq!(read(&a, &alice, &no_ext, "other/app").await, "403");
        assert_eq!(read(&a, &none.0, &cert("node-1"), "other/app").await, "403");
    }

    #[tokio::test]
    async fn the_v2_probe_asks_for_credentials_only_when_nothing_is_public() {
        let dir = tempfile::tempdir().unwrap();
        let private = auth(
            dir.path(),
            &[("alice", "a-pw")],
            vec![rule("ghcr.io/acme/**", users(&["alice"]))],
        );
        let none = HeaderMap::new();
        let no_ext = Extensions::new();
        assert!(matches!(
            private.check_base(&none, &no_ext).await,
            Err(Refusal::NoCredentials { .. })
        ));
        assert!(private
            .check_base(&basic("alice", "a-pw"), &no_ext)
            .await
            .is_ok());
        assert!(private.check_base(&none, &cert("node-1")).await.is_ok());
        assert!(matches!(
            private.check_base(&basic("alice", "nope"), &no_ext).await,
            Err(Refusal::BadCredentials { .. })
        ));

        let public = auth(
            dir.path(),
            &[("alice", "a-pw")],
            vec![
                rule("ghcr.io/acme/**", users(&["alice"])),
                rule("docker.io/library/**", Readers::Anyone),
            ],
        );
        // Open, and the 200 says credentials may open more.
        let challenge = public.check_base(&none, &no_ext).await.unwrap();
        assert_eq!(challenge.unwrap(), "Basic realm=\"test-realm\"");
        // Authenticated: nothing to advertise.
        let alice = basic("alice", "a-pw");
        assert!(public.check_base(&alice, &no_ext).await.unwrap().is_none());
        // Wrong credentials are still wrong (a `docker login` must not succeed with them).
        assert!(public
            .check_base(&basic("alice", "nope"), &no_ext)
            .await
            .is_err());

        // Every rule public: no challenge anywhere.
        let open = auth(
            dir.path(),
            &[("alice", "a-pw")],
            vec![rule("docker.io/library/**", Readers::Anyone)],
        );
        assert!(open.check_base(&none, &no_ext).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn without_a_users_file_basic_credentials_cannot_succeed() {
        let a = Auth::new(
            "r",
            Policy::new(vec![rule("ghcr.io/**", users(&["alice"]))]).unwrap(),
            None,
        );
        let r = a
            .check_read(&basic("alice", "x"), &Extensions::new(), "ghcr.io", "a")
            .await;
        assert!(matches!(r, Err(Refusal::BadCredentials { .. })), "{r:?}");
        assert!(a
            .check_read(&HeaderMap::new(), &cert("alice"), "ghcr.io", "a")
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_old_users() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let a = auth(
            dir.path(),
            &[("alice", "a-pw")],
            vec![rule("ghcr.io/**", users(&["alice", "carol"]))],
        );
        let carol = basic("carol", "c-pw");
        let no_ext = Extensions::new();
        assert_eq!(read(&a, &carol, &no_ext, "x").await, "401 bad");

        std::fs::write(&path, htpasswd(&[("alice", "a-pw"), ("carol", "c-pw")])).unwrap();
        a.reload_if_changed().await;
        assert_eq!(read(&a, &carol, &no_ext, "x").await, "allowed");

        // A broken file: carol and alice keep working.
        std::fs::write(&path, "carol:{SHA}abc\n").unwrap();
        a.reload_if_changed().await;
        assert_eq!(read(&a, &carol, &no_ext, "x").await, "allowed");
        assert_eq!(
            read(&a, &basic("alice", "a-pw"), &no_ext, "x").await,
            "allowed"
        );

        // Fixed again, without carol: she is out at once (her remembered verdict was for a
        // hash the file no longer has).
        std::fs::write(&path, htpasswd(&[("alice", "a-pw")])).unwrap();
        a.reload_if_changed().await;
        assert_eq!(read(&a, &carol, &no_ext, "x").await, "401 bad");

        // Removed: the users stay.
        std::fs::remove_file(&path).unwrap();
        a.reload_if_changed().await;
        assert_eq!(
            read(&a, &basic("alice", "a-pw"), &no_ext, "x").await,
            "allowed"
        );
    }

    #[tokio::test]
    async fn debug_shows_no_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path(), &[("alice", "a-pw")], vec![]);
        let shown = format!("{a:?}");
        assert!(!shown.contains("$2"), "{shown}");
        assert!(shown.contains("test-realm"), "{shown}");
    }
}
