//! Request-path normalisation and path patterns.
//!
//! Matching runs on the normalised path and the gateway forwards exactly
//! that path, so what keygate checked is what the upstream receives.

use std::fmt;

use crate::PatternError;

/// Why a request path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path could be read more than one way (encoded `/`, `\`, NUL,
    /// double-encoded dot…); refused rather than guessed.
    #[error("ambiguous path: {0}")]
    Ambiguous(&'static str),
    /// The path is malformed.
    #[error("invalid path: {0}")]
    Invalid(&'static str),
}

/// RFC 3986 unreserved characters: decoded wherever they appear encoded.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Normalises a request path (without its query) for matching and
/// forwarding:
///
/// - it must start with `/`;
/// - percent-escapes of unreserved characters (`ALPHA DIGIT - . _ ~`) are
///   decoded, every other escape keeps its encoding with upper-case hex;
/// - it is [`PathError::Ambiguous`] if it then contains an encoded `/`, `\`
///   or NUL, a literal `\` or control character, or a multiply-encoded
///   `.`, `/`, `\` or NUL (`%252E`, `%25252F`…), or a dot-segment carrying
///   `;` parameters (`/..;/`, which some servers resolve as `/../`);
/// - it is [`PathError::Invalid`] if a `%` is not followed by two hex
///   digits, or it contains a space, a non-ASCII byte, `#` or `?`;
/// - dot-segments are resolved per RFC 3986 §5.2.4; empty segments are kept.
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    if is_already_normal(raw) {
        return Ok(raw.to_string());
    }
    normalize_path_full(raw)
}

/// The common case, decided in one pass: a path that starts with `/`, has
/// only visible ASCII other than `%`, `\`, `#`, `?` and `;`, and no `.` or
/// `..` segment. Every step of [`normalize_path_full`] leaves such a path
/// as it is (no escape to decode or refuse, no parameter, no dot-segment);
/// a property test holds the two to the same answer.
fn is_already_normal(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return false;
    }
    // Bytes since the last '/', and whether all of them were dots.
    let mut seg_len = 0usize;
    let mut seg_dots = true;
    for &b in &bytes[1..] {
        match b {
            b'/' => {
                if seg_dots && (seg_len == 1 || seg_len == 2) {
                    return false;
                }
                seg_len = 0;
                seg_dots = true;
                continue;
            }
            b'%' | b'\\' | b'#' | b'?' | b';' => return false,
            0x21..=0x7e => {}
            _ => return false,
        }
        seg_len += 1;
        seg_dots &= b == b'.';
    }
    !(seg_dots && (seg_len == 1 || seg_len == 2))
}

/// [`normalize_path`] for any input.
fn normalize_path_full(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    match bytes.first() {
        None => return Err(PathError::Invalid("path is empty")),
        Some(b'/') => {}
        Some(_) => return Err(PathError::Invalid("path must start with '/'")),
    }

    // Pass 1: validate bytes, decode unreserved escapes, upper-case the rest.
    let mut decoded: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex_val),
                    bytes.get(i + 2).copied().and_then(hex_val),
                ) else {
                    return Err(PathError::Invalid("'%' must be followed by two hex digits"));
                };
                let v = (hi << 4) | lo;
                match v {
                    b'/' => return Err(PathError::Ambiguous("encoded '/'")),
                    b'\\' => return Err(PathError::Ambiguous("encoded '\\'")),
                    0 => return Err(PathError::Ambiguous("encoded NUL")),
                    _ => {}
                }
                if is_unreserved(v) {
                    decoded.push(v);
                } else {
                    decoded.extend_from_slice(&[
                        b'%',
                        HEX_UPPER[usize::from(hi)],
                        HEX_UPPER[usize::from(lo)],
                    ]);
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Ambiguous("literal '\\'")),
            0x00..=0x1f | 0x7f => return Err(PathError::Ambiguous("control character")),
            b' ' => return Err(PathError::Invalid("space in path")),
            0x80..=0xff => return Err(PathError::Invalid("non-ASCII byte in path")),
            b'#' => return Err(PathError::Invalid("'#' in path")),
            b'?' => return Err(PathError::Invalid("'?' in path (query not removed)")),
            _ => decoded.push(b),
        }
        i += 1;
    }

    // Pass 2: refuse multiply-encoded separators. After pass 1 an encoded
    // '%' is always "%25"; look through any chain of "25" that follows it.
    let mut j = 0;
    while j + 3 <= decoded.len() {
        if decoded[j..].starts_with(b"%25") {
            let mut k = j + 3;
            while decoded.get(k..k + 2) == Some(b"25".as_slice()) {
                k += 2;
            }
            if let Some(pair) = decoded.get(k..k + 2) {
                let pair = [pair[0], pair[1].to_ascii_uppercase()];
                if matches!(&pair, b"2E" | b"2F" | b"5C" | b"00") {
                    return Err(PathError::Ambiguous(
                        "multiply-encoded '.', '/', '\\' or NUL",
                    ));
                }
            }
        }
        j += 1;
    }

    // Every byte left is visible ASCII, so this cannot fail.
    let decoded =
        String::from_utf8(decoded).map_err(|_| PathError::Invalid("non-ASCII byte in path"))?;

    // Some servers (Tomcat, Jetty…) strip `;params` before resolving dot
    // segments, so `/v1/..;/admin` would reach `/admin` there.
    if decoded.split('/').any(is_dot_segment_with_params) {
        return Err(PathError::Ambiguous("dot-segment with ';' parameters"));
    }

    Ok(remove_dot_segments(&decoded))
}

