//! Hostile input against the real binary: random bytes and mutated
//! requests on the proxy port, mutated HTTP/1.1 heads inside TLS tunnels
//! (sent in random pieces), broken HTTP/2 frames inside TLS tunnels, and
//! mutated responses from an upstream. keygate must never panic, never
//! hold a connection the agent closed, and keep serving; SIGTERM still
//! exits 0.
//!
//! The inputs come from a seeded generator: `KEYGATE_FUZZ_SEED=N` replays
//! a run (the seed is printed), `KEYGATE_FUZZ_CASES=N` sets the count.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{basic_auth, Keygate, SECRET};
use test_support::http;
use test_support::http_body_util::BodyExt;
use test_support::{empty_body, AgentConn, AgentProto, Reply, ScriptedUpstream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Pieces that make parsers take unusual branches.
const TOKENS: [&[u8]; 22] = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\0",
    b" ",
    b"\t",
    b":",
    b"\r\n\r\n",
    b"chunked",
    b"Content-Length: ",
    b"Transfer-Encoding: chunked\r\n",
    b"-1",
    b"99999999999999999999",
    b"ffffffffffffffff\r\n",
    b"\xff\xfe",
    b"/../",
    b"%2e%2e/",
    b"?x=1#f",
    b"Host: other.test\r\n",
    b"Connection: close\r\n",
    b"HTTP/1.0",
    b"HTTP/2.0",
];

/// `seed` changed in 1 to 6 places: a byte replaced, a token or random
/// bytes inserted, a span deleted or repeated.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(6) {
        let i = rng.below(b.len() + 1);
        match rng.below(5) {
            0 if i < b.len() => b[i] = rng.next() as u8,
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                b.splice(i..i, t.iter().copied());
            }
            2 => {
                let end = (i + 1 + rng.below(10)).min(b.len());
                b.drain(i.min(end)..end);
            }
            3 => {
                let j = rng.below(b.len() + 1);
                let span = b[i.min(j)..i.max(j)].to_vec();
                b.splice(i..i, span.into_iter().take(200));
            }
            _ => {
                let n = 1 + rng.below(20);
                let r = rng.bytes(n);
                b.splice(i..i, r);
            }
        }
    }
    b
}

/// Writes `bytes` in random pieces, then reads until the other side
/// closes or is quiet for a while. Errors (resets, TLS alerts) are fine.
/// Returns whether an HTTP/1.1 answer came back.
async fn send_and_drain<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    bytes: &[u8],
    rng: &mut Rng,
) -> bool {
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = 1 + rng.below(rest.len());
        if io.write_all(&rest[..n]).await.is_err() || io.flush().await.is_err() {
            return false;
        }
        rest = &rest[n..];
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), io.read(&mut buf)).await
    {
        if n == 0 {
            break;
        }
        if got.len() < 16 {
            got.extend_from_slice(&buf[..n]);
        }
    }
    got.starts_with(b"HTTP/1.1 ")
}

/// A TLS tunnel to `host:443` offering `alpn`; a refusal fails the test.
async fn tunnel(
    proxy: std::net::SocketAddr,
    host: &str,
    token: &str,
    ca: &str,
    alpn: &[u8],
) -> impl AsyncRead + AsyncWrite + Unpin {
    test_support::agent_tls(proxy, &format!("{host}:443"), token, host, ca, &[alpn])
        .await
        .unwrap_or_else(|e| {
            let alpn = String::from_utf8_lossy(alpn);
            panic!("a tunnel offering {alpn} was refused: {e}")
        })
}

