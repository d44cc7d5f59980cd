//! `keygate serve`: data dir, master key, CA, admin token, store, audit
//! writer, then the proxy and admin listeners until SIGINT/SIGTERM.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use keygate_admin::AdminState;
use keygate_core::pattern::parse_authority;
use keygate_gateway::{EgressGuard, Gateway, GatewayConfig};
use keygate_store::Store;
use keygate_vault::{CertificateAuthority, Vault};
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use zeroize::Zeroizing;

use crate::busy_poll::BusyPoll;
use crate::cli::ServeArgs;
use crate::paths;

pub fn main(data_dir: Option<PathBuf>, args: ServeArgs) -> Result<ExitCode> {
    init_logging(&args.log_format);
    let workers = args
        .workers
        .map_or_else(|| default_workers(available_cores()), usize::from);
    if args.busy_poll_us > 0 && workers != 1 {
        bail!(
            "--busy-poll-us needs a single worker thread (--workers 1); {workers} were asked for"
        );
    }
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let busy_poll = (args.busy_poll_us > 0).then(|| {
        let window = Duration::from_micros(args.busy_poll_us.into());
        (BusyPoll::install(&mut builder), window)
    });
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Some((poll, window)) = busy_poll {
        runtime.spawn(poll.run(window));
    }
    runtime.block_on(serve(data_dir, args, workers))?;
    Ok(ExitCode::SUCCESS)
}

fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Worker threads when `--workers` is not given: one per core but one,
/// and at least one. keygate runs beside the agents it serves (and its
/// audit writer has a thread of its own), like a sidecar proxy; on two
/// cores one worker (a single-threaded runtime) cost 7–25 % less CPU per
/// request and ~18 µs less added latency at c=1 than two, at the same
/// throughput within ~3 % (bench/README.md, "Worker threads").
fn default_workers(cores: usize) -> usize {
    cores.saturating_sub(1).max(1)
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Parses `HOST:PORT=ADDR:PORT` (IPv6 in brackets on either side).
pub fn parse_resolve(s: &str) -> Result<((String, u16), SocketAddr)> {
    let (from, to) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("--resolve {s:?}: expected HOST:PORT=ADDR:PORT"))?;
    let (host, port) =
        parse_authority(from, 0).map_err(|e| anyhow!("--resolve {s:?}: {}", e.message()))?;
    if port == 0 {
        bail!("--resolve {s:?}: the host needs a port (HOST:PORT=ADDR:PORT)");
    }
    let addr: SocketAddr = to
        .parse()
        .map_err(|_| anyhow!("--resolve {s:?}: {to:?} is not ADDR:PORT"))?;
    Ok(((host, port), addr))
}

fn read_upstream_roots(files: &[PathBuf]) -> Result<Vec<CertificateDer<'static>>> {
    let mut roots = Vec::new();
    for file in files {
        let pem = std::fs::read(file)
            .with_context(|| format!("cannot read --upstream-ca {}", file.display()))?;
        let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<_, _>>()
            .with_context(|| format!("--upstream-ca {}: invalid PEM", file.display()))?;
        if certs.is_empty() {
            bail!("--upstream-ca {}: no certificate found", file.display());
        }
        roots.extend(certs);
    }
    Ok(roots)
}

