//! End-to-end protocol tests with the real binary: SSE streams pass through
//! immediately, large bodies stream in constant memory, HTTP/2 and HTTP/1.1
//! mix freely across the two legs, WebSocket upgrades get credentials and
//! pipe bytes, and SIGTERM lets in-flight streams finish.

mod common;

use std::time::{Duration, Instant};

use common::{BIN, SECRET};
use test_support::http::{self, Request};
use test_support::http_body_util::BodyExt;
use test_support::hyper;
use test_support::{
    agent_tls, empty_body, AgentBody, AgentConn, AgentProto, Alpn, Keygate, RepeatBody,
    StreamUpstream,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Three upstreams (both protocols, HTTP/1.1 only, HTTP/2 only), a keygate
/// dialling them, a secret for `*.test` and an agent granted it.
struct World {
    _both: StreamUpstream,
    _h1: StreamUpstream,
    h2: StreamUpstream,
    kg: Keygate,
    token: String,
    ca: String,
}

async fn world_with(extra: &[&str], data_dir: Option<&std::path::Path>) -> World {
    let both = StreamUpstream::start(&["stream.test"], Alpn::Both).await;
    let h1 = StreamUpstream::start(&["h1.test"], Alpn::Http1Only).await;
    let h2 = StreamUpstream::start(&["h2.test"], Alpn::Http2Only).await;
    let mut args: Vec<String> = vec!["--allow-net".into(), "127.0.0.0/8".into()];
    for (name, up) in [("stream.test", &both), ("h1.test", &h1), ("h2.test", &h2)] {
        args.push("--upstream-ca".into());
        args.push(up.ca_file.display().to_string());
        args.push("--resolve".into());
        args.push(format!("{name}:443={}", up.tls_addr));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let bin = std::path::Path::new(BIN);
    let kg = match data_dir {
        Some(d) => Keygate::start_with_data_dir(bin, d, &args),
        None => Keygate::start(bin, &args),
    };
    kg.cli_ok(
        &["secret", "add", "up", "--host", "*.test"],
        Some(format!("{SECRET}\n").as_bytes()),
    );
    let token = kg
        .cli_ok(&["agent", "create", "bot", "--grant", "up"], None)
        .trim()
        .to_string();
    let ca = kg.ca_pem();
    World {
        _both: both,
        _h1: h1,
        h2,
        kg,
        token,
        ca,
    }
}

async fn world() -> World {
    world_with(&[], None).await
}

impl World {
    async fn conn(&self, host: &str, proto: AgentProto) -> AgentConn {
        AgentConn::open(
            self.kg.proxy,
            &format!("{host}:443"),
            &self.token,
            host,
            &self.ca,
            proto,
        )
        .await
        .expect("tunnel")
    }

    /// A raw TLS tunnel to stream.test offering only HTTP/1.1 (the
    /// fast path's kind of connection), for writing heads by hand.
    async fn h1_tunnel(&self) -> impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {
        agent_tls(
            self.kg.proxy,
            "stream.test:443",
            &self.token,
            "stream.test",
            &self.ca,
            &[b"http/1.1"],
        )
        .await
        .expect("tunnel")
    }
}

/// A request with the placeholder credential, in the form `proto` needs.
fn request(
    proto: AgentProto,
    method: &str,
    host: &str,
    path: &str,
    body: AgentBody,
) -> Request<AgentBody> {
    let b = Request::builder()
        .method(method)
        .header("authorization", "Bearer placeholder");
    let b = match proto {
        AgentProto::Http1 => b.uri(path).header("host", host),
        AgentProto::Http2 => b
            .uri(format!("https://{host}{path}"))
            .version(http::Version::HTTP_2),
    };
    b.body(body).expect("request")
}

/// `GET /json` on `conn`; asserts 200 and returns the upstream's
/// description of what it received.
async fn get_json(conn: &mut AgentConn, proto: AgentProto, host: &str) -> serde_json::Value {
    let resp = conn
        .send(request(proto, "GET", host, "/json", empty_body()))
        .await
        .expect("GET /json");
    assert_eq!(resp.status(), 200);
    body_json(resp).await
}

/// Writes each message to an echoing peer and reads it back; returns the
/// bytes sent (equal to the bytes received).
async fn echo_each<S>(io: &mut S, msgs: &[&[u8]]) -> u64
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut piped = 0u64;
    for msg in msgs {
        piped += msg.len() as u64;
        io.write_all(msg).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut back))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(&back, msg);
    }
    piped
}

