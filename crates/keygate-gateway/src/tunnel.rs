//! Inside a CONNECT tunnel: TLS accept with a leaf for the CONNECT host (the
//! SNI must name that same host), then HTTP/1.1 or HTTP/2 (by ALPN) with
//! every request forwarded by [`crate::forward::forward_https`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use keygate_core::pattern::canonical_host;
use keygate_core::{ErrorCode, TokenHash};
use tokio_rustls::LazyConfigAcceptor;

use crate::forward::{self, Destination, RequestLog};
use crate::{GatewayError, Shared};

/// Runs one tunnel to completion.
pub(crate) async fn run(
    shared: Arc<Shared>,
    upgraded: Upgraded,
    dest: Destination,
    token_hash: TokenHash,
) {
    let started = Instant::now();
    let io = TokioIo::new(upgraded);
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let handshake = async {
        let start = acceptor.await.map_err(|e| {
            GatewayError::new(ErrorCode::ClientTls, format!("TLS ClientHello: {e}"))
        })?;
        if let Some(sni) = start.client_hello().server_name() {
            let same = canonical_host(sni).map(|s| s == dest.host).unwrap_or(false);
            if !same {
                return Err(GatewayError::new(
                    ErrorCode::HostMismatch,
                    format!(
                        "TLS SNI {sni:?} does not match the CONNECT host {}",
                        dest.host
                    ),
                ));
            }
        }
        let config = shared.leaves.server_config(&dest.host)?;
        start
            .into_stream(config)
            .await
            .map_err(|e| GatewayError::new(ErrorCode::ClientTls, format!("TLS handshake: {e}")))
    };
    let tls = match tokio::time::timeout(shared.config.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            tracing::debug!(host = %dest.host, error = %err, "tunnel handshake refused");
            let agent = shared
                .snapshot
                .load()
                .agent(&token_hash)
                .map(|a| a.name.clone());
            let log = RequestLog::bare("CONNECT", "https", &dest.host, dest.port, started);
            forward::record(&shared, log, agent, 0, &err).await;
            return;
        }
        Err(_) => {
            tracing::debug!(host = %dest.host, "tunnel handshake timed out");
            return;
        }
    };

    let agent_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    if !agent_h2 && shared.config.http1_fast_path && !shared.fast_h1.http2_only(&dest) {
        match crate::fast_h1::serve(&shared, &dest, token_hash, tls).await {
            crate::fast_h1::End::Closed => {}
            crate::fast_h1::End::HandOff { rest, served } => {
                serve_with_hyper(shared, Arc::new(dest), token_hash, rest, served).await
            }
        }
        return;
    }
    serve_with_hyper(shared, Arc::new(dest), token_hash, tls, false).await
}

/// Serves the tunnel's requests with hyper (HTTP/1.1 or HTTP/2, by what
/// the agent speaks; HTTP/1.1 only when `http1` because the connection
/// already carried an HTTP/1.1 exchange), each forwarded by
/// [`forward::forward_https`].
async fn serve_with_hyper<S>(
    shared: Arc<Shared>,
    dest: Arc<Destination>,
    token_hash: TokenHash,
    io: S,
    http1: bool,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc_shared = shared.clone();
    let service = service_fn(move |req| {
        let shared = svc_shared.clone();
        let dest = dest.clone();
        // Boxed: hyper moves a request's future several times (into the
        // stream task it spawns per HTTP/2 request, into the task's cell,
        // ...), and each move copies the whole state machine, kilobytes
        // of it; a box is one pointer.
        Box::pin(async move {
            let log = RequestLog::new(&req, "https", &dest.host, dest.port, Instant::now());
            Ok::<_, Infallible>(
                forward::forward_https(&shared, &dest, Some(token_hash), req, log).await,
            )
        })
    });
    let max_header = shared.config.max_header_bytes.max(8192);
    let io = TokioIo::new(io);
    if http1 {
        // The auto builder below would take an HTTP/2 preface sent later
        // on this connection as a switch to HTTP/2.
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(shared.config.header_read_timeout)
            .max_buf_size(max_header);
        let conn = builder.serve_connection(io, service).with_upgrades();
        until_done(&shared, conn, |c| c.graceful_shutdown()).await;
        return;
    }
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.config.header_read_timeout)
        .max_buf_size(max_header);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header).unwrap_or(u32::MAX))
        // RFC 8441: WebSocket over HTTP/2 (extended CONNECT).
        .enable_connect_protocol();
    let conn = builder.serve_connection_with_upgrades(io, service);
    until_done(&shared, conn, |c| c.graceful_shutdown()).await;
}

/// Drives a hyper connection to its end; once the gateway shuts down, it
/// finishes what is in flight and takes no new request.
async fn until_done<C, E>(shared: &Shared, conn: C, graceful_shutdown: impl FnOnce(Pin<&mut C>))
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let mut closing = shared.closing.subscribe();
    let result = tokio::select! {
        // The connection first: bytes the fast path already read (replayed
        // by `Rewind`) take hyper past its protocol detection before a
        // shutdown that is already under way is applied, so the request
        // they hold is answered rather than dropped unread.
        biased;
        r = conn.as_mut() => r,
        _ = async { let _ = closing.wait_for(|c| *c).await; } => {
            graceful_shutdown(conn.as_mut());
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "tunnel connection ended with an error");
    }
}
