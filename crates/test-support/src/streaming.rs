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
//! - `/trailers`: echoes the request body, then trailers: the request's
//!   own (each name prefixed `x-echo-`) and `grpc-status: 0`.
//! - anything else: JSON with the method, target, version and headers.
//!
//! On any route, `delay_ms=N` in the query delays the response head by N ms,
//! and `goaway=1` closes the connection gracefully after the response
//! (HTTP/2: GOAWAY), as servers do after so many requests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
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
    /// The first [`TAP_LIMIT`] bytes received on each HTTP/2 connection
    /// (decrypted), for tests that look at the HPACK encoding.
    h2_received: Taps,
    _dir: tempfile::TempDir,
}

/// What each tapped connection received, one buffer per connection.
type Taps = Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>>;

/// HTTP/2 connections whose first bytes [`StreamUpstream`] keeps.
const TAPPED_CONNECTIONS: usize = 64;

/// Bytes kept per HTTP/2 connection by [`StreamUpstream`]'s tap.
const TAP_LIMIT: usize = 64 * 1024;

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
        let h2_received: Taps = Arc::default();
        let taps = h2_received.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let taps = taps.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let seen: Arc<Mutex<Vec<u8>>> = Arc::default();
                    // Bounded: a long-running upstream (the benchmark's)
                    // keeps at most TAPPED_CONNECTIONS × TAP_LIMIT bytes.
                    let on = h2 && {
                        let mut taps = taps.lock().expect("taps");
                        let room = taps.len() < TAPPED_CONNECTIONS;
                        if room {
                            taps.push(seen.clone());
                        }
                        room
                    };
                    let tls = Tap {
                        inner: tls,
                        seen,
                        on,
                    };
                    let goaway = Arc::new(tokio::sync::Notify::new());
                    let asked = goaway.clone();
                    let service = service_fn(move |req| {
                        let asked = asked.clone();
                        async move {
                            // Any route: `delay_ms=N` holds the response head back.
                            if let Some(ms) = query(&req, "delay_ms") {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            if query(&req, "goaway") == Some(1) {
                                asked.notify_one();
                            }
                            Ok::<_, Infallible>(route(req))
                        }
                    });
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    if h2 {
                        builder = builder.http2_only();
                    } else if alpn == Alpn::Http1Only {
                        builder = builder.http1_only();
                    }
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = goaway.notified() => {
                            // In-flight requests (the one that asked) finish.
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        });
        StreamUpstream {
            tls_addr,
            ca_pem,
            ca_file,
            h2_received,
            _dir: dir,
        }
    }

    /// The HPACK header blocks (HEADERS plus CONTINUATION payloads) the
    /// client sent on each HTTP/2 connection so far, in order.
    pub fn h2_header_blocks(&self) -> Vec<Vec<u8>> {
        let conns = self.h2_received.lock().expect("taps").clone();
        conns
            .iter()
            .flat_map(|c| header_blocks(&c.lock().expect("tap")))
            .collect()
    }
}

/// Splits a received HTTP/2 byte stream (preface, then frames) into header
/// blocks; stops at a truncated frame.
fn header_blocks(raw: &[u8]) -> Vec<Vec<u8>> {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let Some(mut rest) = raw.strip_prefix(H2_PREFACE) else {
        return blocks;
    };
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        if rest.len() < 9 + len {
            break;
        }
        let mut payload = &rest[9..9 + len];
        rest = &rest[9 + len..];
        match kind {
            // HEADERS: optional padding (0x8) and priority (0x20) fields.
            0x1 => {
                let mut pad = 0;
                if flags & 0x8 != 0 && !payload.is_empty() {
                    pad = usize::from(payload[0]);
                    payload = &payload[1..];
                }
                if flags & 0x20 != 0 && payload.len() >= 5 {
                    payload = &payload[5..];
                }
                let end = payload.len().saturating_sub(pad);
                blocks.push(payload[..end].to_vec());
            }
            // CONTINUATION.
            0x9 => {
                if let Some(last) = blocks.last_mut() {
                    last.extend_from_slice(payload);
                }
            }
            _ => {}
        }
    }
    blocks
}

/// Records the first [`TAP_LIMIT`] bytes read through it when `on`.
struct Tap<S> {
    inner: S,
    seen: Arc<Mutex<Vec<u8>>>,
    on: bool,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tap<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.on {
            let mut seen = this.seen.lock().expect("tap");
            let room = TAP_LIMIT.saturating_sub(seen.len());
            let new = &buf.filled()[before..];
            seen.extend_from_slice(&new[..new.len().min(room)]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tap<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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
    rx: tokio::sync::mpsc::Receiver<Frame<Bytes>>,
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

/// A body fed frame by frame (data, then trailers if any) from a channel.
struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Frame<Bytes>>,
    len: Option<u64>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|frame| frame.map(Ok))
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
                    if tx.send(Frame::data(ev)).await.is_err() {
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
                    if tx.send(Frame::data(chunk.slice(..take))).await.is_err() {
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
                let _ = tx.send(Frame::data(Bytes::from(desc.to_string()))).await;
            });
            streamed("application/json", rx, None)
        }
        "/trailers" => {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                let mut body = req.into_body();
                let mut trailers = http::HeaderMap::new();
                while let Some(Ok(frame)) = body.frame().await {
                    match frame.into_data() {
                        Ok(d) => {
                            if tx.send(Frame::data(d)).await.is_err() {
                                return;
                            }
                        }
                        Err(f) => {
                            if let Ok(t) = f.into_trailers() {
                                for (name, value) in &t {
                                    let echo = format!("x-echo-{name}");
                                    if let Ok(n) = http::HeaderName::from_bytes(echo.as_bytes()) {
                                        trailers.insert(n, value.clone());
                                    }
                                }
                            }
                        }
                    }
                }
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                let _ = tx.send(Frame::trailers(trailers)).await;
            });
            streamed("application/grpc", rx, None)
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