fn load_or_create_admin_token(dir: &std::path::Path) -> Result<Zeroizing<String>> {
    let path = paths::admin_token(dir);
    if path.exists() {
        let bytes = keygate_vault::read_private_file(&path)?;
        let token = String::from_utf8(bytes.to_vec())
            .map_err(|_| anyhow!("{} is not valid UTF-8", path.display()))?;
        let token = Zeroizing::new(token.trim().to_string());
        if token.is_empty() {
            bail!("{} is empty", path.display());
        }
        return Ok(token);
    }
    let token = Zeroizing::new(keygate_vault::generate_admin_token());
    keygate_vault::write_private_file(&path, token.as_bytes())?;
    Ok(token)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn serve(data_dir: Option<PathBuf>, args: ServeArgs, workers: usize) -> Result<()> {
    let dir = paths::data_dir(data_dir)?;
    keygate_vault::ensure_private_dir(&dir)?;

    let env_key = std::env::var("KEYGATE_MASTER_KEY").ok().map(Zeroizing::new);
    let env_key_file = std::env::var_os("KEYGATE_MASTER_KEY_FILE").map(PathBuf::from);
    // The vault remembers where its key lives (`keygate key rotate` replaces
    // a key file, refuses KEYGATE_MASTER_KEY); Store::open settles a
    // rotation that was interrupted.
    let vault = Arc::new(Vault::load(
        &dir,
        env_key.as_ref().map(|k| k.as_str()),
        env_key_file.as_deref(),
    )?);
    drop(env_key);
    let ca = Arc::new(CertificateAuthority::load_or_create(&dir)?);
    let admin_token = load_or_create_admin_token(&dir)?;

    let mut overrides: HashMap<(String, u16), Vec<SocketAddr>> = HashMap::new();
    for r in &args.resolve {
        let (key, addr) = parse_resolve(r)?;
        overrides.entry(key).or_default().push(addr);
    }
    let allow = args
        .allow_net
        .iter()
        .map(|c| {
            c.parse::<ipnet::IpNet>()
                .or_else(|_| c.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| anyhow!("--allow-net {c:?} is not a CIDR"))
        })
        .collect::<Result<Vec<_>>>()?;
    let upstream_roots = read_upstream_roots(&args.upstream_ca)?;

    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| paths::default_database_url(&dir));
    let store = Store::open(&url, vault.clone()).await?;

    let proxy_listener = TcpListener::bind(&args.proxy_listen)
        .await
        .with_context(|| format!("cannot listen on {} (proxy)", args.proxy_listen))?;
    let admin_listener = TcpListener::bind(&args.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", args.admin_listen))?;
    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let (audit_tx, audit_rx) = mpsc::channel(8192);
    let writer = store.audit_writer(audit_rx).await?;
    let writer_task = tokio::spawn(writer.run());
    let poll_task = store.spawn_poll(Duration::from_secs(30));

    let guard = EgressGuard::new(allow, vec![proxy_addr, admin_addr], overrides);
    let config = GatewayConfig {
        upstream_roots,
        header_read_timeout: Duration::from_secs(args.header_read_timeout.max(1)),
        connect_timeout: Duration::from_secs(args.connect_timeout.max(1)),
        handshake_timeout: Duration::from_secs(args.tls_handshake_timeout.max(1)),
        response_timeout: Duration::from_secs(args.response_timeout.max(1)),
        total_timeout: (args.total_timeout > 0).then(|| Duration::from_secs(args.total_timeout)),
        upgrade_idle_timeout: Duration::from_secs(args.upgrade_idle_timeout.max(1)),
        http1_fast_path: args.http1_fast_path,
        ..GatewayConfig::default()
    };
    let gateway = Gateway::new(
        store.snapshot(),
        store.token_hasher(),
        vault.clone(),
        ca.clone(),
        guard,
        audit_tx,
        config,
    )?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let proxy_task = tokio::spawn(gateway.serve(
        proxy_listener,
        stopped(stop_rx.clone()),
        Duration::from_secs(args.shutdown_grace),
    ));
    let mut admin_state = AdminState::new(store.clone(), admin_token, ca.cert_pem().to_string())
        .with_proxy_addr(proxy_addr.to_string());
    admin_state.secure_cookies = args.admin_secure_cookies;
    let admin_task = tokio::spawn(keygate_admin::serve(
        admin_listener,
        admin_state,
        stopped(stop_rx.clone()),
    ));

    tracing::info!(
        proxy = %proxy_addr,
        admin = %admin_addr,
        data_dir = %dir.display(),
        database = %keygate_store::redact_url(&url),
        workers,
        busy_poll_us = args.busy_poll_us,
        "keygate is running"
    );
    eprintln!(
        "keygate: proxy on http://{proxy_addr}  admin API on http://{admin_addr}\n\
         keygate: CA certificate {}  admin token in {}",
        paths::ca_cert(&dir).display(),
        paths::admin_token(&dir).display()
    );

    shutdown_signal().await;
    tracing::info!("shutting down: draining connections");
    let _ = stop_tx.send(true);
    let _ = proxy_task.await;
    let _ = admin_task.await;
    poll_task.abort();
    // The writer ends when every audit sender is gone; give stragglers a
    // moment, then flush what arrived.
    if tokio::time::timeout(Duration::from_secs(5), writer_task)
        .await
        .is_err()
    {
        tracing::warn!("audit writer did not finish in time");
    }
    store.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_flag_parses_v4_v6_and_names() {
        let ((h, p), a) = parse_resolve("API.OpenAI.com:443=127.0.0.1:8443").unwrap();
        assert_eq!((h.as_str(), p), ("api.openai.com", 443));
        assert_eq!(a, "127.0.0.1:8443".parse().unwrap());
        let ((h, p), a) = parse_resolve("[::1]:443=[::1]:9000").unwrap();
        assert_eq!((h.as_str(), p), ("::1", 443));
        assert_eq!(a, "[::1]:9000".parse().unwrap());
        assert!(parse_resolve("api.test=127.0.0.1:1").is_err());
        assert!(parse_resolve("api.test:443").is_err());
        assert!(parse_resolve("api.test:443=nothere").is_err());
    }

    #[test]
    fn default_workers_leave_one_core_to_the_agents() {
        assert_eq!(default_workers(0), 1);
        assert_eq!(default_workers(1), 1);
        assert_eq!(default_workers(2), 1);
        assert_eq!(default_workers(4), 3);
        assert_eq!(default_workers(64), 63);
    }
}
