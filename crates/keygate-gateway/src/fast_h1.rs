//! The HTTP/1.1 fast path inside a tunnel (docs/http1-fast-path.md).
//!
//! hyper's server and pooled client cost most of keygate's time per
//! request (bench/README.md). For the common case (an HTTP/1.1 agent
//! sending plain requests with a `Content-Length` body or none) this module
//! reads the head itself, runs the same stages as every request
//! ([`forward::admit`], [`forward::rewrite`]: re-authentication, Host
//! check, path normalisation, selection, injection), writes the rewritten
//! head and the body to a pooled HTTP/1.1 upstream connection and relays
//! the response, all in the tunnel's own task.
//!
//! Anything else (a head that does not parse or is too large, HTTP/1.0, a
//! chunked or `Expect`ing request, an `Upgrade`, an unusual method or
//! `Connection`) is handed, with the bytes already read, to hyper's
//! HTTP/1.1 server for the rest of the connection: it answers or refuses
//! it as it always has. So is a destination that will not speak HTTP/1.1
//! (an HTTP/2-only upstream): it is remembered and served by hyper's client.
//!
//! Responses: no body for HEAD, 1xx, 204 and 304; a `Content-Length` body
//! is counted; a chunked body is parsed only for its end and forwarded as
//! it comes (SSE stays streaming); a body framed by neither is read to the
//! upstream's close and the agent's connection is closed after it. A
//! malformed or ambiguous response head is a 502 and the upstream
//! connection is dropped. A request is never sent twice.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};
use http_body_util::BodyExt;
use keygate_core::{Decision, ErrorCode, TokenHash};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant as Deadline;
use tokio_rustls::client::TlsStream;

use crate::connector::DialError;
use crate::forward::{self, DestMap, Destination, RequestLog};
use crate::phase_timer::PhaseTimer;
use crate::{Body, GatewayError, Shared};

/// Most headers a request or response head may have (hyper's default).
const MAX_HEADERS: usize = 100;
/// Largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Idle upstream connections kept per destination.
const POOL_PER_DESTINATION: usize = 64;
/// Read size for heads and bodies.
const READ_CHUNK: usize = 16 * 1024;
/// Largest request body this path serves. It is read whole before the
/// request goes out in one write, so an early answer from the upstream can
/// never find it half sent; larger bodies go to hyper.
const MAX_BODY: u64 = 64 * 1024;
/// Read size while waiting for the next request.
const IDLE_READ: usize = 2048;

/// An upstream connection speaking HTTP/1.1. Boxed: the TLS state is over
/// a kilobyte, and the connection moves on every take from and return to
/// the pool and through each request's future.
type Upstream = Box<TlsStream<TcpStream>>;

/// Idle HTTP/1.1 upstream connections, and the destinations that refused
/// HTTP/1.1 (served by hyper's client instead).
#[derive(Default)]
pub(crate) struct Pool {
    inner: Mutex<PoolInner>,
}

#[derive(Default)]
struct PoolInner {
    idle: DestMap<Vec<Idle>>,
    http2_only: std::collections::HashSet<Destination, foldhash::fast::RandomState>,
}

/// An idle connection in the pool.
struct Idle {
    /// When it was put back.
    since: Instant,
    up: Upstream,
    /// Its (empty) read buffer, kept with it: allocating 16 KiB per
    /// exchange is the dearest allocation of an HTTP/1.1 request, and the
    /// pool holds a bounded number of connections (unlike idle tunnels).
    buf: BytesMut,
}

/// Largest read buffer kept with a pooled connection (one a large
/// response grew is dropped).
const POOLED_BUF_MAX: usize = 2 * READ_CHUNK;

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolInner> {
        // A panic elsewhere while holding the lock leaves plain data behind.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this destination is known to refuse HTTP/1.1.
    pub fn http2_only(&self, dest: &Destination) -> bool {
        let inner = self.lock();
        !inner.http2_only.is_empty() && inner.http2_only.contains(dest)
    }

    fn mark_http2_only(&self, dest: &Destination) {
        self.lock().http2_only.insert(dest.clone());
    }

    /// The most recently used idle connection that is still open; `now`:
    /// the current time, read by the caller.
    fn take(
        &self,
        dest: &Destination,
        max_idle: std::time::Duration,
        now: Instant,
    ) -> Option<(Upstream, BytesMut)> {
        loop {
            let mut idle = {
                let mut inner = self.lock();
                inner.idle.get_mut(dest)?.pop()?
            };
            // Put back after `now` (by another tunnel): idle for zero.
            if now.saturating_duration_since(idle.since) < max_idle && still_open(&mut idle.up) {
                return Some((idle.up, idle.buf));
            }
        }
    }

    /// Returns a connection, with its read buffer (empty), to the pool.
    fn put(&self, dest: &Destination, up: Upstream, buf: BytesMut, max_idle: std::time::Duration) {
        debug_assert!(buf.is_empty());
        let idle = Idle {
            since: Instant::now(),
            up,
            buf: if buf.capacity() <= POOLED_BUF_MAX {
                buf
            } else {
                BytesMut::new()
            },
        };
        let now = idle.since;
        let mut inner = self.lock();
        let Some(list) = inner.idle.get_mut(dest) else {
            // The key is copied only for a destination's first connection.
            inner.idle.insert(dest.clone(), vec![idle]);
            return;
        };
        // The oldest is first: expired ones go only when there are some.
        if list
            .first()
            .is_some_and(|i| now.duration_since(i.since) >= max_idle)
        {
            list.retain(|i| now.duration_since(i.since) < max_idle);
        }
        if list.len() < POOL_PER_DESTINATION {
            list.push(idle);
        }
    }
}

impl Pool {
    /// Drops idle connections that expired or that the upstream closed.
    /// Without it a connection the upstream closed would sit in
    /// CLOSE_WAIT until its destination is used again.
    pub fn sweep(&self, max_idle: std::time::Duration) {
        let now = Instant::now();
        let mut gone = Vec::new();
        {
            let mut inner = self.lock();
            inner.idle.retain(|_, list| {
                let mut i = 0;
                while i < list.len() {
                    let idle = &mut list[i];
                    if now.duration_since(idle.since) < max_idle && still_open(&mut idle.up) {
                        i += 1;
                    } else {
                        gone.push(list.remove(i));
                    }
                }
                !list.is_empty()
            });
        }
        // Closed outside the lock.
        drop(gone);
    }

    /// Drops every idle connection (the gateway is stopping).
    pub fn clear(&self) {
        let idle = std::mem::take(&mut self.lock().idle);
        drop(idle);
    }
}

/// How often the pool is swept: often enough that an upstream's close is
/// answered within seconds, rarely enough to cost nothing.
pub(crate) fn sweep_interval(max_idle: std::time::Duration) -> std::time::Duration {
    max_idle.clamp(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(2),
    )
}

