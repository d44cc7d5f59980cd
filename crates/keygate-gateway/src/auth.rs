//! Agent authentication from `Proxy-Authorization` (SPEC "Agent
//! authentication"): Basic with the token as password (or as user name when
//! the password is empty), or Bearer.

use std::sync::Arc;

use base64::Engine;
use http::HeaderMap;
use keygate_core::{AgentEntry, ErrorCode, Snapshot, TokenHash};
use keygate_vault::TokenHasher;

use crate::GatewayError;

/// Extracts the token from a `Proxy-Authorization` value.
pub fn token_from_header(value: &[u8]) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return (!rest.is_empty()).then(|| rest.to_string());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, pass) = decoded.split_once(':').unwrap_or((&decoded, ""));
    let token = if pass.is_empty() { user } else { pass };
    (!token.is_empty()).then(|| token.to_string())
}

/// The keyed hash of the token in `Proxy-Authorization`, if any.
pub fn token_hash(headers: &HeaderMap, hasher: &TokenHasher) -> Option<TokenHash> {
    let value = headers.get(http::header::PROXY_AUTHORIZATION)?;
    let token = token_from_header(value.as_bytes())?;
    Some(hasher.hash(&token))
}

/// Finds the agent for a token hash in the current snapshot. The lookup is a
/// hash-map probe on a keyed hash, so timing reveals nothing about the token.
pub fn authenticate(
    snapshot: &Snapshot,
    hash: Option<&TokenHash>,
) -> Result<Arc<AgentEntry>, GatewayError> {
    let Some(hash) = hash else {
        return Err(GatewayError::new(
            ErrorCode::ProxyAuthRequired,
            "proxy authentication required: send Proxy-Authorization with your keygate agent token",
        ));
    };
    match snapshot.agent(hash) {
        Some(agent) => Ok(agent.clone()),
        None => Err(GatewayError::new(
            ErrorCode::ProxyAuthRequired,
            "unknown or revoked agent token",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(s: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
        .into_bytes()
    }

    #[test]
    fn token_in_password_username_or_bearer() {
        assert_eq!(
            token_from_header(&basic("agent:kg_abc")).as_deref(),
            Some("kg_abc")
        );
        assert_eq!(
            token_from_header(&basic("kg_abc:")).as_deref(),
            Some("kg_abc")
        );
        assert_eq!(
            token_from_header(&basic("kg_abc")).as_deref(),
            Some("kg_abc")
        );
        assert_eq!(
            token_from_header(b"Bearer kg_abc").as_deref(),
            Some("kg_abc")
        );
        assert_eq!(
            token_from_header(b"bearer  kg_abc ").as_deref(),
            Some("kg_abc")
        );
    }

    #[test]
    fn malformed_values_yield_nothing() {
        assert_eq!(token_from_header(b"Basic !!!"), None);
        assert_eq!(token_from_header(b"Digest x"), None);
        assert_eq!(token_from_header(b"Bearer"), None);
        assert_eq!(token_from_header(&basic(":")), None);
        assert_eq!(token_from_header(b"\xff\xfe"), None);
    }

    #[test]
    fn unknown_token_is_refused() {
        let snap = Snapshot::default();
        let e = authenticate(&snap, Some(&[7; 32])).unwrap_err();
        assert_eq!(e.code, ErrorCode::ProxyAuthRequired);
        let e = authenticate(&snap, None).unwrap_err();
        assert_eq!(e.code, ErrorCode::ProxyAuthRequired);
    }
}