/// The audit record for `path`, after giving the writer time to commit.
async fn audit_record(kg: &Keygate, path: &str) -> serde_json::Value {
    tokio::time::sleep(Duration::from_millis(400)).await;
    let audit: Vec<serde_json::Value> = kg
        .cli_ok(&["audit", "--json", "--limit", "100"], None)
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit JSON"))
        .collect();
    audit
        .iter()
        .find(|r| r["path"] == path)
        .cloned()
        .unwrap_or_else(|| panic!("no audit record for {path}: {audit:?}"))
}

async fn body_json(resp: http::Response<hyper::body::Incoming>) -> serde_json::Value {
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        panic!("not JSON: {}", String::from_utf8_lossy(&bytes));
    })
}

fn seen_header(v: &serde_json::Value, name: &str) -> Vec<String> {
    v["headers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|h| h[0] == name)
                .filter_map(|h| h[1].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn vm_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")).map(str::to_string))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_events_reach_the_agent_while_the_upstream_holds_the_stream() {
    let w = world().await;
    for proto in [AgentProto::Http1, AgentProto::Http2] {
        let mut conn = w.conn("stream.test", proto).await;
        let started = Instant::now();
        let req = request(
            proto,
            "GET",
            "stream.test",
            "/sse?events=2&interval_ms=300&hold_ms=20000",
            empty_body(),
        );
        let resp = conn.send(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let mut body = resp.into_body();
        let mut got = String::new();
        let mut first_at = None;
        while !got.contains("\"n\":1") {
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .unwrap_or_else(|_| panic!("{proto:?}: no event within 5 s (got {got:?})"))
                .expect("stream ended early")
                .expect("frame");
            if let Some(d) = frame.data_ref() {
                got.push_str(&String::from_utf8_lossy(d));
                first_at.get_or_insert_with(|| started.elapsed());
            }
        }
        let first_at = first_at.expect("first event");
        // The upstream holds the stream open for 20 s after its events: they
        // must have arrived one by one, long before it ends.
        assert!(got.starts_with("data: {\"n\":0}\n\n"), "{got:?}");
        assert!(
            first_at < Duration::from_secs(2),
            "{proto:?}: first event after {first_at:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

/// 1 GiB each way by default (about 10 s in a debug build);
/// `KEYGATE_TEST_LARGE_MIB` changes the size.
#[tokio::test(flavor = "multi_thread")]
async fn large_bodies_stream_both_ways_in_constant_memory() {
    let mib: u64 = std::env::var("KEYGATE_TEST_LARGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let len = mib * 1024 * 1024;
    let w = world().await;
    let pid = w.kg.pid();
    let mut conn = w.conn("stream.test", AgentProto::Http1).await;
    // Warm up (leaf, pool), then take the baseline.
    let resp = conn
        .send(request(
            AgentProto::Http1,
            "GET",
            "stream.test",
            "/",
            empty_body(),
        ))
        .await
        .expect("warm-up");
    body_json(resp).await;
    let before = vm_kib(pid, "VmHWM");

    let started = Instant::now();
    let resp = conn
        .send(request(
            AgentProto::Http1,
            "GET",
            "stream.test",
            &format!("/bytes?n={len}"),
            empty_body(),
        ))
        .await
        .expect("download");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut received: u64 = 0;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.expect("download frame").data_ref() {
            received += d.len() as u64;
        }
    }
    assert_eq!(received, len);
    let down = started.elapsed();

    let started = Instant::now();
    let resp = conn
        .send(request(
            AgentProto::Http1,
            "POST",
            "stream.test",
            "/sink",
            RepeatBody::new(len).boxed(),
        ))
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200);
    let v = body_json(resp).await;
    assert_eq!(v["received"].as_u64(), Some(len), "{v}");
    assert_eq!(
        seen_header(&v, "authorization"),
        vec![format!("Bearer {SECRET}")]
    );
    let up = started.elapsed();

    let growth_mib = vm_kib(pid, "VmHWM").saturating_sub(before) / 1024;
    eprintln!("{mib} MiB down in {down:?}, up in {up:?}; keygate peak RSS grew {growth_mib} MiB");
    assert!(
        growth_mib < 32.min(mib / 4),
        "keygate peak RSS grew {growth_mib} MiB for a {mib} MiB body"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trailers_cross_both_http2_legs_in_both_directions() {
    // gRPC's shape: a request body with trailers, a response whose status
    // is in its trailers. Both upstreams speak HTTP/2 to keygate.
    let w = world_with(&[], None).await;
    for host in ["stream.test", "h2.test"] {
        let mut conn = w.conn(host, AgentProto::Http2).await;
        let mut sent = http::HeaderMap::new();
        sent.insert("x-checksum", http::HeaderValue::from_static("abc123"));
        let body = test_support::http_body_util::Full::new(
            test_support::bytes::Bytes::from_static(b"hello"),
        )
        .map_err(|never| match never {})
        .with_trailers(async move { Some(Ok(sent)) })
        .boxed();
        let mut req = request(AgentProto::Http2, "POST", host, "/trailers", body);
        req.headers_mut()
            .insert("te", http::HeaderValue::from_static("trailers"));
        let resp = conn.send(req).await.expect("an answer");
        assert_eq!(resp.status(), 200, "{host}");
        let got = resp.into_body().collect().await.expect("whole body");
        let trailers = got.trailers().cloned().expect("response trailers");
        assert_eq!(trailers["grpc-status"], "0", "{host}");
        assert_eq!(
            trailers.get("x-echo-x-checksum").map(|v| v.as_bytes()),
            Some(&b"abc123"[..]),
            "{host}: the request's trailers reach the upstream"
        );
        assert_eq!(&got.to_bytes()[..], b"hello", "{host}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_closing_its_http2_connection_after_each_request_loses_none() {
    // `goaway=1`: the upstream sends GOAWAY after each response, as servers
    // do after so many requests on a connection; keygate dials a new one.
    let w = world_with(&[], None).await;
    for proto in [AgentProto::Http2, AgentProto::Http1] {
        let mut conn = w.conn("h2.test", proto).await;
        for i in 0..8 {
            let req = request(proto, "GET", "h2.test", "/json?goaway=1", empty_body());
            let resp = conn.send(req).await.expect("an answer");
            assert_eq!(resp.status(), 200, "{proto:?}, request {i}");
            let seen = body_json(resp).await;
            assert_eq!(
                seen_header(&seen, "authorization"),
                vec![format!("Bearer {SECRET}")]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_and_http1_mix_across_the_two_legs_with_injection() {
    let w = world().await;
    // (agent protocol, upstream host, protocol the upstream must see)
    for (proto, host, upstream_version) in [
        (AgentProto::Http2, "h1.test", "HTTP/1.1"),
        (AgentProto::Http1, "h2.test", "HTTP/2.0"),
        (AgentProto::Http2, "h2.test", "HTTP/2.0"),
        (AgentProto::Http2, "stream.test", "HTTP/2.0"),
    ] {
        let mut conn = w.conn(host, proto).await;
        for _ in 0..3 {
            let resp = conn
                .send(request(
                    proto,
                    "POST",
                    host,
                    "/v1/chat?x=1",
                    RepeatBody::new(1000).boxed(),
                ))
                .await
                .unwrap_or_else(|e| panic!("{proto:?} -> {host}: {e}"));
            assert_eq!(resp.status(), 200, "{proto:?} -> {host}");
            let v = body_json(resp).await;
            assert_eq!(v["version"], upstream_version, "{proto:?} -> {host}: {v}");
            assert_eq!(v["target"], "/v1/chat?x=1");
            assert_eq!(
                seen_header(&v, "authorization"),
                vec![format!("Bearer {SECRET}")],
                "{proto:?} -> {host}"
            );
            assert!(seen_header(&v, "proxy-authorization").is_empty());
        }
    }
}

/// Reads an HTTP/1.1 response head from a raw stream.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("head in time")
            .expect("read");
        assert_eq!(
            n,
            1,
            "connection closed after {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrade_gets_the_credential_and_pipes_bytes_both_ways() {
    // On a fresh tunnel, and after a request keygate's HTTP/1.1 path
    // served on the same tunnel (the upgrade is then handed to hyper's
    // HTTP/1.1-only server).
    for get_first in [false, true] {
        websocket_upgrade(get_first).await;
    }
}

async fn websocket_upgrade(get_first: bool) {
    let w = world_with(&["--upgrade-idle-timeout", "2"], None).await;
    let mut tls = w.h1_tunnel().await;
    if get_first {
        tls.write_all(
            b"GET /json HTTP/1.1\r\nHost: stream.test\r\nAuthorization: Bearer placeholder\r\n\r\n",
        )
        .await
        .expect("write GET");
        let head = read_head(&mut tls).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .expect("content-length");
        let mut body = vec![0u8; len];
        tls.read_exact(&mut body).await.expect("GET body");
    }
    tls.write_all(
        b"GET /ws?room=1 HTTP/1.1\r\nHost: stream.test\r\nConnection: Upgrade\r\n\
          Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Authorization: Bearer placeholder\r\n\r\n",
    )
    .await
    .expect("write handshake");
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    // The upstream saw the real credential in the handshake, not the
    // placeholder, and no proxy credentials.
    assert!(head.contains(&format!("Bearer {SECRET}")), "{head}");
    assert!(!lower.contains("placeholder"), "{head}");
    assert!(!lower.contains("proxy-authorization"), "{head}");

    let piped = echo_each(
        &mut tls,
        &[b"hello", &[0x81, 0x05, b'w', b'o', b'r', b'l', b'd']],
    )
    .await;
    // Idle for longer than --upgrade-idle-timeout: keygate closes the pipe.
    let mut rest = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut rest))
        .await
        .expect("idle upgraded connection closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);

    let ws = audit_record(&w.kg, "/ws").await;
    assert_eq!(ws["status"], 101);
    assert_eq!(ws["decision"], "injected");
    // The close record carries the bytes piped each way after the
    // handshake: what the agent sent, and the upstream's echo of it.
    assert_eq!(ws["bytes_up"], piped, "{ws}");
    assert_eq!(ws["bytes_down"], piped, "{ws}");
    assert!(!w.kg.logs().contains(SECRET));
}

/// HPACK "literal header field never indexed" with the static-table name
/// `authorization` (index 23): `0001 1111`, then 23 − 15 = 8 (RFC 7541
/// §6.2.3, §5.1, Appendix A).
const AUTHORIZATION_NEVER_INDEXED: [u8; 2] = [0x1f, 0x08];

#[tokio::test(flavor = "multi_thread")]
async fn injected_credentials_are_never_indexed_by_hpack_upstream() {
    let w = world().await;
    // An HTTP/1.1 agent: its own headers are not HPACK-encoded at all, so
    // everything in the upstream's header blocks is keygate's encoding.
    let mut conn = w.conn("h2.test", AgentProto::Http1).await;
    for _ in 0..3 {
        let seen = get_json(&mut conn, AgentProto::Http1, "h2.test").await;
        assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    }
    let blocks = w.h2.h2_header_blocks();
    assert_eq!(blocks.len(), 3, "one header block per request: {blocks:?}");
    // Had the secret been indexed, the second and third requests would
    // carry a one-byte reference to the dynamic table instead of the
    // literal: every request must carry the never-indexed literal.
    for (i, block) in blocks.iter().enumerate() {
        assert!(
            block
                .windows(AUTHORIZATION_NEVER_INDEXED.len())
                .any(|w| w == AUTHORIZATION_NEVER_INDEXED),
            "request {i}: authorization not sent as never-indexed: {block:02x?}"
        );
    }
}

/// An HTTP/2 extended CONNECT (RFC 8441) for `protocol` to `path`.
fn extended_connect(path: &str, protocol: &'static str) -> Request<AgentBody> {
    let mut req = Request::builder()
        .method("CONNECT")
        .uri(format!("https://stream.test{path}"))
        .version(http::Version::HTTP_2)
        .header("sec-websocket-version", "13")
        .header("authorization", "Bearer placeholder")
        .body(empty_body())
        .expect("request");
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static(protocol));
    req
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_over_http2_extended_connect_gets_the_credential_and_pipes_bytes() {
    let w = world_with(&["--upgrade-idle-timeout", "2"], None).await;
    let mut conn = w.conn("stream.test", AgentProto::Http2).await;
    // An ordinary request first: the client then has keygate's SETTINGS,
    // which must allow extended CONNECT.
    get_json(&mut conn, AgentProto::Http2, "stream.test").await;

    let resp = conn
        .send(extended_connect("/ws?room=2", "websocket"))
        .await
        .expect("extended CONNECT");
    assert_eq!(resp.status(), 200, "{resp:?}");
    // The upstream handshake (HTTP/1.1, made by keygate) carried the real
    // credential and a key keygate generated; its accept stays with keygate.
    let seen = resp
        .headers()
        .get("x-seen")
        .and_then(|v| v.to_str().ok())
        .expect("x-seen from the upstream")
        .to_string();
    assert!(seen.contains(&format!("Bearer {SECRET}")), "{seen}");
    assert!(!seen.contains("placeholder"), "{seen}");
    assert!(
        seen.to_ascii_lowercase().contains("sec-websocket-key"),
        "{seen}"
    );
    assert!(resp.headers().get("sec-websocket-accept").is_none());
    let upgraded = hyper::upgrade::on(resp).await.expect("h2 stream upgraded");
    let mut io = test_support::hyper_util::rt::TokioIo::new(upgraded);
    let piped = echo_each(&mut io, &[b"over h2", &[0x81, 0x02, b'h', b'i']]).await;
    // The same HTTP/2 connection still carries ordinary requests.
    get_json(&mut conn, AgentProto::Http2, "stream.test").await;
    // Idle past --upgrade-idle-timeout: keygate ends the stream.
    let mut rest = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), io.read(&mut rest))
        .await
        .expect("idle stream closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);

    let ws = audit_record(&w.kg, "/ws").await;
    assert_eq!(ws["method"], "CONNECT", "{ws}");
    assert_eq!(ws["status"], 200, "{ws}");
    assert_eq!(ws["decision"], "injected", "{ws}");
    assert_eq!(ws["bytes_up"], piped, "{ws}");
    assert_eq!(ws["bytes_down"], piped, "{ws}");
    assert!(!w.kg.logs().contains(SECRET));
}

#[tokio::test(flavor = "multi_thread")]
async fn other_connects_inside_a_tunnel_are_refused() {
    let w = world().await;
    let mut conn = w.conn("stream.test", AgentProto::Http2).await;
    get_json(&mut conn, AgentProto::Http2, "stream.test").await;
    // Extended CONNECT for something other than WebSocket.
    let resp = conn
        .send(extended_connect("/tunnel", "connect-udp"))
        .await
        .expect("answer");
    assert_eq!(resp.status(), 400);
    let body = body_json(resp).await;
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    // A plain CONNECT (no :protocol) inside the tunnel.
    let mut plain = Request::builder()
        .method("CONNECT")
        .uri("stream.test:443")
        .version(http::Version::HTTP_2)
        .body(empty_body())
        .expect("request");
    plain.headers_mut().insert(
        "authorization",
        http::HeaderValue::from_static("Bearer placeholder"),
    );
    let resp = conn.send(plain).await.expect("answer");
    assert_eq!(resp.status(), 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_open_stream_finish_then_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let w = world_with(&[], Some(&data)).await;
    let proxy = w.kg.proxy;
    let mut conn = w.conn("stream.test", AgentProto::Http1).await;
    let resp = conn
        .send(request(
            AgentProto::Http1,
            "GET",
            "stream.test",
            "/sse?events=4&interval_ms=400",
            empty_body(),
        ))
        .await
        .expect("response");
    let mut body = resp.into_body();
    let first = body.frame().await.expect("frame").expect("frame");
    assert!(first.data_ref().is_some());

    let World { kg, .. } = w;
    let stopping = tokio::task::spawn_blocking(move || kg.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No new connections once shutdown started.
    assert!(
        tokio::net::TcpStream::connect(proxy).await.is_err(),
        "keygate still accepts connections during shutdown"
    );
    // The stream that was in flight completes.
    let mut got = String::new();
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.expect("frame").data_ref() {
            got.push_str(&String::from_utf8_lossy(d));
        }
    }
    assert!(got.contains("\"n\":3"), "stream cut short: {got:?}");
    let status = stopping.await.expect("join");
    assert!(status.success(), "exit status {status}");

    // The audit record of the drained stream was flushed.
    let kg = Keygate::start_with_data_dir(std::path::Path::new(BIN), &data, &[]);
    let audit = kg.cli_ok(&["audit", "--json", "--limit", "100"], None);
    assert!(audit.contains("\"/sse\""), "{audit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_an_idle_keep_alive_tunnel_at_once() {
    let w = world_with(&["--shutdown-grace", "30"], None).await;
    let mut tls = w.h1_tunnel().await;
    // One exchange on the HTTP/1.1 fast path; the tunnel then waits for
    // the next head.
    tls.write_all(b"GET /bytes?n=5 HTTP/1.1\r\nHost: stream.test\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = [0u8; 5];
    tls.read_exact(&mut body).await.expect("body");
    assert_eq!(&body, b"xxxxx");

    let World { kg, .. } = w;
    let started = std::time::Instant::now();
    let stopping = tokio::task::spawn_blocking(move || kg.stop());
    // Closed at once, not after the 30 s grace.
    closed_within(
        &mut tls,
        Duration::from_secs(5),
        "an idle tunnel at shutdown",
    )
    .await;
    let status = stopping.await.expect("join");
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "shutdown waited {:?} for an idle tunnel",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_oversized_request_heads_are_dropped() {
    let w = world_with(&["--header-read-timeout", "1"], None).await;
    // Slowloris on the proxy listener: a CONNECT head that never ends.
    let mut slow = tokio::net::TcpStream::connect(w.kg.proxy)
        .await
        .expect("connect");
    slow.write_all(b"CONNECT stream.test:443 HTTP/1.1\r\nHost: stream.test\r\n")
        .await
        .expect("write");
    closed_within(&mut slow, Duration::from_secs(5), "a slow request head").await;

    // The same inside a tunnel.
    let mut tls = w.h1_tunnel().await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: stream.test\r\n")
        .await
        .expect("write");
    closed_within(
        &mut tls,
        Duration::from_secs(5),
        "a slow request head in a tunnel",
    )
    .await;

    // A request head larger than the limit is refused, not buffered.
    let mut tls = w.h1_tunnel().await;
    let big = "a".repeat(200 * 1024);
    let head = format!("GET / HTTP/1.1\r\nHost: stream.test\r\nx-big: {big}\r\n\r\n");
    let _ = tls.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    // keygate still serves afterwards.
    let mut conn = w.conn("stream.test", AgentProto::Http1).await;
    let resp = conn
        .send(request(
            AgentProto::Http1,
            "GET",
            "stream.test",
            "/",
            empty_body(),
        ))
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
}

/// Reads (and discards) until the peer closes; panics if it is still open
/// after `within`.
async fn closed_within<S>(stream: &mut S, within: Duration, what: &str)
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{what}: still open after {within:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_and_idle_agents_are_dropped() {
    let w = world_with(
        &["--header-read-timeout", "1", "--tls-handshake-timeout", "1"],
        None,
    )
    .await;
    // A tunnel whose client never starts TLS.
    let mut silent = test_support::connect_raw(
        w.kg.proxy,
        "stream.test:443",
        Some(&test_support::basic_auth(&w.token)),
    )
    .await
    .expect("CONNECT");
    closed_within(&mut silent, Duration::from_secs(5), "a tunnel without TLS").await;

    // A keep-alive connection left idle after a request.
    let mut conn = w.conn("stream.test", AgentProto::Http1).await;
    get_json(&mut conn, AgentProto::Http1, "stream.test").await;
    let AgentConn::Http1(sender) = &conn else {
        unreachable!()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sender.is_closed() {
        assert!(
            Instant::now() < deadline,
            "an idle keep-alive connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An upstream that accepts TCP and then never speaks: `--resolve`
/// `silent.test:443` to it.
async fn silent_upstream() -> String {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    format!("silent.test:443={silent_addr}")
}

#[tokio::test(flavor = "multi_thread")]
async fn total_timeout_bounds_the_upstream_dial_too() {
    // Connecting (TLS to an upstream that never speaks) would take up to
    // the 5 s connect timeout; the whole request may take only 1 s.
    let resolve = silent_upstream().await;
    let w = world_with(
        &[
            "--connect-timeout",
            "5",
            "--total-timeout",
            "1",
            "--resolve",
            &resolve,
        ],
        None,
    )
    .await;
    for proto in [AgentProto::Http1, AgentProto::Http2] {
        let label = format!("{proto:?}, --total-timeout");
        let window = Duration::from_millis(900)..Duration::from_millis(1900);
        assert_504_after(&w, proto, "silent.test", "/json", &label, window).await;
    }
}

/// Sends one GET on a fresh tunnel and asserts that keygate answers it with
/// 504 `upstream_timeout` at a time inside `window`.
async fn assert_504_after(
    w: &World,
    proto: AgentProto,
    host: &str,
    path: &str,
    what: &str,
    window: std::ops::Range<Duration>,
) {
    let mut conn = w.conn(host, proto).await;
    let started = Instant::now();
    let resp = conn
        .send(request(proto, "GET", host, path, empty_body()))
        .await
        .expect("an answer");
    let took = started.elapsed();
    assert_eq!(resp.status(), 504, "{what}");
    let body = body_json(resp).await;
    assert_eq!(body["error"]["code"], "upstream_timeout", "{what}: {body}");
    assert!(window.contains(&took), "{what}: answered after {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_and_slow_upstreams_answer_504() {
    let resolve = silent_upstream().await;
    let w = world_with(
        &[
            "--connect-timeout",
            "1",
            "--response-timeout",
            "2",
            "--resolve",
            &resolve,
        ],
        None,
    )
    .await;
    // (host, path, which timeout answers, in whole seconds)
    for (host, path, what, secs) in [
        (
            "silent.test",
            "/json",
            "--connect-timeout (upstream TLS)",
            1,
        ),
        (
            "stream.test",
            "/json?delay_ms=5000",
            "--response-timeout",
            2,
        ),
    ] {
        let expected = Duration::from_secs(secs);
        let window = expected - Duration::from_millis(100)..expected + Duration::from_millis(900);
        assert_504_after(&w, AgentProto::Http1, host, path, what, window).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn total_timeout_cuts_a_long_stream_off_with_an_error() {
    let w = world_with(&["--total-timeout", "2"], None).await;
    for proto in [AgentProto::Http1, AgentProto::Http2] {
        let mut conn = w.conn("stream.test", proto).await;
        let started = Instant::now();
        // Ten events 500 ms apart: 5 s, more than the 2 s allowed.
        let req = request(
            proto,
            "GET",
            "stream.test",
            "/sse?events=10&interval_ms=500",
            empty_body(),
        );
        let resp = conn.send(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut got = String::new();
        let ended = loop {
            match tokio::time::timeout(Duration::from_secs(8), body.frame()).await {
                Err(_) => panic!("{proto:?}: the stream outlived --total-timeout"),
                Ok(None) => break Ok(()),
                Ok(Some(Err(e))) => break Err(e),
                Ok(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        got.push_str(&String::from_utf8_lossy(d));
                    }
                }
            }
        };
        let took = started.elapsed();
        // Events streamed until the limit, then the body failed: it did not
        // end as if complete.
        assert!(got.contains("\"n\":0"), "{proto:?}: {got:?}");
        assert!(!got.contains("\"n\":9"), "{proto:?}: {got:?}");
        assert!(ended.is_err(), "{proto:?}: the body ended cleanly: {got:?}");
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
            "{proto:?}: cut off after {took:?}"
        );
    }
    // Short requests are unaffected.
    let mut conn = w.conn("stream.test", AgentProto::Http1).await;
    get_json(&mut conn, AgentProto::Http1, "stream.test").await;
}
