//! The proxy listener: HTTP/1.1 from agents, `CONNECT host:port` tunnels and
//! absolute-form requests (`GET http://host/…`, and `https://…` as sent by
//! axios). Authentication happens here on every request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use keygate_core::pattern::parse_authority;
use keygate_core::{ErrorCode, TokenHash};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::forward::{self, Destination, RequestLog};
use crate::{auth, tunnel, Body, GatewayError, Shared};

/// Serves one agent connection until it closes or is upgraded to a tunnel.
pub(crate) async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    permit: Arc<OwnedSemaphorePermit>,
) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&agent_keepalive(&shared.config));
    let io = TokioIo::new(stream);
    let svc_shared = shared.clone();
    let service = service_fn(move |req| {
        let shared = svc_shared.clone();
        let permit = permit.clone();
        async move { Ok::<_, Infallible>(handle(shared, req, permit).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.config.header_read_timeout)
        .max_buf_size(shared.config.max_header_bytes.max(8192))
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut closing = shared.closing.subscribe();
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { let _ = closing.wait_for(|c| *c).await; } => {
            // Shutdown: answer what is in flight, then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "agent connection ended with an error");
    }
}

/// TCP keepalive for an agent's connection: after `header_read_timeout`
/// of silence the kernel probes the agent every `handshake_timeout` and,
/// after three unanswered probes, resets the connection. That finds an
/// agent whose host or network went away (a process that exits closes its
/// sockets itself) on every kind of connection, HTTP/2 tunnels included,
/// at no cost per request: hyper's HTTP/2 keep-alive pings, which did
/// this for HTTP/2 tunnels, were ~1k instructions per request.
fn agent_keepalive(config: &crate::GatewayConfig) -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(config.header_read_timeout)
        .with_interval(config.handshake_timeout)
        .with_retries(3)
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    permit: Arc<OwnedSemaphorePermit>,
) -> Response<Body> {
    let started = Instant::now();
    let token_hash = auth::token_hash(req.headers(), &shared.hasher);
    if req.method() == Method::CONNECT {
        return connect(shared, req, token_hash, started, permit).await;
    }
    match req.uri().scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            let err = GatewayError::new(
                ErrorCode::BadRequest,
                "this is the keygate proxy: send CONNECT or an absolute-form request (set HTTPS_PROXY)",
            );
            let log = RequestLog::new(&req, "http", "", 0, started);
            return forward::refuse(&shared, log, None, &err).await;
        }
    }
    let https = req.uri().scheme_str() == Some("https");
    let default_port = if https { 443 } else { 80 };
    let dest = match req
        .uri()
        .authority()
        .map(|a| parse_authority(a.as_str(), default_port))
    {
        Some(Ok((host, port))) => Destination { host, port },
        _ => {
            let err = GatewayError::new(ErrorCode::BadRequest, "invalid request target authority");
            let log = RequestLog::new(&req, "http", "", 0, started);
            return forward::refuse(&shared, log, None, &err).await;
        }
    };
    let scheme = if https { "https" } else { "http" };
    let log = RequestLog::new(&req, scheme, &dest.host, dest.port, started);
    let agent = match auth::authenticate(&shared.snapshot.load(), token_hash.as_ref()) {
        Ok(a) => a,
        Err(err) => return forward::refuse(&shared, log, None, &err).await,
    };
    if https {
        forward::forward_https(&shared, &dest, token_hash, req, log).await
    } else {
        forward::forward_plain(&shared, &dest, agent, req, log).await
    }
}

async fn connect(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    token_hash: Option<TokenHash>,
    started: Instant,
    permit: Arc<OwnedSemaphorePermit>,
) -> Response<Body> {
    let parsed = req
        .uri()
        .authority()
        .map(|a| parse_authority(a.as_str(), 443));
    let dest = match parsed {
        Some(Ok((host, port))) => Destination { host, port },
        _ => {
            let err =
                GatewayError::new(ErrorCode::BadRequest, "CONNECT needs a host:port authority");
            let log = RequestLog::new(&req, "connect", "", 0, started);
            return forward::refuse(&shared, log, None, &err).await;
        }
    };
    let log = RequestLog::new(&req, "connect", &dest.host, dest.port, started);
    let agent = match auth::authenticate(&shared.snapshot.load(), token_hash.as_ref()) {
        Ok(a) => a,
        Err(err) => return forward::refuse(&shared, log, None, &err).await,
    };
    // Refuse early when the destination can never be dialled; the connector
    // checks again (and dials only checked addresses) for every connection.
    if let Err(err) = shared.guard.resolve(&dest.host, dest.port).await {
        return forward::refuse(&shared, log, Some(agent.name.clone()), &err).await;
    }
    let Some(token_hash) = token_hash else {
        // authenticate() succeeded, so there was a token.
        let err = GatewayError::new(ErrorCode::Internal, "missing token");
        return forward::refuse(&shared, log, None, &err).await;
    };
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                tunnel::run(shared, upgraded, dest, token_hash).await;
            }
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
        drop(permit);
    });
    let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *resp.status_mut() = StatusCode::OK;
    resp
}
