//! `hudsucker-peer LISTEN CA_CERT CA_KEY UPSTREAM_CA HOST:PORT=ADDR HOST SECRET`
//!
//! hudsucker's interceptor with what keygate's bench secret does and nothing
//! more: requests to HOST under /v1/ get `Authorization: Bearer SECRET` over
//! the client's placeholder; HOST:PORT is dialled at ADDR (keygate's
//! `--resolve`), with HOST as the TLS name, trusting UPSTREAM_CA. No
//! authentication, no policy, no audit: the floor a proxy built on hyper,
//! rustls and hyper-util's pooled client starts from.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hudsucker::certificate_authority::RcgenAuthority;
use hudsucker::hyper::header::{HeaderValue, AUTHORIZATION};
use hudsucker::hyper::{Request, Uri};
use hudsucker::rcgen::{Issuer, KeyPair};
use hudsucker::rustls::crypto::aws_lc_rs;
use hudsucker::rustls::{ClientConfig, RootCertStore};
use hudsucker::{Body, HttpContext, HttpHandler, Proxy, RequestOrResponse};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Dials the one overridden destination; anything else is refused.
#[derive(Clone)]
struct Resolve {
    authority: String,
    addr: SocketAddr,
}

impl tower_service::Service<Uri> for Resolve {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let wanted = format!(
            "{}:{}",
            uri.host().unwrap_or(""),
            uri.port_u16().unwrap_or(443)
        );
        let (ok, addr) = (wanted == self.authority, self.addr);
        Box::pin(async move {
            if !ok {
                return Err(std::io::Error::other(format!("no route to {wanted}")));
            }
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(tcp))
        })
    }
}

#[derive(Clone)]
struct Inject {
    host: Arc<str>,
    value: HeaderValue,
}

impl HttpHandler for Inject {
    async fn handle_request(
        &mut self,
        _: &HttpContext,
        mut req: Request<Body>,
    ) -> RequestOrResponse {
        if req.uri().host() == Some(&*self.host) && req.uri().path().starts_with("/v1/") {
            req.headers_mut().insert(AUTHORIZATION, self.value.clone());
        }
        req.into()
    }
}

fn die(msg: String) -> ! {
    eprintln!("hudsucker-peer: {msg}");
    std::process::exit(2)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| die(format!("{path}: {e}")))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, ca_cert, ca_key, upstream_ca, resolve, host, secret] = &args[..] else {
        die(
            "usage: hudsucker-peer LISTEN CA_CERT CA_KEY UPSTREAM_CA HOST:PORT=ADDR HOST SECRET"
                .into(),
        )
    };
    let listen: SocketAddr = listen
        .parse()
        .unwrap_or_else(|_| die(format!("bad address {listen}")));
    let (authority, addr) = resolve
        .split_once('=')
        .unwrap_or_else(|| die("bad resolve".into()));
    let addr: SocketAddr = addr
        .parse()
        .unwrap_or_else(|_| die(format!("bad address {addr}")));

    let key = KeyPair::from_pem(&read(ca_key)).unwrap_or_else(|e| die(format!("CA key: {e}")));
    let issuer = Issuer::from_ca_cert_pem(&read(ca_cert), key)
        .unwrap_or_else(|e| die(format!("CA certificate: {e}")));
    let ca = RcgenAuthority::new(issuer, 1_000, aws_lc_rs::default_provider());

    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut read(upstream_ca).as_bytes()) {
        let cert = cert.unwrap_or_else(|e| die(format!("upstream CA: {e}")));
        roots
            .add(cert)
            .unwrap_or_else(|e| die(format!("upstream CA: {e}")));
    }
    let tls = ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| die(format!("TLS: {e}")))
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(Resolve {
            authority: authority.to_string(),
            addr,
        });

    let value = HeaderValue::from_str(&format!("Bearer {secret}"))
        .unwrap_or_else(|_| die("bad secret".into()));
    let proxy = Proxy::builder()
        .with_addr(listen)
        .with_ca(ca)
        .with_http_connector(https)
        .with_http_handler(Inject {
            host: Arc::from(host.as_str()),
            value,
        })
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .build()
        .unwrap_or_else(|e| die(format!("{e}")));
    eprintln!("hudsucker-peer: listening on {listen}");
    if let Err(e) = proxy.start().await {
        die(format!("{e}"));
    }
}
