//! Property tests of what the configuration decides: no text panics the parser (errors are
//! fine), and the upstream a request selects (`?ns=`, a first path component, the default) is
//! always a configured one, as the selection rules say, or an error.
//!
//! Selection lives in `crate::upstream`; its properties are here because they range over
//! configurations, which are generated as text and go through `Config::parse` first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use proptest::prelude::*;

use super::Config;
use crate::clock::Clock;
use crate::error::ApiError;
use crate::oci::name::arbitrary::{grammar_name, hostile};
use crate::oci::RepoName;
use crate::upstream::Upstreams;

/// Parses without the process environment: the same text always gives the same answer.
fn parse(text: &str) -> Result<Config, super::ConfigError> {
    Config::parse_with_env(text, &|_| None)
}

const SECTIONS: &[&str] = &[
    "",
    "[server]",
    "[server.tls]",
    "[storage]",
    "[storage.s3]",
    "[[upstream]]",
    "[[pin]]",
    "[cluster]",
    "[auth]",
    "[[access]]",
    "[[server]]",
    "[upstream]",
    "[storage.s3.x]",
    "[bogus]",
];

/// Every key of every table (and a few that are none), so generated documents reach the
/// validation of each value rather than stopping at `deny_unknown_fields`.
const KEYS: &[&str] = &[
    "listen",
    "shutdown_grace",
    "admin_listen",
    "offline",
    "header_read_timeout",
    "max_connections",
    "cert",
    "key",
    "client_ca",
    "backend",
    "root",
    "max_manifest_size",
    "max_size",
    "low_water",
    "sweep_interval",
    "s3",
    "endpoint",
    "region",
    "bucket",
    "prefix",
    "access_key_id",
    "secret_access_key",
    "secret_access_key_file",
    "redirect",
    "connect_timeout",
    "request_timeout",
    "max_retries",
    "abandoned_uploads_after",
    "eviction_grace",
    "name",
    "url",
    "aliases",
    "mirrors",
    "default",
    "tag_ttl",
    "username",
    "password",
    "password_env",
    "password_file",
    "library_prefix",
    "read_timeout",
    "token_realms",
    "allow",
    "deny",
    "image",
    "advertise",
    "peers",
    "peers_dns",
    "dns_refresh",
    "secret",
    "secret_file",
    "response_timeout",
    "health_interval",
    "htpasswd",
    "realm",
    "match",
    "anonymous",
    "users",
    "",
    "a.b",
    "\"quoted key\"",
];

/// Strings that sit at the edges of what the values mean: durations, sizes and percentages out
/// of range, URLs of every kind, names and globs, paths (none of them a special file), empty
/// and non-ASCII text.
const STRINGS: &[&str] = &[
    "",
    " ",
    "0",
    "0s",
    "1s",
    "-1s",
    "1 parsec",
    "18446744073709551615s",
    "584942417355y",
    "99999999999999999999999y",
    "1ns",
    "4MiB",
    "0B",
    "18446744073709551615",
    "18446744073709551616",
    "17179869184GiB",
    "1 KB",
    "90%",
    "100%",
    "101%",
    "-5%",
    "%",
    "http://",
    "http://x",
    "https://registry-1.docker.io",
    "https://u:p@x",
    "http://x/?q#f",
    "ftp://x",
    "http://[::1]:5000",
    "http://127.0.0.1:0",
    "127.0.0.1:5000",
    "0.0.0.0:0",
    "[::]:65535",
    "localhost:99999",
    "docker.io",
    "index.docker.io",
    "A/b",
    "a/../b",
    "..",
    "library/**",
    "**",
    "*",
    "[",
    "{a,b}",
    "a/",
    "docker.io/library/alpine:3.20",
    "docker.io/x@sha256:00",
    "alpine",
    "fs",
    "s3",
    "gcs",
    "/nonexistent/entrepot-fuzz/file",
    "/nonexistent",
    "mirror-a/",
    "/a//b/",
    "é",
    "\u{0}",
    "\\",
    "\"",
    "a\nb",
];