/// Sweeps the pool until the gateway is gone or stopping, then empties it.
pub(crate) async fn sweep_until_closed(shared: std::sync::Weak<Shared>) {
    let (every, mut closing) = match shared.upgrade() {
        Some(s) => (
            sweep_interval(s.config.pool_idle_timeout),
            s.closing.subscribe(),
        ),
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = closing.wait_for(|c| *c) => break,
        }
        let Some(s) = shared.upgrade() else { return };
        s.fast_h1.sweep(s.config.pool_idle_timeout);
        s.h2.sweep(s.config.pool_idle_timeout);
    }
    if let Some(s) = shared.upgrade() {
        s.fast_h1.clear();
        s.h2.clear();
    }
}

/// An idle connection is still usable if reading it would block: no close,
/// no error, and no unexpected bytes.
fn still_open(up: &mut Upstream) -> bool {
    let waker = futures_util::task::noop_waker_ref();
    let mut cx = Context::from_waker(waker);
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    matches!(Pin::new(up).poll_read(&mut cx, &mut buf), Poll::Pending)
}

/// How a tunnel's fast path ended.
pub(crate) enum End<S> {
    /// The connection is finished (closed, failed or shut down).
    Closed,
    /// Serve the rest of the connection with hyper, replaying the bytes
    /// already read first.
    HandOff {
        rest: Rewind<S>,
        /// A request was answered here first: the connection is
        /// HTTP/1.1 and must stay so (hyper alone would never switch a
        /// connection it served as HTTP/1.1 to HTTP/2 on a later preface).
        served: bool,
    },
}

/// The agent's connection with bytes already read put back in front.
pub(crate) struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A parsed request head that the fast path serves.
struct Head {
    req: Request<()>,
    framed: Framed,
}

/// Where a request ends in the agent's stream.
#[derive(Debug, Clone, Copy)]
struct Framed {
    /// Bytes of the head still in the agent's buffer (0 once consumed).
    len: usize,
    /// Body bytes not yet read from the agent.
    body_len: u64,
    /// The agent asked to close after this exchange.
    close: bool,
    /// A HEAD request: no response to it has a body, refusals included.
    head: bool,
}

/// Why a head is not served here.
enum NotHere {
    /// More bytes are needed to decide.
    Partial,
    /// hyper serves it (and everything after it on this connection).
    HandOff,
    /// A complete head hyper would refuse as malformed (400, in its own
    /// bare format): refused here, in keygate's error format and audited,
    /// as a head found malformed before its end is.
    Malformed,
}

/// Methods served here; anything else (CONNECT, TRACE, extensions) goes to
/// hyper.
fn plain_method(m: &str) -> Option<Method> {
    Some(match m {
        "GET" => Method::GET,
        "POST" => Method::POST,
        "HEAD" => Method::HEAD,
        "PUT" => Method::PUT,
        "PATCH" => Method::PATCH,
        "DELETE" => Method::DELETE,
        "OPTIONS" => Method::OPTIONS,
        _ => return None,
    })
}

/// The method a malformed head's audit record names: its first word when
/// that is a method this path serves, else `-` (nothing else in a head
/// that does not parse is taken as what it claims to be).
fn malformed_method(head: &[u8]) -> &str {
    let start = head
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(head.len());
    let word = head[start..]
        .split(|b| *b == b' ')
        .next()
        .unwrap_or_default();
    std::str::from_utf8(word)
        .ok()
        .filter(|m| plain_method(m).is_some())
        .unwrap_or("-")
}

fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Parses an agent's request head at the start of `buf` and decides
/// whether this path serves it. `from`: where the end of the head may
/// start (bytes before it were looked at already).
fn parse_request(buf: &[u8], from: usize) -> Result<Head, NotHere> {
    let end = head_end(buf, from).ok_or(NotHere::Partial)?;
    // The target and the header values share one copy of the head
    // instead of a copy each.
    let copy = Bytes::copy_from_slice(&buf[..end]);
    // Uninitialised: 100 headers would be 3.2 KiB to zero per parse.
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(&copy, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        // An empty line httparse does not take as the end (leading blank
        // lines, say), or too many headers (hyper answers 431).
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return Err(NotHere::HandOff)
        }
        // HTTP/2 with prior knowledge: hyper serves it (its preface
        // starts as a head of one line that is not an HTTP/1.1 request
        // line).
        Err(httparse::Error::Version) if copy[..] == b"PRI * HTTP/2.0\r\n\r\n"[..] => {
            return Err(NotHere::HandOff)
        }
        // hyper parses with httparse too, and answers these 400.
        Err(_) => return Err(NotHere::Malformed),
    };
    if parsed.version != Some(1) {
        return Err(NotHere::HandOff);
    }
    let method = parsed
        .method
        .and_then(plain_method)
        .ok_or(NotHere::HandOff)?;
    let target = parsed.path.ok_or(NotHere::HandOff)?;
    if !target.starts_with('/') {
        return Err(NotHere::HandOff);
    }
    // hyper parses the target the same way, and answers a failure 400.
    let uri = Uri::from_maybe_shared(copy.slice_ref(target.as_bytes()))
        .map_err(|_| NotHere::Malformed)?;
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    let mut body_len = None;
    let mut close = false;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| NotHere::Malformed)?;
        let value = HeaderValue::from_maybe_shared(copy.slice_ref(h.value))
            .map_err(|_| NotHere::HandOff)?;
        if name == header::CONTENT_LENGTH {
            if body_len.is_some() {
                return Err(NotHere::HandOff);
            }
            let n = digits(h.value).ok_or(NotHere::HandOff)?;
            // Larger bodies stream through hyper, which sends them while
            // it watches for an early answer (413, say).
            if n > MAX_BODY {
                return Err(NotHere::HandOff);
            }
            body_len = Some(n);
        } else if name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
        {
            return Err(NotHere::HandOff);
        } else if name == header::TE {
            if !h.value.eq_ignore_ascii_case(b"trailers") {
                return Err(NotHere::HandOff);
            }
        } else if name == header::CONNECTION {
            if h.value.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if !h.value.eq_ignore_ascii_case(b"keep-alive") {
                return Err(NotHere::HandOff);
            }
        }
        map.append(name, value);
    }
    let mut req = Request::new(());
    let head = method == Method::HEAD;
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = map;
    Ok(Head {
        req,
        framed: Framed {
            len,
            body_len: body_len.unwrap_or(0),
            close,
            head,
        },
    })
}

