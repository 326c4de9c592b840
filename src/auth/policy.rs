//! The read policy: `[[access]]` rules over `<upstream>/<repository>`, and which one decides a
//! read. Pure data and matching, no I/O: who the client is was settled before this is asked.
//!
//! # Which rule decides
//!
//! A read of `repo` through upstream `up` is matched against `"{up}/{repo}"`, where `up` is the
//! configured `[[upstream]] name` and `repo` the name the upstream is asked for (after
//! `library/` is added). Of the rules whose pattern matches, the **most specific** decides, and
//! only it: a less specific rule that would allow the read is not consulted. Specificity is
//! compared key by key, the first difference deciding:
//!
//! 1. the longer literal prefix (the characters before the first `*` or `?`) wins;
//! 2. then the pattern with fewer wildcards (`*`, `**` and `?` count one each);
//! 3. then the one with fewer `**`;
//! 4. then the one with more literal characters in all;
//! 5. then the rule written first in the file.
//!
//! So `ghcr.io/acme/secret/**` beats `ghcr.io/acme/**` (longer prefix), `ghcr.io/acme/*` beats
//! `ghcr.io/acme/**` for `acme/app` (same prefix and count, no `**`), and `*/**` is the
//! fallback every other rule beats. No matching rule: the read is refused.

use std::cmp::Reverse;

/// One compiled `match` pattern: `<upstream>/<repository glob>`. `*` and `?` stay within one
/// path component, `**` (a whole component) crosses them.
#[derive(Clone)]
pub struct Pattern {
    text: String,
    glob: globset::GlobMatcher,
    rank: Rank,
}

/// How specific a pattern is: greater is more specific (fields compared in order; see the
/// module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    literal_prefix: usize,
    wildcards: Reverse<usize>,
    double_stars: Reverse<usize>,
    literals: usize,
}

