//! The upstream connector for the pooled client: resolve through the egress
//! guard, dial only checked addresses (next one on failure), then TLS with
//! the destination's name as SNI and verification against our roots.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use keygate_core::ErrorCode;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::{EgressGuard, GatewayError};

/// Dials upstreams for the pooled hyper client.
#[derive(Clone)]
pub struct UpstreamConnector {
    guard: Arc<EgressGuard>,
    tls: TlsConnector,
    /// Same roots, ALPN `http/1.1` only: for upgrades (WebSocket), which
    /// need an HTTP/1.1 connection of their own.
    tls_http1: TlsConnector,
    connect_timeout: Duration,
    /// Connections dialled (offering h2 and HTTP/1.1) to learn what an
    /// upstream speaks, on which it chose HTTP/1.1: the pooled client's
    /// next dial to that destination takes it instead of dialling again.
    spares: Arc<Mutex<Spares>>,
}

/// Spare connections by host and port, with when each was dialled (several
/// when a burst of first requests dialled together).
type Spares = HashMap<(String, u16), Vec<(Instant, TlsStream<TcpStream>)>>;

/// Spare connections kept per destination at most.
const SPARES_PER_DESTINATION: usize = 64;

/// A spare connection older than this is not handed out (the request that
/// dialled it takes it at once; one left behind is stale).
const SPARE_MAX_AGE: Duration = Duration::from_secs(5);

impl UpstreamConnector {
    pub fn new(
        guard: Arc<EgressGuard>,
        tls: Arc<ClientConfig>,
        connect_timeout: Duration,
    ) -> UpstreamConnector {
        let mut http1 = (*tls).clone();
        http1.alpn_protocols = vec![b"http/1.1".to_vec()];
        UpstreamConnector {
            guard,
            tls: TlsConnector::from(tls),
            tls_http1: TlsConnector::from(Arc::new(http1)),
            connect_timeout,
            spares: Arc::default(),
        }
    }

    /// Keeps `tls` (to `dest`, HTTP/1.1 chosen by ALPN) for the pooled
    /// client's next dial to `dest`.
    pub(crate) fn keep_spare(&self, dest: &crate::forward::Destination, tls: TlsStream<TcpStream>) {
        let now = Instant::now();
        let stale = {
            let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
            let mut stale = Vec::new();
            // Each list is oldest first: its stale ones are a prefix.
            spares.retain(|_, list| {
                let fresh = list
                    .iter()
                    .position(|(since, _)| now.duration_since(*since) < SPARE_MAX_AGE)
                    .unwrap_or(list.len());
                stale.extend(list.drain(..fresh));
                !list.is_empty()
            });
            let list = spares.entry((dest.host.clone(), dest.port)).or_default();
            if list.len() < SPARES_PER_DESTINATION {
                list.push((now, tls));
            }
            stale
        };
        // Closed outside the lock.
        drop(stale);
    }

    fn take_spare(&self, host: &str, port: u16) -> Option<TlsStream<TcpStream>> {
        let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
        if spares.is_empty() {
            return None;
        }
        let key = (host.to_string(), port);
        let list = spares.get_mut(&key)?;
        let fresh = list
            .pop()
            .filter(|(since, _)| since.elapsed() < SPARE_MAX_AGE)
            .map(|(_, tls)| tls);
        if fresh.is_none() || list.is_empty() {
            spares.remove(&key);
        }
        fresh
    }

    /// Dials `uri` (checked by the egress guard) offering only HTTP/1.1, for
    /// a connection that will be upgraded (WebSocket).
    pub async fn connect_http1(&self, uri: Uri) -> Result<UpstreamStream, GatewayError> {
        let tls = self.tls_http1.clone();
        self.clone()
            .dial(uri, tls)
            .await
            .map_err(DialError::into_gateway)
    }

    /// Dials the destination over TLS offering only HTTP/1.1, for the
    /// HTTP/1.1 fast path; tells apart an upstream that refuses HTTP/1.1.
    pub(crate) async fn connect_http1_only(
        &self,
        dest: &crate::forward::Destination,
    ) -> Result<TlsStream<TcpStream>, DialError> {
        self.dial_tls(dest, self.tls_http1.clone()).await
    }

    /// Dials the destination over TLS offering h2 and HTTP/1.1 (what the
    /// upstream chose is the stream's ALPN protocol).
    pub(crate) async fn connect_tls(
        &self,
        dest: &crate::forward::Destination,
    ) -> Result<TlsStream<TcpStream>, GatewayError> {
        self.dial_tls(dest, self.tls.clone())
            .await
            .map_err(DialError::into_gateway)
    }