/// `..;x`, `.;`, `..%3B`: a dot-segment once path parameters are removed.
fn is_dot_segment_with_params(seg: &str) -> bool {
    let cut = [seg.find(';'), seg.find("%3B")].into_iter().flatten().min();
    match cut {
        Some(i) => matches!(&seg[..i], "." | ".."),
        None => false,
    }
}

/// RFC 3986 §5.2.4 for an absolute path (starts with '/'): "." segments
/// vanish, ".." removes the previous segment (never above the root), and a
/// trailing dot-segment leaves a trailing '/'.
fn remove_dot_segments(path: &str) -> String {
    let rest = path.strip_prefix('/').unwrap_or(path);
    let mut out: Vec<&str> = Vec::new();
    let mut segments = rest.split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match seg {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            _ => out.push(seg),
        }
    }
    let mut result = String::with_capacity(path.len());
    for seg in &out {
        result.push('/');
        result.push_str(seg);
    }
    if result.is_empty() {
        result.push('/');
    }
    result
}

/// A compiled path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// `*` or `/*`: every path.
    Any,
    /// `/v1/models`: exactly that normalised path.
    Exact(String),
    /// `/v1/*`, stored as `/v1`: the path itself and everything below it.
    Prefix(String),
}

impl PathPattern {
    /// `*` → Any; `/v1/models` → Exact; `/v1/*` → Prefix("/v1"); `/*` → Any.
    ///
    /// The pattern text is normalised with [`normalize_path`] and must not be
    /// ambiguous. `*` is allowed only alone or as the final `/*`. A prefix
    /// that normalises to something ending in `/` (`/v1//*`, `/v1/./*`) is
    /// refused rather than reinterpreted.
    pub fn parse(s: &str) -> Result<PathPattern, PatternError> {
        if s == "*" || s == "/*" {
            return Ok(PathPattern::Any);
        }
        let (body, prefix) = match s.strip_suffix("/*") {
            Some(body) => (body, true),
            None => (s, false),
        };
        if body.contains('*') {
            return Err(PatternError::new(
                "'*' is allowed only alone or as a final \"/*\"",
            ));
        }
        let norm = normalize_path(body)
            .map_err(|e| PatternError::new(format!("invalid path pattern: {e}")))?;
        if !prefix {
            return Ok(PathPattern::Exact(norm));
        }
        if norm == "/" {
            return Ok(PathPattern::Any);
        }
        if norm.ends_with('/') {
            return Err(PatternError::new(
                "a path prefix must not end in '/' once normalised",
            ));
        }
        Ok(PathPattern::Prefix(norm))
    }

