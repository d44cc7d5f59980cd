//! Stable error codes. One code names one cause; the status says who is at fault.

use serde::{Deserialize, Serialize};

/// A refusal or failure reason, as seen by agents (`keygate-error` header,
/// JSON body) and recorded in the audit log (`reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request could not be parsed or is not a proxy request.
    BadRequest,
    /// The path stays ambiguous after normalisation (encoded `/`, `\`, NUL…).
    PathAmbiguous,
    /// Missing, unknown or revoked agent token.
    ProxyAuthRequired,
    /// SNI or Host/`:authority` names another host than the CONNECT target.
    HostMismatch,
    /// A credential would be sent over plaintext HTTP.
    PlaintextRefused,
    /// The destination resolves to an address the egress guard refuses.
    DestinationBlocked,
    /// The destination name could not be resolved.
    DnsFailed,
    /// Policy refused the request.
    PolicyDenied,
    /// Too many requests.
    RateLimited,
    /// The upstream could not be reached (connect refused, reset…).
    UpstreamUnreachable,
    /// The upstream certificate failed verification.
    UpstreamCertificate,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The TLS handshake with the agent failed.
    ClientTls,
    /// A fault inside keygate.
    Internal,
}

impl ErrorCode {
    /// The stable string form used in headers, JSON and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::PathAmbiguous => "path_ambiguous",
            ErrorCode::ProxyAuthRequired => "proxy_auth_required",
            ErrorCode::HostMismatch => "host_mismatch",
            ErrorCode::PlaintextRefused => "plaintext_refused",
            ErrorCode::DestinationBlocked => "destination_blocked",
            ErrorCode::DnsFailed => "dns_failed",
            ErrorCode::PolicyDenied => "policy_denied",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::UpstreamUnreachable => "upstream_unreachable",
            ErrorCode::UpstreamCertificate => "upstream_certificate",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::ClientTls => "client_tls",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status an agent receives for this code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::PathAmbiguous | ErrorCode::ClientTls => 400,
            ErrorCode::ProxyAuthRequired => 407,
            ErrorCode::HostMismatch => 421,
            ErrorCode::PlaintextRefused
            | ErrorCode::DestinationBlocked
            | ErrorCode::PolicyDenied => 403,
            ErrorCode::RateLimited => 429,
            ErrorCode::DnsFailed
            | ErrorCode::UpstreamUnreachable
            | ErrorCode::UpstreamCertificate => 502,
            ErrorCode::UpstreamTimeout => 504,
            ErrorCode::Internal => 500,
        }
    }

    /// Whether the refusal is a policy decision (`denied`) rather than a
    /// failure (`error`) in the audit log.
    pub fn is_denial(self) -> bool {
        matches!(
            self,
            ErrorCode::ProxyAuthRequired
                | ErrorCode::HostMismatch
                | ErrorCode::PlaintextRefused
                | ErrorCode::DestinationBlocked
                | ErrorCode::PolicyDenied
                | ErrorCode::PathAmbiguous
                | ErrorCode::RateLimited
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_spec() {
        assert_eq!(ErrorCode::ProxyAuthRequired.status(), 407);
        assert_eq!(ErrorCode::HostMismatch.status(), 421);
        assert_eq!(ErrorCode::PlaintextRefused.status(), 403);
        assert_eq!(ErrorCode::DestinationBlocked.status(), 403);
        assert_eq!(ErrorCode::PathAmbiguous.status(), 400);
        assert_eq!(ErrorCode::UpstreamCertificate.status(), 502);
        assert_eq!(ErrorCode::UpstreamTimeout.status(), 504);
    }
}
