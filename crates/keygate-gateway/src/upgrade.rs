//! WebSocket through the gateway, from an HTTP/1.1 Upgrade or an HTTP/2
//! extended CONNECT (RFC 8441): the handshake is an ordinary request
//! (authenticated, matched, credentials injected), sent as an HTTP/1.1
//! Upgrade on a fresh upstream connection of its own; when the upstream
//! answers `101 Switching Protocols`, the agent's side (its HTTP/1.1
//! connection, or its HTTP/2 stream after a `200`) and the upstream
//! connection are piped both ways until either side closes or nothing moves
//! for `upgrade_idle_timeout`. The audit record, with the bytes piped each
//! way, is written when the pipe ends.
//!
//! An HTTP/2 agent sends no `Sec-WebSocket-Key` (RFC 8441 §5), so keygate
//! makes one for the upstream handshake and checks the upstream's
//! `Sec-WebSocket-Accept` against it, as a WebSocket client would.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use keygate_core::{Decision, ErrorCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::forward::{emit, refuse, strip_hop_by_hop, Destination, RequestLog};
use crate::{Body, GatewayError, Shared};

/// How the agent asked to switch protocols.
pub(crate) enum AgentSide {
    /// HTTP/1.1 `Connection: upgrade` + `Upgrade: <protocol>`; answered
    /// with the upstream's 101.
    Http1Upgrade,
    /// HTTP/2 extended CONNECT with `:protocol` (RFC 8441); answered with
    /// 200 and the stream becomes the pipe.
    H2ExtendedConnect,
}

const SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
const SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");

/// `Sec-WebSocket-Accept` for `key` (RFC 6455 §4.2.2).
fn websocket_accept(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64.
fn websocket_key() -> Result<HeaderValue, GatewayError> {
    let mut nonce = [0u8; 16];
    aws_lc_rs::rand::fill(&mut nonce)
        .map_err(|_| GatewayError::new(ErrorCode::Internal, "no randomness for a WebSocket key"))?;
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    HeaderValue::from_str(&key)
        .map_err(|_| GatewayError::new(ErrorCode::Internal, "invalid WebSocket key"))
}

/// Forwards an upgrade handshake and, on 101, pipes the two connections.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward(
    shared: &Arc<Shared>,
    dest: &Destination,
    mut req: Request<Incoming>,
    side: AgentSide,
    protocol: HeaderValue,
    agent_upgrade: OnUpgrade,
    log: RequestLog,
    agent: Option<String>,
    injected: Vec<String>,
) -> Response<Body> {
    // Origin-form target and Host for a plain HTTP/1.1 connection.
    let authority = if dest.port == 443 {
        dest.authority_without_port()
    } else {
        dest.authority()
    };
    let origin = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    let dial: Uri = match format!("https://{}/", dest.authority()).parse() {
        Ok(u) => u,
        Err(_) => {
            let err = GatewayError::new(ErrorCode::BadRequest, "invalid upgrade target");
            return refuse(shared, log, agent, &err).await;
        }
    };
    *req.uri_mut() = match origin.parse() {
        Ok(u) => u,
        Err(_) => {
            let err = GatewayError::new(ErrorCode::BadRequest, "invalid upgrade target");
            return refuse(shared, log, agent, &err).await;
        }
    };
    let headers = req.headers_mut();
    if let Ok(host) = HeaderValue::from_str(&authority) {
        headers.insert(header::HOST, host);
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
    // The key keygate made for an HTTP/2 agent, to check the accept against.
    let mut our_key = None;
    if let AgentSide::H2ExtendedConnect = side {
        let key = match websocket_key() {
            Ok(k) => k,
            Err(err) => return refuse(shared, log, agent, &err).await,
        };
        headers.insert(SEC_WEBSOCKET_KEY, key.clone());
        our_key = Some(key);
        *req.method_mut() = Method::GET;
        *req.version_mut() = Version::HTTP_11;
    }

    let timeout = shared.config.response_timeout;
    let handshake = async {
        let stream = shared.connector.connect_http1(dial).await?;
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(stream)
            .await
            .map_err(|e| upstream_failed(dest, &e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended with an error");
            }
        });
        sender
            .send_request(req)
            .await
            .map_err(|e| upstream_failed(dest, &e))
    };
    let mut resp = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(err)) => return refuse(shared, log, agent, &err).await,
        Err(_) => {
            let err = GatewayError::new(
                ErrorCode::UpstreamTimeout,
                format!("upstream {} did not answer in time", dest.authority()),
            );
            return refuse(shared, log, agent, &err).await;
        }
    };
    let decision = if injected.is_empty() {
        Decision::Passthrough
    } else {
        Decision::Injected
    };
    let status = resp.status();
    let agent_version = match side {
        AgentSide::Http1Upgrade => Version::HTTP_11,
        AgentSide::H2ExtendedConnect => Version::HTTP_2,
    };
    if status != StatusCode::SWITCHING_PROTOCOLS {
        // The upstream declined: an ordinary response.
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.version = agent_version;
        let event = log.event(agent, status.as_u16(), decision, None, injected);
        emit(shared, event).await;
        return Response::from_parts(parts, body.map_err(crate::BodyError::from).boxed());
    }
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    let upgrade_to = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = agent_version;
    // The status the agent sees (and the audit records).
    let agent_status = match our_key {
        None => {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(u) = upgrade_to {
                parts.headers.insert(header::UPGRADE, u);
            }
            StatusCode::SWITCHING_PROTOCOLS
        }
        Some(key) => {
            let accepted = parts.headers.remove(SEC_WEBSOCKET_ACCEPT);
            let expected = websocket_accept(key.as_bytes());
            if accepted.as_ref().map(|v| v.as_bytes()) != Some(expected.as_bytes()) {
                let err = GatewayError::new(
                    ErrorCode::UpstreamUnreachable,
                    format!(
                        "upstream {} answered the WebSocket handshake without a valid Sec-WebSocket-Accept",
                        dest.authority()
                    ),
                );
                return refuse(shared, log, agent, &err).await;
            }
            parts.status = StatusCode::OK;
            StatusCode::OK
        }
    };
    let idle = shared.config.upgrade_idle_timeout;
    let shared = shared.clone();
    let host = dest.host.clone();
    tokio::spawn(async move {
        let (agent_io, upstream_io) = match tokio::join!(agent_upgrade, upstream_upgrade) {
            (Ok(a), Ok(u)) => (TokioIo::new(a), TokioIo::new(u)),
            (a, u) => {
                tracing::debug!(
                    agent_ok = a.is_ok(),
                    upstream_ok = u.is_ok(),
                    "upgrade did not complete"
                );
                let event = log
                    .event(agent, agent_status.as_u16(), decision, None, injected)
                    .with_bytes(0, 0);
                emit(&shared, event).await;
                return;
            }
        };
        let (up, down, why) = pipe(agent_io, upstream_io, idle).await;
        tracing::debug!(%host, bytes_to_upstream = up, bytes_to_agent = down, end = why, "upgraded connection closed");
        // duration_us covers the whole upgraded session.
        let event = log
            .event(agent, agent_status.as_u16(), decision, None, injected)
            .with_bytes(up, down);
        emit(&shared, event).await;
    });
    Response::from_parts(
        parts,
        http_body_util::Empty::new().map_err(|n| match n {}).boxed(),
    )
}