impl Pattern {
    /// Compiles `text`; the error says what is wrong with it, for the caller to put after the
    /// key it came from.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let example = "like \"docker.io/library/**\" or \"ghcr.io/acme/*\"";
        if text.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(format!(
                "{text:?} can never match: registry and repository names are lower-case"
            ));
        }
        if let Some(c) = text
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-:/*?".contains(*c)))
        {
            return Err(format!(
                "{text:?} has {c:?}: a pattern holds lower-case letters, digits, '.', '_', '-', \
                 ':', '/' and the wildcards *, ** and ?"
            ));
        }
        let Some((upstream, repo)) = text.split_once('/') else {
            return Err(format!(
                "{text:?} must be <upstream name>/<repository pattern>, {example}"
            ));
        };
        if upstream.is_empty() || repo.is_empty() || repo.ends_with('/') || repo.contains("//") {
            return Err(format!(
                "{text:?} must be <upstream name>/<repository pattern>, {example} \
                 (no empty part, no trailing or double '/')"
            ));
        }
        if upstream.contains("**") {
            return Err(format!(
                "{text:?}: an upstream name has no '/', so use * for any upstream, not **"
            ));
        }
        if let Some(c) = repo.split('/').find(|c| c.contains("**") && *c != "**") {
            return Err(format!(
                "{text:?}: ** must be a whole path component (\"team/**\"), not part of {c:?}"
            ));
        }
        let glob = globset::GlobBuilder::new(text)
            .literal_separator(true)
            .backslash_escape(false)
            .build()
            .map_err(|e| format!("{text:?} is not a valid pattern: {}", e.kind()))?
            .compile_matcher();
        let is_wild = |c: char| c == '*' || c == '?';
        let mut wildcards = 0;
        let mut double_stars = 0;
        for component in text.split('/') {
            if component == "**" {
                wildcards += 1;
                double_stars += 1;
                continue;
            }
            let mut in_star = false;
            for c in component.chars() {
                match c {
                    '*' if !in_star => {
                        wildcards += 1;
                        in_star = true;
                    }
                    '*' => {}
                    '?' => {
                        wildcards += 1;
                        in_star = false;
                    }
                    _ => in_star = false,
                }
            }
        }
        let rank = Rank {
            literal_prefix: text.find(is_wild).unwrap_or(text.len()),
            wildcards: Reverse(wildcards),
            double_stars: Reverse(double_stars),
            literals: text.chars().filter(|c| !is_wild(*c)).count(),
        };
        Ok(Pattern {
            text: text.to_string(),
            glob,
            rank,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The upstream part (before the first '/'), and whether it is a plain name rather than a
    /// wildcard pattern.
    pub fn upstream(&self) -> (&str, bool) {
        let up = self.text.split('/').next().unwrap_or_default();
        (up, !up.contains(['*', '?']))
    }

    /// Does it match `<upstream>/<repo>` (already joined)?
    pub fn is_match(&self, target: &str) -> bool {
        self.glob.is_match(target)
    }
}

impl std::fmt::Debug for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.text.fmt(f)
    }
}

/// Who a rule lets read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readers {
    /// Everyone, with or without credentials (`anonymous = true`).
    Anyone,
    /// These authenticated users only (htpasswd users or client-certificate common names);
    /// empty: nobody.
    Users(Vec<String>),
}

/// One `[[access]]` rule.
#[derive(Clone, Debug)]
pub struct Rule {
    pub pattern: Pattern,
    pub readers: Readers,
}

impl Rule {
    /// Whether anyone may read without credentials.
    pub fn anonymous(&self) -> bool {
        self.readers == Readers::Anyone
    }

    /// Whether the authenticated `user` may read.
    pub fn admits(&self, user: &str) -> bool {
        match &self.readers {
            Readers::Anyone => true,
            Readers::Users(users) => users.iter().any(|u| u == user),
        }
    }
}

/// The rules, most specific first, compiled into one set.
#[derive(Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    set: globset::GlobSet,
    anonymous_somewhere: bool,
    users_somewhere: bool,
}

impl Policy {
    /// The rules in file order. Two rules with the same pattern are an error: `Err((i, j))`,
    /// the indexes of the two.
    pub fn new(rules: Vec<Rule>) -> Result<Policy, (usize, usize)> {
        for (j, r) in rules.iter().enumerate() {
            if let Some(i) = rules[..j]
                .iter()
                .position(|o| o.pattern.text == r.pattern.text)
            {
                return Err((i, j));
            }
        }
        let mut rules = rules;
        // Stable: equally specific rules keep their file order.
        rules.sort_by_key(|r| Reverse(r.pattern.rank));
        let mut set = globset::GlobSetBuilder::new();
        for r in &rules {
            set.add(r.pattern.glob.glob().clone());
        }
        let set = set.build().expect("each glob compiled on its own");
        let anonymous_somewhere = rules.iter().any(Rule::anonymous);
        let users_somewhere = rules
            .iter()
            .any(|r| matches!(&r.readers, Readers::Users(u) if !u.is_empty()));
        Ok(Policy {
            rules,
            set,
            anonymous_somewhere,
            users_somewhere,
        })
    }

    /// The rule that decides a read of `repo` through `upstream`: the most specific match.
    pub fn rule_for(&self, upstream: &str, repo: &str) -> Option<&Rule> {
        let target = format!("{upstream}/{repo}");
        // `matches` lists every match; the rules are sorted, so the lowest index decides.
        self.set
            .matches(target.as_str())
            .into_iter()
            .min()
            .map(|i| &self.rules[i])
    }

    /// Whether some rule lets anyone read (then `GET /v2/` does not demand credentials).
    pub fn anonymous_somewhere(&self) -> bool {
        self.anonymous_somewhere
    }

    /// Whether there are rules and every one lets anyone read.
    pub fn anonymous_everywhere(&self) -> bool {
        !self.rules.is_empty() && self.rules.iter().all(Rule::anonymous)
    }

    /// Whether some rule lists `user` by name (`anonymous = true` lists nobody).
    pub fn names(&self, user: &str) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(&r.readers, Readers::Users(u) if u.iter().any(|x| x == user)))
    }

    /// Whether some rule lets a listed user read (then credentials may open more).
    pub fn users_somewhere(&self) -> bool {
        self.users_somewhere
    }

    /// The rules, most specific first.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.rules).finish()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(in crate::auth) fn rule(pattern: &str, readers: Readers) -> Rule {
        Rule {
            pattern: Pattern::parse(pattern).unwrap(),
            readers,
        }
    }

    pub(in crate::auth) fn users(names: &[&str]) -> Readers {
        Readers::Users(names.iter().map(|s| s.to_string()).collect())
    }

    fn policy(rules: Vec<Rule>) -> Policy {
        Policy::new(rules).unwrap()
    }

    /// The pattern of the rule deciding `upstream/repo`.
    fn decider<'a>(p: &'a Policy, upstream: &str, repo: &str) -> Option<&'a str> {
        p.rule_for(upstream, repo).map(|r| r.pattern.as_str())
    }

    #[test]
    fn single_star_stays_in_one_component_double_star_crosses() {
        let p = policy(vec![
            rule("ghcr.io/acme/*", Readers::Anyone),
            rule("quay.io/team/**", Readers::Anyone),
        ]);
        assert_eq!(decider(&p, "ghcr.io", "acme/app"), Some("ghcr.io/acme/*"));
        assert_eq!(decider(&p, "ghcr.io", "acme/app/sub"), None);
        assert_eq!(decider(&p, "quay.io", "team/app"), Some("quay.io/team/**"));
        assert_eq!(
            decider(&p, "quay.io", "team/app/sub/deeper"),
            Some("quay.io/team/**")
        );
        // `**` needs a component to match: the bare prefix is not under it.
        assert_eq!(decider(&p, "quay.io", "team"), None);
        assert_eq!(decider(&p, "quay.io", "teams/app"), None);
    }

    #[test]
    fn the_upstream_part_is_matched_too() {
        let p = policy(vec![rule("docker.io/library/**", Readers::Anyone)]);
        assert!(p.rule_for("docker.io", "library/alpine").is_some());
        assert!(p.rule_for("ghcr.io", "library/alpine").is_none());
        // An upstream name with a port.
        let p = policy(vec![rule("127.0.0.1:5000/team/*", Readers::Anyone)]);
        assert!(p.rule_for("127.0.0.1:5000", "team/app").is_some());
        let p = policy(vec![rule("*/library/*", Readers::Anyone)]);
        assert!(p.rule_for("anything.example:443", "library/x").is_some());
    }

    #[test]
    fn no_rule_matches_nothing() {
        let p = policy(vec![rule("docker.io/library/**", Readers::Anyone)]);
        assert!(p.rule_for("docker.io", "someone/app").is_none());
        let empty = policy(vec![]);
        assert!(empty.rule_for("docker.io", "library/alpine").is_none());
        assert!(!empty.anonymous_somewhere());
    }

    #[test]
    fn most_specific_wins_whatever_the_file_order() {
        let rules = || {
            vec![
                rule("*/**", Readers::Anyone),
                rule("ghcr.io/**", users(&["ops"])),
                rule("ghcr.io/acme/**", users(&["ci", "alice"])),
                rule("ghcr.io/acme/*", users(&["ci"])),
                rule("ghcr.io/acme/secret/**", users(&["alice"])),
                rule("ghcr.io/acme/secret/vault", users(&[])),
            ]
        };
        for reversed in [false, true] {
            let mut r = rules();
            if reversed {
                r.reverse();
            }
            let p = policy(r);
            let d = |repo| decider(&p, "ghcr.io", repo);
            assert_eq!(d("acme/secret/vault"), Some("ghcr.io/acme/secret/vault"));
            assert_eq!(d("acme/secret/keys"), Some("ghcr.io/acme/secret/**"));
            // `secret/**` needs a component after `secret`: the one-component rule decides.
            assert_eq!(d("acme/secret"), Some("ghcr.io/acme/*"));
            // Same prefix and wildcard count: the one without `**` wins.
            assert_eq!(d("acme/app"), Some("ghcr.io/acme/*"));
            assert_eq!(d("acme/app/sub"), Some("ghcr.io/acme/**"));
            assert_eq!(d("other/app"), Some("ghcr.io/**"));
            assert_eq!(decider(&p, "quay.io", "x/y"), Some("*/**"));
        }
    }

    #[test]
    fn a_more_specific_rule_can_refuse_what_a_broader_one_allows() {
        let p = policy(vec![
            rule("docker.io/**", Readers::Anyone),
            rule("docker.io/internal/**", users(&["alice"])),
        ]);
        let r = p.rule_for("docker.io", "internal/app").unwrap();
        assert!(!r.anonymous());
        assert!(r.admits("alice") && !r.admits("bob"));
        assert!(p
            .rule_for("docker.io", "library/alpine")
            .unwrap()
            .anonymous());
    }

    #[test]
    fn fewer_wildcards_then_more_literals_then_file_order() {
        // Same literal prefix "ghcr.io/a": one wildcard beats two.
        let p = policy(vec![
            rule("ghcr.io/a*/*", Readers::Anyone),
            rule("ghcr.io/a*/x", users(&["u"])),
        ]);
        assert_eq!(decider(&p, "ghcr.io", "ab/x"), Some("ghcr.io/a*/x"));
        // Same prefix, one wildcard each: more literal characters win.
        let p = policy(vec![
            rule("ghcr.io/a*", Readers::Anyone),
            rule("ghcr.io/a*z", users(&["u"])),
        ]);
        assert_eq!(decider(&p, "ghcr.io", "abz"), Some("ghcr.io/a*z"));
        // A longer literal prefix beats an earlier rule.
        let p = policy(vec![
            rule("ghcr.io/a?c", Readers::Anyone),
            rule("ghcr.io/ab?", users(&["u"])),
        ]);
        assert_eq!(decider(&p, "ghcr.io", "abc"), Some("ghcr.io/ab?"));
        // Equal in every way: the first in the file.
        let ranked = |t: &str| Pattern::parse(t).unwrap().rank;
        assert_eq!(ranked("ghcr.io/a*b?"), ranked("ghcr.io/a?b*"));
        for (first, second) in [
            ("ghcr.io/a*b?", "ghcr.io/a?b*"),
            ("ghcr.io/a?b*", "ghcr.io/a*b?"),
        ] {
            let p = policy(vec![
                rule(first, Readers::Anyone),
                rule(second, users(&["u"])),
            ]);
            assert_eq!(decider(&p, "ghcr.io", "axby"), Some(first));
        }
        let p = policy(vec![
            rule("ghcr.io/*/a", Readers::Anyone),
            rule("ghcr.io/*/b", users(&["u"])),
            rule("ghcr.io/x/*", users(&["v"])),
        ]);
        assert_eq!(decider(&p, "ghcr.io", "x/a"), Some("ghcr.io/x/*"));
    }

    #[test]
    fn anonymous_rules_and_user_lists() {
        let p = policy(vec![
            rule("docker.io/library/**", Readers::Anyone),
            rule("ghcr.io/acme/**", users(&["ci", "alice"])),
            rule("ghcr.io/acme/closed", users(&[])),
        ]);
        assert!(p.anonymous_somewhere());
        let hub = p.rule_for("docker.io", "library/alpine").unwrap();
        assert!(hub.anonymous() && hub.admits("anyone"));
        let acme = p.rule_for("ghcr.io", "acme/app").unwrap();
        assert!(!acme.anonymous() && acme.admits("ci") && !acme.admits("bob"));
        assert!(!acme.admits("Alice"), "user names are compared exactly");
        let closed = p.rule_for("ghcr.io", "acme/closed").unwrap();
        assert!(!closed.admits("alice") && !closed.anonymous());
        assert!(p.users_somewhere());
        let private = policy(vec![rule("ghcr.io/acme/**", users(&["ci"]))]);
        assert!(!private.anonymous_somewhere() && private.users_somewhere());
        let public = policy(vec![
            rule("*/**", Readers::Anyone),
            rule("ghcr.io/closed/**", users(&[])),
        ]);
        assert!(public.anonymous_somewhere() && !public.users_somewhere());
    }

    #[test]
    fn duplicate_patterns_are_refused() {
        let err = Policy::new(vec![
            rule("docker.io/**", Readers::Anyone),
            rule("ghcr.io/**", Readers::Anyone),
            rule("docker.io/**", users(&["a"])),
        ])
        .unwrap_err();
        assert_eq!(err, (0, 2));
    }

    #[test]
    fn bad_patterns_say_why() {
        let e = |t: &str| Pattern::parse(t).unwrap_err();
        assert!(e("docker.io").contains("<upstream name>/<repository pattern>"));
        assert!(e("docker.io/").contains("no empty part"));
        assert!(e("/library/*").contains("no empty part"));
        assert!(e("docker.io/a//b").contains("double"));
        assert!(e("Docker.io/a").contains("lower-case"));
        assert!(e("docker.io/{a,b}").contains("'{'"));
        assert!(e("docker.io/[ab]").contains("'['"));
        assert!(e("docker.io/a\\b").contains("'\\\\'"));
        assert!(e("**/a").contains("use * for any upstream"));
        assert!(e("docker.io/team**").contains("whole path component"));
        assert!(e("docker.io/a/**x/b").contains("whole path component"));
        assert!(Pattern::parse("docker.io/**/app").is_ok());
    }

    #[test]
    fn pattern_upstream_part() {
        let p = Pattern::parse("docker.io/library/**").unwrap();
        assert_eq!(p.upstream(), ("docker.io", true));
        let p = Pattern::parse("*.io/x").unwrap();
        assert_eq!(p.upstream(), ("*.io", false));
    }

    /// Any name, well-formed or not: matching answers, it never panics, and what it answers is
    /// a matching rule that no more specific rule would have beaten.
    fn arbitrary_policy() -> Policy {
        policy(vec![
            rule("*/**", Readers::Anyone),
            rule("docker.io/library/*", Readers::Anyone),
            rule("docker.io/**/app", users(&["a"])),
            rule("ghcr.io/acme/**", users(&["ci"])),
            rule("ghcr.io/acme/?", users(&[])),
            rule("*.io/x*y/*", users(&["b"])),
            rule("127.0.0.1:5000/**", users(&["c"])),
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn matching_never_panics_on_arbitrary_names(
            upstream in any::<String>(),
            repo in any::<String>(),
        ) {
            let p = arbitrary_policy();
            let _ = p.rule_for(&upstream, &repo);
        }

        #[test]
        fn the_decider_matches_and_is_the_most_specific_match(
            upstream in prop::sample::select(vec!["docker.io", "ghcr.io", "quay.io", "127.0.0.1:5000", "a.io"]),
            repo in "[a-z?*/.]{0,24}",
        ) {
            let p = arbitrary_policy();
            let target = format!("{upstream}/{repo}");
            let matching: Vec<&Rule> = p.rules().iter().filter(|r| r.pattern.is_match(&target)).collect();
            match p.rule_for(upstream, &repo) {
                None => prop_assert!(matching.is_empty()),
                Some(r) => {
                    prop_assert!(r.pattern.is_match(&target));
                    prop_assert!(matching.iter().all(|m| m.pattern.rank <= r.pattern.rank));
                }
            }
        }

        #[test]
        fn parsing_never_panics_on_arbitrary_patterns(text in any::<String>()) {
            let _ = Pattern::parse(&text);
        }

        #[test]
        fn parsing_never_panics_on_glob_like_patterns(text in "[a-z*?/.:]{0,20}") {
            if let Ok(p) = Pattern::parse(&text) {
                let _ = p.is_match("docker.io/library/alpine");
            }
        }
    }
}
