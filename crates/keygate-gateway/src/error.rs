//! Gateway errors and the one function that turns them into the response an
//! agent sees: status, `keygate-error` header and JSON body (SPEC "Errors").

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keygate_core::ErrorCode;

use crate::Body;

/// Who is at fault for a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Agent,
    Upstream,
    Internal,
}

/// A refusal or failure on the request path. The message is shown to the
/// agent and logged: it must never contain a secret.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct GatewayError {
    pub code: ErrorCode,
    pub message: String,
}

impl GatewayError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> GatewayError {
        GatewayError {
            code,
            message: message.into(),
        }
    }

    pub fn fault(&self) -> Fault {
        match self.code {
            ErrorCode::UpstreamUnreachable
            | ErrorCode::UpstreamCertificate
            | ErrorCode::UpstreamTimeout
            | ErrorCode::DnsFailed => Fault::Upstream,
            ErrorCode::Internal => Fault::Internal,
            _ => Fault::Agent,
        }
    }

    /// The response an agent receives for this error.
    pub fn to_response(&self) -> Response<Body> {
        let body = serde_json::json!({
            "error": { "code": self.code.as_str(), "message": self.message }
        })
        .to_string();
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = Response::new(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        );
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            "keygate-error",
            HeaderValue::from_static(self.code.as_str()),
        );
        if self.code == ErrorCode::ProxyAuthRequired {
            h.insert(
                header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"keygate\""),
            );
        }
        if self.code == ErrorCode::RateLimited {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn response_has_header_status_and_json_body() {
        let resp = GatewayError::new(ErrorCode::PlaintextRefused, "no").to_response();
        assert_eq!(resp.status(), 403);
        assert_eq!(resp.headers()["keygate-error"], "plaintext_refused");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "plaintext_refused");
        assert_eq!(v["error"]["message"], "no");
    }

    #[test]
    fn auth_refusal_asks_for_basic_credentials() {
        let resp = GatewayError::new(ErrorCode::ProxyAuthRequired, "x").to_response();
        assert_eq!(resp.status(), 407);
        assert_eq!(
            resp.headers()[header::PROXY_AUTHENTICATE],
            "Basic realm=\"keygate\""
        );
    }
}
