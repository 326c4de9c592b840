//! `[auth]` and `[[access]]`: the htpasswd file (loaded here, so a bad one stops the start
//! naming the line at fault), the realm of the Basic challenge, and the read rules. With
//! neither section every read stays anonymous; with either, every read needs a rule.

use std::path::PathBuf;

use serde::Deserialize;

use super::{invalid, ConfigError, UpstreamConfig};
use crate::auth::htpasswd::Htpasswd;
use crate::auth::policy::{Pattern, Policy, Readers, Rule};
use crate::auth::Auth;

/// The realm of the `WWW-Authenticate: Basic` challenge when `[auth] realm` is not given.
pub const DEFAULT_REALM: &str = "entrepot";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    htpasswd: Option<PathBuf>,
    realm: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccess {
    #[serde(rename = "match")]
    pattern: Option<String>,
    #[serde(default)]
    anonymous: bool,
    users: Option<Vec<String>>,
}

/// `[auth]` and the `[[access]]` tables, validated; `None` when there are neither.
pub(super) fn validate_auth(
    auth: Option<RawAuth>,
    access: Vec<RawAccess>,
    upstreams: &[UpstreamConfig],
) -> Result<Option<Auth>, ConfigError> {
    if auth.is_none() && access.is_empty() {
        return Ok(None);
    }
    let auth = auth.unwrap_or_default();
    let realm = auth.realm.as_deref().unwrap_or(DEFAULT_REALM);
    let realm_ok = !realm.is_empty()
        && realm.len() <= 128
        && realm
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if !realm_ok {
        return Err(invalid(
            "auth.realm",
            format!("{realm:?} must be 1 to 128 printable ASCII characters without '\"' or '\\'"),
        ));
    }
    let users = auth
        .htpasswd
        .map(|path| {
            Htpasswd::load(&path)
                .map(|(file, stamp)| (path, file, stamp))
                .map_err(|e| invalid("auth.htpasswd", e.to_string()))
        })
        .transpose()?;
    let rules = access
        .into_iter()
        .enumerate()
        .map(|(i, a)| validate_rule(i, a, upstreams))
        .collect::<Result<Vec<_>, _>>()?;
    let policy = Policy::new(rules.clone()).map_err(|(i, j)| {
        invalid(
            format!("access[{j}].match"),
            format!(
                "{:?} is also access[{i}].match: one rule per pattern",
                rules[j].pattern.as_str()
            ),
        )
    })?;
    Ok(Some(Auth::new(realm, policy, users)))
}

fn validate_rule(
    i: usize,
    a: RawAccess,
    upstreams: &[UpstreamConfig],
) -> Result<Rule, ConfigError> {
    let key = |k: &str| format!("access[{i}].{k}");
    let text = a
        .pattern
        .ok_or_else(|| invalid(key("match"), "is required, like \"docker.io/library/**\""))?;
    let pattern = Pattern::parse(&text).map_err(|p| invalid(key("match"), p))?;
    if let (name, true) = pattern.upstream() {
        if !upstreams.iter().any(|u| u.name == name) {
            let problem = match upstreams.iter().find(|u| u.matches(name)) {
                Some(u) => format!(
                    "{name:?} is an alias of upstream {:?}: rules name upstreams by their name",
                    u.name
                ),
                None => {
                    let names: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
                    format!("{name:?} is not an [[upstream]] name (they are {names:?})")
                }
            };
            return Err(invalid(key("match"), problem));
        }
    }
    let readers = match (a.anonymous, a.users) {
        (true, None) => Readers::Anyone,
        (true, Some(_)) => {
            return Err(invalid(
                key("users"),
                "anonymous = true already lets everyone read: leave users out",
            ))
        }
        (false, Some(users)) => {
            if users.iter().any(|u| u.is_empty()) {
                return Err(invalid(key("users"), "a user name is empty"));
            }
            Readers::Users(users)
        }
        (false, None) => {
            return Err(invalid(
                format!("access[{i}]"),
                "says nobody may read: give anonymous = true or users = [...] \
                 (users = [] refuses everyone explicitly)",
            ))
        }
    };
    Ok(Rule { pattern, readers })
}

#[cfg(test)]
mod tests {
    use crate::config::tests::err;
    use crate::config::Config;

    const UPSTREAMS: &str = "[[upstream]]\nname = \"docker.io\"\nurl = \"http://hub\"\n\
                             aliases = [\"index.docker.io\"]\ndefault = true\n\
                             [[upstream]]\nname = \"ghcr.io\"\nurl = \"http://ghcr\"\n";

    fn with(tables: &str) -> String {
        format!("{UPSTREAMS}{tables}")
    }

    #[test]
    fn without_auth_or_access_everything_is_anonymous() {
        let c = Config::parse(UPSTREAMS).unwrap();
        assert!(c.auth.is_none());
    }

    #[test]
    fn access_alone_turns_the_policy_on_with_the_default_realm() {
        let c = Config::parse(&with(
            "[[access]]\nmatch = \"docker.io/library/**\"\nanonymous = true\n\
             [[access]]\nmatch = \"ghcr.io/acme/**\"\nusers = [\"ci\", \"alice\"]\n",
        ))
        .unwrap();
        let auth = c.auth.unwrap();
        assert_eq!(auth.realm(), "entrepot");
        assert!(auth.htpasswd_path().is_none());
        let rule = auth.policy().rule_for("ghcr.io", "acme/app").unwrap();
        assert!(rule.admits("alice") && !rule.anonymous());
        assert!(auth.policy().rule_for("ghcr.io", "other/app").is_none());
    }

    #[test]
    fn auth_alone_turns_the_policy_on_and_refuses_everything() {
        let c = Config::parse(&with("[auth]\nrealm = \"my cache\"\n")).unwrap();
        let auth = c.auth.unwrap();
        assert_eq!(auth.realm(), "my cache");
        assert!(auth.policy().rules().is_empty());
    }

