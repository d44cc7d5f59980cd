//! A scripted HTTP/1.1 upstream and a raw HTTP/1.1 reader for tests that
//! need exact control over the bytes on the wire (framing, malformed or
//! ambiguous responses, streaming with a hand-off between test and server).
//!
//! [`ScriptedUpstream`] is a TLS server offering only `http/1.1` by ALPN.
//! Per connection it reads requests (body by `Content-Length` or chunked),
//! records each one (raw head, decoded body, connection number) and answers
//! with the [`Reply`] the test's script returns for the request target:
//! raw bytes written as given, optionally in several writes with pauses or
//! waits on a [`Notify`] in between, then the connection stays open or is
//! closed. A reply can also be sent as soon as the head has arrived, with
//! the body left unread (an early `413`).
//!
//! [`RawH1`] is the agent side: raw requests out, responses parsed with
//! their framing (interim 1xx heads, `Content-Length`, chunked with
//! trailers, HEAD/204/304 without a body, or to the close).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

/// Longest a single read may wait, on either side: keeps every test bounded.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One step of a [`Reply`].
#[derive(Clone)]
pub enum Act {
    /// Write these bytes (and flush: one TLS record, one TCP write).
    Send(Vec<u8>),
    /// Pause.
    Sleep(Duration),
    /// Wait until the test calls `notify_one` on this.
    Wait(Arc<Notify>),
}

/// How the upstream answers one request.
#[derive(Clone)]
pub struct Reply {
    pub acts: Vec<Act>,
    /// Close the connection (TLS close_notify, then TCP) after the acts.
    pub close_after: bool,
    /// Answer as soon as the head has arrived, without reading the body
    /// (an early `413`, say); then close (`close_after`) or hold the
    /// connection without reading anything more.
    pub before_body: bool,
}

impl Reply {
    /// These bytes in one write; the connection stays open.
    pub fn raw(bytes: impl Into<Vec<u8>>) -> Reply {
        Reply {
            acts: vec![Act::Send(bytes.into())],
            close_after: false,
            before_body: false,
        }
    }

    /// `200 OK` with a `Content-Length` body.
    pub fn ok(body: impl AsRef<[u8]>) -> Reply {
        let body = body.as_ref();
        let mut out = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        Reply::raw(out)
    }

    /// Nothing at all: the connection is closed without an answer.
    pub fn close_without_answer() -> Reply {
        Reply {
            acts: Vec::new(),
            close_after: true,
            before_body: false,
        }
    }

    /// Closes the connection after this reply.
    pub fn then_close(mut self) -> Reply {
        self.close_after = true;
        self
    }

    /// Answers once the head has arrived, leaving the body unread.
    pub fn before_body(mut self) -> Reply {
        self.before_body = true;
        self
    }

    pub fn then_send(mut self, bytes: impl Into<Vec<u8>>) -> Reply {
        self.acts.push(Act::Send(bytes.into()));
        self
    }

    pub fn then_sleep(mut self, d: Duration) -> Reply {
        self.acts.push(Act::Sleep(d));
        self
    }

    pub fn then_wait(mut self, n: Arc<Notify>) -> Reply {
        self.acts.push(Act::Wait(n));
        self
    }
}

/// Chooses the reply for a request target (path and query as received).
pub type Script = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// One request as the scripted upstream received it.
#[derive(Clone)]
pub struct Recorded {
    /// Number of the connection it arrived on (1 for the first accepted).
    pub conn: usize,
    /// The head exactly as received, up to and including the empty line.
    pub head: Vec<u8>,
    /// The body (chunked bodies decoded).
    pub body: Vec<u8>,
    /// The body came chunked.
    pub chunked: bool,
}

impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorded")
            .field("conn", &self.conn)
            .field("head", &self.head_str())
            .field("body_len", &self.body.len())
            .field("chunked", &self.chunked)
            .finish()
    }
}

impl Recorded {
    pub fn head_str(&self) -> String {
        String::from_utf8_lossy(&self.head).into_owned()
    }

    /// `METHOD target VERSION`.
    pub fn request_line(&self) -> String {
        self.head_str()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    }

    pub fn method(&self) -> String {
        self.part(0)
    }

    pub fn target(&self) -> String {
        self.part(1)
    }

