//! `tls-pipe LISTEN CERT KEY UPSTREAM_CA HOST ADDR [HEADER]`: the floor of a
//! TLS intercepting proxy, for bench/ (`--floor`).
//!
//! Accepts `CONNECT` (no authentication, any target), answers 200, accepts
//! TLS with CERT/KEY (offering the ALPN protocols the client offers, h2
//! first), dials ADDR with TLS for HOST (offering only the protocol the
//! client got, trusting UPSTREAM_CA), then copies bytes both ways until
//! either side closes. No HTTP parsing, no injection, no pooling, no audit:
//! two TLS legs and loopback TCP, which any proxy that reads and rewrites
//! HTTPS requests pays before doing anything else. One thread, like keygate
//! on a two-core machine.
//!
//! With HEADER (`"Name: value"`, bench's `--h1-model`) it is instead a model
//! of the cheapest HTTP/1.1 fast path a gateway could have: HTTP/1.1 only
//! on both legs, each request head parsed (httparse) and written again with
//! HEADER in place of the client's header of that name, bodies forwarded by
//! `Content-Length`, each response head parsed for its length and forwarded
//! as it came. A measuring instrument, not a proxy: no chunked bodies,
//! upgrades, 1xx answers, limits, authentication, matching or audit (it
//! closes the connection on anything it does not model).

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn die(msg: String) -> ! {
    eprintln!("tls-pipe: {msg}");
    std::process::exit(2)
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| die(format!("{path}: {e}")))
}

/// Reads up to the end of the CONNECT request head; false if the client
/// closed or sent more than 8 KiB without one.
async fn read_connect(tcp: &mut TcpStream) -> bool {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return head.starts_with(b"CONNECT ");
        }
        if head.len() > 8192 {
            return false;
        }
    }
}

/// The header the HTTP/1.1 model writes into every request.
struct Inject {
    name: String,
    line: Vec<u8>,
}

fn bad(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

/// `Content-Length` among `headers` (0 when absent); an error for a
/// `Transfer-Encoding`, which the model does not handle.
fn body_length(headers: &[httparse::Header<'_>]) -> std::io::Result<usize> {
    let mut len = 0;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad("Transfer-Encoding is not modelled"));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| bad("bad Content-Length"))?;
        }
    }
    Ok(len)
}

/// Parses a request head at the start of `buf`; returns its length, the
/// head rewritten with the injected header, and the body's length.
fn rewrite_request(
    buf: &[u8],
    inject: &Inject,
) -> std::io::Result<Option<(usize, Vec<u8>, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(n) = req.parse(buf).map_err(|e| bad(&e.to_string()))? else {
        return Ok(None);
    };
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Err(bad("incomplete request line"));
    };
    let body = body_length(req.headers)?;
    let mut out = Vec::with_capacity(n + inject.line.len());
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case(&inject.name) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&inject.line);
    out.extend_from_slice(b"\r\n");
    Ok(Some((n, out, body)))
}

/// Parses a response head at the start of `buf`: its length and the
/// body's (`Content-Length`; none for 204 and 304).
fn response_framing(buf: &[u8]) -> std::io::Result<Option<(usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(n) = resp.parse(buf).map_err(|e| bad(&e.to_string()))? else {
        return Ok(None);
    };
    match resp.code {
        Some(204 | 304) => Ok(Some((n, 0))),
        Some(c) if c >= 200 => Ok(Some((n, body_length(resp.headers)?))),
        _ => Err(bad("1xx answers are not modelled")),
    }
}

