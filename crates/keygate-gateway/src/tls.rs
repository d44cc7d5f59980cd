//! TLS on both legs: per-host server configs with leaves minted by the local
//! CA (cached with a bound), and the upstream client config (web PKI roots
//! plus `--upstream-ca`, verification never disabled).

use std::sync::Arc;

use keygate_vault::CertificateAuthority;
use quick_cache::sync::Cache;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::CertificateDer;

use crate::GatewayError;
use keygate_core::ErrorCode;

/// The one crypto provider of the process (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

struct CachedLeaf {
    config: Arc<ServerConfig>,
    not_after_unix: i64,
}

/// Server configs for intercepted hosts, each with a leaf certificate minted
/// on first use and reused until it nears expiry.
pub struct LeafCertCache {
    ca: Arc<CertificateAuthority>,
    cache: Cache<String, Arc<CachedLeaf>>,
    provider: Arc<CryptoProvider>,
}

impl LeafCertCache {
    pub fn new(ca: Arc<CertificateAuthority>, capacity: usize) -> LeafCertCache {
        LeafCertCache {
            ca,
            cache: Cache::new(capacity.max(1)),
            provider: provider(),
        }
    }

    /// The server config presenting a leaf for `host` (canonical name or IP).
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, GatewayError> {
        let now = keygate_core::now_ms() / 1000;
        if let Some(leaf) = self.cache.get(host) {
            // Re-mint a day before expiry.
            if leaf.not_after_unix - 86_400 > now {
                return Ok(leaf.config.clone());
            }
        }
        let leaf = self.ca.mint_leaf(host).map_err(|e| {
            GatewayError::new(
                ErrorCode::Internal,
                format!("cannot mint a certificate for {host}: {e}"),
            )
        })?;
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth()
                    .with_single_cert(leaf.chain, leaf.key)
            })
            .map_err(|e| {
                GatewayError::new(ErrorCode::Internal, format!("TLS server config: {e}"))
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = Arc::new(config);
        self.cache.insert(
            host.to_string(),
            Arc::new(CachedLeaf {
                config: config.clone(),
                not_after_unix: leaf.not_after_unix,
            }),
        );
        Ok(config)
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

/// The upstream TLS client config: web PKI roots plus extra trusted roots.
pub fn upstream_client_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots
            .add(cert.clone())
            .map_err(|e| format!("invalid upstream CA certificate: {e}"))?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