/// Checks the complete lines of an incomplete head after `from` (where
/// the lines checked before end): `None` when one is malformed, else where
/// the complete lines end. Each line is looked at once, however the head
/// arrives.
fn lines_well_formed(buf: &[u8], from: usize) -> Option<usize> {
    let Some(last) = memchr::memrchr(b'\n', &buf[from..]) else {
        return Some(from);
    };
    let upto = from + last + 1;
    let lines = &buf[from..upto];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let checked = if from == 0 {
        // Empty lines before the request line are skipped (as httparse
        // and hyper skip them): the request line is checked when it is
        // whole.
        if lines.iter().all(|b| matches!(b, b'\r' | b'\n')) {
            return Some(0);
        }
        // The start of an HTTP/2 preface (prior knowledge) that arrived
        // in pieces: hyper takes the whole preface as HTTP/2.
        if lines.starts_with(b"PRI * HTTP/2.0\r\n") {
            return Some(upto);
        }
        httparse::Request::new(&mut headers)
            .parse(lines)
            .map(|_| ())
    } else {
        httparse::parse_headers(lines, &mut headers).map(|_| ())
    };
    match checked {
        // Too many headers is not malformed: hyper answers the whole head
        // (431).
        Ok(()) | Err(httparse::Error::TooManyHeaders) => Some(upto),
        Err(_) => None,
    }
}

/// Where the head at the start of `buf` ends: just past its first empty
/// line (CRLF or bare LF, as httparse accepts), looking only at lines that
/// end at or after `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(2).min(buf.len());
    memchr::memchr_iter(b'\n', &buf[start..])
        .map(|i| start + i)
        .find_map(|i| match buf.get(i + 1..) {
            Some([b'\n', ..]) => Some(i + 2),
            Some([b'\r', b'\n', ..]) => Some(i + 3),
            _ => None,
        })
}

/// The request head written upstream: origin-form target (the admitted
/// path and the request's query), Host naming the destination first.
fn upstream_head(
    dest: &Destination,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + headers.len() * 48);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    if let Some(q) = query {
        out.push(b'?');
        out.extend_from_slice(q.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    // The authority, written in place (no string built per request).
    let ipv6 = dest.host.contains(':');
    if ipv6 {
        out.push(b'[');
    }
    out.extend_from_slice(dest.host.as_bytes());
    if ipv6 {
        out.push(b']');
    }
    if dest.port != 443 {
        out.push(b':');
        out.extend_from_slice(itoa::Buffer::new().format(dest.port).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// `content-length: N` and its CRLF (no string formatted per response).
fn push_content_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A path that can stand in a request line as it is: no space, control
/// byte or DEL. A normalised path is visible ASCII; a path forwarded as
/// received (to a host no credential applies to) is what the agent's
/// request line held, which httparse and `Uri` accepted (UTF-8 bytes
/// included, as hyper's path forwards them).
fn request_line_safe(path: &str) -> bool {
    path.starts_with('/') && path.bytes().all(|b| b > 0x20 && b != 0x7f)
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes.
    Close,
}

/// A parsed upstream response head.
#[derive(Debug)]
struct ResponseHead {
    status: u16,
    /// The head to write to the agent (hop-by-hop headers removed).
    out: Vec<u8>,
    len: usize,
    framing: Framing,
    /// The upstream will close after this response.
    upstream_closes: bool,
}

/// Parses an upstream response head at the start of `buf`. `Ok(None)`:
/// incomplete.
fn parse_response(buf: &[u8], head_request: bool) -> Result<Option<ResponseHead>, String> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let status = parsed.code.ok_or("response without a status")?;
    let code = http::StatusCode::from_u16(status).map_err(|_| "invalid status")?;
    if status == 101 {
        return Err("unrequested protocol switch (101)".into());
    }
    // A length is checked only where it frames the body: HEAD, 1xx, 204
    // and 304 have none, whatever their headers say (as hyper's client).
    let mut length: Result<Option<u64>, &'static str> = Ok(None);
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut te_repeated = false;
    let mut upstream_closes = parsed.version == Some(0);
    // Header names `Connection` lists, besides the hop-by-hop ones always
    // dropped (`keep-alive`, the usual one, allocates nothing).
    let mut named: Vec<&str> = Vec::new();
    for h in parsed.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = match (length, digits(h.value)) {
                (Err(e), _) => Err(e),
                (_, None) => Err("invalid Content-Length"),
                (Ok(Some(l)), Some(n)) if l != n => Err("conflicting Content-Length headers"),
                (_, Some(n)) => Ok(Some(n)),
            };
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te_repeated |= transfer_encoding;
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
            chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
            transfer_encoding = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = std::str::from_utf8(h.value).map_err(|_| "invalid Connection")?;
            for token in v.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    upstream_closes = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && parsed.version == Some(0) {
                    upstream_closes = false;
                }
                if !forward::HOP_BY_HOP
                    .iter()
                    .any(|n| token.eq_ignore_ascii_case(n))
                {
                    named.push(token);
                }
            }
        }
    }
    let framing = if head_request || (100..200).contains(&status) || status == 204 || status == 304
    {
        Framing::Empty
    } else if te_repeated {
        return Err("repeated Transfer-Encoding".into());
    } else if transfer_encoding {
        if length != Ok(None) {
            return Err("both Content-Length and Transfer-Encoding".into());
        }
        if !chunked {
            // Not chunked last (`gzip`, say): the body runs to the close.
            Framing::Close
        } else {
            Framing::Chunked
        }
    } else {
        match length {
            Err(e) => return Err(e.into()),
            Ok(Some(n)) => Framing::Length(n),
            Ok(None) => Framing::Close,
        }
    };
    // Room for the framing headers written below, and for the body bytes
    // already read, which go out with the head (no reallocation then).
    let mut out = Vec::with_capacity(buf.len() + 64);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(code.as_str().as_bytes());
    out.push(b' ');
    let reason = code
        .canonical_reason()
        .or(parsed.reason)
        .unwrap_or_default();
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in parsed.headers.iter() {
        // The framing headers are written below, once, from the framing
        // found: never repeated, never dropped because `Connection` named
        // them.
        let hop = h.name.eq_ignore_ascii_case("content-length")
            || forward::HOP_BY_HOP
                .iter()
                .any(|n| h.name.eq_ignore_ascii_case(n))
            || named.iter().any(|n| h.name.eq_ignore_ascii_case(n));
        if hop {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => push_content_length(&mut out, n),
        // What the body of a GET would be (HEAD), or of the cached
        // representation (304); 1xx and 204 never have one.
        Framing::Empty if status == 304 || (head_request && status >= 200 && status != 204) => {
            if let Ok(Some(n)) = length {
                push_content_length(&mut out, n);
            }
        }
        Framing::Empty => {}
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        // The agent's end of a body read to the close is its connection's
        // close.
        Framing::Close => out.extend_from_slice(b"connection: close\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead {
        status,
        out,
        len,
        framing,
        upstream_closes,
    }))
}

