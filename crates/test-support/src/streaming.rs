//! A streaming upstream for protocol tests and the benchmark: SSE that holds
//! the stream open, large generated downloads, a counting upload sink, an
//! upgrade endpoint that echoes raw bytes, and a configurable ALPN (HTTP/1.1
//! only, HTTP/2 only, or both). Nothing is buffered: bodies are generated
//! and counted chunk by chunk.
//!
//! Routes (any method):
//! - `/sse?events=N&interval_ms=M&hold_ms=H`: `text/event-stream`, N events
//!   `data: {"n":i}` M ms apart, then the stream stays open H ms.
//! - `/bytes?n=N`: N bytes (`application/octet-stream`) in 64 KiB chunks.
//! - `/sink`: reads the request body and answers `{"received": N, ...}`.
//! - `/ws`: with `Upgrade`, answers 101 and echoes every byte back until
//!   the client closes.
//! - anything else: JSON with the method, target, version and headers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Which protocols the upstream offers by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    Http1Only,
    Http2Only,
    Both,
}

/// A running streaming upstream (TLS only).
pub struct StreamUpstream {
    pub tls_addr: SocketAddr,
    pub ca_pem: String,
    pub ca_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

type StreamBodyT = BoxBody<Bytes, Infallible>;

impl StreamUpstream {
    /// Starts an upstream whose certificate names `names`, offering `alpn`.
    pub async fn start(names: &[&str], alpn: Alpn) -> StreamUpstream {
        let (ca_pem, mut config) = crate::upstream::tls_config_for(names);
        config.alpn_protocols = match alpn {
            Alpn::Http1Only => vec![b"http/1.1".to_vec()],
            Alpn::Http2Only => vec![b"h2".to_vec()],
            Alpn::Both => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("stream-upstream-ca.pem");
        std::fs::write(&ca_file, &ca_pem).expect("write CA");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let tls_addr = listener.local_addr().expect("addr");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let service = service_fn(|req| async move { Ok::<_, Infallible>(route(req)) });
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    if h2 {
                        builder = builder.http2_only();
                    } else if alpn == Alpn::Http1Only {
                        builder = builder.http1_only();
                    }
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        StreamUpstream {
            tls_addr,
            ca_pem,
            ca_file,
            _dir: dir,
        }
    }
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

fn full(status: StatusCode, ctype: &'static str, body: String) -> Response<StreamBodyT> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}

fn describe(req: &Request<Incoming>) -> serde_json::Value {
    let headers: Vec<serde_json::Value> = req
        .headers()
        .iter()
        .map(|(n, v)| serde_json::json!([n.as_str(), String::from_utf8_lossy(v.as_bytes())]))
        .collect();
    serde_json::json!({
        "method": req.method().as_str(),
        "target": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "version": format!("{:?}", req.version()),
        "headers": headers,
    })
}

fn streamed(
    ctype: &'static str,
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    len: Option<u64>,
) -> Response<StreamBodyT> {
    let mut resp = Response::new(BodyExt::boxed(ChannelBody { rx, len }));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    if let Some(n) = len {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    resp
}

/// A body fed chunk by chunk from a channel.
struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    len: Option<u64>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self.len {
            Some(n) => hyper::body::SizeHint::with_exact(n),
            None => hyper::body::SizeHint::default(),
        }
    }
}

fn route(mut req: Request<Incoming>) -> Response<StreamBodyT> {
    match req.uri().path() {
        "/sse" => {
            let events = query(&req, "events").unwrap_or(3);
            let interval = Duration::from_millis(query(&req, "interval_ms").unwrap_or(0));
            let hold = Duration::from_millis(query(&req, "hold_ms").unwrap_or(0));
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                for i in 0..events {
                    if i > 0 {
                        tokio::time::sleep(interval).await;
                    }
                    let ev = Bytes::from(format!("data: {{\"n\":{i}}}\n\n"));
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(hold).await;
            });
            let mut resp = streamed("text/event-stream", rx, None);
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            resp
        }
        "/bytes" => {
            let n = query(&req, "n").unwrap_or(0);
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                let mut left = n;
                while left > 0 {
                    let take = left.min(chunk.len() as u64) as usize;
                    if tx.send(chunk.slice(..take)).await.is_err() {
                        return;
                    }
                    left -= take as u64;
                }
            });
            streamed("application/octet-stream", rx, Some(n))
        }
        "/sink" => {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let mut desc = describe(&req);
            tokio::spawn(async move {
                let mut body = req.into_body();
                let mut received: u64 = 0;
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(f) => {
                            if let Some(d) = f.data_ref() {
                                received += d.len() as u64;
                            }
                        }
                        Err(_) => break,
                    }
                }
                desc["received"] = received.into();
                let _ = tx.send(Bytes::from(desc.to_string())).await;
            });
            streamed("application/json", rx, None)
        }
        "/ws" if req.headers().contains_key(header::UPGRADE) => {
            let desc = describe(&req);
            let key = req
                .headers()
                .get("sec-websocket-key")
                .map(|k| k.as_bytes().to_vec());
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = on.await else { return };
                let mut io = TokioIo::new(up);
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = io.shutdown().await;
            });
            let mut resp = Response::new(Full::new(Bytes::new()).boxed());
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = resp.headers_mut();
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(accept) = key.as_deref().map(websocket_accept) {
                if let Ok(v) = HeaderValue::from_str(&accept) {
                    h.insert("sec-websocket-accept", v);
                }
            }
            // What the upstream saw in the handshake, for assertions.
            if let Ok(v) = HeaderValue::from_str(&desc.to_string()) {
                h.insert("x-seen", v);
            }
            resp
        }
        _ => full(
            StatusCode::OK,
            "application/json",
            describe(&req).to_string(),
        ),
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 §4.2.2), as
/// a real WebSocket server answers.
fn websocket_accept(key: &[u8]) -> String {
    use base64::Engine;
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}
