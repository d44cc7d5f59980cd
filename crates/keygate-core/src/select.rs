//! Choosing the credential(s) for a request: per target header, the most
//! specific matching rule wins (exact host over wildcard, longer wildcard
//! suffix over shorter, then exact path over prefix over any, longer prefix
//! over shorter).

use std::sync::Arc;

use crate::{HostPattern, PathPattern, SecretEntry};

/// One candidate rule: a host pattern, a path pattern and the header it
/// injects into (lower-case).
pub trait Rule {
    fn host(&self) -> &HostPattern;
    fn path(&self) -> &PathPattern;
    fn header(&self) -> &str;
}

impl Rule for SecretEntry {
    fn host(&self) -> &HostPattern {
        &self.host
    }
    fn path(&self) -> &PathPattern {
        &self.path
    }
    fn header(&self) -> &str {
        &self.header
    }
}

impl<T: Rule + ?Sized> Rule for Arc<T> {
    fn host(&self) -> &HostPattern {
        (**self).host()
    }
    fn path(&self) -> &PathPattern {
        (**self).path()
    }
    fn header(&self) -> &str {
        (**self).header()
    }
}

type Rank = ((u8, usize), (u8, usize));

fn rank<T: Rule + ?Sized>(r: &T) -> Rank {
    (r.host().specificity(), r.path().specificity())
}

/// For a request to (canonical `host`, `port`, normalised `path`), returns
/// for each distinct header name (case-insensitive) the single most specific
/// matching rule, ordered by host specificity, then path specificity. Should
/// two rules tie (which [`would_tie`] lets the store prevent), the first one
/// given wins. The result is ordered by lower-cased header name.
pub fn select<'a, T: Rule + ?Sized + 'a>(
    rules: impl IntoIterator<Item = &'a T>,
    host: &str,
    port: u16,
    path: &str,
) -> Vec<&'a T> {
    // Usually one or two candidates: a short list, no map, no key copies.
    let mut best: Vec<(Rank, &'a T)> = Vec::new();
    for rule in rules {
        if !rule.host().matches(host, port) || !rule.path().matches(path) {
            continue;
        }
        let r = rank(rule);
        match best
            .iter_mut()
            .find(|(_, b)| b.header().eq_ignore_ascii_case(rule.header()))
        {
            Some(slot) => {
                if r > slot.0 {
                    *slot = (r, rule);
                }
            }
            None => best.push((r, rule)),
        }
    }
    best.sort_by(|(_, a), (_, b)| {
        let lower = |s: &'a str| s.bytes().map(|c| c.to_ascii_lowercase());
        lower(a.header()).cmp(lower(b.header()))
    });
    best.into_iter().map(|(_, rule)| rule).collect()
}

/// True when any rule's host pattern matches `host` (and `port`, unless
/// `ignore_port`), whatever its path pattern. Used to decide whether a
/// credential would apply, e.g. to refuse a plaintext request.
pub fn any_host_match<'a, T: Rule + ?Sized + 'a>(
    rules: impl IntoIterator<Item = &'a T>,
    host: &str,
    port: u16,
    ignore_port: bool,
) -> bool {
    rules.into_iter().any(|rule| {
        if ignore_port {
            rule.host().matches_host(host)
        } else {
            rule.host().matches(host, port)
        }
    })
}