/// Finds the end of a chunked body, fed the bytes as they arrive; the
/// bytes themselves are forwarded unchanged.
#[derive(Debug, Default)]
pub(crate) struct ChunkedEnd {
    state: ChunkState,
    size: u64,
    digits: u8,
    /// Bytes of extensions or trailers so far (bounded).
    extra: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// After the last chunk: at the start of a trailer line (or the end).
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// Most bytes of chunk extensions plus trailers accepted in one body.
const MAX_CHUNK_EXTRA: usize = 64 * 1024;

impl ChunkedEnd {
    /// Consumes bytes of the body; returns how many belong to it (all of
    /// `input` unless the body ends inside it).
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, &'static str> {
        use ChunkState::*;
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits >= 15 {
                            return Err("chunk size too large");
                        }
                        let v = (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.size = self.size * 16 + v;
                        self.digits += 1;
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => self.state = Extension,
                    b'\r' if self.digits > 0 => self.state = SizeLf,
                    _ => return Err("invalid chunk size"),
                },
                Extension => match b {
                    b'\r' => self.state = SizeLf,
                    b'\n' => return Err("bare LF in chunk extension"),
                    _ => {
                        self.extra += 1;
                        if self.extra > MAX_CHUNK_EXTRA {
                            return Err("chunk extensions too long");
                        }
                    }
                },
                SizeLf => {
                    if b != b'\n' {
                        return Err("chunk size line without CRLF");
                    }
                    self.digits = 0;
                    self.state = if self.size == 0 { TrailerStart } else { Data };
                }
                Data => {
                    let take =
                        (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                DataCr => {
                    if b != b'\r' {
                        return Err("chunk data longer than its size");
                    }
                    self.state = DataLf;
                }
                DataLf => {
                    if b != b'\n' {
                        return Err("chunk data without CRLF");
                    }
                    self.state = Size;
                }
                TrailerStart => {
                    if b == b'\r' {
                        self.state = EndLf;
                    } else {
                        self.state = Trailer;
                        continue;
                    }
                }
                Trailer => {
                    if b == b'\r' {
                        self.state = TrailerLf;
                    } else if b == b'\n' {
                        return Err("bare LF in trailer");
                    }
                    self.extra += 1;
                    if self.extra > MAX_CHUNK_EXTRA {
                        return Err("trailers too long");
                    }
                }
                TrailerLf => {
                    if b != b'\n' {
                        return Err("trailer without CRLF");
                    }
                    self.state = TrailerStart;
                }
                EndLf => {
                    if b != b'\n' {
                        return Err("chunked body without final CRLF");
                    }
                    self.state = Done;
                    return Ok(i + 1);
                }
                Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }

    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

/// The per-tunnel state of the fast path.
struct Conn<'a, S> {
    shared: &'a Shared,
    dest: &'a Destination,
    token_hash: TokenHash,
    agent: S,
    /// Bytes read from the agent and not yet consumed.
    buf: BytesMut,
    /// The deadlines of every phase of every exchange.
    timer: PhaseTimer,
}

/// Serves an HTTP/1.1 tunnel until it closes or must be handed to hyper.
pub(crate) async fn serve<S>(
    shared: &Shared,
    dest: &Destination,
    token_hash: TokenHash,
    agent: S,
) -> End<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Conn {
        shared,
        dest,
        token_hash,
        agent,
        buf: BytesMut::new(),
        timer: PhaseTimer::new(shortest_timeout(&shared.config)),
    };
    // One wait for shutdown per tunnel, registered once, rather than one
    // registered and dropped again for every head read. It ends when the
    // gateway starts shutting down (or is gone) and is never polled again
    // after that: each place that sees it end returns.
    let mut closing = shared.closing.subscribe();
    let mut closed = std::pin::pin!(closing.wait_for(|c| *c));
    let mut served = false;
    loop {
        let head = match conn.read_head(closed.as_mut()).await {
            Ok(Some(head)) => head,
            Ok(None) => return End::Closed,
            Err(NotRead::HandOff) => return conn.hand_off(served),
            Err(NotRead::Malformed) => {
                // Refused at once, audited, and the connection closed (as
                // hyper closes after a head it cannot parse; it would also
                // wait for the end of a head that arrives in pieces).
                let err = GatewayError::new(ErrorCode::BadRequest, "malformed request head");
                let log = RequestLog::bare(
                    malformed_method(&conn.buf),
                    "https",
                    &dest.host,
                    dest.port,
                    Instant::now(),
                );
                let agent = shared
                    .snapshot
                    .load()
                    .agent(&conn.token_hash)
                    .map(|a| a.name.clone());
                let nothing_left = Framed {
                    len: 0,
                    body_len: 0,
                    close: true,
                    head: false,
                };
                if let Step::Close = conn.refuse(log, agent, &err, nothing_left).await {
                    let _ = conn.agent.shutdown().await;
                }
                return End::Closed;
            }
        };
        match conn.exchange(head).await {
            Step::KeepAlive => {}
            Step::Close => {
                let _ = conn.agent.shutdown().await;
                return End::Closed;
            }
            Step::Drop => return End::Closed,
            Step::HandOff => return conn.hand_off(served),
        }
        served = true;
        if closed.as_mut().now_or_never().is_some() {
            let _ = conn.agent.shutdown().await;
            return End::Closed;
        }
        // An idle tunnel holds no read buffer.
        if conn.buf.is_empty() {
            conn.buf = BytesMut::new();
        }
    }
}

/// Why no head was read for the fast path.
enum NotRead {
    /// hyper serves the head in the buffer, and the rest.
    HandOff,
    /// A line of a head not yet complete is malformed.
    Malformed,
}

/// What to do with the agent's connection after an exchange.
enum Step {
    KeepAlive,
    /// Close cleanly (close_notify).
    Close,
    /// Drop at once: the response is incomplete, and the agent must see
    /// that as an error.
    Drop,
    /// hyper serves the request still in the buffer, and the rest.
    HandOff,
}

impl<S> Conn<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn hand_off(self, served: bool) -> End<S> {
        End::HandOff {
            rest: Rewind {
                prefix: self.buf.freeze(),
                inner: self.agent,
            },
            served,
        }
    }

