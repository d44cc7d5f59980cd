//! `paced-load`: an open-loop HTTP/1.1 load generator whose requests leave
//! evenly spaced, for bench/'s half-load scenario (`bench/README.md`).
//!
//! ```text
//! paced-load --url https://HOST/PATH --rate R --seconds S --connections C
//!            --cacert FILE [--proxy ADDR:PORT [--proxy-auth VALUE]]
//!            [--connect-to ADDR:PORT] [-H "Name: value"]…
//! ```
//!
//! Why not oha's `-q`: oha releases request *i* when a tokio timer for
//! `start + i / R` fires, and tokio's timers fire on 1 ms ticks, so at
//! 9,000 req/s the requests leave in bursts of ~9 every millisecond and its
//! p99 measures how fast a burst drains. Here a thread of its own sleeps
//! (`nanosleep`, not the runtime's timer wheel) until each request's time
//! and hands it to the runtime, which sends it on the first free one of C
//! keep-alive connections (through the proxy's CONNECT tunnel, or straight
//! to `--connect-to`). Latency runs from the request's *scheduled* time to
//! the last byte of its response, so a request that waits for a free
//! connection, or for this program, is charged for the wait (no coordinated
//! omission). `lag_p99_us` is how late requests were handed to a connection.
//!
//! Prints one JSON object: requests, ok, non_2xx, errors, rps (completed
//! per second of the run), p50_us, p99_us, p999_us, max_us, lag_p99_us.
//! Exits 2 on bad arguments or when no connection can be opened.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

fn die(msg: String) -> ! {
    eprintln!("paced-load: {msg}");
    std::process::exit(2)
}

const USAGE: &str = "usage: paced-load --url https://HOST/PATH --rate R --seconds S \
--connections C --cacert FILE [--proxy ADDR:PORT [--proxy-auth VALUE]] \
[--connect-to ADDR:PORT] [-H H]...";

/// The command line.
struct Opts {
    host: String,
    port: u16,
    path: String,
    rate: f64,
    seconds: f64,
    connections: usize,
    cacert: String,
    proxy: Option<SocketAddr>,
    /// The `Proxy-Authorization` value for the CONNECT.
    proxy_auth: Option<String>,
    connect_to: Option<SocketAddr>,
    headers: Vec<(String, String)>,
}

fn split_header(h: &str) -> (String, String) {
    match h.split_once(':') {
        Some((n, v)) if !n.trim().is_empty() => (n.trim().to_string(), v.trim().to_string()),
        _ => die(format!("bad header {h:?} (want \"Name: value\")")),
    }
}