/// True when two rules would tie for some request: the same header
/// (case-insensitive), equal host and path specificity, and some request
/// that matches both. For these pattern kinds that amounts to equal host
/// patterns and equal path patterns.
pub fn would_tie(a: &dyn Rule, b: &dyn Rule) -> bool {
    a.header().eq_ignore_ascii_case(b.header())
        && a.host().specificity() == b.host().specificity()
        && a.path().specificity() == b.path().specificity()
        && a.host().overlaps(b.host())
        && a.path().overlaps(b.path())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SealedSecret, Template};
    use proptest::prelude::*;

    #[derive(Debug)]
    struct R {
        id: &'static str,
        host: HostPattern,
        path: PathPattern,
        header: String,
    }

    impl Rule for R {
        fn host(&self) -> &HostPattern {
            &self.host
        }
        fn path(&self) -> &PathPattern {
            &self.path
        }
        fn header(&self) -> &str {
            &self.header
        }
    }

    fn r(id: &'static str, host: &str, path: &str, header: &str) -> R {
        let host = HostPattern::parse(host).unwrap_or_else(|e| panic!("{host}: {e}"));
        let path = PathPattern::parse(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        R {
            id,
            host,
            path,
            header: header.to_string(),
        }
    }

    fn ids<T: std::ops::Deref<Target = R>>(v: &[T]) -> Vec<&'static str> {
        v.iter().map(|x| x.id).collect()
    }

    fn pick(rules: &[R], host: &str, port: u16, path: &str) -> Vec<&'static str> {
        ids(&select(rules.iter(), host, port, path))
    }

    #[test]
    fn exact_host_beats_wildcard_even_with_a_less_specific_path() {
        let rules = [
            r("wild", "*.example.com", "/v1/models", "authorization"),
            r("exact", "api.example.com", "*", "authorization"),
        ];
        assert_eq!(
            pick(&rules, "api.example.com", 443, "/v1/models"),
            ["exact"]
        );
        assert_eq!(pick(&rules, "x.example.com", 443, "/v1/models"), ["wild"]);
        assert!(pick(&rules, "x.example.com", 443, "/v2").is_empty());
    }

    #[test]
    fn longer_wildcard_suffix_wins() {
        let rules = [
            r("short", "*.example.com", "*", "authorization"),
            r("long", "*.eu.example.com", "*", "authorization"),
        ];
        assert_eq!(pick(&rules, "api.eu.example.com", 443, "/"), ["long"]);
        assert_eq!(pick(&rules, "api.us.example.com", 443, "/"), ["short"]);
        // Order of the input does not matter.
        let rev = [
            r("long", "*.eu.example.com", "*", "authorization"),
            r("short", "*.example.com", "*", "authorization"),
        ];
        assert_eq!(pick(&rev, "api.eu.example.com", 443, "/"), ["long"]);
    }

    #[test]
    fn path_specificity_breaks_host_ties() {
        let rules = [
            r("any", "api.test", "*", "authorization"),
            r("v1", "api.test", "/v1/*", "authorization"),
            r("chat", "api.test", "/v1/chat/*", "authorization"),
            r("models", "api.test", "/v1/models", "authorization"),
        ];
        assert_eq!(pick(&rules, "api.test", 443, "/other"), ["any"]);
        assert_eq!(pick(&rules, "api.test", 443, "/v1/x"), ["v1"]);
        assert_eq!(
            pick(&rules, "api.test", 443, "/v1/chat/completions"),
            ["chat"]
        );
        assert_eq!(pick(&rules, "api.test", 443, "/v1/models"), ["models"]);
        assert_eq!(pick(&rules, "api.test", 443, "/v1x"), ["any"]);
        let rev: Vec<R> = rules.into_iter().rev().collect();
        assert_eq!(
            pick(&rev, "api.test", 443, "/v1/chat/completions"),
            ["chat"]
        );
        assert_eq!(pick(&rev, "api.test", 443, "/other"), ["any"]);
    }

    #[test]
    fn one_rule_per_header_sorted_by_header() {
        let rules = [
            r("key", "api.test", "*", "x-api-key"),
            r("auth", "api.test", "*", "authorization"),
            r("auth2", "api.test", "/v1/*", "Authorization"),
            r("org", "api.test", "*", "openai-organization"),
        ];
        assert_eq!(
            pick(&rules, "api.test", 443, "/v1/x"),
            ["auth2", "org", "key"]
        );
        assert_eq!(pick(&rules, "api.test", 443, "/v2"), ["auth", "org", "key"]);
    }

    #[test]
    fn first_rule_wins_a_tie() {
        let rules = [
            r("a", "api.test", "*", "authorization"),
            r("b", "api.test", "*", "authorization"),
        ];
        assert_eq!(pick(&rules, "api.test", 443, "/"), ["a"]);
    }

    #[test]
    fn port_and_path_must_match() {
        let rules = [r("a", "api.test", "/v1/*", "authorization")];
        assert!(
            pick(&rules, "api.test", 8443, "/v1/x").is_empty(),
            "port mismatch"
        );
        assert!(pick(&rules, "api.test", 443, "//v1/x").is_empty());
        assert!(pick(&rules, "api.test", 443, "/v1x").is_empty());
        assert!(pick(&rules, "api.test", 443, "/admin").is_empty());
        assert!(pick(&rules, "example.com", 443, "/v1/x").is_empty());
        assert_eq!(pick(&rules, "api.test", 443, "/v1"), ["a"]);
        let wild = [r("w", "*.api.test", "*", "authorization")];
        assert!(pick(&wild, "api.test", 443, "/").is_empty(), "apex");
    }

    #[test]
    fn normalised_traversal_does_not_select() {
        let rules = [r("a", "api.test", "/v1/*", "authorization")];
        for raw in ["/v1/../admin", "/v1/%2e%2e/admin", "/v1/.%2e/admin"] {
            let n = crate::normalize_path(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert!(pick(&rules, "api.test", 443, &n).is_empty(), "{raw}");
        }
    }

    #[test]
    fn any_host_match_cases() {
        let rules = [
            r("a", "api.test:8443", "/v1/models", "authorization"),
            r("b", "*.example.com", "*", "authorization"),
        ];
        assert!(any_host_match(rules.iter(), "api.test", 8443, false));
        assert!(!any_host_match(rules.iter(), "api.test", 80, false));
        assert!(any_host_match(rules.iter(), "api.test", 80, true));
        assert!(any_host_match(rules.iter(), "x.example.com", 80, true));
        assert!(!any_host_match(rules.iter(), "x.example.com", 80, false));
        assert!(!any_host_match(rules.iter(), "example.com", 443, true));
        assert!(!any_host_match(rules.iter(), "other.test", 443, true));
        let none: [R; 0] = [];
        assert!(!any_host_match(none.iter(), "api.test", 443, true));
    }

    #[test]
    fn would_tie_cases() {
        let base = r("a", "api.test", "/v1/*", "authorization");
        assert!(would_tie(
            &base,
            &r("b", "API.test.", "/v1/*", "Authorization")
        ));
        assert!(!would_tie(&base, &r("b", "api.test", "/v1/*", "x-api-key")));
        assert!(!would_tie(
            &base,
            &r("b", "api.test:8443", "/v1/*", "authorization")
        ));
        assert!(!would_tie(
            &base,
            &r("b", "api.test", "/v2/*", "authorization")
        ));
        assert!(!would_tie(
            &base,
            &r("b", "api.test", "/v1/x/*", "authorization")
        ));
        assert!(!would_tie(&base, &r("b", "api.test", "*", "authorization")));
        assert!(!would_tie(
            &base,
            &r("b", "other.test", "/v1/*", "authorization")
        ));
        assert!(!would_tie(
            &base,
            &r("b", "*.api.test", "/v1/*", "authorization")
        ));

        let w = r("a", "*.example.com", "*", "authorization");
        assert!(would_tie(
            &w,
            &r("b", "*.example.com", "/*", "authorization")
        ));
        // Same suffix length, disjoint names.
        assert!(!would_tie(
            &w,
            &r("b", "*.examplf.com", "*", "authorization")
        ));
        assert!(!would_tie(
            &w,
            &r("b", "*.eu.example.com", "*", "authorization")
        ));

        let e = r("a", "api.test", "/v1/models", "authorization");
        assert!(would_tie(
            &e,
            &r("b", "api.test", "/v1/%6dodels", "authorization")
        ));
        assert!(!would_tie(
            &e,
            &r("b", "api.test", "/v1/modelz", "authorization")
        ));
    }

    fn entry(id: &str, host: &str, path: &str, header: &str) -> Arc<SecretEntry> {
        Arc::new(SecretEntry {
            id: id.to_string(),
            name: id.to_string(),
            host: HostPattern::parse(host).unwrap_or_else(|e| panic!("{e}")),
            path: PathPattern::parse(path).unwrap_or_else(|e| panic!("{e}")),
            header: header.to_string(),
            format: Template::parse("Bearer {secret}").unwrap_or_else(|e| panic!("{e}")),
            version: 1,
            sealed: SealedSecret {
                key_id: "k".into(),
                wrapped_key: Vec::new(),
                ciphertext: Vec::new(),
            },
        })
    }

    #[test]
    fn works_with_secret_entries() {
        let grants = [
            entry("s1", "api.test", "*", "authorization"),
            entry("s2", "api.test", "/v1/*", "authorization"),
            entry("s3", "*.test", "*", "x-api-key"),
        ];
        let got = select(grants.iter().map(|a| a.as_ref()), "api.test", 443, "/v1/x");
        let got: Vec<&str> = got.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(got, ["s2", "s3"]);

        // Arc<SecretEntry> is a Rule too.
        let got = select(grants.iter(), "api.test", 443, "/v2");
        let got: Vec<&str> = got.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(got, ["s1", "s3"]);

        assert!(any_host_match(grants.iter(), "x.test", 80, true));
        assert!(!any_host_match(
            grants.iter().map(|a| a.as_ref()),
            "test",
            443,
            false
        ));
        assert!(would_tie(
            grants[0].as_ref(),
            entry("s4", "api.test", "/*", "Authorization").as_ref()
        ));
        assert!(!would_tie(grants[0].as_ref(), grants[1].as_ref()));
    }

    fn host_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a.test".to_string()),
            Just("b.a.test".to_string()),
            Just("*.test".to_string()),
            Just("*.a.test".to_string()),
            Just("a.test:8443".to_string()),
        ]
    }

    fn path_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("*".to_string()),
            Just("/v1/*".to_string()),
            Just("/v1/a/*".to_string()),
            Just("/v1/a".to_string()),
            Just("/v2".to_string()),
        ]
    }

    proptest! {
        /// The selected rule matches, and no other matching rule for the same
        /// header is strictly more specific.
        #[test]
        fn select_picks_a_maximal_matching_rule(
            specs in prop::collection::vec(
                (host_strategy(), path_strategy(), prop_oneof![Just("authorization"), Just("x-key")]),
                0..8,
            ),
            req_host in prop_oneof![Just("a.test"), Just("b.a.test"), Just("c.b.a.test"), Just("test")],
            req_port in prop_oneof![Just(443u16), Just(8443u16)],
            req_path in prop_oneof![Just("/v1"), Just("/v1/a"), Just("/v1/a/b"), Just("/v2"), Just("/v1x")],
        ) {
            let rules: Vec<R> = specs.iter().map(|(h, p, hd)| r("x", h, p, hd)).collect();
            let chosen = select(rules.iter(), req_host, req_port, req_path);
            let mut headers: Vec<&str> = Vec::new();
            for c in &chosen {
                prop_assert!(c.host.matches(req_host, req_port));
                prop_assert!(c.path.matches(req_path));
                prop_assert!(!headers.contains(&c.header()));
                headers.push(c.header());
                for other in &rules {
                    if other.header == c.header
                        && other.host.matches(req_host, req_port)
                        && other.path.matches(req_path)
                    {
                        prop_assert!(rank(other) <= rank(*c));
                    }
                }
            }
            // Every header with a matching rule is represented.
            for other in &rules {
                if other.host.matches(req_host, req_port) && other.path.matches(req_path) {
                    prop_assert!(headers.contains(&other.header()));
                }
            }
        }

        /// would_tie agrees with the brute-force definition on a grid of requests.
        #[test]
        fn would_tie_matches_brute_force(
            a in (host_strategy(), path_strategy()),
            b in (host_strategy(), path_strategy()),
        ) {
            let ra = r("a", &a.0, &a.1, "authorization");
            let rb = r("b", &b.0, &b.1, "authorization");
            let mut some_request_ties = false;
            for h in ["a.test", "b.a.test", "c.b.a.test", "test", "x.test"] {
                for port in [443u16, 8443] {
                    for p in ["/", "/v1", "/v1/a", "/v1/a/b", "/v2", "/v1x"] {
                        if ra.host.matches(h, port) && ra.path.matches(p)
                            && rb.host.matches(h, port) && rb.path.matches(p)
                            && rank(&ra) == rank(&rb)
                        {
                            some_request_ties = true;
                        }
                    }
                }
            }
            prop_assert_eq!(would_tie(&ra, &rb), some_request_ties);
        }
    }
}
