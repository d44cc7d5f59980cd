//! Host names and host patterns.
//!
//! Every host keygate compares is first brought to one canonical form
//! ([`canonical_host`]): lower-case, one trailing dot removed, IDNA ASCII
//! (punycode) for names, and the standard text form for IP literals (IPv6
//! without brackets). Patterns store the same form, so matching is a plain
//! string comparison.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The port a pattern or authority names when it gives none.
pub const DEFAULT_PORT: u16 = 443;

/// Longest host name accepted (DNS limit without the root dot).
const MAX_HOST_LEN: usize = 253;
/// Longest label accepted (DNS limit).
const MAX_LABEL_LEN: usize = 63;

/// Why a host, authority, path pattern or template was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternError {
    message: String,
}

impl PatternError {
    pub fn new(msg: impl Into<String>) -> Self {
        PatternError {
            message: msg.into(),
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PatternError {}

/// Canonical form of a host name for matching: lower-case, one trailing dot
/// removed, IDNA → ASCII (punycode) for names; IP literals normalised (IPv6
/// without brackets, e.g. `::1`; IPv4 dotted). Accepts an IPv6 literal with
/// or without brackets.
///
/// Rejects empty names, empty or over-long labels, whitespace, control
/// characters and URL delimiters (`/`, `@`, `:`, `%`, `*`…), IPv6 zone ids,
/// and names whose last label is numeric but which are not a plain
/// dotted-decimal IPv4 address (`127.1`, `0x7f.0.0.1`, `010.0.0.1`), since
/// resolvers disagree on what those mean.
pub fn canonical_host(host: &str) -> Result<String, PatternError> {
    if host.is_empty() {
        return Err(PatternError::new("host is empty"));
    }
    // IPv6 literal, bracketed or not.
    if let Some(inner) = host.strip_prefix('[') {
        let Some(inner) = inner.strip_suffix(']') else {
            return Err(PatternError::new("unterminated IPv6 literal"));
        };
        return canonical_ipv6(inner);
    }
    if host.contains(':') {
        return canonical_ipv6(host);
    }
    // Refuse ASCII that can never be part of a host name before IDNA gets a
    // chance to interpret it. Non-ASCII goes through IDNA and is checked on
    // the way out.
    if let Some(b) = host
        .bytes()
        .find(|b| b.is_ascii() && !is_host_byte(*b) && *b != b'.')
    {
        return Err(PatternError::new(format!(
            "host contains a forbidden character ({})",
            describe_byte(b)
        )));
    }
    let ascii = idna::domain_to_ascii_cow(host.as_bytes(), idna::AsciiDenyList::URL)
        .map_err(|_| PatternError::new("host is not a valid (internationalised) domain name"))?;
    let mut name: &str = &ascii;
    if let Some(stripped) = name.strip_suffix('.') {
        name = stripped;
    }
    if name.is_empty() {
        return Err(PatternError::new("host is empty"));
    }
    if name.len() > MAX_HOST_LEN {
        return Err(PatternError::new("host name is too long"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(PatternError::new("host has an empty label"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(PatternError::new("host has a label longer than 63 bytes"));
        }
        if !label.bytes().all(is_host_byte) {
            return Err(PatternError::new("host contains a forbidden character"));
        }
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if is_numeric_label(last) {
        // Only the strict dotted-decimal form is an IPv4 address here; the
        // standard parser refuses shorthand, hex, octal and leading zeros.
        return match name.parse::<Ipv4Addr>() {
            Ok(v4) => Ok(v4.to_string()),
            Err(_) => Err(PatternError::new(
                "host looks numeric but is not a dotted-decimal IPv4 address",
            )),
        };
    }
    Ok(name.to_ascii_lowercase())
}

fn canonical_ipv6(s: &str) -> Result<String, PatternError> {
    s.parse::<Ipv6Addr>()
        .map(|a| a.to_string())
        .map_err(|_| PatternError::new("invalid IPv6 address"))
}

/// Bytes allowed inside a label of a canonical host name.
fn is_host_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// A label that a URL parser would read as (part of) an IPv4 number:
/// decimal digits, or `0x` followed by hex digits.
fn is_numeric_label(label: &str) -> bool {
    if !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    match label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"))
    {
        Some(rest) => rest.bytes().all(|b| b.is_ascii_hexdigit()),
        None => false,
    }
}

fn describe_byte(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else {
        format!("byte 0x{b:02x}")
    }
}

/// Parses an authority `host[:port]` or `[v6][:port]` into (canonical host,
/// port). `default_port` applies when no port is given. User info, empty
/// ports, port 0 and unbracketed IPv6 literals are refused.
pub fn parse_authority(authority: &str, default_port: u16) -> Result<(String, u16), PatternError> {
    if authority.is_empty() {
        return Err(PatternError::new("authority is empty"));
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let Some(end) = rest.find(']') else {
            return Err(PatternError::new("unterminated IPv6 literal"));
        };
        let inner = &rest[..end];
        let after = &rest[end + 1..];
        let port = if after.is_empty() {
            default_port
        } else if let Some(p) = after.strip_prefix(':') {
            parse_port(p)?
        } else {
            return Err(PatternError::new("unexpected text after IPv6 literal"));
        };
        (canonical_ipv6(inner)?, port)
    } else {
        match authority.split_once(':') {
            None => (canonical_host(authority)?, default_port),
            Some((h, p)) => {
                if p.contains(':') {
                    return Err(PatternError::new(
                        "IPv6 literal in an authority must be in brackets",
                    ));
                }
                (canonical_host(h)?, parse_port(p)?)
            }
        }
    };
    if port == 0 {
        return Err(PatternError::new("port 0 is not allowed"));
    }
    Ok((host, port))
}

/// Whether `authority` is spelled exactly as a destination is written:
/// the canonical `host` (as [`parse_authority`] returns it; an IPv6 address
/// in brackets) followed by `:port`, or alone when `port` is
/// `default_port`. Such an authority names that destination (a canonical
/// host is its own canonical form), so a caller may skip the full parse;
/// `false` decides nothing, another spelling may still name it.
pub fn is_canonical_authority(authority: &[u8], host: &str, port: u16, default_port: u16) -> bool {
    let rest = if host.contains(':') {
        authority
            .strip_prefix(b"[")
            .and_then(|r| r.strip_prefix(host.as_bytes()))
            .and_then(|r| r.strip_prefix(b"]"))
    } else {
        authority.strip_prefix(host.as_bytes())
    };
    let Some(rest) = rest else {
        return false;
    };
    if rest.is_empty() {
        return port == default_port;
    }
    rest.strip_prefix(b":")
        .and_then(|digits| std::str::from_utf8(digits).ok())
        .and_then(|digits| parse_port(digits).ok())
        == Some(port)
}

fn parse_port(p: &str) -> Result<u16, PatternError> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PatternError::new("port must be a number from 1 to 65535"));
    }
    // Port 0 is refused by the caller, together with a default port of 0.
    p.parse::<u16>()
        .map_err(|_| PatternError::new("port must be a number from 1 to 65535"))
}

/// A compiled host pattern: an exact host or a leading wildcard
/// (`*.example.com`), plus a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// Canonical host; for a wildcard, the suffix after `*.`.
    host: String,
    wildcard: bool,
    port: u16,
}

impl HostPattern {
    /// Parses `api.openai.com`, `API.OpenAI.com.`, `*.example.com`,
    /// `api.test:8443`, `*.example.com:8443`, `127.0.0.1`, `127.0.0.1:8443`,
    /// `[::1]:8443`. The port defaults to 443.
    ///
    /// Refuses `*` alone, `**.x`, `a.*.b`, `*x.com`, empty text, ports 0 or
    /// above 65535, and wildcards over IP literals.
    pub fn parse(s: &str) -> Result<HostPattern, PatternError> {
        if s.is_empty() {
            return Err(PatternError::new("host pattern is empty"));
        }
        let (wildcard, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        if rest.contains('*') {
            return Err(PatternError::new(
                "'*' is allowed only as a leading \"*.\" label",
            ));
        }
        let (host, port) = parse_authority(rest, DEFAULT_PORT)
            .map_err(|e| PatternError::new(format!("invalid host pattern: {}", e.message())))?;
        if wildcard && host.parse::<IpAddr>().is_ok() {
            return Err(PatternError::new(
                "a wildcard cannot apply to an IP address",
            ));
        }
        Ok(HostPattern {
            host,
            wildcard,
            port,
        })
    }

    /// Whether a request to (`host`, `port`) matches. `host` must already be
    /// canonical (see [`canonical_host`] and [`parse_authority`]). The port
    /// must be equal; `*.example.com` matches `a.example.com` and
    /// `a.b.example.com` but not `example.com`.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        port == self.port && self.matches_host(host)
    }

    /// Like [`HostPattern::matches`], ignoring the port.
    pub fn matches_host(&self, host: &str) -> bool {
        // Cheap tolerance for a caller that skipped canonicalisation of case
        // or the trailing dot; both name the same DNS host.
        let host = host.strip_suffix('.').unwrap_or(host);
        if !self.wildcard {
            return host.eq_ignore_ascii_case(&self.host);
        }
        let suffix = self.host.as_bytes();
        let h = host.as_bytes();
        // At least one character and a dot before the suffix.
        if h.len() < suffix.len() + 2 {
            return false;
        }
        let split = h.len() - suffix.len();
        h[split - 1] == b'.' && h[split..].eq_ignore_ascii_case(suffix)
    }

    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The canonical host, or for a wildcard the suffix after `*.`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Larger = more specific: an exact host (1) beats any wildcard (0);
    /// among wildcards the longer suffix wins.
    pub fn specificity(&self) -> (u8, usize) {
        (u8::from(!self.wildcard), self.host.len())
    }

    /// Whether some (host, port) matches both patterns.
    pub(crate) fn overlaps(&self, other: &HostPattern) -> bool {
        if self.port != other.port {
            return false;
        }
        match (self.wildcard, other.wildcard) {
            (false, false) => self.host == other.host,
            (true, false) => self.matches_host(&other.host),
            (false, true) => other.matches_host(&self.host),
            // Two suffixes overlap when one is the other or lies under it.
            (true, true) => {
                self.host == other.host
                    || self.matches_host(&other.host)
                    || other.matches_host(&self.host)
            }
        }
    }
}

impl fmt::Display for HostPattern {
    /// Canonical text; the port is omitted when it is 443.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if self.port != DEFAULT_PORT {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hp(s: &str) -> HostPattern {
        match HostPattern::parse(s) {
            Ok(p) => p,
            Err(e) => panic!("pattern {s:?} should parse: {e}"),
        }
    }

    fn canon(s: &str) -> String {
        match canonical_host(s) {
            Ok(h) => h,
            Err(e) => panic!("host {s:?} should be accepted: {e}"),
        }
    }

    #[test]
    fn canonical_host_lowercases_and_strips_one_trailing_dot() {
        assert_eq!(canon("API.OpenAI.com"), "api.openai.com");
        assert_eq!(canon("api.openai.com."), "api.openai.com");
        assert_eq!(canon("API.OpenAI.com."), "api.openai.com");
        assert!(canonical_host("api.openai.com..").is_err());
        assert!(canonical_host(".").is_err());
    }

    #[test]
    fn canonical_host_applies_idna() {
        assert_eq!(canon("BÜCHER.example"), "xn--bcher-kva.example");
        assert_eq!(canon("bücher.example."), "xn--bcher-kva.example");
        assert_eq!(canon("xn--bcher-kva.example"), "xn--bcher-kva.example");
        assert_eq!(canon("XN--BCHER-KVA.example"), "xn--bcher-kva.example");
        // Full-width dot is a label separator under UTS 46.
        assert_eq!(canon("bücher\u{3002}example"), "xn--bcher-kva.example");
        // Invalid punycode.
        assert!(canonical_host("xn--a.example").is_err());
    }

    #[test]
    fn canonical_host_refuses_junk() {
        for bad in [
            "",
            " ",
            "api.test ",
            " api.test",
            "api .test",
            "api\t.test",
            "api.test/x",
            "user@api.test",
            "api.test#",
            "api.test?",
            "api%2etest",
            "api\\test",
            "*.api.test",
            "a..b",
            ".a",
            "api\u{0}.test",
            "[::1",
            "fe80::1%eth0",
            "[fe80::1%25eth0]",
            "exa\u{ff0f}mple.com", // full-width solidus maps to '/'
        ] {
            assert!(canonical_host(bad).is_err(), "{bad:?} must be refused");
        }
        let long_label = "a".repeat(64);
        assert!(canonical_host(&format!("{long_label}.test")).is_err());
        assert!(canonical_host(&format!("{}.test", "a".repeat(63))).is_ok());
        let long_name = ["abcdefghi"; 26].join(".");
        assert!(long_name.len() > 253);
        assert!(canonical_host(&long_name).is_err());
    }

    #[test]
    fn canonical_host_normalises_ip_literals() {
        assert_eq!(canon("127.0.0.1"), "127.0.0.1");
        assert_eq!(canon("127.0.0.1."), "127.0.0.1");
        assert_eq!(canon("::1"), "::1");
        assert_eq!(canon("[::1]"), "::1");
        assert_eq!(canon("[0:0:0:0:0:0:0:1]"), "::1");
        assert_eq!(canon("2001:DB8::0001"), "2001:db8::1");
    }

    #[test]
    fn canonical_host_refuses_ambiguous_numeric_hosts() {
        for bad in [
            "127.1",
            "0x7f.0.0.1",
            "0x7f000001",
            "2130706433",
            "127.000.0.1",
            "010.0.0.1",
            "1.2.3.4.5",
            "256.0.0.1",
            "example.123",
            "example.0x",
        ] {
            assert!(canonical_host(bad).is_err(), "{bad:?} must be refused");
        }
        // A numeric label elsewhere is fine.
        assert_eq!(canon("123.example.com"), "123.example.com");
        assert_eq!(canon("0x1.example"), "0x1.example");
    }

    #[test]
    fn parse_authority_cases() {
        assert_eq!(
            parse_authority("API.test", 443),
            Ok(("api.test".to_string(), 443))
        );
        assert_eq!(
            parse_authority("api.test", 80),
            Ok(("api.test".to_string(), 80))
        );
        assert_eq!(
            parse_authority("api.test:8443", 443),
            Ok(("api.test".to_string(), 8443))
        );
        assert_eq!(
            parse_authority("api.test.:8443", 443),
            Ok(("api.test".to_string(), 8443))
        );
        assert_eq!(
            parse_authority("[::1]:8443", 443),
            Ok(("::1".to_string(), 8443))
        );
        assert_eq!(parse_authority("[::1]", 443), Ok(("::1".to_string(), 443)));
        assert_eq!(
            parse_authority("127.0.0.1:65535", 443),
            Ok(("127.0.0.1".to_string(), 65535))
        );
        for bad in [
            "",
            ":443",
            "api.test:",
            "api.test:0",
            "api.test:65536",
            "api.test:99999999",
            "api.test:+443",
            "api.test:44 3",
            "api.test:443:1",
            "::1",
            "::1:443",
            "[::1]443",
            "[::1]:",
            "[::1",
            "[]:443",
            "user@api.test:443",
            "user:pw@api.test",
            "api.test:443/",
        ] {
            assert!(
                parse_authority(bad, 443).is_err(),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn parse_authority_messages_and_default_port_zero() {
        for v6 in ["::1", "::1:443", "2001:db8::1"] {
            let e = parse_authority(v6, 443)
                .err()
                .map(|e| e.message().to_string());
            assert!(
                e.as_deref().is_some_and(|m| m.contains("brackets")),
                "{v6:?}: {e:?}"
            );
        }
        assert!(parse_authority("api.test", 0).is_err());
        assert_eq!(
            parse_authority("api.test:1", 0),
            Ok(("api.test".to_string(), 1))
        );
    }

    #[test]
    fn pattern_parse_and_display() {
        assert_eq!(hp("api.openai.com").to_string(), "api.openai.com");
        assert_eq!(hp("API.OpenAI.com.").to_string(), "api.openai.com");
        assert_eq!(hp("*.example.com").to_string(), "*.example.com");
        assert_eq!(hp("*.Example.COM.").to_string(), "*.example.com");
        assert_eq!(hp("api.test:8443").to_string(), "api.test:8443");
        assert_eq!(hp("api.test:443").to_string(), "api.test");
        assert_eq!(hp("*.example.com:8443").to_string(), "*.example.com:8443");
        assert_eq!(hp("127.0.0.1").to_string(), "127.0.0.1");
        assert_eq!(hp("127.0.0.1:8443").to_string(), "127.0.0.1:8443");
        assert_eq!(hp("[::1]:8443").to_string(), "[::1]:8443");
        assert_eq!(hp("[::1]").to_string(), "[::1]");
        assert_eq!(
            hp("*.BÜCHER.example").to_string(),
            "*.xn--bcher-kva.example"
        );
        assert_eq!(hp("*.com").to_string(), "*.com");

        assert_eq!(hp("api.test").port(), 443);
        assert_eq!(hp("api.test:8443").port(), 8443);
        assert!(hp("*.example.com").is_wildcard());
        assert!(!hp("example.com").is_wildcard());
        assert_eq!(hp("*.example.com").host(), "example.com");
    }

    #[test]
    fn pattern_parse_refusals() {
        for bad in [
            "",
            "*",
            "*.",
            "**.x",
            "*.*.x",
            "a.*.b",
            "*x.com",
            "x*.com",
            "api.*",
            "*.example.com*",
            ".example.com",
            "api.test:0",
            "api.test:65536",
            "api.test:",
            "*.127.0.0.1",
            "*.[::1]",
            "*.[::1]:8443",
            "*.1.2.3.4",
            "api test",
            "https://api.test",
            "api.test/v1",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn exact_pattern_matching() {
        let p = hp("api.test");
        assert!(p.matches("api.test", 443));
        assert!(!p.matches("api.test", 8443), "port mismatch must not match");
        assert!(!p.matches("api.test", 80));
        assert!(p.matches_host("api.test"));
        assert!(!p.matches("x.api.test", 443));
        assert!(!p.matches("api.test.evil", 443));
        assert!(!p.matches("evilapi.test", 443));
        assert!(!p.matches("pi.test", 443));

        let q = hp("api.test:8443");
        assert!(q.matches("api.test", 8443));
        assert!(!q.matches("api.test", 443));
        assert!(q.matches_host("api.test"));
    }

    #[test]
    fn pattern_matches_canonical_forms_of_the_request_host() {
        let p = hp("API.Test.");
        for h in ["api.test", "API.TEST", "api.test."] {
            let c = canon(h);
            assert!(p.matches(&c, 443), "{h:?}");
        }
        let idn = hp("bücher.example");
        assert!(idn.matches(&canon("BÜCHER.example"), 443));
        assert!(idn.matches("xn--bcher-kva.example", 443));
        assert!(!idn.matches("bucher.example", 443));
    }

    #[test]
    fn wildcard_matching() {
        let p = hp("*.example.com");
        assert!(p.matches("a.example.com", 443));
        assert!(p.matches("a.b.example.com", 443));
        assert!(
            !p.matches("example.com", 443),
            "wildcard must not match apex"
        );
        assert!(!p.matches_host("example.com"));
        assert!(!p.matches(".example.com", 443));
        assert!(!p.matches("aexample.com", 443));
        assert!(
            !p.matches("evilexample.com", 443),
            "suffix must start at a label"
        );
        assert!(!p.matches("a.evilexample.com", 443));
        assert!(!p.matches("a.example.com.evil", 443));
        assert!(!p.matches("a.example.org", 443));
        assert!(!p.matches("a.example.com", 8443));
        assert!(p.matches_host("a.example.com"));
        assert!(!p.matches("com", 443));

        let q = hp("*.example.com:8443");
        assert!(q.matches("a.example.com", 8443));
        assert!(!q.matches("a.example.com", 443));
    }

    #[test]
    fn ip_pattern_matching() {
        let v4 = hp("127.0.0.1:8443");
        assert!(v4.matches(&canon("127.0.0.1"), 8443));
        assert!(!v4.matches("127.0.0.2", 8443));
        assert!(!v4.matches("127.0.0.1", 443));
        let v6 = hp("[::1]:8443");
        let (h, port) = match parse_authority("[0::1]:8443", 443) {
            Ok(x) => x,
            Err(e) => panic!("{e}"),
        };
        assert!(v6.matches(&h, port));
        assert!(!v6.matches("::2", 8443));
    }

    #[test]
    fn specificity_orders_exact_over_wildcard_and_long_over_short() {
        let exact = hp("a.b.example.com").specificity();
        let long_wc = hp("*.b.example.com").specificity();
        let short_wc = hp("*.example.com").specificity();
        let short_exact = hp("x.io").specificity();
        assert!(exact > long_wc);
        assert!(long_wc > short_wc);
        assert!(short_exact > long_wc, "any exact beats any wildcard");
        assert_eq!(
            hp("*.example.com").specificity(),
            hp("*.example.com:8443").specificity()
        );
    }

    #[test]
    fn overlaps_cases() {
        assert!(hp("api.test").overlaps(&hp("API.test.")));
        assert!(!hp("api.test").overlaps(&hp("api.test:8443")));
        assert!(!hp("api.test").overlaps(&hp("api2.test")));
        assert!(hp("*.example.com").overlaps(&hp("a.example.com")));
        assert!(hp("a.example.com").overlaps(&hp("*.example.com")));
        assert!(!hp("example.com").overlaps(&hp("*.example.com")));
        assert!(hp("*.example.com").overlaps(&hp("*.b.example.com")));
        assert!(hp("*.b.example.com").overlaps(&hp("*.example.com")));
        assert!(!hp("*.b.example.com").overlaps(&hp("*.c.example.com")));
        assert!(!hp("*.example.com").overlaps(&hp("*.xample.com")));
    }

    #[test]
    fn pattern_error_accessors() {
        let e = PatternError::new("boom");
        assert_eq!(e.message(), "boom");
        assert_eq!(e.to_string(), "boom");
    }

    proptest! {
        #[test]
        fn host_functions_never_panic(s in "\\PC{0,40}") {
            let _ = canonical_host(&s);
            let _ = parse_authority(&s, 443);
            let _ = HostPattern::parse(&s);
        }

        #[test]
        fn host_functions_never_panic_on_ascii(s in "[ -~]{0,40}") {
            let _ = canonical_host(&s);
            let _ = parse_authority(&s, 443);
            let _ = HostPattern::parse(&s);
        }

        /// The fast path only ever says yes to what the full parse says
        /// names the same destination; spellings built around the
        /// canonical one (suffixes, case, brackets, ports with zeros,
        /// trailing dots) and random text alike.
        #[test]
        fn a_canonical_authority_names_the_destination_it_spells(
            dest in prop::sample::select(vec![
                "api.example.com:443", "api.example.com:8443", "127.0.0.1:443",
                "[::1]:443", "[2001:db8::1]:10255", "xn--bcher-kva.example:443", "a:1",
            ]),
            variant in 0usize..10,
            extra in "[ -~]{0,6}",
            port in 0u32..70_000,
        ) {
            let (host, p) = parse_authority(dest, 443).unwrap();
            let written = if host.contains(':') { format!("[{host}]") } else { host.clone() };
            let candidate = match variant {
                0 => format!("{written}:{p}"),
                1 => written.clone(),
                2 => format!("{written}{extra}"),
                3 => format!("{written}:{extra}"),
                4 => format!("{written}:0{p}"),
                5 => format!("{written}:{port}"),
                6 => format!("{}:{p}", written.to_uppercase()),
                7 => format!("{written}.:{p}"),
                8 => format!("{written}:{}", u32::from(p) + 65_536),
                _ => format!("{extra}{written}:{p}"),
            };
            if is_canonical_authority(candidate.as_bytes(), &host, p, 443) {
                prop_assert_eq!(parse_authority(&candidate, 443), Ok((host.clone(), p)), "{}", candidate);
            }
            if variant == 0 || (variant == 1 && p == 443) {
                prop_assert!(is_canonical_authority(candidate.as_bytes(), &host, p, 443), "{}", candidate);
            }
        }

        #[test]
        fn canonical_host_is_idempotent(s in "[a-zA-Z0-9.\\-_]{1,30}") {
            if let Ok(c) = canonical_host(&s) {
                prop_assert_eq!(canonical_host(&c), Ok(c.clone()));
            }
        }

        #[test]
        fn pattern_display_round_trips(
            wc in any::<bool>(),
            labels in prop::collection::vec("[a-z][a-z0-9]{0,6}", 1..4),
            port in 1u16..,
        ) {
            let text = format!(
                "{}{}:{}",
                if wc { "*." } else { "" },
                labels.join("."),
                port
            );
            let p = HostPattern::parse(&text);
            prop_assert!(p.is_ok(), "{}", text);
            if let Ok(p) = p {
                prop_assert_eq!(HostPattern::parse(&p.to_string()), Ok(p.clone()));
            }
        }

        #[test]
        fn wildcard_never_matches_its_apex_and_always_a_child(
            labels in prop::collection::vec("[a-z][a-z0-9]{0,6}", 1..4),
            child in "[a-z0-9]{1,8}",
        ) {
            let apex = labels.join(".");
            if let Ok(p) = HostPattern::parse(&format!("*.{apex}")) {
                prop_assert!(!p.matches(&apex, 443));
                let child_host = format!("{child}.{apex}");
                prop_assert!(p.matches(&child_host, 443));
            }
        }
    }
}