fn parse_opts(args: &[String]) -> Opts {
    let mut url = None;
    let mut o = Opts {
        host: String::new(),
        port: 443,
        path: String::new(),
        rate: 0.0,
        seconds: 0.0,
        connections: 1,
        cacert: String::new(),
        proxy: None,
        proxy_auth: None,
        connect_to: None,
        headers: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let Some(v) = it.next() else {
            die(format!("{flag} needs a value\n{USAGE}"))
        };
        let number = |what: &str| -> f64 {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x > 0.0)
                .unwrap_or_else(|| die(format!("{what} must be a positive number, not {v:?}")))
        };
        let addr = || -> SocketAddr {
            v.parse()
                .unwrap_or_else(|_| die(format!("{flag}: bad address {v:?}")))
        };
        match flag.as_str() {
            "--url" => url = Some(v.clone()),
            "--rate" => o.rate = number("--rate"),
            "--seconds" => o.seconds = number("--seconds"),
            "--connections" => o.connections = number("--connections") as usize,
            "--cacert" => o.cacert = v.clone(),
            "--proxy" => o.proxy = Some(addr()),
            "--proxy-auth" => o.proxy_auth = Some(v.clone()),
            "--connect-to" => o.connect_to = Some(addr()),
            "-H" => o.headers.push(split_header(v)),
            _ => die(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    let url = url.unwrap_or_else(|| die(USAGE.into()));
    let uri: http::Uri = url
        .parse()
        .unwrap_or_else(|_| die(format!("bad URL {url:?}")));
    if uri.scheme_str() != Some("https") {
        die(format!("{url}: only https:// URLs"));
    }
    o.host = uri.host().unwrap_or_default().to_string();
    o.port = uri.port_u16().unwrap_or(443);
    o.path = uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    if o.rate == 0.0 || o.seconds == 0.0 || o.cacert.is_empty() || o.connections == 0 {
        die(USAGE.into());
    }
    if o.proxy.is_none() && o.connect_to.is_none() {
        die("give --proxy or --connect-to (the host is not resolved)".into());
    }
    o
}

struct Dialer {
    opts: Opts,
    tls: TlsConnector,
    name: ServerName<'static>,
}

impl Dialer {
    /// One keep-alive HTTP/1.1 connection to the destination, through the
    /// proxy's CONNECT tunnel when there is one.
    async fn connect(&self) -> Result<SendRequest<Empty<Bytes>>, String> {
        let o = &self.opts;
        let tcp = match (o.proxy, o.connect_to) {
            (Some(proxy), _) => {
                let authority = format!("{}:{}", o.host, o.port);
                test_support::connect_raw(proxy, &authority, o.proxy_auth.as_deref())
                    .await
                    .map_err(|e| format!("CONNECT refused: {} {}", e.status, e.head))?
            }
            (None, Some(addr)) => TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?,
            (None, None) => return Err("give --proxy or --connect-to".into()),
        };
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let tls = self
            .tls
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn request(&self) -> http::Request<Empty<Bytes>> {
        let o = &self.opts;
        let mut b = http::Request::get(o.path.as_str()).header(
            http::header::HOST,
            if o.port == 443 {
                o.host.clone()
            } else {
                format!("{}:{}", o.host, o.port)
            },
        );
        for (n, v) in &o.headers {
            b = b.header(n.as_str(), v.as_str());
        }
        b.body(Empty::new())
            .unwrap_or_else(|e| die(format!("bad request header: {e}")))
    }
}

/// What became of one request.
enum Outcome {
    /// Status and latency from the scheduled time, in µs.
    Answered(u16, u64),
    Failed(String),
}

fn tls_connector(cacert: &str) -> TlsConnector {
    let pem = std::fs::read(cacert).unwrap_or_else(|e| die(format!("{cacert}: {e}")));
    let roots =
        test_support::roots_from_pem(&pem).unwrap_or_else(|e| die(format!("{cacert}: {e}")));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| die(format!("TLS: {e}")))
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn run(dialer: Arc<Dialer>) -> serde_json::Value {
    let o = &dialer.opts;
    let (idle_tx, mut idle_rx) = mpsc::channel(o.connections);
    for _ in 0..o.connections {
        match dialer.connect().await {
            Ok(s) => idle_tx.send(s).await.expect("receiver held"),
            Err(e) => die(e),
        }
    }
    let live = Arc::new(AtomicUsize::new(o.connections));
    let total = (o.rate * o.seconds).round() as u64;
    let (sched_tx, mut sched_rx) = mpsc::unbounded_channel::<Instant>();
    let start = Instant::now() + Duration::from_millis(5);
    let interval_ns = 1e9 / o.rate;
    std::thread::Builder::new()
        .name("pacer".into())
        .spawn(move || {
            for i in 0..total {
                let at = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                if sched_tx.send(at).is_err() {
                    return;
                }
            }
        })
        .unwrap_or_else(|e| die(format!("cannot start the pacer: {e}")));

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Outcome>();
    let mut lags = Vec::with_capacity(total as usize);
    let mut sent = 0u64;
    while let Some(at) = sched_rx.recv().await {
        if live.load(Ordering::Relaxed) == 0 {
            die("every connection failed".into());
        }
        let mut sender = match tokio::time::timeout(Duration::from_secs(10), idle_rx.recv()).await {
            Ok(Some(s)) => s,
            // idle_tx is held here, so the channel stays open.
            Ok(None) => die("connection queue closed".into()),
            Err(_) => die("no connection came free for 10 s".into()),
        };
        lags.push(u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX));
        sent += 1;
        let req = dialer.request();
        let (dialer, idle_tx, done_tx, live) = (
            dialer.clone(),
            idle_tx.clone(),
            done_tx.clone(),
            live.clone(),
        );
        tokio::spawn(async move {
            let outcome = match sender.send_request(req).await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match resp.into_body().collect().await {
                        Ok(_) => Outcome::Answered(
                            status,
                            u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX),
                        ),
                        Err(e) => Outcome::Failed(format!("body: {e}")),
                    }
                }
                Err(e) => Outcome::Failed(e.to_string()),
            };
            if matches!(outcome, Outcome::Failed(_)) || sender.is_closed() {
                // Replace the connection; without one, there is one less.
                match dialer.connect().await {
                    Ok(s) => sender = s,
                    Err(e) => {
                        eprintln!("paced-load: reconnect failed: {e}");
                        live.fetch_sub(1, Ordering::Relaxed);
                        let _ = done_tx.send(outcome);
                        return;
                    }
                }
            }
            let _ = idle_tx.send(sender).await;
            let _ = done_tx.send(outcome);
        });
    }
    drop(done_tx);

    let mut latencies = Vec::with_capacity(sent as usize);
    let (mut ok, mut non_2xx, mut errors) = (0u64, 0u64, 0u64);
    let mut first_error = None;
    for _ in 0..sent {
        match tokio::time::timeout(Duration::from_secs(30), done_rx.recv()).await {
            Ok(Some(Outcome::Answered(status, us))) => {
                latencies.push(us);
                if (200..300).contains(&status) {
                    ok += 1;
                } else {
                    non_2xx += 1;
                }
            }
            Ok(Some(Outcome::Failed(e))) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
            Ok(None) => break,
            Err(_) => {
                errors += sent - ok - non_2xx - errors;
                first_error.get_or_insert("no answer within 30 s".into());
                break;
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    lags.sort_unstable();
    serde_json::json!({
        "requests": sent,
        "ok": ok,
        "non_2xx": non_2xx,
        "errors": errors,
        "first_error": first_error,
        "rate": o.rate,
        "connections": o.connections,
        "wall_s": wall,
        "rps": (ok + non_2xx) as f64 / wall,
        "p50_us": percentile(&latencies, 0.50),
        "p99_us": percentile(&latencies, 0.99),
        "p999_us": percentile(&latencies, 0.999),
        "max_us": latencies.last().copied().unwrap_or(0),
        "lag_p99_us": percentile(&lags, 0.99),
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let opts = parse_opts(&args);
    let name = ServerName::try_from(opts.host.clone())
        .unwrap_or_else(|e| die(format!("{}: {e}", opts.host)));
    let dialer = Arc::new(Dialer {
        tls: tls_connector(&opts.cacert),
        name,
        opts,
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(format!("runtime: {e}")));
    let report = rt.block_on(run(dialer));
    println!("{report}");
}
