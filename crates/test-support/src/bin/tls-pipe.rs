//! `tls-pipe LISTEN CERT KEY UPSTREAM_CA HOST ADDR`: the floor of a TLS
//! intercepting proxy, for bench/ (`--floor`).
//!
//! Accepts `CONNECT` (no authentication, any target), answers 200, accepts
//! TLS with CERT/KEY (offering the ALPN protocols the client offers, h2
//! first), dials ADDR with TLS for HOST (offering only the protocol the
//! client got, trusting UPSTREAM_CA), then copies bytes both ways until
//! either side closes. No HTTP parsing, no injection, no pooling, no audit:
//! two TLS legs and loopback TCP, which any proxy that reads and rewrites
//! HTTPS requests pays before doing anything else. One thread, like keygate
//! on a two-core machine.

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

struct Pipe {
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
        tokio::io::copy_bidirectional(&mut agent, &mut up).await?;
        Ok(())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, cert, key, upstream_ca, host, addr] = &args[..] else {
        die("usage: tls-pipe LISTEN CERT KEY UPSTREAM_CA HOST ADDR".into())
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
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    server.ignore_client_order = true;

    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut read(upstream_ca).as_slice()) {
        let c = c.unwrap_or_else(|e| die(format!("{upstream_ca}: {e}")));
        roots
            .add(c)
            .unwrap_or_else(|e| die(format!("{upstream_ca}: {e}")));
    }
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