    /// Reads until a complete head the fast path serves. `Ok(None)`: the
    /// connection closed, timed out or the gateway is shutting down.
    async fn read_head(
        &mut self,
        mut closed: Pin<&mut impl Future>,
    ) -> Result<Option<Head>, NotRead> {
        let max = self.shared.config.max_header_bytes.max(8192);
        let now = Deadline::now();
        let deadline = now + self.shared.config.header_read_timeout;
        // Bytes already looked at for the end of the head: a head that
        // arrives a byte at a time is parsed once it can be complete, not
        // once per byte (quadratic work for a slow client).
        let mut scanned: usize = 0;
        // Where the lines of an incomplete head already checked end.
        let mut checked: usize = 0;
        loop {
            match parse_request(&self.buf, scanned) {
                // hyper refuses a head over the limit (431), even when it
                // arrived whole in the read that crossed the limit.
                Ok(head) if head.framed.len > max => return Err(NotRead::HandOff),
                Ok(head) => return Ok(Some(head)),
                Err(NotHere::HandOff) => return Err(NotRead::HandOff),
                Err(NotHere::Malformed) => return Err(NotRead::Malformed),
                Err(NotHere::Partial) => match lines_well_formed(&self.buf, checked) {
                    Some(upto) => checked = upto,
                    // Refused at once: waiting for its end would hold the
                    // tunnel, unanswered, until the header timeout.
                    None => return Err(NotRead::Malformed),
                },
            }
            scanned = self.buf.len();
            if self.buf.len() >= max {
                // hyper refuses the oversized head (431).
                return Err(NotRead::HandOff);
            }
            let idle = self.buf.is_empty();
            // A waiting tunnel holds a small buffer (heads are usually a
            // few hundred bytes); it grows when a head needs more.
            self.buf
                .reserve(if idle { IDLE_READ } else { READ_CHUNK.min(max) });
            let read = self
                .timer
                .within_from(now, deadline, self.agent.read_buf(&mut self.buf));
            let n = tokio::select! {
                biased;
                r = read => match r {
                    Ok(Ok(n)) => n,
                    Ok(Err(_)) | Err(_) => return Ok(None),
                },
                // Shutdown closes idle connections at once; a head under
                // way is still read and answered.
                _ = closed.as_mut(), if idle => return Ok(None),
            };
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// Reads until the request's whole body is in the buffer (at most
    /// [`MAX_BODY`]), waiting as long as hyper's path would wait for the
    /// upstream's answer. `None`: it did not arrive; `Some(waited)`: it is
    /// here, and whether reading it waited.
    async fn read_body(&mut self, framed: Framed) -> Option<bool> {
        let need = framed.len + usize::try_from(framed.body_len).unwrap_or(usize::MAX);
        if self.buf.len() >= need {
            return Some(false);
        }
        let deadline = Deadline::now() + self.shared.config.response_timeout;
        self.buf.reserve(need - self.buf.len());
        while self.buf.len() < need {
            match self
                .timer
                .within(deadline, self.agent.read_buf(&mut self.buf))
                .await
            {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
        Some(true)
    }

    /// One request and its response.
    async fn exchange(&mut self, head: Head) -> Step {
        let shared = self.shared;
        let dest = self.dest;
        let started = Instant::now();
        let framed = head.framed;
        let log = RequestLog::new(&head.req, "https", &dest.host, dest.port, started);
        let admitted = match forward::admit(shared, dest, Some(&self.token_hash), &head.req) {
            Ok(a) => a,
            Err((name, err)) => return self.refuse(log, name, &err, framed).await,
        };
        let name = Some(admitted.agent.name.clone());
        let (mut parts, ()) = head.req.into_parts();
        if !request_line_safe(&admitted.path) {
            let err = GatewayError::new(ErrorCode::BadRequest, "invalid request target");
            return self.refuse(log, name, &err, framed).await;
        }
        let injected = match forward::rewrite_headers(shared, dest, &admitted, &mut parts.headers) {
            Ok(n) => n,
            Err(err) => return self.refuse(log, name, &err, framed).await,
        };
        let Some(waited) = self.read_body(framed).await else {
            let err = GatewayError::new(
                ErrorCode::BadRequest,
                format!(
                    "the request body ({} bytes) did not arrive in time",
                    framed.body_len
                ),
            );
            let close = Framed {
                close: true,
                ..framed
            };
            return self.refuse(log, name, &err, close).await;
        };
        let total = shared
            .config
            .total_timeout
            .map(|t| Deadline::from_std(started) + t);
        let up = match upstream(shared, dest, total, started).await {
            Ok(up) => up,
            Err(DialError::NoHttp1) => {
                // Nothing was consumed: hyper serves this request again
                // from the start, through its HTTP/2 client.
                shared.fast_h1.mark_http2_only(dest);
                return Step::HandOff;
            }
            Err(DialError::Failed(err)) => return self.refuse(log, name, &err, framed).await,
        };
        // The clock is read again only when the exchange may have waited
        // since it started (for the body, or for a new connection).
        let now = if waited || up.dialed {
            Deadline::now()
        } else {
            Deadline::from_std(started)
        };
        let (mut up, mut ubuf) = (up.conn, up.buf);
        let head_deadline = {
            let h = now + shared.config.response_timeout;
            total.map_or(h, |t| t.min(h))
        };

        // Request head and body, in one write.
        let body_len = usize::try_from(framed.body_len).unwrap_or(usize::MAX);
        let mut out = upstream_head(
            dest,
            &parts.method,
            &admitted.path,
            parts.uri.query(),
            &parts.headers,
        );
        out.extend_from_slice(&self.buf[framed.len..framed.len + body_len]);
        self.buf.advance(framed.len + body_len);
        let sent = async {
            up.write_all(&out).await?;
            up.flush().await
        };
        let sent = match self.timer.within_from(now, head_deadline, sent).await {
            Ok(r) => r,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        };
        if let Err(e) = sent {
            let err = GatewayError::new(
                ErrorCode::UpstreamUnreachable,
                format!(
                    "sending the request to upstream {} failed: {e}",
                    dest.authority()
                ),
            );
            let consumed = Framed {
                len: 0,
                body_len: 0,
                ..framed
            };
            return self.refuse(log, name, &err, consumed).await;
        }

        // Response heads (1xx interim heads are read and dropped).
        let head_request = parts.method == Method::HEAD;
        let resp = loop {
            let resp = match read_response_head(
                &mut up,
                &mut ubuf,
                head_request,
                &mut self.timer,
                head_deadline,
            )
            .await
            {
                Ok(r) => r,
                Err(err) => {
                    let consumed = Framed {
                        len: 0,
                        body_len: 0,
                        ..framed
                    };
                    return self.refuse(log, name, &err, consumed).await;
                }
            };
            ubuf.advance(resp.len);
            if resp.status >= 200 {
                break resp;
            }
            // Interim (1xx) heads are dropped, as hyper's client drops
            // them: no request here expects `100 Continue`, and some
            // clients (Python's http.client) take any other 1xx for the
            // final answer, which would hand every later response to the
            // wrong request.
        };
        let decision = if injected.is_empty() {
            Decision::Passthrough
        } else {
            Decision::Injected
        };
        forward::emit(
            shared,
            log.event(name, resp.status, decision, None, injected),
        )
        .await;

        // Response body.
        let mut head_out = resp.out;
        if framed.close && resp.framing != Framing::Close {
            // The agent asked to close: say so (the head ends in CRLF CRLF).
            head_out.truncate(head_out.len() - 2);
            head_out.extend_from_slice(b"connection: close\r\n\r\n");
        }
        let relayed = self
            .relay_body(&mut up, &mut ubuf, resp.framing, &mut head_out, total)
            .await;
        match relayed {
            Ok(()) => {
                let reusable =
                    !resp.upstream_closes && resp.framing != Framing::Close && ubuf.is_empty();
                if reusable {
                    shared
                        .fast_h1
                        .put(dest, up, ubuf, shared.config.pool_idle_timeout);
                }
                if framed.close || resp.framing == Framing::Close {
                    Step::Close
                } else {
                    Step::KeepAlive
                }
            }
            Err(e) => {
                tracing::debug!(host = %dest.host, error = %e, "response relay ended early");
                Step::Drop
            }
        }
    }

    /// Relays the response body after `head` (written with the first body
    /// bytes, in one TLS record when they are already here).
    async fn relay_body(
        &mut self,
        up: &mut Upstream,
        ubuf: &mut BytesMut,
        framing: Framing,
        head: &mut Vec<u8>,
        total: Option<Deadline>,
    ) -> io::Result<()> {
        let mut remaining = match framing {
            Framing::Empty => 0,
            Framing::Length(n) => n,
            Framing::Chunked | Framing::Close => u64::MAX,
        };
        let mut chunked = ChunkedEnd::default();
        let mut first = true;
        loop {
            // Forward what is buffered, up to the end of the body.
            let take = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(ubuf.len());
            let take = if framing == Framing::Chunked {
                chunked
                    .feed(&ubuf[..take])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            } else {
                take
            };
            let end = match framing {
                Framing::Empty => true,
                Framing::Length(_) => remaining == take as u64,
                Framing::Chunked => chunked.done(),
                Framing::Close => false,
            };
            if first {
                head.extend_from_slice(&ubuf[..take]);
                self.write_agent(head).await?;
                first = false;
            } else if take > 0 {
                self.write_agent(&ubuf[..take]).await?;
            }
            ubuf.advance(take);
            if framing != Framing::Chunked && framing != Framing::Close {
                remaining -= take as u64;
            }
            if end {
                return Ok(());
            }
            if ubuf.capacity() - ubuf.len() < READ_CHUNK / 2 {
                ubuf.reserve(READ_CHUNK);
            }
            let read = up.read_buf(ubuf);
            let n = match total {
                Some(at) => self
                    .timer
                    .within(at, read)
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "total timeout"))??,
                None => read.await?,
            };
            if n == 0 {
                return if framing == Framing::Close {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed inside the response body",
                    ))
                };
            }
        }
    }