    /// `HTTP/1.1` or `HTTP/1.0`.
    pub fn version(&self) -> String {
        self.part(2)
    }

    fn part(&self, i: usize) -> String {
        self.request_line()
            .split(' ')
            .nth(i)
            .unwrap_or_default()
            .to_string()
    }

    /// Header names (lower-case) and values, in order.
    pub fn headers(&self) -> Vec<(String, String)> {
        self.head_str()
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect()
    }

    /// Every value of header `name` (case-insensitive).
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers()
            .into_iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.header_all(name).into_iter().next()
    }
}

/// A running scripted upstream.
pub struct ScriptedUpstream {
    pub tls_addr: SocketAddr,
    pub ca_pem: String,
    /// The CA file (pass to `--upstream-ca`).
    pub ca_file: std::path::PathBuf,
    recorded: Arc<Mutex<Vec<Recorded>>>,
    connections: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl ScriptedUpstream {
    /// Starts an upstream on 127.0.0.1 whose certificate names `names`,
    /// answering every request with `script(target)`.
    pub async fn start(names: &[&str], script: Script) -> ScriptedUpstream {
        let (ca_pem, mut config) = crate::upstream::tls_config_for(names);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("scripted-upstream-ca.pem");
        std::fs::write(&ca_file, &ca_pem).expect("write CA");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let tls_addr = listener.local_addr().expect("addr");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let recorded: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let connections: Arc<AtomicUsize> = Arc::default();
        let (rec, count) = (recorded.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let conn = count.fetch_add(1, Ordering::SeqCst) + 1;
                let (acceptor, rec, script) = (acceptor.clone(), rec.clone(), script.clone());
                tokio::spawn(async move {
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(READ_TIMEOUT, acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    serve_scripted(tls, conn, rec, script).await;
                });
            }
        });
        ScriptedUpstream {
            tls_addr,
            ca_pem,
            ca_file,
            recorded,
            connections,
            _dir: dir,
        }
    }

    /// Every request received so far, in arrival order.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.recorded.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The most recent request.
    pub fn last(&self) -> Option<Recorded> {
        self.recorded().pop()
    }

    /// Requests whose target is `target`.
    pub fn with_target(&self, target: &str) -> Vec<Recorded> {
        self.recorded()
            .into_iter()
            .filter(|r| r.target() == target)
            .collect()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve_scripted<S>(
    mut io: S,
    conn: usize,
    recorded: Arc<Mutex<Vec<Recorded>>>,
    script: Script,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let Some((mut req, content_length)) = read_request_head(&mut io, &mut buf, conn).await
        else {
            return;
        };
        let target = req.target();
        let reply = script(&target);
        if !reply.before_body {
            let body = if req.chunked {
                read_chunked(&mut io, &mut buf).await.map(|(data, _)| data)
            } else {
                read_exact_body(&mut io, &mut buf, content_length).await
            };
            let Some(body) = body else {
                return;
            };
            req.body = body;
        }
        if let Ok(mut r) = recorded.lock() {
            r.push(req);
        }
        for act in reply.acts {
            match act {
                Act::Send(bytes) => {
                    if io.write_all(&bytes).await.is_err() || io.flush().await.is_err() {
                        return;
                    }
                }
                Act::Sleep(d) => tokio::time::sleep(d).await,
                Act::Wait(n) => {
                    if tokio::time::timeout(READ_TIMEOUT, n.notified())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        if reply.close_after {
            let _ = io.shutdown().await;
            return;
        }
        if reply.before_body {
            // The rest of the stream is an unread body: hold it, unread.
            tokio::time::sleep(READ_TIMEOUT).await;
            return;
        }
    }
}

/// Reads more bytes into `buf`; `None` on close, error or timeout.
async fn fill<S: AsyncRead + Unpin>(io: &mut S, buf: &mut Vec<u8>) -> Option<usize> {
    let mut chunk = [0u8; 16 * 1024];
    match tokio::time::timeout(READ_TIMEOUT, io.read(&mut chunk)).await {
        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => None,
        Ok(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(n)
        }
    }
}

/// Reads one request head; `None` when the connection ends first or the
/// head does not parse. Returns the request (body still empty) and its
/// `Content-Length` (0 when absent).
async fn read_request_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
    conn: usize,
) -> Option<(Recorded, usize)> {
    let (head_len, content_length, chunked) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let mut len = 0usize;
                let mut chunked = false;
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        len = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = h.value.to_ascii_lowercase().ends_with(b"chunked");
                    }
                }
                break (n, len, chunked);
            }
            Ok(httparse::Status::Partial) => {
                fill(io, buf).await?;
            }
            Err(_) => return None,
        }
    };
    let head: Vec<u8> = buf.drain(..head_len).collect();
    let req = Recorded {
        conn,
        head,
        body: Vec::new(),
        chunked,
    };
    Some((req, content_length))
}

