//! The audit event the gateway emits for every request it handles.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// What keygate did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// A credential was injected and the request forwarded.
    Injected,
    /// Forwarded untouched: no credential applied.
    Passthrough,
    /// Refused by policy (auth, host mismatch, plaintext, egress guard…).
    Denied,
    /// Failed (upstream unreachable, timeout, internal fault).
    Error,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Injected => "injected",
            Decision::Passthrough => "passthrough",
            Decision::Denied => "denied",
            Decision::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Decision> {
        Some(match s {
            "injected" => Decision::Injected,
            "passthrough" => Decision::Passthrough,
            "denied" => Decision::Denied,
            "error" => Decision::Error,
            _ => return None,
        })
    }

    /// The decision recorded for a refusal with this code.
    pub fn for_code(code: ErrorCode) -> Decision {
        if code.is_denial() {
            Decision::Denied
        } else {
            Decision::Error
        }
    }
}

/// One proxied request (or refused connection). Never carries a secret value
/// or a query string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// The agent's name, when authentication succeeded.
    pub agent: Option<String>,
    /// The request method; see [`method_name`].
    pub method: Cow<'static, str>,
    /// `https` (inside a tunnel), `http` (absolute-form) or `connect` for a
    /// refused CONNECT.
    pub scheme: Cow<'static, str>,
    pub host: String,
    pub port: u16,
    /// The request path without its query string.
    pub path: String,
    /// Status returned to the agent (0 when no response could be sent).
    pub status: u16,
    pub decision: Decision,
    /// Stable code when the decision is `denied` or `error`.
    pub reason: Option<String>,
    /// Names of the secrets injected.
    pub secrets: Vec<String>,
    /// Time from request start to response headers, in microseconds (for
    /// an upgraded connection: until it closed).
    pub duration_us: u64,
    /// Bytes piped agent → upstream after an HTTP/1.1 Upgrade (WebSocket);
    /// `None` for ordinary requests.
    #[serde(default)]
    pub bytes_up: Option<u64>,
    /// Bytes piped upstream → agent after an HTTP/1.1 Upgrade; `None` for
    /// ordinary requests.
    #[serde(default)]
    pub bytes_down: Option<u64>,
}

/// A request method as an audit field: the standard methods (RFC 9110 and
/// PATCH) are static strings, so an event for them allocates nothing for
/// its method; any other token is copied.
pub fn method_name(method: &str) -> Cow<'static, str> {
    const STANDARD: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
    ];
    match STANDARD.iter().find(|m| **m == method) {
        Some(m) => Cow::Borrowed(m),
        None => Cow::Owned(method.to_owned()),
    }
}

impl AuditEvent {
    /// The event with the byte counts of an upgraded connection.
    pub fn with_bytes(mut self, up: u64, down: u64) -> AuditEvent {
        self.bytes_up = Some(up);
        self.bytes_down = Some(down);
        self
    }
}

/// Strips a query string and fragment from a request target, for audit.
pub fn path_without_query(target: &str) -> &str {
    let end = target.find(['?', '#']).unwrap_or(target.len());
    &target[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_never_kept() {
        assert_eq!(path_without_query("/v1/x?key=secret"), "/v1/x");
        assert_eq!(path_without_query("/v1/x#frag"), "/v1/x");
        assert_eq!(path_without_query("/v1/x"), "/v1/x");
    }

    #[test]
    fn decision_round_trips() {
        for d in [
            Decision::Injected,
            Decision::Passthrough,
            Decision::Denied,
            Decision::Error,
        ] {
            assert_eq!(Decision::parse(d.as_str()), Some(d));
        }
    }

    #[test]
    fn method_names_keep_the_method_and_borrow_only_standard_ones() {
        for m in [
            "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
        ] {
            let name = method_name(m);
            assert_eq!(name, m);
            assert!(matches!(name, Cow::Borrowed(_)), "{m}");
        }
        // Methods are case-sensitive tokens: `get` is not `GET`.
        for m in ["get", "PROPFIND", "X-CUSTOM", ""] {
            let name = method_name(m);
            assert_eq!(name, m);
            assert!(matches!(name, Cow::Owned(_)), "{m}");
        }
    }
}
