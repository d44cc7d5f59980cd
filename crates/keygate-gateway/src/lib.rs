//! The keygate proxy. Agents connect with `HTTPS_PROXY`; each request goes
//! one way through these stages:
//!
//! ```text
//! accept → auth (agent from Snapshot) → destination (CONNECT authority)
//!   → egress guard (resolve, check) → TLS accept with minted leaf (SNI must
//!   equal destination) → per request: host check, normalise, select
//!   credential, inject → upstream: the destination's HTTP/2 connection, or
//!   the pooled client for HTTP/1.1 upstreams (both dial checked addresses)
//!   → stream response back → AuditEvent into a bounded channel
//! ```
//!
//! - [`proxy`]: the listener, CONNECT and absolute-form requests.
//! - [`tunnel`]: TLS interception and the per-request forwarding inside it.
//! - [`auth`], [`egress`], [`tls`], [`connector`]: one stage each.
//! - `upgrade`: HTTP/1.1 Upgrade (WebSocket): the handshake gets
//!   credentials like any request, then bytes are piped both ways with an
//!   idle timeout.
//!
//! Bodies are never buffered: request and response frames stream through
//! as they arrive (SSE, large uploads and downloads). Audit events go
//! straight to the store's writer, which gathers them in bursts. On
//! shutdown every connection finishes its in-flight requests and closes.
//!
//! The gateway never touches the database: it reads an
//! `ArcSwap<Snapshot>` and sends [`AuditEvent`]s down a channel.
#![forbid(unsafe_code)]

pub mod auth;
pub mod connector;
mod deadline;
pub mod egress;
pub mod error;
mod fast_h1;
mod forward;
mod h2_upstream;
mod phase_timer;
pub mod proxy;
pub mod tls;
pub mod tunnel;
mod upgrade;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use keygate_core::{AuditEvent, Snapshot};
use keygate_vault::{CertificateAuthority, TokenHasher, Vault};
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};

pub use connector::UpstreamConnector;
pub use egress::EgressGuard;
pub use error::{Fault, GatewayError};
pub use tls::LeafCertCache;

/// Error type of agent-side response bodies.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Response body type used on the agent side.
pub type Body = BoxBody<Bytes, BodyError>;

/// Tunables of the gateway. Defaults suit an agent on the same machine.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Extra roots trusted for upstream TLS (`--upstream-ca`).
    pub upstream_roots: Vec<CertificateDer<'static>>,
    /// TCP connect and upstream TLS handshake timeout, each.
    pub connect_timeout: Duration,
    /// Time allowed for the upstream's response headers (LLM APIs can take
    /// minutes on long completions).
    pub response_timeout: Duration,
    /// Whole exchange, from the request head to the last byte of the
    /// response body; `None`: no limit (streams may run for hours).
    pub total_timeout: Option<Duration>,
    /// TLS handshake timeout with the agent.
    pub handshake_timeout: Duration,
    /// Time allowed for an agent to send request headers.
    pub header_read_timeout: Duration,
    /// Idle pooled upstream connections are closed after this.
    pub pool_idle_timeout: Duration,
    /// Maximum concurrent agent connections.
    pub max_connections: usize,
    /// An upgraded connection (WebSocket) with no byte in either direction
    /// for this long is closed.
    pub upgrade_idle_timeout: Duration,
    /// Largest request head (HTTP/1.1 buffer, HTTP/2 header list) accepted
    /// from an agent; larger heads are refused (431) or reset.
    pub max_header_bytes: usize,
    /// Leaf certificates kept in memory.
    pub leaf_cache_size: usize,
    /// Serve plain HTTP/1.1 requests inside tunnels with keygate's own
    /// HTTP/1.1 path (fast_h1) instead of hyper's server and pooled client.
    pub http1_fast_path: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            upstream_roots: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(600),
            handshake_timeout: Duration::from_secs(10),
            total_timeout: None,
            header_read_timeout: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(90),
            max_connections: 16_384,
            upgrade_idle_timeout: Duration::from_secs(300),
            max_header_bytes: 64 * 1024,
            leaf_cache_size: 1024,
            http1_fast_path: true,
        }
    }
}

/// Everything the request path reads, shared by all connections.
pub(crate) struct Shared {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub hasher: Arc<TokenHasher>,
    pub vault: Arc<Vault>,
    pub leaves: LeafCertCache,
    pub guard: Arc<EgressGuard>,
    pub client: Client<UpstreamConnector, Incoming>,
    /// The client's connector, for upgraded (WebSocket) connections that
    /// are not pooled.
    pub connector: UpstreamConnector,
    /// Idle upstream connections of the HTTP/1.1 fast path.
    pub fast_h1: fast_h1::Pool,
    /// HTTP/2 upstream connections, one per destination.
    pub h2: h2_upstream::H2Upstreams,
    /// Flips to `true` when the gateway stops: connections finish their
    /// in-flight requests and close.
    pub closing: watch::Sender<bool>,
    pub audit: mpsc::Sender<AuditEvent>,
    pub config: GatewayConfig,
}

/// The proxy, ready to serve on a bound listener.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    pub fn new(
        snapshot: Arc<ArcSwap<Snapshot>>,
        hasher: Arc<TokenHasher>,
        vault: Arc<Vault>,
        ca: Arc<CertificateAuthority>,
        guard: EgressGuard,
        audit: mpsc::Sender<AuditEvent>,
        config: GatewayConfig,
    ) -> Result<Gateway, GatewayError> {
        let tls = tls::upstream_client_config(&config.upstream_roots)
            .map_err(|e| GatewayError::new(keygate_core::ErrorCode::Internal, e))?;
        let guard = Arc::new(guard);
        let connector =
            UpstreamConnector::new(guard.clone(), Arc::new(tls), config.connect_timeout);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(64)
            .build(connector.clone());
        let (closing, _) = watch::channel(false);
        Ok(Gateway {
            shared: Arc::new(Shared {
                snapshot,
                hasher,
                vault,
                leaves: LeafCertCache::new(ca, config.leaf_cache_size),
                guard,
                client,
                connector,
                fast_h1: fast_h1::Pool::default(),
                h2: h2_upstream::H2Upstreams::default(),
                closing,
                audit,
                config,
            }),
        })
    }

    /// Accepts agent connections until `shutdown` resolves, then asks every
    /// connection to close once its in-flight requests are answered (idle
    /// keep-alive connections close at once) and waits up to `drain` for
    /// them and for open streams and upgraded connections.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        drain: Duration,
    ) {
        let max = self.shared.config.max_connections;
        // Both upstream pools (the fast path's and the HTTP/2 one).
        tokio::spawn(fast_h1::sweep_until_closed(Arc::downgrade(&self.shared)));
        let limit = Arc::new(Semaphore::new(max));
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                _ = &mut shutdown => break,
                p = limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let shared = self.shared.clone();
            // The permit lives as long as the connection and any tunnel
            // upgraded from it, so shutdown can wait for both.
            tokio::spawn(proxy::serve_connection(
                shared,
                stream,
                peer,
                Arc::new(permit),
            ));
        }
        drop(listener);
        let _ = self.shared.closing.send(true);
        let all = u32::try_from(max).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(drain, limit.acquire_many(all)).await;
    }

    /// Number of leaf certificates currently cached.
    pub fn cached_leaves(&self) -> usize {
        self.shared.leaves.len()
    }
}