/// Reads from `from` into `buf` until `parse` finds a complete head; None
/// when `from` closes first.
async fn read_head<S, T>(
    from: &mut S,
    buf: &mut bytes::BytesMut,
    mut parse: impl FnMut(&[u8]) -> std::io::Result<Option<T>>,
) -> std::io::Result<Option<T>>
where
    S: tokio::io::AsyncRead + Unpin,
{
    loop {
        if !buf.is_empty() {
            if let Some(t) = parse(buf)? {
                return Ok(Some(t));
            }
        }
        if buf.len() > 64 * 1024 {
            return Err(bad("head over 64 KiB"));
        }
        if from.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Writes `first` and then `len` body bytes (those already in `buf`, then
/// from `from`) to `to`, in one write when the body is already buffered.
async fn forward<S, D>(
    first: &[u8],
    buf: &mut bytes::BytesMut,
    from: &mut S,
    to: &mut D,
    mut len: usize,
) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + Unpin,
    D: tokio::io::AsyncWrite + Unpin,
{
    use bytes::Buf;
    let have = len.min(buf.len());
    if first.is_empty() {
        to.write_all(&buf[..have]).await?;
    } else if have == 0 {
        to.write_all(first).await?;
    } else {
        let mut one = Vec::with_capacity(first.len() + have);
        one.extend_from_slice(first);
        one.extend_from_slice(&buf[..have]);
        to.write_all(&one).await?;
    }
    buf.advance(have);
    len -= have;
    while len > 0 {
        if from.read_buf(buf).await? == 0 {
            return Err(bad("body cut short"));
        }
        let n = len.min(buf.len());
        to.write_all(&buf[..n]).await?;
        buf.advance(n);
        len -= n;
    }
    to.flush().await
}

/// The HTTP/1.1 model's loop: one request, then its response, until the
/// agent closes.
async fn relay_http1<A, U>(agent: &mut A, up: &mut U, inject: &Inject) -> std::io::Result<()>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use bytes::Buf;
    let mut abuf = bytes::BytesMut::with_capacity(16 * 1024);
    let mut ubuf = bytes::BytesMut::with_capacity(16 * 1024);
    loop {
        let Some((n, head, body)) =
            read_head(agent, &mut abuf, |b| rewrite_request(b, inject)).await?
        else {
            return Ok(());
        };
        abuf.advance(n);
        forward(&head, &mut abuf, agent, up, body).await?;
        let Some((n, body)) = read_head(up, &mut ubuf, response_framing).await? else {
            return Err(bad("upstream closed before answering"));
        };
        // The head goes out as it came, with as much of the body as is here.
        let total = n + body;
        let have = total.min(ubuf.len());
        agent.write_all(&ubuf[..have]).await?;
        ubuf.advance(have);
        forward(&[], &mut ubuf, up, agent, total - have).await?;
    }
}

struct Pipe {
    /// Some: the HTTP/1.1 model (module docs).
    inject: Option<Inject>,
    acceptor: TlsAcceptor,
    /// One client config per ALPN protocol the upstream may be offered.
    connectors: Vec<(Vec<u8>, TlsConnector)>,
    host: ServerName<'static>,
    addr: SocketAddr,
}

impl Pipe {
    async fn serve(&self, mut tcp: TcpStream) -> std::io::Result<()> {
        tcp.set_nodelay(true)?;
        if !read_connect(&mut tcp).await {
            return Ok(());
        }
        tcp.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
        let mut agent = self.acceptor.accept(tcp).await?;
        let alpn = agent.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let connector = match &alpn {
            Some(p) => self.connectors.iter().find(|(q, _)| q == p),
            None => self.connectors.iter().find(|(q, _)| q.is_empty()),
        };
        let Some((_, connector)) = connector else {
            return Ok(());
        };
        let up = TcpStream::connect(self.addr).await?;
        up.set_nodelay(true)?;
        let mut up = connector.connect(self.host.clone(), up).await?;
        match &self.inject {
            Some(inject) => relay_http1(&mut agent, &mut up, inject).await?,
            None => {
                tokio::io::copy_bidirectional(&mut agent, &mut up).await?;
            }
        }
        Ok(())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (fixed, inject) = match args.len() {
        6 => (&args[..], None),
        7 => {
            let Some((name, value)) = args[6].split_once(':') else {
                die(format!("bad header {:?} (want \"Name: value\")", args[6]))
            };
            let name = name.trim().to_string();
            let line = format!("{name}: {}\r\n", value.trim()).into_bytes();
            (&args[..6], Some(Inject { name, line }))
        }
        _ => die("usage: tls-pipe LISTEN CERT KEY UPSTREAM_CA HOST ADDR [HEADER]".into()),
    };
    let [listen, cert, key, upstream_ca, host, addr] = fixed else {
        die("usage: tls-pipe LISTEN CERT KEY UPSTREAM_CA HOST ADDR [HEADER]".into())
    };
    let listen: SocketAddr = listen
        .parse()
        .unwrap_or_else(|_| die(format!("bad address {listen}")));
    let addr: SocketAddr = addr
        .parse()
        .unwrap_or_else(|_| die(format!("bad address {addr}")));
    let host = ServerName::try_from(host.clone()).unwrap_or_else(|e| die(format!("{host}: {e}")));

    // AES-128-GCM first on both legs, as keygate does (its tls.rs).
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|s| {
        use rustls::CipherSuite::*;
        !matches!(
            s.suite(),
            TLS13_AES_128_GCM_SHA256 | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        )
    });
    let provider = Arc::new(provider);
    let certs = rustls_pemfile::certs(&mut read(cert).as_slice())
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| die(format!("{cert}: {e}")));
    let key = rustls_pemfile::private_key(&mut read(key).as_slice())
        .ok()
        .flatten()
        .unwrap_or_else(|| die(format!("{key}: no private key")));
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| die(format!("TLS: {e}")))
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap_or_else(|e| die(format!("TLS: {e}")));
    server.alpn_protocols = if inject.is_some() {
        vec![b"http/1.1".to_vec()]
    } else {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    };
    server.ignore_client_order = true;

    let roots = test_support::roots_from_pem(&read(upstream_ca))
        .unwrap_or_else(|e| die(format!("{upstream_ca}: {e}")));
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| die(format!("TLS: {e}")))
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connectors = [&b"h2"[..], b"http/1.1", b""]
        .into_iter()
        .map(|p| {
            let mut c = client.clone();
            if !p.is_empty() {
                c.alpn_protocols = vec![p.to_vec()];
            }
            (p.to_vec(), TlsConnector::from(Arc::new(c)))
        })
        .collect();
    let pipe = Arc::new(Pipe {
        inject,
        acceptor: TlsAcceptor::from(Arc::new(server)),
        connectors,
        host,
        addr,
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(format!("runtime: {e}")));
    rt.block_on(async move {
        let listener = TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| die(format!("{listen}: {e}")));
        eprintln!("tls-pipe: listening on {listen}");
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let pipe = pipe.clone();
            tokio::spawn(async move {
                if let Err(e) = pipe.serve(tcp).await {
                    eprintln!("tls-pipe: {e}");
                }
            });
        }
    });
}