    /// Dials `dest` (an https destination) with `connector`'s ALPN offer.
    async fn dial_tls(
        &self,
        dest: &crate::forward::Destination,
        connector: TlsConnector,
    ) -> Result<TlsStream<TcpStream>, DialError> {
        let uri = Uri::try_from(dest.https_uri("/", None)).map_err(|_| {
            DialError::Failed(GatewayError::new(
                ErrorCode::BadRequest,
                "invalid destination",
            ))
        })?;
        match self.clone().dial(uri, connector).await? {
            UpstreamStream::Tls(tls) => Ok(tls.into_inner()),
            UpstreamStream::Plain(_) => Err(DialError::Failed(GatewayError::new(
                ErrorCode::Internal,
                "plain connection for an https destination",
            ))),
        }
    }

    async fn connect(self, uri: Uri) -> Result<UpstreamStream, GatewayError> {
        if uri.scheme_str() == Some("https") {
            let host = uri.host().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if let Some(tls) = self.take_spare(host, uri.port_u16().unwrap_or(443)) {
                return Ok(UpstreamStream::Tls(Box::new(TokioIo::new(tls))));
            }
        }
        let tls = self.tls.clone();
        self.dial(uri, tls).await.map_err(DialError::into_gateway)
    }

    async fn dial(self, uri: Uri, connector: TlsConnector) -> Result<UpstreamStream, DialError> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(
                    GatewayError::new(ErrorCode::BadRequest, "unsupported upstream scheme").into(),
                )
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| GatewayError::new(ErrorCode::BadRequest, "upstream URI has no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addrs = self.guard.resolve(host, port).await?;
        let mut last_err = None;
        let mut tcp = None;
        for addr in addrs {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    tcp = Some(s);
                    break;
                }
                Ok(Err(e)) => last_err = Some(format!("connect to {addr} failed: {e}")),
                Err(_) => last_err = Some(format!("connect to {addr} timed out")),
            }
        }
        let Some(tcp) = tcp else {
            return Err(GatewayError::new(
                ErrorCode::UpstreamUnreachable,
                format!(
                    "upstream {host}:{port} unreachable: {}",
                    last_err.unwrap_or_default()
                ),
            )
            .into());
        };
        let _ = tcp.set_nodelay(true);
        if !https {
            return Ok(UpstreamStream::Plain(TokioIo::new(tcp)));
        }
        let name = ServerName::try_from(host.to_string()).map_err(|_| {
            GatewayError::new(ErrorCode::BadRequest, format!("invalid server name {host}"))
        })?;
        let tls = tokio::time::timeout(self.connect_timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| {
                GatewayError::new(
                    ErrorCode::UpstreamTimeout,
                    format!("TLS handshake with {host}:{port} timed out"),
                )
            })?
            .map_err(|e| tls_error(host, port, e))?;
        Ok(UpstreamStream::Tls(Box::new(TokioIo::new(tls))))
    }
}

/// Why a dial failed.
pub(crate) enum DialError {
    /// The upstream refused every protocol offered (ALPN): offered only
    /// HTTP/1.1, it speaks HTTP/2 only.
    NoHttp1,
    Failed(GatewayError),
}

impl From<GatewayError> for DialError {
    fn from(e: GatewayError) -> DialError {
        DialError::Failed(e)
    }
}

impl DialError {
    fn into_gateway(self) -> GatewayError {
        match self {
            DialError::Failed(e) => e,
            DialError::NoHttp1 => GatewayError::new(
                ErrorCode::UpstreamUnreachable,
                "the upstream does not speak HTTP/1.1",
            ),
        }
    }
}

/// Maps a TLS handshake failure to a message that names the cause.
fn tls_error(host: &str, port: u16, e: io::Error) -> DialError {
    let cause = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    if let Some(rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)) =
        cause
    {
        return DialError::NoHttp1;
    }
    if let Some(rustls::Error::InvalidCertificate(cert)) = cause {
        return DialError::Failed(GatewayError::new(
            ErrorCode::UpstreamCertificate,
            format!("certificate of upstream {host}:{port} failed verification: {cert:?}"),
        ));
    }
    DialError::Failed(GatewayError::new(
        ErrorCode::UpstreamUnreachable,
        format!("TLS handshake with upstream {host}:{port} failed: {e}"),
    ))
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = UpstreamStream;
    type Error = GatewayError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamStream, GatewayError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// A connection to an upstream, plain (for `http://` passthrough) or TLS.
pub enum UpstreamStream {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match self {
            UpstreamStream::Plain(_) => Connected::new(),
            UpstreamStream::Tls(s) => {
                let (_, conn) = s.inner().get_ref();
                if conn.alpn_protocol() == Some(b"h2") {
                    Connected::new().negotiated_h2()
                } else {
                    Connected::new()
                }
            }
        }
    }
}

impl hyper::rt::Read for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }
}
