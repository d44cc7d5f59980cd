//! An echo upstream with its own CA. It answers every request with a JSON
//! description of what it received and keeps a copy for assertions.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query exactly as received.
    pub target: String,
    /// Lower-case header names with their values, in order.
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// SNI the client sent (TLS only).
    pub sni: Option<String>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A running echo upstream.
pub struct Upstream {
    /// HTTPS address (certificate valid for `names`).
    pub tls_addr: SocketAddr,
    /// Plain HTTP address.
    pub plain_addr: SocketAddr,
    /// PEM of the upstream's own CA (pass to `--upstream-ca`).
    pub ca_pem: String,
    /// The CA file written to a temp dir.
    pub ca_file: std::path::PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
    _dir: tempfile::TempDir,
}

impl Upstream {
    /// Starts an upstream whose certificate names `names` (DNS names or IPs).
    pub async fn start(names: &[&str]) -> Upstream {
        let (ca_pem, config) = tls_config(names);
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("upstream-ca.pem");
        std::fs::write(&ca_file, &ca_pem).expect("write upstream CA");
        let seen = Arc::new(Mutex::new(Vec::new()));

        let tls_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let plain_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let tls_addr = tls_listener.local_addr().expect("addr");
        let plain_addr = plain_listener.local_addr().expect("addr");

        let acceptor = TlsAcceptor::from(Arc::new(config));
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = tls_listener.accept().await {
                let acceptor = acceptor.clone();
                let seen = s.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().map(str::to_string);
                    serve(TokioIo::new(tls), seen, sni).await;
                });
            }
        });
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = plain_listener.accept().await {
                let seen = s.clone();
                tokio::spawn(serve(TokioIo::new(tcp), seen, None));
            }
        });
        Upstream {
            tls_addr,
            plain_addr,
            ca_pem,
            ca_file,
            seen,
            _dir: dir,
        }
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The most recent request.
    pub fn last(&self) -> Option<Seen> {
        self.seen().pop()
    }

    pub fn clear(&self) {
        if let Ok(mut v) = self.seen.lock() {
            v.clear();
        }
    }
}

async fn serve<I>(io: I, seen: Arc<Mutex<Vec<Seen>>>, sni: Option<String>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let seen = seen.clone();
        let sni = sni.clone();
        async move { Ok::<_, Infallible>(echo(req, seen, sni).await) }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(io, service)
        .await;
}

async fn echo(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    sni: Option<String>,
) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let version = format!("{:?}", req.version());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let record = Seen {
        method: method.clone(),
        target: target.clone(),
        headers: headers.clone(),
        body_len: body.len(),
        version: version.clone(),
        sni: sni.clone(),
    };
    if let Ok(mut v) = seen.lock() {
        v.push(record);
    }
    let json = serde_json::json!({
        "method": method,
        "target": target,
        "version": version,
        "headers": headers.iter().map(|(n, v)| serde_json::json!([n, v])).collect::<Vec<_>>(),
        "body_len": body.len(),
        "sni": sni,
    });
    let mut resp = Response::new(Full::new(Bytes::from(json.to_string())));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A CA (PEM) and a server config whose leaf names `names`, for other
/// upstreams of this crate.
pub(crate) fn tls_config_for(names: &[&str]) -> (String, ServerConfig) {
    tls_config(names)
}

/// A CA and a server config whose leaf names `names`.
fn tls_config(names: &[&str]) -> (String, ServerConfig) {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keygate test upstream CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate().expect("leaf key");
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut leaf_params = CertificateParams::new(names).expect("leaf params");
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keygate test upstream");
    leaf_params.use_authority_key_identifier_extension = true;
    leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("leaf");

    let chain: Vec<CertificateDer<'static>> = vec![leaf.der().clone(), ca_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let mut config = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (ca_cert.pem(), config)
}