/// What a case did.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Raw,
    Proxy,
    /// Heads in a tunnel, and an HTTP/1.1 answer came back.
    TunnelAnswered,
    /// Heads in a tunnel, no answer (a head still incomplete, say).
    Tunnel,
    /// Frames in an HTTP/2 tunnel.
    Http2,
    /// The proxy port did not accept the connection.
    Refused,
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_bytes_and_heads_never_crash_or_hold_keygate() {
    let w = common::world().await;
    w.add_openai();
    let token = w.agent("bot", &["openai"]);
    let ca = w.kg.ca_pem();
    let proxy = w.kg.proxy;
    let (seed, cases) = seed_and_cases();

    let auth = basic_auth(&token);
    let proxy_requests: Vec<Vec<u8>> = vec![
        format!("CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\nProxy-Authorization: {auth}\r\n\r\n").into_bytes(),
        format!("GET http://api.test/v1/x HTTP/1.1\r\nHost: api.test\r\nProxy-Authorization: {auth}\r\n\r\n").into_bytes(),
        format!("GET https://api.test/v1/x HTTP/1.1\r\nHost: api.test\r\nProxy-Authorization: {auth}\r\n\r\n").into_bytes(),
    ];
    let heads: Vec<&[u8]> = vec![
        b"GET /v1/x?a=1 HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer placeholder\r\n\r\n",
        b"POST /v1/y HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /v1/y HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET /v1/x HTTP/1.1\r\nHost: api.test\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
        b"HEAD /v1/x HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
        b"GET /v1/x HTTP/1.1\r\nHost: api.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ];
    let heads = Arc::new(heads);
    let proxy_requests = Arc::new(proxy_requests);
    let token = Arc::new(token);
    let ca = Arc::new(ca);

    let limit = Duration::from_secs(120);
    tokio::time::timeout(limit, async {
        let mut set = tokio::task::JoinSet::new();
        let gate = Arc::new(tokio::sync::Semaphore::new(32));
        for case in 0..cases {
            let mut rng = case_rng(seed, case);
            let permit = gate.clone().acquire_owned().await.expect("semaphore");
            let (heads, proxy_requests, token, ca) = (
                heads.clone(),
                proxy_requests.clone(),
                token.clone(),
                ca.clone(),
            );
            set.spawn(async move {
                let _permit = permit;
                match rng.below(5) {
                    // Random bytes on the proxy port.
                    0 => {
                        let Ok(mut tcp) = TcpStream::connect(proxy).await else {
                            return Kind::Refused;
                        };
                        let n = 1 + rng.below(3000);
                        let bytes = rng.bytes(n);
                        send_and_drain(&mut tcp, &bytes, &mut rng).await;
                        Kind::Raw
                    }
                    // A mutated proxy request.
                    1 => {
                        let Ok(mut tcp) = TcpStream::connect(proxy).await else {
                            return Kind::Refused;
                        };
                        let seed = &proxy_requests[rng.below(proxy_requests.len())];
                        let bytes = mutate(&mut rng, seed);
                        send_and_drain(&mut tcp, &bytes, &mut rng).await;
                        Kind::Proxy
                    }
                    // HTTP/2 in a TLS tunnel: the preface, then a mutated
                    // SETTINGS frame and HEADERS-like frames of random bytes.
                    2 => {
                        let mut tls = tunnel(proxy, "api.test", &token, &ca, b"h2").await;
                        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
                        bytes.extend(mutate(&mut rng, b"\0\0\0\x04\0\0\0\0\0"));
                        for _ in 0..1 + rng.below(3) {
                            let n = rng.below(300);
                            // length, type HEADERS or DATA or random, flags, stream 1
                            bytes.extend_from_slice(&(n as u32).to_be_bytes()[1..]);
                            bytes.push([0x1, 0x0, rng.next() as u8][rng.below(3)]);
                            bytes.push(rng.next() as u8);
                            bytes.extend_from_slice(&[0, 0, 0, 1]);
                            bytes.extend(rng.bytes(n));
                        }
                        send_and_drain(&mut tls, &bytes, &mut rng).await;
                        Kind::Http2
                    }
                    // Mutated heads inside a TLS tunnel (HTTP/1.1).
                    _ => {
                        let mut tls = tunnel(proxy, "api.test", &token, &ca, b"http/1.1").await;
                        let mut bytes = Vec::new();
                        for _ in 0..1 + rng.below(3) {
                            let seed = heads[rng.below(heads.len())];
                            if rng.below(5) == 0 {
                                bytes.extend_from_slice(seed);
                            } else {
                                bytes.extend(mutate(&mut rng, seed));
                            }
                        }
                        if send_and_drain(&mut tls, &bytes, &mut rng).await {
                            Kind::TunnelAnswered
                        } else {
                            Kind::Tunnel
                        }
                    }
                }
            });
        }
        let mut kinds = std::collections::BTreeMap::new();
        while let Some(r) = set.join_next().await {
            *kinds.entry(r.expect("a case task panicked")).or_insert(0) += 1;
        }
        println!("cases by kind: {kinds:?}");
        // Not vacuous: tunnels were opened and heads in them answered.
        assert!(
            kinds.get(&Kind::TunnelAnswered).copied().unwrap_or(0) > 0,
            "{kinds:?}"
        );
        assert_eq!(
            kinds.get(&Kind::Refused),
            None,
            "the proxy port refused connections"
        );
    })
    .await
    .expect("the hostile cases did not finish in time");

    assert_agents_released(proxy.port()).await;

    // Still serving, with the credential injected.
    let seen = w
        .client(&token)
        .get("https://api.test/v1/after")
        .header("authorization", "Bearer placeholder")
        .send()
        .await
        .expect("a request after the hostile input");
    assert_eq!(seen.status(), 200);
    let injected = format!("Bearer {SECRET}");
    assert!(
        w.up.seen().iter().any(|s| s.target == "/v1/after"
            && s.headers
                .iter()
                .any(|(k, v)| k == "authorization" && *v == injected)),
        "the request after the hostile input reached the upstream with the credential"
    );

    assert_clean_exit(w.kg);
}

/// Every connection the cases opened is closed now: keygate must let go of
/// its side too, promptly (not at the header-read timeout). Its side of a
/// connection the agent closed and it did not is CLOSE_WAIT (8).
async fn assert_agents_released(proxy_port: u16) {
    let held = || {
        test_support::tcp_sockets()
            .iter()
            .filter(|s| s.local_port == proxy_port && matches!(s.state, 1 | 8))
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while held() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(held(), 0, "keygate still holds closed agents' connections");
}

/// No panic in keygate's log, and SIGTERM ends it with status 0.
fn assert_clean_exit(kg: Keygate) {
    let logs = kg.logs();
    assert!(!logs.contains("panicked"), "keygate panicked:\n{logs}");
    let status = kg.stop();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
}

/// The seed (`KEYGATE_FUZZ_SEED`, else the clock) and the number of cases
/// (`KEYGATE_FUZZ_CASES`, else 400), printed so a failure can be replayed.
fn seed_and_cases() -> (u64, usize) {
    let var = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    let seed = var("KEYGATE_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    }) | 1;
    let cases = var("KEYGATE_FUZZ_CASES").map_or(400, |n| n as usize);
    println!("KEYGATE_FUZZ_SEED={seed} KEYGATE_FUZZ_CASES={cases}");
    (seed, cases)
}

/// The generator for one case of a run.
fn case_rng(seed: u64, case: usize) -> Rng {
    Rng(seed
        .wrapping_add(case as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        | 1)
}

/// Responses an upstream might send, to be mutated.
const RESPONSES: [&[u8]; 7] = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the close",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
];

#[tokio::test(flavor = "multi_thread")]
async fn hostile_upstream_responses_never_crash_or_hold_keygate() {
    // The upstream answers `/v1/fuzz/N` with case N's mutated response,
    // then closes. Agents ask over HTTP/1.1 (the fast path) or HTTP/2
    // (hyper's client to this HTTP/1.1-only upstream).
    let (seed, cases) = seed_and_cases();
    let up = ScriptedUpstream::start(
        &["h1.test"],
        Arc::new(move |target: &str| {
            let Some(case) = target
                .strip_prefix("/v1/fuzz/")
                .and_then(|n| n.parse::<usize>().ok())
            else {
                return Reply::ok("fine");
            };
            let mut rng = case_rng(seed, case);
            let response = RESPONSES[rng.below(RESPONSES.len())];
            let bytes = if rng.below(5) == 0 {
                response.to_vec()
            } else {
                mutate(&mut rng, response)
            };
            Reply::raw(bytes).then_close()
        }),
    )
    .await;
    let args = [
        "--allow-net".to_string(),
        "127.0.0.0/8".to_string(),
        "--upstream-ca".to_string(),
        up.ca_file.display().to_string(),
        "--resolve".to_string(),
        format!("h1.test:443={}", up.tls_addr),
    ];
    let kg = Keygate::start(std::path::Path::new(common::BIN), &args);
    kg.cli_ok(
        &[
            "secret", "add", "up", "--host", "h1.test", "--path", "/v1/*",
        ],
        Some(format!("{SECRET}\n").as_bytes()),
    );
    let token = kg
        .cli_ok(&["agent", "create", "bot", "--grant", "up"], None)
        .trim()
        .to_string();
    let (token, ca, proxy) = (Arc::new(token), Arc::new(kg.ca_pem()), kg.proxy);

    tokio::time::timeout(Duration::from_secs(120), async {
        let mut set = tokio::task::JoinSet::new();
        let gate = Arc::new(tokio::sync::Semaphore::new(32));
        for case in 0..cases {
            let permit = gate.clone().acquire_owned().await.expect("semaphore");
            let (token, ca) = (token.clone(), ca.clone());
            set.spawn(async move {
                let _permit = permit;
                let target = format!("/v1/fuzz/{case}");
                if case % 2 == 0 {
                    let mut tls = tunnel(proxy, "h1.test", &token, &ca, b"http/1.1").await;
                    let head = format!(
                        "GET {target} HTTP/1.1\r\nHost: h1.test\r\nAuthorization: Bearer placeholder\r\n\r\n"
                    );
                    let mut rng = case_rng(seed, case);
                    send_and_drain(&mut tls, head.as_bytes(), &mut rng).await
                } else {
                    let Ok(mut conn) = AgentConn::open(
                        proxy,
                        "h1.test:443",
                        &token,
                        "h1.test",
                        &ca,
                        AgentProto::Http2,
                    )
                    .await
                    else {
                        panic!("an h2 tunnel was refused")
                    };
                    let req = http::Request::get(format!("https://h1.test{target}"))
                        .header("authorization", "Bearer placeholder")
                        .body(empty_body())
                        .expect("request");
                    let answered = async {
                        let resp = conn.send(req).await.ok()?;
                        let _ = resp.into_body().collect().await;
                        Some(())
                    };
                    tokio::time::timeout(Duration::from_secs(2), answered)
                        .await
                        .ok()
                        .flatten()
                        .is_some()
                }
            });
        }
        let mut answered = 0;
        while let Some(r) = set.join_next().await {
            answered += usize::from(r.expect("a case task panicked"));
        }
        println!("answered: {answered} of {cases}");
        assert!(answered > 0, "no case was answered");
    })
    .await
    .expect("the hostile cases did not finish in time");

    assert_agents_released(proxy.port()).await;
    // Still serving, with the credential injected.
    let mut conn = AgentConn::open(
        proxy,
        "h1.test:443",
        &token,
        "h1.test",
        &ca,
        AgentProto::Http1,
    )
    .await
    .expect("tunnel");
    let req = http::Request::get("/v1/after")
        .header("host", "h1.test")
        .header("authorization", "Bearer placeholder")
        .body(empty_body())
        .expect("request");
    let resp = conn
        .send(req)
        .await
        .expect("a request after the hostile input");
    assert_eq!(resp.status(), 200);
    let last = up.last().expect("the upstream saw it");
    assert_eq!(last.target(), "/v1/after");
    assert_eq!(
        last.header("authorization"),
        Some(format!("Bearer {SECRET}"))
    );
    assert_clean_exit(kg);
}