    async fn write_agent(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.agent.write_all(bytes).await?;
        self.agent.flush().await
    }

    /// Records a refusal or failure and answers it with the usual JSON
    /// error. The connection stays open only when the request had no body
    /// left unread and the agent did not ask to close.
    async fn refuse(
        &mut self,
        log: RequestLog,
        name: Option<String>,
        err: &GatewayError,
        framed: Framed,
    ) -> Step {
        let resp = forward::refuse(self.shared, log, name, err).await;
        self.buf.advance(framed.len);
        let keep = !framed.close && framed.body_len == 0;
        match self.write_response(resp, !keep, framed.head).await {
            Ok(()) if keep => Step::KeepAlive,
            Ok(()) => Step::Close,
            Err(_) => Step::Drop,
        }
    }

    /// Writes a small, complete response (a gateway error); its body is
    /// left out for a HEAD request (the length still says what it is).
    async fn write_response(
        &mut self,
        resp: Response<Body>,
        close: bool,
        head_request: bool,
    ) -> io::Result<()> {
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut out = Vec::with_capacity(256 + body.len());
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(parts.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_request {
            out.extend_from_slice(&body);
        }
        self.write_agent(&out).await
    }
}

/// The shortest timeout a phase of an exchange has (the lead of the
/// tunnel's [`PhaseTimer`]).
fn shortest_timeout(config: &crate::GatewayConfig) -> std::time::Duration {
    let phases = config.header_read_timeout.min(config.response_timeout);
    config.total_timeout.map_or(phases, |t| t.min(phases))
}

/// A pooled upstream connection, or a new one, dialled within the
/// request's total deadline when there is one (each connect and handshake
/// has its own timeout too).
async fn upstream(
    shared: &Shared,
    dest: &Destination,
    total: Option<Deadline>,
    now: Instant,
) -> Result<Taken, DialError> {
    if let Some((conn, buf)) = shared
        .fast_h1
        .take(dest, shared.config.pool_idle_timeout, now)
    {
        return Ok(Taken {
            conn,
            buf,
            dialed: false,
        });
    }
    let dial = shared.connector.connect_http1_only(dest);
    let up = match total {
        Some(at) => tokio::time::timeout_at(at, dial).await.map_err(|_| {
            DialError::Failed(GatewayError::new(
                ErrorCode::UpstreamTimeout,
                format!(
                    "connecting to upstream {} took longer than the total timeout",
                    dest.authority()
                ),
            ))
        })??,
        None => dial.await?,
    };
    Ok(Taken {
        conn: Box::new(up),
        buf: BytesMut::new(),
        dialed: true,
    })
}

/// An upstream connection for an exchange.
struct Taken {
    conn: Upstream,
    /// Its read buffer (empty).
    buf: BytesMut,
    /// New, not from the pool (the dial took time).
    dialed: bool,
}

/// Reads one response head from the upstream.
async fn read_response_head(
    up: &mut Upstream,
    ubuf: &mut BytesMut,
    head_request: bool,
    timer: &mut PhaseTimer,
    deadline: Deadline,
) -> Result<ResponseHead, GatewayError> {
    loop {
        if !ubuf.is_empty() {
            match parse_response(ubuf, head_request) {
                Ok(Some(head)) => return Ok(head),
                Ok(None) if ubuf.len() >= MAX_RESPONSE_HEAD => {
                    return Err(bad_upstream("response head too large".into()))
                }
                Ok(None) => {}
                Err(e) => return Err(bad_upstream(e)),
            }
        }
        ubuf.reserve(READ_CHUNK);
        match timer.within(deadline, up.read_buf(ubuf)).await {
            Ok(Ok(0)) => {
                return Err(bad_upstream(
                    "the upstream closed the connection before answering".into(),
                ))
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(bad_upstream(format!("reading the response failed: {e}"))),
            Err(_) => {
                return Err(GatewayError::new(
                    ErrorCode::UpstreamTimeout,
                    "the upstream did not answer in time",
                ))
            }
        }
    }
}

fn bad_upstream(detail: String) -> GatewayError {
    GatewayError::new(
        ErrorCode::UpstreamUnreachable,
        format!("upstream failed: {detail}"),
    )
}

#[cfg(test)]
#[path = "fast_h1_props.rs"]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn request(raw: &str) -> Result<Head, NotHere> {
        parse_request(raw.as_bytes(), 0)
    }