    /// Whether the (already normalised) `path` matches. A prefix matches at
    /// a segment boundary only: `Prefix("/v1")` matches `/v1`, `/v1/` and
    /// `/v1/…` but not `/v1x`, `/v` or `//v1`.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Any => true,
            PathPattern::Exact(p) => path == p,
            PathPattern::Prefix(p) => match path.strip_prefix(p.as_str()) {
                Some(rest) => rest.is_empty() || rest.starts_with('/'),
                None => false,
            },
        }
    }

    /// Larger = more specific: Exact (2) > Prefix (1, longer first) > Any (0).
    pub fn specificity(&self) -> (u8, usize) {
        match self {
            PathPattern::Any => (0, 0),
            PathPattern::Prefix(p) => (1, p.len()),
            PathPattern::Exact(p) => (2, p.len()),
        }
    }

    /// Whether some path matches both patterns.
    pub(crate) fn overlaps(&self, other: &PathPattern) -> bool {
        match (self, other) {
            (PathPattern::Any, _) | (_, PathPattern::Any) => true,
            (PathPattern::Exact(a), PathPattern::Exact(b)) => a == b,
            (PathPattern::Exact(e), p @ PathPattern::Prefix(_))
            | (p @ PathPattern::Prefix(_), PathPattern::Exact(e)) => p.matches(e),
            (PathPattern::Prefix(a), PathPattern::Prefix(b)) => self.matches(b) || other.matches(a),
        }
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathPattern::Any => f.write_str("*"),
            PathPattern::Exact(p) => f.write_str(p),
            PathPattern::Prefix(p) => write!(f, "{p}/*"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(s: &str) -> String {
        match normalize_path(s) {
            Ok(p) => p,
            Err(e) => panic!("{s:?} should normalise: {e}"),
        }
    }

    fn pp(s: &str) -> PathPattern {
        match PathPattern::parse(s) {
            Ok(p) => p,
            Err(e) => panic!("{s:?} should parse: {e}"),
        }
    }

    fn is_ambiguous(s: &str) -> bool {
        matches!(normalize_path(s), Err(PathError::Ambiguous(_)))
    }

    fn is_invalid(s: &str) -> bool {
        matches!(normalize_path(s), Err(PathError::Invalid(_)))
    }

    #[test]
    fn dot_segments_are_resolved() {
        assert_eq!(norm("/v1/../admin"), "/admin");
        assert_eq!(norm("/v1/./x"), "/v1/x");
        assert_eq!(norm("/.."), "/");
        assert_eq!(norm("/."), "/");
        assert_eq!(norm("/../../a"), "/a");
        assert_eq!(norm("/a/b/.."), "/a/");
        assert_eq!(norm("/a/b/."), "/a/b/");
        assert_eq!(norm("/a/b/../c/./d"), "/a/c/d");
        assert_eq!(norm("/a//../b"), "/a/b");
        assert_eq!(norm("/a/.../b"), "/a/.../b");
        assert_eq!(norm("/a/..b/.c"), "/a/..b/.c");
        assert_eq!(norm("/"), "/");
    }

    #[test]
    fn encoded_dots_are_resolved() {
        assert_eq!(norm("/v1/%2e%2e/admin"), "/admin");
        assert_eq!(norm("/v1/%2E%2E/admin"), "/admin");
        assert_eq!(norm("/v1/.%2e/admin"), "/admin");
        assert_eq!(norm("/v1/%2e./admin"), "/admin");
        assert_eq!(norm("/v1/%2e/admin"), "/v1/admin");
        assert_eq!(norm("/v1/%2e%2E"), "/");
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_uppercased() {
        assert_eq!(norm("/%41%62%7e%5f%2D%30"), "/Ab~_-0");
        assert_eq!(norm("/a%20b"), "/a%20b");
        assert_eq!(norm("/a%3a%3Ab"), "/a%3A%3Ab");
        assert_eq!(norm("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(norm("/a%25b"), "/a%25b");
        assert_eq!(norm("/a%0a"), "/a%0A");
        // Reserved characters stay as they came.
        assert_eq!(norm("/a:b@c!$&'()*+,;="), "/a:b@c!$&'()*+,;=");
    }

    #[test]
    fn empty_segments_are_kept() {
        assert_eq!(norm("//v1/x"), "//v1/x");
        assert_eq!(norm("/v1//x"), "/v1//x");
        assert_eq!(norm("/v1/"), "/v1/");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for bad in [
            "/v1%2Fadmin",
            "/v1%2fadmin",
            "/v1/%2e%2e%2fadmin",
            "/v1%5Cadmin",
            "/v1%5cadmin",
            "/v1%00",
            "/v1/%252e%252e/admin",
            "/v1/%252E%252E/admin",
            "/v1%252Fadmin",
            "/v1%252fadmin",
            "/v1%255Cadmin",
            "/v1%255cadmin",
            "/v1%25252e",
            "/v1%2500",
            "/v1/%25%32%65", // decodes to %252e
            "/v1\\..\\admin",
            "/v1\\admin",
            "/v1\u{0}",
            "/v1\nx",
            "/v1\rx",
            "/v1\tx",
            "/v1\u{7f}",
            "/v1/..;/admin",
            "/v1/..;x=1/admin",
            "/v1/.;/admin",
            "/v1/%2e%2e;/admin",
            "/v1/..%3b/admin",
            "/v1/..%3B/admin",
            "/v1/..;",
        ] {
            assert!(
                is_ambiguous(bad),
                "{bad:?} must be ambiguous, got {:?}",
                normalize_path(bad)
            );
        }
        // Encoded '%' followed by something harmless is fine.
        assert_eq!(norm("/v1%2541"), "/v1%2541");
        assert_eq!(norm("/v1%25"), "/v1%25");
        assert_eq!(norm("/v1%252"), "/v1%252");
        // Parameters on ordinary segments are fine.
        assert_eq!(norm("/v1;a=b/x"), "/v1;a=b/x");
        assert_eq!(norm("/v1/...;/x"), "/v1/...;/x");
        assert_eq!(norm("/v1/x..;/y"), "/v1/x..;/y");
    }

    #[test]
    fn invalid_paths_are_refused() {
        for bad in [
            "", "v1", "v1/x", "*", "/v1%", "/v1%2", "/v1%zz", "/v1%g0", "/v1%%41", "/v1 x",
            "/v1/é", "/v1#x", "/v1?x",
        ] {
            assert!(
                is_invalid(bad),
                "{bad:?} must be invalid, got {:?}",
                normalize_path(bad)
            );
        }
    }

    #[test]
    fn path_error_display() {
        assert_eq!(
            PathError::Ambiguous("encoded '/'").to_string(),
            "ambiguous path: encoded '/'"
        );
        assert_eq!(
            PathError::Invalid("path is empty").to_string(),
            "invalid path: path is empty"
        );
    }

    #[test]
    fn pattern_parse() {
        assert_eq!(pp("*"), PathPattern::Any);
        assert_eq!(pp("/*"), PathPattern::Any);
        assert_eq!(pp("/v1/models"), PathPattern::Exact("/v1/models".into()));
        assert_eq!(pp("/v1/*"), PathPattern::Prefix("/v1".into()));
        assert_eq!(pp("/v1/x/../y/*"), PathPattern::Prefix("/v1/y".into()));
        assert_eq!(pp("/%7Euser/*"), PathPattern::Prefix("/~user".into()));
        assert_eq!(pp("/v1/%2e%2e/*"), PathPattern::Any);
        assert_eq!(pp("/"), PathPattern::Exact("/".into()));
        assert_eq!(pp("/v1/"), PathPattern::Exact("/v1/".into()));
        for bad in [
            "",
            "v1",
            "v1/*",
            "/v1*",
            "/v1/*/x",
            "/*/x",
            "**",
            "/v1/**",
            "/v1/x*",
            "/v1%2F/*",
            "/v1%2Fx",
            "/v1/%252e/*",
            "/v1\\x",
            "/v1//*",
            "/v1/./*",
            "/v1 x",
        ] {
            assert!(PathPattern::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn pattern_display_round_trips() {
        for s in ["*", "/v1/models", "/v1/*", "/", "/a%20b/*"] {
            let p = pp(s);
            assert_eq!(p.to_string(), s);
            assert_eq!(pp(&p.to_string()), p);
        }
        assert_eq!(pp("/*").to_string(), "*");
    }

    #[test]
    fn prefix_matches_at_segment_boundary_only() {
        let p = pp("/v1/*");
        assert!(p.matches("/v1"));
        assert!(p.matches("/v1/"));
        assert!(p.matches("/v1/anything"));
        assert!(p.matches("/v1/a/b"));
        assert!(!p.matches("/v1x"), "/v1x must not match");
        assert!(!p.matches("/v1x/y"));
        assert!(!p.matches("/v"));
        assert!(!p.matches("//v1/x"), "//v1/x must not match /v1/*");
        assert!(!p.matches("/"));
        assert!(!p.matches("/V1/x"));
        assert!(!p.matches("/admin"));
    }

    #[test]
    fn security_cases_against_prefix() {
        let p = pp("/v1/*");
        for attack in [
            "/v1/../admin",
            "/v1/%2e%2e/admin",
            "/v1/%2E%2E/admin",
            "/v1/.%2e/admin",
            "/v1/a/../../admin",
        ] {
            let n = norm(attack);
            assert_eq!(n, "/admin");
            assert!(!p.matches(&n), "{attack:?} must not match /v1/*");
        }
        assert!(p.matches(&norm("/v1/./models")));
        assert!(p.matches(&norm("/v1/x/../models")));
        assert!(!p.matches(&norm("/v1/..")));
    }

    #[test]
    fn exact_and_any_matching() {
        let e = pp("/v1/models");
        assert!(e.matches("/v1/models"));
        assert!(!e.matches("/v1/models/"));
        assert!(!e.matches("/v1/models/x"));
        assert!(!e.matches("/v1/model"));
        assert!(!e.matches("/V1/models"));
        assert!(e.matches(&norm("/v1/%6dodels")));
        assert!(pp("*").matches("/anything"));
        assert!(pp("*").matches("/"));
    }

    #[test]
    fn specificity_ordering() {
        let any = pp("*").specificity();
        let short = pp("/v1/*").specificity();
        let long = pp("/v1/chat/*").specificity();
        let exact = pp("/v1/models").specificity();
        let short_exact = pp("/").specificity();
        assert!(any < short);
        assert!(short < long);
        assert!(long < exact);
        assert!(long < short_exact, "any exact beats any prefix");
    }

    #[test]
    fn overlap_cases() {
        assert!(pp("*").overlaps(&pp("/x")));
        assert!(pp("/v1/*").overlaps(&pp("/v1/chat/*")));
        assert!(pp("/v1/chat/*").overlaps(&pp("/v1/*")));
        assert!(!pp("/v1/*").overlaps(&pp("/v1x/*")));
        assert!(pp("/v1/*").overlaps(&pp("/v1")));
        assert!(pp("/v1").overlaps(&pp("/v1/*")));
        assert!(!pp("/v1/*").overlaps(&pp("/v2")));
        assert!(!pp("/a").overlaps(&pp("/b")));
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("v1".to_string()),
            Just("v1x".to_string()),
            Just("admin".to_string()),
            Just("".to_string()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just("%2e".to_string()),
            Just("%2E%2e".to_string()),
            Just(".%2e".to_string()),
            Just("%76%31".to_string()), // "v1"
            Just("%2F".to_string()),
            Just("%252e".to_string()),
            Just("...".to_string()),
            "[a-zA-Z0-9._~%-]{0,6}",
        ]
    }

    fn segmented_path() -> impl Strategy<Value = String> {
        prop::collection::vec(segment(), 0..8).prop_map(|segs| format!("/{}", segs.join("/")))
    }

    proptest! {
        #[test]
        fn normalize_is_idempotent(p in segmented_path()) {
            if let Ok(n) = normalize_path(&p) {
                prop_assert_eq!(normalize_path(&n), Ok(n.clone()));
            }
        }

        #[test]
        fn normalize_is_idempotent_on_ascii(p in "/[ -~]{0,40}") {
            if let Ok(n) = normalize_path(&p) {
                prop_assert_eq!(normalize_path(&n), Ok(n.clone()));
            }
        }

        #[test]
        fn normalized_has_no_dot_segments(p in segmented_path()) {
            if let Ok(n) = normalize_path(&p) {
                prop_assert!(n.starts_with('/'));
                prop_assert!(!n.contains("/../"), "{}", n);
                prop_assert!(!n.contains("/./"), "{}", n);
                prop_assert!(!n.ends_with("/.."), "{}", n);
                prop_assert!(!n.ends_with("/."), "{}", n);
                prop_assert!(n.split('/').all(|s| s != "." && s != ".."), "{}", n);
            }
        }

        #[test]
        fn prefix_match_implies_segment_boundary(p in segmented_path()) {
            let pat = PathPattern::Prefix("/v1".to_string());
            if let Ok(n) = normalize_path(&p) {
                if pat.matches(&n) {
                    prop_assert!(n == "/v1" || n.starts_with("/v1/"), "{} -> {}", p, n);
                }
            }
        }

        #[test]
        fn fast_path_agrees_with_full_normalisation(
            segs in prop::collection::vec(
                prop_oneof![
                    Just(""), Just("."), Just(".."), Just("..."), Just("..;"),
                    Just(".;x"), Just("a;b"), Just("%2e"), Just("%2E%2e"),
                    Just("%252e"), Just("%41"), Just("a.b"), Just("~:@!$&'()*+,="),
                    Just("a b"), Just("a#"), Just("a?"), Just("\\"), Just("\u{7f}"),
                    Just("\u{e9}"), Just("v1"),
                ],
                0..6,
            ),
            q in "/[ -~]{0,30}",
        ) {
            let p = format!("/{}", segs.join("/"));
            for raw in [&p, &q] {
                if is_already_normal(raw) {
                    prop_assert_eq!(normalize_path_full(raw), Ok(raw.to_string()));
                }
                prop_assert_eq!(normalize_path(raw), normalize_path_full(raw));
            }
        }

        #[test]
        fn random_ascii_never_panics(p in "[\\x00-\\x7f]{0,60}") {
            let _ = normalize_path(&p);
            let _ = PathPattern::parse(&p);
        }

        #[test]
        fn random_unicode_never_panics(p in "\\PC{0,40}") {
            let _ = normalize_path(&p);
            let _ = PathPattern::parse(&p);
        }

        #[test]
        fn random_bytes_prefixed_with_slash_never_panic(p in "/[\\x00-\\x7f]{0,60}") {
            let _ = normalize_path(&p);
        }
    }
}