fn upstream_failed(dest: &Destination, e: &hyper::Error) -> GatewayError {
    GatewayError::new(
        ErrorCode::UpstreamUnreachable,
        format!("upstream {} failed: {e}", dest.authority()),
    )
}

/// Copies bytes both ways until both directions are closed, either side
/// fails, or nothing moves for `idle`. Returns bytes agent→upstream,
/// upstream→agent and why it ended.
pub(crate) async fn pipe<A, U>(agent: A, upstream: U, idle: Duration) -> (u64, u64, &'static str)
where
    A: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(agent);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let mut a_buf = vec![0u8; 16 * 1024];
    let mut u_buf = vec![0u8; 16 * 1024];
    let (mut up, mut down) = (0u64, 0u64);
    let (mut a_open, mut u_open) = (true, true);
    while a_open || u_open {
        tokio::select! {
            r = ar.read(&mut a_buf), if a_open => match r {
                Ok(0) => {
                    a_open = false;
                    let _ = uw.shutdown().await;
                }
                Ok(n) => {
                    if uw.write_all(&a_buf[..n]).await.is_err() {
                        return (up, down, "upstream write failed");
                    }
                    up += n as u64;
                }
                Err(_) => return (up, down, "agent read failed"),
            },
            r = ur.read(&mut u_buf), if u_open => match r {
                Ok(0) => {
                    u_open = false;
                    let _ = aw.shutdown().await;
                }
                Ok(n) => {
                    if aw.write_all(&u_buf[..n]).await.is_err() {
                        return (up, down, "agent write failed");
                    }
                    down += n as u64;
                }
                Err(_) => return (up, down, "upstream read failed"),
            },
            _ = tokio::time::sleep(idle) => return (up, down, "idle timeout"),
        }
    }
    (up, down, "closed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_accept_is_the_rfc_6455_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn websocket_keys_are_16_random_bytes() {
        let a = websocket_key().unwrap();
        let b = websocket_key().unwrap();
        assert_ne!(a, b);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.as_bytes())
            .unwrap();
        assert_eq!(raw.len(), 16);
    }

    #[tokio::test]
    async fn pipe_copies_both_ways_and_closes_when_both_sides_are_done() {
        let (agent, mut agent_peer) = tokio::io::duplex(1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let task = tokio::spawn(pipe(agent, upstream, Duration::from_secs(5)));
        agent_peer.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        upstream_peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        upstream_peer.write_all(b"pong!").await.unwrap();
        let mut buf = [0u8; 5];
        agent_peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong!");
        drop(agent_peer);
        drop(upstream_peer);
        let (up, down, why) = task.await.unwrap();
        assert_eq!((up, down), (4, 5));
        assert_ne!(why, "idle timeout");
    }

    #[tokio::test]
    async fn pipe_ends_when_idle() {
        let (agent, _agent_peer) = tokio::io::duplex(1024);
        let (upstream, _upstream_peer) = tokio::io::duplex(1024);
        let started = std::time::Instant::now();
        let (_, _, why) = pipe(agent, upstream, Duration::from_millis(100)).await;
        assert_eq!(why, "idle timeout");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