    fn served(raw: &str) -> Head {
        match request(raw) {
            Ok(h) => h,
            Err(NotHere::Partial) => panic!("partial: {raw:?}"),
            Err(NotHere::HandOff) => panic!("handed off: {raw:?}"),
            Err(NotHere::Malformed) => panic!("malformed: {raw:?}"),
        }
    }

    fn handed_off(raw: &str) -> bool {
        matches!(request(raw), Err(NotHere::HandOff))
    }

    #[test]
    fn plain_requests_are_served_with_their_framing() {
        let h = served(
            "GET /v1/x?a=1 HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer ph\r\n\r\nNEXT",
        );
        assert_eq!(h.req.method(), Method::GET);
        assert_eq!(h.req.uri().path(), "/v1/x");
        assert_eq!(h.req.uri().query(), Some("a=1"));
        assert_eq!(h.req.headers()["authorization"], "Bearer ph");
        assert_eq!(
            h.framed.len,
            "GET /v1/x?a=1 HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer ph\r\n\r\n".len()
        );
        assert_eq!(h.framed.body_len, 0);
        assert!(!h.framed.close);
        let p = served("POST / HTTP/1.1\r\nContent-Length: 12\r\nConnection: close\r\n\r\n");
        assert_eq!(p.framed.body_len, 12);
        assert!(p.framed.close);
        let te = served("GET / HTTP/1.1\r\nTE: trailers\r\nConnection: keep-alive\r\n\r\n");
        assert!(!te.framed.close);
        assert!(matches!(
            request("GET / HTTP/1.1\r\nHost: a"),
            Err(NotHere::Partial)
        ));
    }

    #[test]
    fn unusual_or_ambiguous_requests_go_to_hyper() {
        for raw in [
            // Framing keygate does not parse itself, or that is ambiguous.
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            // Protocol switches and hop-by-hop tricks.
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: x-secret\r\n\r\n",
            "GET / HTTP/1.1\r\nTE: gzip\r\n\r\n",
            // Versions, targets, methods.
            "GET / HTTP/1.0\r\n\r\n",
            "GET https://api.test/ HTTP/1.1\r\n\r\n",
            "GET * HTTP/1.1\r\n\r\n",
            "CONNECT api.test:443 HTTP/1.1\r\n\r\n",
            "TRACE / HTTP/1.1\r\n\r\n",
            "get / HTTP/1.1\r\n\r\n",
            "PROPFIND / HTTP/1.1\r\n\r\n",
            // HTTP/2 with prior knowledge.
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            // Leading empty lines (hyper skips them).
            "\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        ] {
            assert!(handed_off(raw), "{raw:?}");
        }
        // Too many headers: hyper answers 431.
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert!(handed_off(&format!("GET / HTTP/1.1\r\n{many}\r\n")));
    }

    #[test]
    fn complete_malformed_heads_are_refused_here() {
        // Each would get hyper's bare 400; here they get keygate's error.
        for raw in [
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            "GET /\0 HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nX: \0\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
            "G\u{b1}T / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.7\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "NOT A REQUEST\r\n\r\n",
            ": no name\r\n\r\n",
        ] {
            assert!(matches!(request(raw), Err(NotHere::Malformed)), "{raw:?}");
        }
        assert_eq!(malformed_method(b"\r\nPOST /x\0 HTTP/1.1\r\n"), "POST");
        assert_eq!(malformed_method(b"G\xb1T / HTTP/1.1\r\n"), "-");
        assert_eq!(malformed_method(b"TRACE / HTTP/1.1\r\n"), "-");
        assert_eq!(malformed_method(b""), "-");
    }

    #[test]
    fn an_incomplete_head_is_checked_line_by_line() {
        // Fed in pieces, the way a slow agent sends it: the complete lines
        // are checked once each, and a malformed one is seen at once.
        let head = b"\r\nGET /v1/x HTTP/1.1\r\nHost: api.test\r\nX-A: 1\r\n";
        let mut checked = 0;
        for end in 1..=head.len() {
            let upto = lines_well_formed(&head[..end], checked)
                .unwrap_or_else(|| panic!("{:?}", String::from_utf8_lossy(&head[..end])));
            assert!(upto >= checked && upto <= end);
            if head[end - 1] == b'\n' && end > 2 {
                assert_eq!(upto, end, "every complete line is checked");
            }
            checked = upto;
        }
        for (good, bad) in [
            ("", "NOT A REQUEST\r\n"),
            ("", "GET / HTTP/1.1\r\nBad Header: x\r\n"),
            ("GET / HTTP/1.1\r\n", "no colon\r\n"),
            ("GET / HTTP/1.1\r\nX: 1\r\n", "X: \0\r\nY"),
            ("GET / HTTP/1.1\r\nX: 1\r\n", " folded\r\n"),
        ] {
            let checked = lines_well_formed(good.as_bytes(), 0).expect(good);
            assert_eq!(checked, good.len());
            let whole = format!("{good}{bad}");
            assert_eq!(
                lines_well_formed(whole.as_bytes(), checked),
                None,
                "{whole:?}"
            );
        }
        // A line not yet complete is not judged.
        assert_eq!(lines_well_formed(b"GET / HTTP/1.1\r\nno col", 0), Some(16));
        // Nor is the first line of an HTTP/2 preface.
        assert_eq!(lines_well_formed(b"PRI * HTTP/2.0\r\n", 0), Some(16));
        // Many headers arriving together are not malformed (hyper answers
        // 431 for too many, once the head is whole).
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\n{many}");
        assert_eq!(lines_well_formed(head.as_bytes(), 0), Some(head.len()));
        assert_eq!(lines_well_formed(head.as_bytes(), 16), Some(head.len()));
    }

    fn response(raw: &str, head_request: bool) -> Result<ResponseHead, String> {
        parse_response(raw.as_bytes(), head_request).map(|r| r.expect("complete"))
    }

    fn out(r: &ResponseHead) -> String {
        String::from_utf8(r.out.clone()).unwrap()
    }