/// A TOML value: a string from the edges or any, a number, a boolean, an array or an inline
/// table.
fn value() -> impl Strategy<Value = String> {
    let string = prop_oneof![
        4 => proptest::sample::select(STRINGS).prop_map(|s| format!("{s:?}")),
        1 => any::<String>().prop_map(|s| format!("{s:?}")),
    ];
    let leaf = prop_oneof![
        6 => string,
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => prop_oneof![Just("0"), Just("-1"), Just("4096"), Just("1e400"), Just("nan")]
            .prop_map(str::to_string),
        1 => any::<bool>().prop_map(|b| b.to_string()),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| format!("[{}]", v.join(", "))),
            proptest::collection::vec((proptest::sample::select(KEYS), inner), 0..3).prop_map(
                |kv| {
                    let kv: Vec<String> = kv.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                    format!("{{ {} }}", kv.join(", "))
                }
            ),
        ]
    })
}

/// A document of tables and `key = value` lines, with the odd line that is not TOML at all.
fn document() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        8 => (proptest::sample::select(KEYS), value()).prop_map(|(k, v)| format!("{k} = {v}")),
        2 => proptest::sample::select(SECTIONS).prop_map(str::to_string),
        1 => "[ -~]{0,30}",
    ];
    proptest::collection::vec(line, 0..24).prop_map(|l| l.join("\n"))
}

/// An edit of the shipped example: a range cut out, text put in, or a line doubled.
fn edited_example() -> impl Strategy<Value = String> {
    let example = include_str!("../../config.example.toml");
    (
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        0u8..3,
        prop_oneof![
            "[ -~\n]{0,12}",
            proptest::sample::select(STRINGS).prop_map(str::to_string)
        ],
    )
        .prop_map(move |(at, len, how, text)| {
            // Edit on char boundaries: the example is ASCII but stay correct if it is not.
            let chars: Vec<char> = example.chars().collect();
            let at = at.index(chars.len());
            let end = (at + len.index(64)).min(chars.len());
            let mut out: String;
            match how {
                0 => {
                    out = chars[..at].iter().collect();
                    out.extend(&chars[end..]);
                }
                1 => {
                    out = chars[..at].iter().collect();
                    out.push_str(&text);
                    out.extend(&chars[at..]);
                }
                _ => {
                    let lines: Vec<&str> = example.lines().collect();
                    let i = at % lines.len();
                    let mut l = lines.clone();
                    l.insert(i, lines[i]);
                    out = l.join("\n");
                }
            }
            out
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn no_text_panics_the_config_parser(text in any::<String>()) {
        let _ = parse(&text);
    }

    #[test]
    fn no_toml_like_document_panics_the_config_parser(text in document()) {
        let _ = parse(&text);
    }

    #[test]
    fn no_edit_of_the_example_panics_the_config_parser(text in edited_example()) {
        let _ = parse(&text);
    }
}

// --- Upstream selection --------------------------------------------------------------------

/// Upstream names from a few that clash with names' first components (`team`, `library`) and
/// host-like ones.
fn upstream_names() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(
            &[
                "docker.io",
                "ghcr.io",
                "team",
                "library",
                "a",
                "localhost:5000"
            ][..]
        )
        .prop_map(str::to_string),
        "[a-z0-9][a-z0-9.-]{0,8}",
    ]
}

/// One to four `[[upstream]]` tables: names, aliases, at most one default, `library_prefix`,
/// `allow` and `deny`. Tables whose names clash are refused by the config, and skipped.
fn upstream_tables() -> impl Strategy<Value = String> {
    let globs = proptest::sample::select(
        &[
            "library/*",
            "team/**",
            "**",
            "a",
            "team/secret/**",
            "*/x",
            "a/*/c",
        ][..],
    );
    let table = (
        upstream_names(),
        proptest::collection::vec(upstream_names(), 0..3),
        proptest::option::of(any::<bool>()),
        proptest::option::of(proptest::collection::vec(globs.clone(), 1..3)),
        proptest::option::of(proptest::collection::vec(globs, 1..3)),
    );
    (
        proptest::collection::vec(table, 1..5),
        proptest::option::of(0usize..4),
    )
        .prop_map(|(tables, default)| {
            let mut text = String::new();
            for (i, (name, aliases, library_prefix, allow, deny)) in tables.iter().enumerate() {
                text.push_str(&format!(
                    "[[upstream]]\nname = {name:?}\nurl = \"http://127.0.0.1:9\"\n\
                     aliases = {aliases:?}\ndefault = {}\n",
                    default == Some(i)
                ));
                if let Some(p) = library_prefix {
                    text.push_str(&format!("library_prefix = {p}\n"));
                }
                if let Some(a) = allow {
                    text.push_str(&format!("allow = {a:?}\n"));
                }
                if let Some(d) = deny {
                    text.push_str(&format!("deny = {d:?}\n"));
                }
            }
            text
        })
}

