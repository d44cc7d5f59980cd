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

/// The one crypto provider of the process (aws-lc-rs), with its cipher
/// suites in keygate's order of preference (see [`prefer_fast_suites`]).
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    prefer_fast_suites(&mut provider.cipher_suites, aes_hardware());
    Arc::new(provider)
}

/// Whether this CPU has AES and carry-less multiply instructions, which
/// AES-GCM needs to be fast; without them ChaCha20-Poly1305, designed for
/// software, is the faster AEAD.
fn aes_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Puts the cheapest suites for this CPU before the others of the same
/// TLS version, keeping the rest of rustls' order; the set of suites is
/// unchanged. With AES instructions that is AES-128-GCM, without them
/// ChaCha20-Poly1305 (as Go's crypto/tls decides).
///
/// rustls lists `TLS13_AES_256_GCM_SHA384` first, and most clients offer it
/// first too, so both legs negotiated AES-256 with SHA-384. AES-128-GCM is
/// as safe a choice (the first suite TLS 1.3 makes mandatory) and cheaper on
/// every record (10 AES rounds instead of 14), and its SHA-256 key schedule
/// runs on the CPU's SHA extensions where SHA-384 has none: on a cold
/// request SHA-512 was ~10 % of keygate's CPU samples (bench/README.md).
/// The upstream leg offers the suites in this order; the agent leg chooses
/// in this order (`ignore_client_order`): keygate and the agent share the
/// host, so what is cheap for keygate is cheap for the agent.
fn prefer_fast_suites(suites: &mut [rustls::SupportedCipherSuite], aes_hardware: bool) {
    use rustls::CipherSuite as S;
    suites.sort_by_key(|s| {
        let tls12 = matches!(s, rustls::SupportedCipherSuite::Tls12(_));
        let fast = if aes_hardware {
            matches!(
                s.suite(),
                S::TLS13_AES_128_GCM_SHA256
                    | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                    | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            )
        } else {
            matches!(
                s.suite(),
                S::TLS13_CHACHA20_POLY1305_SHA256
                    | S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                    | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
            )
        };
        (tls12, !fast)
    });
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
        // Our order, not the agent's (see `prefer_fast_suites`).
        config.ignore_client_order = true;
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

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite;

    fn ca() -> (tempfile::TempDir, Arc<CertificateAuthority>) {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        (dir, Arc::new(ca))
    }

    /// An agent trusting `ca`, with rustls' stock provider cut down to the
    /// suites `keep` accepts. Unfiltered, it offers AES-256 first, as most
    /// TLS clients do.
    fn agent(ca: &CertificateAuthority, keep: impl Fn(CipherSuite) -> bool) -> ClientConfig {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.cipher_suites.retain(|s| keep(s.suite()));
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der()).unwrap();
        ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }

    /// A complete handshake in memory; the suite both sides agreed on.
    fn handshake(client: ClientConfig, server: Arc<ServerConfig>, host: &str) -> CipherSuite {
        let (c, s) = test_support::handshake_in_memory(Arc::new(client), server, host)
            .unwrap_or_else(|e| panic!("TLS handshake for {host} failed: {e}"));
        let ours = s.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(Some(ours), c.negotiated_cipher_suite().map(|s| s.suite()));
        ours
    }

    /// `ours` holds exactly rustls' default suites, TLS 1.3 ones first,
    /// led by `tls13` and, among the TLS 1.2 ones, by `tls12`.
    fn assert_order(ours: &[rustls::SupportedCipherSuite], tls13: CipherSuite, tls12: CipherSuite) {
        let names = |v: &[rustls::SupportedCipherSuite]| {
            let mut n: Vec<_> = v.iter().map(|s| format!("{:?}", s.suite())).collect();
            n.sort();
            n
        };
        let stock = rustls::crypto::aws_lc_rs::default_provider().cipher_suites;
        assert_eq!(names(&stock), names(ours), "same set of suites");
        let is_tls12 =
            |s: &rustls::SupportedCipherSuite| matches!(s, rustls::SupportedCipherSuite::Tls12(_));
        let first_tls12 = ours.iter().position(is_tls12).unwrap();
        assert!(
            ours[first_tls12..].iter().all(is_tls12),
            "TLS 1.3 suites stay ahead of TLS 1.2 ones"
        );
        assert_eq!(ours[0].suite(), tls13);
        assert_eq!(ours[first_tls12].suite(), tls12);
    }

    #[test]
    fn without_aes_instructions_chacha20_comes_first_per_version() {
        let mut ours = rustls::crypto::aws_lc_rs::default_provider().cipher_suites;
        prefer_fast_suites(&mut ours, false);
        assert_order(
            &ours,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        );
    }

    #[test]
    fn the_provider_keeps_every_suite_and_puts_aes_128_first_per_version() {
        // The in-memory handshakes below assume a CPU with AES instructions
        // (every x86-64 and ARMv8 server CPU this runs on).
        assert!(aes_hardware(), "this test machine has no AES instructions");
        assert_order(
            &provider().cipher_suites,
            CipherSuite::TLS13_AES_128_GCM_SHA256,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        );
    }

    #[test]
    fn the_agent_leg_chooses_aes_128_over_the_clients_first_choice() {
        let (_dir, ca) = ca();
        let leaves = LeafCertCache::new(ca.clone(), 4);
        let client = agent(&ca, |_| true);
        assert_eq!(
            client.crypto_provider().cipher_suites[0].suite(),
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            "the client must prefer another suite for this test to mean anything"
        );
        let server = leaves.server_config("api.example.com").unwrap();
        assert_eq!(
            handshake(client, server, "api.example.com"),
            CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }

    #[test]
    fn the_agent_leg_still_serves_a_client_without_aes_128() {
        let (_dir, ca) = ca();
        let leaves = LeafCertCache::new(ca.clone(), 4);
        for only in [
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let client = agent(&ca, |s| s == only);
            let server = leaves.server_config("api.example.com").unwrap();
            assert_eq!(handshake(client, server, "api.example.com"), only);
        }
    }

    #[test]
    fn the_upstream_leg_offers_aes_128_first() {
        let (_dir, ca) = ca();
        // A server that follows the client's order (rustls' default, and
        // OpenSSL's and so nginx's unless told otherwise).
        let leaf = ca.mint_leaf("upstream.test").unwrap();
        let server = ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(leaf.chain, leaf.key)
        .unwrap();
        assert!(!server.ignore_client_order);
        let client = upstream_client_config(&[ca.cert_der()]).unwrap();
        assert_eq!(
            handshake(client, Arc::new(server), "upstream.test"),
            CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }
}