    #[test]
    fn response_framing_and_hop_by_hop_headers() {
        let r = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-Keep: 2\r\n\r\n", false).unwrap();
        assert_eq!(r.framing, Framing::Length(5));
        assert!(!r.upstream_closes);
        assert_eq!(
            out(&r),
            "HTTP/1.1 200 OK\r\nX-Keep: 2\r\ncontent-length: 5\r\n\r\n"
        );
        // The framing is written by keygate, once: `Connection` naming it
        // does not drop it, repeats are one header, and a transfer-coding
        // list becomes `chunked` (as hyper's path sends it).
        for (raw, want) in [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: content-length\r\n\r\n",
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: transfer-encoding\r\n\r\n",
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 05\r\n\r\n",
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            ),
        ] {
            assert_eq!(out(&response(raw, false).unwrap()), want, "{raw:?}");
        }
        let gzip = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(gzip.framing, Framing::Chunked);
        let c = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(c.framing, Framing::Chunked);
        assert!(c.upstream_closes);
        assert_eq!(
            out(&c),
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let eof = response("HTTP/1.1 200 OK\r\nX: 1\r\n\r\n", false).unwrap();
        assert_eq!(eof.framing, Framing::Close);
        assert!(out(&eof).ends_with("connection: close\r\n\r\n"));
        for (status, head) in [
            ("204 No Content", false),
            ("304 Not Modified", false),
            ("200 OK", true),
            ("103 Early Hints", false),
        ] {
            let r = response(
                &format!("HTTP/1.1 {status}\r\nContent-Length: 10\r\n\r\n"),
                head,
            )
            .unwrap();
            assert_eq!(r.framing, Framing::Empty, "{status}");
            // HEAD and 304 say what the body would be; 1xx and 204 never
            // carry a length.
            let says = out(&r).contains("content-length: 10\r\n");
            assert_eq!(says, status.starts_with("304") || head, "{status}");
            // Lengths that frame nothing are not checked (hyper relays
            // these); a bad one is dropped.
            let r = response(
                &format!(
                    "HTTP/1.1 {status}\r\nContent-Length: 5\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
                ),
                head,
            )
            .unwrap();
            assert_eq!(r.framing, Framing::Empty, "{status}");
            assert!(
                !out(&r).to_ascii_lowercase().contains("content-length"),
                "{status}"
            );
            assert!(
                !out(&r).to_ascii_lowercase().contains("transfer-encoding"),
                "{status}"
            );
        }
        let old = response("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false).unwrap();
        assert!(old.upstream_closes);
        assert!(out(&old).starts_with("HTTP/1.1 200 OK\r\n"));
    }

    #[test]
    fn ambiguous_or_malformed_responses_are_refused() {
        for raw in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Header: 1\r\n\r\n",
            "XTTP/1.1 200 OK\r\n\r\n",
        ] {
            assert!(parse_response(raw.as_bytes(), false).is_err(), "{raw:?}");
        }
        // Repeated identical lengths are one length.
        let same = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(same.framing, Framing::Length(3));
    }

    /// Feeds `body` split at every point into two pieces, and byte by byte.
    fn chunked_end(body: &[u8]) -> Result<usize, &'static str> {
        let mut whole = ChunkedEnd::default();
        let n = whole.feed(body)?;
        assert_eq!(whole.done(), n < body.len() || whole.done());
        for split in 0..body.len() {
            let mut c = ChunkedEnd::default();
            let a = c.feed(&body[..split])?;
            let total = if c.done() {
                a
            } else {
                a + c.feed(&body[split..])?
            };
            assert_eq!(total, n, "split at {split}");
        }
        let mut bytewise = ChunkedEnd::default();
        let mut total = 0;
        for b in body {
            if bytewise.done() {
                break;
            }
            total += bytewise.feed(std::slice::from_ref(b))?;
        }
        assert_eq!(total, n);
        assert!(whole.done());
        Ok(n)
    }

    #[test]
    fn chunked_bodies_end_where_they_end_however_they_arrive() {
        let body = b"5\r\nhello\r\na;ext=1\r\n0123456789\r\n0\r\n\r\nNEXT";
        assert_eq!(chunked_end(body), Ok(body.len() - 4));
        let trailers = b"3\r\nabc\r\n0\r\nx-checksum: 1\r\nx-more: 2\r\n\r\n";
        assert_eq!(chunked_end(trailers), Ok(trailers.len()));
        let mut open = ChunkedEnd::default();
        assert_eq!(open.feed(b"5\r\nhel"), Ok(6));
        assert!(!open.done());
        for bad in [
            &b"x\r\n"[..],
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"5\r\nhello\n",
            b"\r\n",
            b"10000000000000000\r\n",
            b"0\r\nx: 1\n\r\n",
        ] {
            let mut c = ChunkedEnd::default();
            assert!(c.feed(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_upstream_head_names_the_checked_destination_and_keeps_headers() {
        let dest = Destination {
            host: "api.test".into(),
            port: 443,
        };
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer real"));
        headers.insert("content-length", HeaderValue::from_static("2"));
        let head = upstream_head(&dest, &Method::POST, "/v1/x", Some("q=1"), &headers);
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "POST /v1/x?q=1 HTTP/1.1\r\nhost: api.test\r\nauthorization: Bearer real\r\ncontent-length: 2\r\n\r\n"
        );
        let v6 = Destination {
            host: "::1".into(),
            port: 8443,
        };
        let head = upstream_head(&v6, &Method::GET, "/", None, &HeaderMap::new());
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET / HTTP/1.1\r\nhost: [::1]:8443\r\n\r\n"
        );
        for (host, port, want) in [
            ("::1", 443, "[::1]"),
            ("api.test", 8443, "api.test:8443"),
            ("api.test", 1, "api.test:1"),
        ] {
            let dest = Destination {
                host: host.into(),
                port,
            };
            let head = upstream_head(&dest, &Method::GET, "/", None, &HeaderMap::new());
            assert_eq!(
                String::from_utf8(head).unwrap(),
                format!("GET / HTTP/1.1\r\nhost: {want}\r\n\r\n")
            );
        }
        assert!(request_line_safe("/v1/a%20b~c"));
        assert!(request_line_safe("/caf\u{e9}"));
        for bad in ["", "v1", "/a b", "/a\r\nx: y", "/a\tb", "/a\u{7f}", "/a\0"] {
            assert!(!request_line_safe(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_end_of_a_head_is_found_across_reads() {
        let crlf = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
        assert_eq!(head_end(crlf, 0), Some(crlf.len() - 4));
        let lf = b"GET / HTTP/1.1\nHost: a\n\nbody";
        assert_eq!(head_end(lf, 0), Some(lf.len() - 4));
        assert_eq!(head_end(b"\n\r\n", 0), Some(3));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        assert_eq!(head_end(b"\r\n\r", 0), None);
        assert_eq!(head_end(b"", 0), None);
        assert_eq!(head_end(b"", 5), None);
        // Two heads: the first one's end.
        let two = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        assert_eq!(head_end(two, 0), Some(19));
        // What read_head does: after each read it looks from where the
        // previous look stopped, and finds the same end as a whole look.
        for head in [&crlf[..], &lf[..]] {
            let whole = head_end(head, 0);
            for split in 1..head.len() {
                let found = head_end(&head[..split], 0).or_else(|| head_end(head, split));
                assert_eq!(found, whole, "split at {split}");
            }
        }
    }

    #[tokio::test]
    async fn rewind_replays_the_prefix_then_reads_the_stream() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut r = Rewind {
            prefix: Bytes::from_static(b"hello"),
            inner: b,
        };
        let mut all = String::new();
        r.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }
}