/// The upstream clients of a configuration, built once per configuration text: building HTTP
/// clients is the slow part, and shrinking revisits the same tables.
fn upstreams_of(text: &str, config: &Config) -> Arc<Upstreams> {
    static BUILT: OnceLock<Mutex<HashMap<String, Arc<Upstreams>>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    built
        .entry(text.to_string())
        .or_insert_with(|| {
            Arc::new(Upstreams::new(&config.upstreams, Clock::default(), false).unwrap())
        })
        .clone()
}

/// A name or `ns=` part of a request: one of the configuration's names or aliases (picked by
/// index once the configuration is known), or anything else.
#[derive(Debug, Clone)]
enum Pick {
    Configured(prop::sample::Index),
    Other(String),
}

impl Pick {
    fn resolve(&self, config: &Config) -> String {
        let names: Vec<&String> = config
            .upstreams
            .iter()
            .flat_map(|u| std::iter::once(&u.name).chain(&u.aliases))
            .collect();
        match self {
            Pick::Configured(i) => names[i.index(names.len())].clone(),
            Pick::Other(s) => s.clone(),
        }
    }
}

fn pick(other: impl Strategy<Value = String>) -> impl Strategy<Value = Pick> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Pick::Configured),
        other.prop_map(Pick::Other),
    ]
}

/// Requests: an `ns=` that may name an upstream, be something else, or be absent, and a name
/// whose first component may name one.
fn requests() -> impl Strategy<Value = Vec<(Option<Pick>, Option<Pick>, String)>> {
    let ns = proptest::option::of(pick(prop_oneof![3 => upstream_names(), 1 => hostile()]));
    let first = proptest::option::of(pick(prop_oneof![upstream_names(), grammar_name()]));
    proptest::collection::vec((ns, first, grammar_name()), 1..24)
}

proptest! {
    // Each case builds the HTTP clients of its configuration (the slow part) and asks many
    // requests of them.
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// For any configuration and request, selection never panics, and it either picks a
    /// configured upstream, by the rules (`ns=` first, then a first component naming an
    /// upstream, then the default), that admits the repository it returns, or refuses with
    /// "no upstream" / "name unknown" exactly when the rules say so. A request forwarded by
    /// another replica, which names its upstream, gets that configured upstream or an error.
    #[test]
    fn every_request_selects_a_configured_upstream_by_the_rules_or_is_refused(
        text in upstream_tables(),
        reqs in requests(),
    ) {
        let Ok(config) = parse(&text) else { return Ok(()) };
        let ups = upstreams_of(&text, &config);
        let configured = &config.upstreams;
        let default = configured.iter().find(|u| u.default);
        for (ns, first, rest) in reqs {
            let ns = ns.map(|p| p.resolve(&config));
            let name = match first {
                Some(f) => format!("{}/{rest}", f.resolve(&config)),
                None => rest,
            };
            // Upstream names with a port are not repository components.
            let Ok(name) = name.parse::<RepoName>() else { continue };
            // The model: which upstream the rules pick, and the name asked of it.
            let by_name = |n: &str| configured.iter().find(|u| u.matches(n));
            let picked = match &ns {
                Some(ns) => by_name(ns).map(|u| (u, name.clone())),
                None => match name.strip_first().and_then(|(f, rest)| Some((by_name(f)?, rest))) {
                    Some(hit) => Some(hit),
                    None => default.map(|u| (u, name.clone())),
                },
            };
            let with_prefix = |u: &super::UpstreamConfig, repo: RepoName| {
                if u.library_prefix { repo.with_library_prefix() } else { repo }
            };
            match (picked, ups.select(ns.as_deref(), &name)) {
                (Some((want, repo)), Ok((up, got_repo))) => {
                    prop_assert_eq!(&**up.name(), want.name.as_str());
                    let repo = with_prefix(want, repo);
                    prop_assert_eq!(&got_repo, &repo);
                    prop_assert!(want.admits(repo.as_str()));
                }
                (Some((want, repo)), Err(e)) => {
                    prop_assert!(!want.admits(with_prefix(want, repo).as_str()), "{ns:?} {name}: {e}");
                    prop_assert!(matches!(e, ApiError::NameUnknown), "{ns:?} {name}: {e}");
                }
                (None, Ok((up, _))) => {
                    prop_assert!(false, "{ns:?} {name} selected {} where no rule applies", up.name());
                }
                (None, Err(e)) => {
                    prop_assert!(matches!(e, ApiError::NoUpstream(_)), "{ns:?} {name}: {e}");
                }
            }
            let asked = ns.unwrap_or_default();
            match ups.named(&asked, &name) {
                Ok((up, repo)) => {
                    prop_assert_eq!(&**up.name(), asked.as_str());
                    prop_assert_eq!(&repo, &name);
                    prop_assert!(up.config().admits(name.as_str()));
                }
                Err(e) => prop_assert!(
                    matches!(e, ApiError::NoUpstream(_) | ApiError::NameUnknown),
                    "{asked:?} {name}: {e}"
                ),
            }
        }
    }
}