/// Reads a body of `len` bytes from the start of `buf` (reading more as
/// needed), consuming it.
async fn read_exact_body<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
    len: usize,
) -> Option<Vec<u8>> {
    while buf.len() < len {
        fill(io, buf).await?;
    }
    Some(buf.drain(..len).collect())
}

/// Decodes a chunked body at the start of `buf` (reading more as needed),
/// consuming it: returns the data and the trailer lines.
async fn read_chunked<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
) -> Option<(Vec<u8>, Vec<(String, String)>)> {
    let mut data = Vec::new();
    loop {
        let line = read_line(io, buf).await?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).ok()?;
        if size == 0 {
            break;
        }
        while buf.len() < size + 2 {
            fill(io, buf).await?;
        }
        data.extend_from_slice(&buf[..size]);
        if &buf[size..size + 2] != b"\r\n" {
            return None;
        }
        buf.drain(..size + 2);
    }
    let mut trailers = Vec::new();
    loop {
        let line = read_line(io, buf).await?;
        if line.is_empty() {
            return Some((data, trailers));
        }
        let (n, v) = line.split_once(':')?;
        trailers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
}

/// One CRLF-terminated line from the start of `buf`, consumed.
async fn read_line<S: AsyncRead + Unpin>(io: &mut S, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..at]).into_owned();
            buf.drain(..at + 2);
            return Some(line);
        }
        fill(io, buf).await?;
    }
}

/// A response head as the agent received it.
#[derive(Debug, Clone)]
pub struct RawHead {
    pub status: u16,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    /// Lower-case names with their values, in order.
    pub headers: Vec<(String, String)>,
    /// The head exactly as received.
    pub raw: Vec<u8>,
}

impl RawHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn chunked(&self) -> bool {
        self.header_all("transfer-encoding")
            .last()
            .is_some_and(|v| v.to_ascii_lowercase().trim_end().ends_with("chunked"))
    }

    /// A `connection: close` token.
    pub fn closes(&self) -> bool {
        self.header_all("connection")
            .iter()
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

/// A whole response as the agent received it.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// 1xx heads before the final one.
    pub interim: Vec<RawHead>,
    pub head: RawHead,
    /// The body, chunked encoding removed.
    pub body: Vec<u8>,
    /// Trailer fields of a chunked body.
    pub trailers: Vec<(String, String)>,
    /// The body was delimited by the connection's close.
    pub to_close: bool,
}

impl RawResponse {
    pub fn status(&self) -> u16 {
        self.head.status
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The JSON error body of a keygate refusal (`error.code`).
    pub fn error_code(&self) -> Option<String> {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()?
            .pointer("/error/code")?
            .as_str()
            .map(str::to_string)
    }
}

/// Raw HTTP/1.1 over any stream: exact request bytes out, responses read
/// with their framing.
pub struct RawH1<S> {
    pub io: S,
    /// Bytes received and not yet consumed.
    pub buf: Vec<u8>,
}

impl<S> RawH1<S> {
    pub fn new(io: S) -> RawH1<S> {
        RawH1 {
            io,
            buf: Vec::new(),
        }
    }
}

impl<S: AsyncWrite + Unpin> RawH1<S> {
    /// Writes `bytes` in one write and flushes.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.io.write_all(bytes).await.map_err(|e| e.to_string())?;
        self.io.flush().await.map_err(|e| e.to_string())
    }
}