    #[test]
    fn the_htpasswd_file_is_loaded_and_its_errors_name_key_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let table = format!("[auth]\nhtpasswd = {:?}\n", path.display().to_string());
        let e = err(&with(&table));
        assert!(e.starts_with("auth.htpasswd: cannot read "), "{e}");

        let good = format!("alice:{}\n", bcrypt::hash("pw", 4).unwrap());
        std::fs::write(&path, format!("{good}# md5 below\nbob:$apr1$x$y\n")).unwrap();
        let e = err(&with(&table));
        assert!(e.starts_with("auth.htpasswd: "), "{e}");
        assert!(
            e.contains("htpasswd line 3: user \"bob\": an Apache MD5"),
            "{e}"
        );
        assert!(e.contains("htpasswd -B"), "{e}");

        std::fs::write(&path, good).unwrap();
        let c = Config::parse(&with(&table)).unwrap();
        assert_eq!(c.auth.unwrap().htpasswd_path(), Some(path.as_path()));
    }

    #[test]
    fn rule_errors_name_the_key() {
        let cases = [
            (
                "[[access]]\nanonymous = true\n",
                "access[0].match: is required",
            ),
            (
                "[[access]]\nmatch = \"docker.io\"\nanonymous = true\n",
                "access[0].match: \"docker.io\" must be <upstream name>/<repository pattern>",
            ),
            (
                "[[access]]\nmatch = \"quay.io/**\"\nanonymous = true\n",
                "access[0].match: \"quay.io\" is not an [[upstream]] name",
            ),
            (
                "[[access]]\nmatch = \"index.docker.io/**\"\nanonymous = true\n",
                "access[0].match: \"index.docker.io\" is an alias of upstream \"docker.io\"",
            ),
            (
                "[[access]]\nmatch = \"ghcr.io/Acme/*\"\nanonymous = true\n",
                "access[0].match: \"ghcr.io/Acme/*\" can never match",
            ),
            (
                "[[access]]\nmatch = \"ghcr.io/**\"\n",
                "access[0]: says nobody may read",
            ),
            (
                "[[access]]\nmatch = \"ghcr.io/**\"\nanonymous = true\nusers = [\"a\"]\n",
                "access[0].users: anonymous = true already lets everyone read",
            ),
            (
                "[[access]]\nmatch = \"ghcr.io/**\"\nusers = [\"\"]\n",
                "access[0].users: a user name is empty",
            ),
            (
                "[[access]]\nmatch = \"ghcr.io/**\"\nusers = []\n\
                 [[access]]\nmatch = \"ghcr.io/**\"\nanonymous = true\n",
                "access[1].match: \"ghcr.io/**\" is also access[0].match",
            ),
            ("[auth]\nrealm = \"say \\\"hi\\\"\"\n", "auth.realm: "),
            ("[auth]\nrealm = \"\"\n", "auth.realm: "),
            ("[auth]\nrelam = \"x\"\n", "relam"),
            (
                "[[access]]\nmatch = \"ghcr.io/**\"\nuser = [\"a\"]\n",
                "`user`",
            ),
        ];
        for (tables, expected) in cases {
            let e = err(&with(tables));
            assert!(e.contains(expected), "{tables}\n{e}");
        }
    }

    /// The commented `[auth]` and `[[access]]` block of config.example.toml, uncommented, is
    /// valid and means what its comments say.
    #[test]
    fn config_example_auth_block_parses() {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        let alice = format!("alice:{}\n", bcrypt::hash("pw", 4).unwrap());
        std::fs::write(&htpasswd, alice).unwrap();
        let example = include_str!("../../config.example.toml");
        let mut text = String::new();
        let mut in_auth = false;
        let mut uncommented = 0;
        for line in example.lines() {
            in_auth = (in_auth && !line.is_empty()) || line == "# [auth]";
            let setting = line
                .strip_prefix("# ")
                .filter(|l| in_auth && (l.starts_with('[') || l.contains(" = ")));
            let line = match setting {
                Some(l) if l.starts_with("htpasswd = ") => {
                    format!("htpasswd = {:?}", htpasswd.display().to_string())
                }
                Some(l) => l.to_string(),
                None => line.to_string(),
            };
            uncommented += usize::from(setting.is_some());
            text.push_str(&line);
            text.push('\n');
        }
        assert_eq!(uncommented, 9, "{text}");
        let auth = Config::parse(&text).unwrap().auth.expect("[auth] is on");
        assert_eq!(auth.realm(), "entrepot");
        assert_eq!(auth.htpasswd_path(), Some(htpasswd.as_path()));
        let policy = auth.policy();
        assert!(policy
            .rule_for("docker.io", "library/alpine")
            .unwrap()
            .anonymous());
        let acme = policy.rule_for("ghcr.io", "acme/app").unwrap();
        assert!(acme.admits("alice") && acme.admits("ci") && !acme.anonymous());
        assert!(policy.rule_for("quay.io", "acme/app").is_none());
    }

    #[test]
    fn wildcard_upstreams_and_explicit_nobody_are_valid() {
        let c = Config::parse(&with(
            "[[access]]\nmatch = \"*/**\"\nanonymous = true\n\
             [[access]]\nmatch = \"ghcr.io/vault/**\"\nusers = []\n",
        ))
        .unwrap();
        let auth = c.auth.unwrap();
        let vault = auth.policy().rule_for("ghcr.io", "vault/keys").unwrap();
        assert!(!vault.anonymous() && !vault.admits("anyone"));
        assert!(auth
            .policy()
            .rule_for("docker.io", "x/y")
            .unwrap()
            .anonymous());
    }
}