// --- Durations -----------------------------------------------------------------------------

/// A duration as the config writes it: any count of any unit, often near the limits.
fn duration_text() -> impl Strategy<Value = String> {
    let n = prop_oneof![0u64..1000, any::<u64>(), (1u64 << 32)..(1u64 << 40)];
    let unit = proptest::sample::select(&["ns", "ms", "s", "m", "h", "d", "w", "M", "y"][..]);
    (n, unit).prop_map(|(n, u)| format!("{n}{u}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every duration a configuration is accepted with can be added to the current time, as
    /// timers and deadlines do (`Instant + Duration` panics on overflow), and the cluster's
    /// two timeouts to each other (a forwarded request waits for their sum).
    #[test]
    fn every_accepted_duration_can_be_added_to_now(
        durations in proptest::collection::vec(duration_text(), 11),
    ) {
        let [grace, header, sweep, ttl, connect, request, read, refresh, peer_connect, peer_response, health] =
            &durations[..]
        else {
            unreachable!()
        };
        let text = format!(
            "[server]\nshutdown_grace = {grace:?}\nheader_read_timeout = {header:?}\n\
             [storage]\nsweep_interval = {sweep:?}\n\
             [[upstream]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\ntag_ttl = {ttl:?}\n\
             connect_timeout = {connect:?}\nrequest_timeout = {request:?}\nread_timeout = {read:?}\n\
             [cluster]\npeers_dns = \"peers.local:5000\"\ndns_refresh = {refresh:?}\n\
             secret = \"0123456789abcdef0123\"\nconnect_timeout = {peer_connect:?}\n\
             response_timeout = {peer_response:?}\nhealth_interval = {health:?}\n"
        );
        let Ok(c) = parse(&text) else { return Ok(()) };
        let u = &c.upstreams[0];
        let cluster = c.cluster.as_ref().unwrap();
        let super::Members::Dns { refresh, .. } = &cluster.members else { unreachable!() };
        let now = std::time::Instant::now();
        for (key, d) in [
            ("server.shutdown_grace", c.server.shutdown_grace),
            ("server.header_read_timeout", c.server.header_read_timeout),
            ("storage.sweep_interval", c.storage.sweep_interval),
            ("upstream.tag_ttl", u.tag_ttl),
            ("upstream.connect_timeout", u.connect_timeout),
            ("upstream.request_timeout", u.request_timeout),
            ("upstream.read_timeout", u.read_timeout),
            ("cluster.dns_refresh", *refresh),
            ("cluster.health_interval", cluster.health_interval),
        ] {
            prop_assert!(now.checked_add(d).is_some(), "{key} = {d:?} was accepted");
        }
        prop_assert!(
            cluster.connect_timeout.checked_add(cluster.response_timeout).is_some(),
            "cluster.connect_timeout + cluster.response_timeout overflows"
        );
    }
}
