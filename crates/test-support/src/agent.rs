//! An agent-side client for protocol tests: CONNECT through keygate, TLS
//! with a chosen ALPN, then HTTP/1.1 or HTTP/2 with any request body
//! (streamed), or the raw TLS stream for upgrade tests.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::tunnel::{basic_auth, connect_raw};

/// Request body type of [`AgentConn`].
pub type AgentBody = BoxBody<Bytes, io::Error>;

/// The protocol the agent offers inside the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentProto {
    Http1,
    Http2,
}

/// CONNECT `authority` through `proxy` as `token`, then TLS with `sni`
/// trusting `ca_pem` and offering `alpn`. Returns the TLS stream.
pub async fn agent_tls(
    proxy: std::net::SocketAddr,
    authority: &str,
    token: &str,
    sni: &str,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> Result<TlsStream<TcpStream>, String> {
    let tcp = connect_raw(proxy, authority, Some(&basic_auth(token)))
        .await
        .map_err(|e| format!("CONNECT refused: {} {}", e.status, e.head))?;
    let roots = roots_from_pem(ca_pem.as_bytes())?;
    let mut config = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))
}

/// An HTTP connection inside a tunnel.
pub enum AgentConn {
    Http1(hyper::client::conn::http1::SendRequest<AgentBody>),
    Http2(hyper::client::conn::http2::SendRequest<AgentBody>),
}

impl AgentConn {
    /// Opens a tunnel and speaks `proto` in it (ALPN must agree).
    pub async fn open(
        proxy: std::net::SocketAddr,
        authority: &str,
        token: &str,
        sni: &str,
        ca_pem: &str,
        proto: AgentProto,
    ) -> Result<AgentConn, String> {
        let alpn: &[&[u8]] = match proto {
            AgentProto::Http1 => &[b"http/1.1"],
            AgentProto::Http2 => &[b"h2"],
        };
        let tls = agent_tls(proxy, authority, token, sni, ca_pem, alpn).await?;
        let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let io = TokioIo::new(tls);
        match proto {
            AgentProto::Http1 => {
                let (sender, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                Ok(AgentConn::Http1(sender))
            }
            AgentProto::Http2 => {
                if negotiated.as_deref() != Some(b"h2") {
                    return Err("keygate did not negotiate h2".into());
                }
                let (sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                Ok(AgentConn::Http2(sender))
            }
        }
    }

    /// Sends a request (HTTP/1.1: origin-form target plus Host; HTTP/2: an
    /// absolute URI) and returns the response with its body unread.
    pub async fn send(&mut self, req: Request<AgentBody>) -> Result<Response<Incoming>, String> {
        match self {
            AgentConn::Http1(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await.map_err(|e| e.to_string())
            }
            AgentConn::Http2(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await.map_err(|e| e.to_string())
            }
        }
    }
}

/// A request body of `len` bytes generated in 64 KiB chunks (never held
/// in memory at once).
pub struct RepeatBody {
    left: u64,
    chunk: Bytes,
}

impl RepeatBody {
    pub fn new(len: u64) -> RepeatBody {
        RepeatBody {
            left: len,
            chunk: Bytes::from(vec![b'u'; 64 * 1024]),
        }
    }

    pub fn boxed(self) -> AgentBody {
        http_body_util::BodyExt::boxed(self)
    }
}

impl hyper::body::Body for RepeatBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let take = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= take as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..take)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

/// An empty request body.
pub fn empty_body() -> AgentBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A root store holding every certificate of a PEM bundle.
pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    Ok(roots)
}