/// Reading needs only the read side (a split stream's read half will do).
impl<S: AsyncRead + Unpin> RawH1<S> {
    async fn more(&mut self) -> Result<(), String> {
        match fill(&mut self.io, &mut self.buf).await {
            Some(_) => Ok(()),
            None => Err(format!(
                "connection closed or silent with {} unparsed bytes: {:?}",
                self.buf.len(),
                String::from_utf8_lossy(&self.buf)
            )),
        }
    }

    /// Reads one response head (final or interim).
    pub async fn read_head(&mut self) -> Result<RawHead, String> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 128];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let head = RawHead {
                        status: resp.code.unwrap_or(0),
                        version: format!("HTTP/1.{}", resp.version.unwrap_or(1)),
                        headers: resp
                            .headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_ascii_lowercase(),
                                    String::from_utf8_lossy(h.value).into_owned(),
                                )
                            })
                            .collect(),
                        raw: self.buf[..n].to_vec(),
                    };
                    self.buf.drain(..n);
                    return Ok(head);
                }
                Ok(httparse::Status::Partial) => self.more().await?,
                Err(e) => {
                    return Err(format!(
                        "malformed response head ({e}): {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
            }
        }
    }

    /// Reads a whole response (interim heads, final head, body). HEAD
    /// requests' responses have no body: say so with `head_request`.
    pub async fn read_response(&mut self, head_request: bool) -> Result<RawResponse, String> {
        let mut interim = Vec::new();
        let head = loop {
            let head = self.read_head().await?;
            if (100..200).contains(&head.status) && head.status != 101 {
                interim.push(head);
            } else {
                break head;
            }
        };
        let (body, trailers, to_close) = self.read_body(&head, head_request).await?;
        Ok(RawResponse {
            interim,
            head,
            body,
            trailers,
            to_close,
        })
    }

    /// Reads the body that follows `head` by its framing: the data
    /// (chunked encoding removed), the trailers, and whether it ran to the
    /// connection's close.
    pub async fn read_body(
        &mut self,
        head: &RawHead,
        head_request: bool,
    ) -> Result<(Vec<u8>, Vec<(String, String)>, bool), String> {
        if head_request || head.status == 204 || head.status == 304 {
            return Ok((Vec::new(), Vec::new(), false));
        }
        if head.chunked() {
            let (data, trailers) =
                read_chunked(&mut self.io, &mut self.buf)
                    .await
                    .ok_or_else(|| {
                        format!(
                            "bad or truncated chunked body: {:?}",
                            String::from_utf8_lossy(&self.buf)
                        )
                    })?;
            return Ok((data, trailers, false));
        }
        if let Some(len) = head.header("content-length") {
            let len: usize = len
                .trim()
                .parse()
                .map_err(|_| format!("bad content-length {len:?}"))?;
            while self.buf.len() < len {
                self.more().await?;
            }
            return Ok((self.buf.drain(..len).collect(), Vec::new(), false));
        }
        self.read_to_close().await?;
        Ok((std::mem::take(&mut self.buf), Vec::new(), true))
    }

    /// Reads until `needle` is among the received, unconsumed bytes.
    pub async fn wait_for(&mut self, needle: &[u8]) -> Result<(), String> {
        while !self.buf.windows(needle.len()).any(|w| w == needle) {
            self.more().await?;
        }
        Ok(())
    }

    /// Reads until the peer closes (appending to `buf`); an error if it is
    /// still open after the read timeout.
    pub async fn read_to_close(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match tokio::time::timeout(READ_TIMEOUT, self.io.read(&mut chunk)).await {
                Err(_) => return Err("still open after the read timeout".into()),
                // A close without close_notify is a close too.
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The peer closes within `within` without sending anything more.
    pub async fn closed_within(&mut self, within: Duration) -> Result<(), String> {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(within, self.io.read(&mut chunk)).await {
            Err(_) => Err(format!("still open after {within:?}")),
            Ok(Ok(0)) | Ok(Err(_)) if self.buf.is_empty() => Ok(()),
            Ok(Ok(0)) | Ok(Err(_)) => Err(format!(
                "closed with unread bytes: {:?}",
                String::from_utf8_lossy(&self.buf)
            )),
            Ok(Ok(n)) => Err(format!(
                "got more bytes instead of a close: {:?}",
                String::from_utf8_lossy(&chunk[..n])
            )),
        }
    }
}
