//! The local certificate authority and the leaf certificates it mints.
//!
//! The CA is ECDSA P-256, stored as `<dir>/ca.pem` (0644, what agents trust)
//! and `<dir>/ca-key.pem` (PKCS#8, 0600). Leaves are minted per intercepted
//! host, with a fresh P-256 key and a one-week lifetime, shaped to pass strict
//! verifiers (`openssl verify -x509_strict`, Python 3.13's
//! `VERIFY_X509_STRICT`, webpki).

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use crate::files::{
    create_private_file, ensure_private_dir, read_private_file, read_private_file_opt,
    write_public_file,
};
use crate::VaultError;

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";
const CA_COMMON_NAME: &str = "keygate local CA";
const CA_ORGANIZATION: &str = "keygate";
/// Ten years (with leap days).
const CA_LIFETIME: Duration = Duration::days(3653);
const CA_BACKDATE: Duration = Duration::days(1);
const LEAF_LIFETIME: Duration = Duration::days(7);
const LEAF_BACKDATE: Duration = Duration::hours(1);
/// X.520 upper bound for commonName.
const MAX_CN_LEN: usize = 64;

/// The local CA: signing key, certificate, and what leaves need from it.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    not_after: OffsetDateTime,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A minted leaf: `chain` is `[leaf, ca]`, `key` the leaf's PKCS#8 key.
pub struct LeafCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The leaf's notAfter, as Unix seconds (for cache expiry).
    pub not_after_unix: i64,
}

impl fmt::Debug for LeafCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafCert")
            .field("chain_len", &self.chain.len())
            .field("not_after_unix", &self.not_after_unix)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// `<dir>/ca.pem` (cert, 0644) and `<dir>/ca-key.pem` (PKCS#8 PEM, 0600, perms checked with read_private_file). Creates both
    /// on first run: ECDSA P-256, CN "keygate local CA" + O "keygate", basicConstraints CA:true pathlen 0, keyUsage keyCertSign+cRLSign,
    /// subject key identifier, validity now-1day .. +10 years, random serial.
    ///
    /// If the key exists but the certificate does not (e.g. a crash between
    /// the two writes), a certificate is issued for the existing key. A
    /// certificate without its key, a certificate that does not match the
    /// key, is not a CA, or has expired is an error.
    pub fn load_or_create(dir: &Path) -> Result<CertificateAuthority, VaultError> {
        ensure_private_dir(dir)?;
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);

        let key = match read_private_file_opt(&key_path)? {
            Some(pem) => parse_key(&pem, &key_path)?,
            None => {
                if read_cert_file(&cert_path)?.is_some() {
                    return Err(VaultError::InvalidCa {
                        path: key_path,
                        reason: format!("{CA_CERT_FILE} exists but its private key is missing"),
                    });
                }
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
                let pem = Zeroizing::new(key.serialize_pem());
                if create_private_file(&key_path, pem.as_bytes())? {
                    key
                } else {
                    // Another process created the key first; use theirs.
                    parse_key(&read_private_file(&key_path)?, &key_path)?
                }
            }
        };

        match read_cert_file(&cert_path)? {
            Some(pem) => Self::from_existing(&pem, key, &cert_path),
            None => {
                let ca = Self::issue(key)?;
                write_public_file(&cert_path, ca.cert_pem.as_bytes())?;
                Ok(ca)
            }
        }
    }

    /// Self-signs a new CA certificate for `key`.
    fn issue(key: KeyPair) -> Result<CertificateAuthority, VaultError> {
        let now = now_seconds();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, CA_COMMON_NAME);
        dn.push(DnType::OrganizationName, CA_ORGANIZATION);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.key_identifier_method = KeyIdMethod::Sha256;
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - CA_BACKDATE;
        params.not_after = now + CA_LIFETIME;
        params.serial_number = Some(random_serial());

        let cert = params.self_signed(&key)?;
        let not_after = params.not_after;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            not_after,
        })
    }

    /// Loads an existing certificate and checks it belongs to `key`.
    fn from_existing(
        pem: &[u8],
        key: KeyPair,
        path: &Path,
    ) -> Result<CertificateAuthority, VaultError> {
        let invalid = |reason: String| VaultError::InvalidCa {
            path: path.to_path_buf(),
            reason,
        };
        let der = CertificateDer::from_pem_slice(pem)
            .map_err(|_| invalid("not a PEM certificate".into()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|_| invalid("the certificate cannot be parsed".into()))?;
        if x509.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
            return Err(invalid(format!(
                "the certificate does not belong to the key in {CA_KEY_FILE}"
            )));
        }
        if !x509.is_ca() {
            return Err(invalid("the certificate is not a CA certificate".into()));
        }
        let not_after_unix = x509.validity().not_after.timestamp();
        let not_after = OffsetDateTime::from_unix_timestamp(not_after_unix)
            .map_err(|_| invalid("the certificate's expiry date is out of range".into()))?;
        if not_after <= OffsetDateTime::now_utc() {
            return Err(invalid(format!(
                "the certificate expired at {not_after_unix} (Unix time)"
            )));
        }
        // The issuer keeps the certificate's exact subject and key identifier,
        // so leaves chain to it byte for byte.
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| invalid(format!("the certificate cannot be used as issuer: {e}")))?;
        let cert_der = der.into_owned();
        let cert_pem = pem_encode_cert(&cert_der);
        Ok(CertificateAuthority {
            issuer,
            cert_pem,
            cert_der,
            not_after,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// Leaf for `host` (a canonical DNS name or an IP literal like "127.0.0.1" / "::1"): fresh P-256 key, SAN DNS or IP accordingly,
    /// CN = host, EKU serverAuth, keyUsage digitalSignature, authority key identifier of the CA, basicConstraints CA:false (or absent),
    /// validity now-1h .. now+7 days (short), random serial. Must pass `openssl verify -x509_strict -CAfile ca.pem leaf.pem`
    /// and Python 3.13-style strict verification (VERIFY_X509_STRICT: needs AKI, SKI ok, non-critical SAN when subject non-empty, etc.).
    ///
    /// Brackets around an IPv6 literal (`[::1]`) are accepted. A DNS name is
    /// lower-cased and a single trailing dot dropped. The CN is omitted (and
    /// O=keygate used instead) when the host is longer than 64 characters.
    /// The leaf never outlives the CA.
    pub fn mint_leaf(&self, host: &str) -> Result<LeafCert, VaultError> {
        let (san, cn) = parse_host(host)?;
        let now = now_seconds();
        let not_after = std::cmp::min(now + LEAF_LIFETIME, self.not_after);

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if cn.len() <= MAX_CN_LEN {
            dn.push(DnType::CommonName, cn);
        } else {
            dn.push(DnType::OrganizationName, CA_ORGANIZATION);
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![san];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        params.not_before = now - LEAF_BACKDATE;
        params.not_after = not_after;
        params.serial_number = Some(random_serial());

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(LeafCert {
            chain: vec![cert.der().clone(), self.cert_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_after_unix: not_after.unix_timestamp(),
        })
    }
}

/// Current time truncated to whole seconds (what X.509 encodes).
fn now_seconds() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    OffsetDateTime::from_unix_timestamp(now.unix_timestamp()).unwrap_or(now)
}

/// 16 random bytes, positive (top bit clear) and non-zero.
fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    crate::fill_random(&mut b);
    b[0] &= 0x7f;
    b[0] |= 0x01;
    SerialNumber::from_slice(&b)
}

fn parse_key(pem: &[u8], path: &Path) -> Result<KeyPair, VaultError> {
    let invalid = || VaultError::InvalidCa {
        path: path.to_path_buf(),
        reason: "not a usable PKCS#8 PEM private key".into(),
    };
    let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|_| invalid())?;
    KeyPair::try_from(&der).map_err(|_| invalid())
}

/// Reads the (public) CA certificate file; a missing file is `Ok(None)`.
fn read_cert_file(path: &Path) -> Result<Option<Vec<u8>>, VaultError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(VaultError::io("reading", path, e)),
    }
}

fn pem_encode_cert(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // Base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Validates `host` and returns its SAN and the text for the CN.
fn parse_host(host: &str) -> Result<(SanType, String), VaultError> {
    let invalid = |reason| VaultError::InvalidHost {
        host: host.chars().take(300).collect(),
        reason,
    };
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Ok((SanType::IpAddress(ip), ip.to_string()));
    }
    if unbracketed.len() != host.len() {
        return Err(invalid("brackets are only allowed around an IPv6 address"));
    }

    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if name.is_empty() {
        return Err(invalid("empty host name"));
    }
    if name.len() > 253 {
        return Err(invalid("host name longer than 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(invalid("empty label in host name"));
        }
        if label.len() > 63 {
            return Err(invalid("host name label longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            return Err(invalid(
                "host name must be ASCII letters, digits, '-', '_' and '.' (IDNA-encode it first)",
            ));
        }
    }
    // A name whose last label is numeric would be read as a (malformed) IP address.
    if name
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|c| c.is_ascii_digit()))
    {
        return Err(invalid("not a valid IP address or DNS name"));
    }
    let ia5 = name
        .clone()
        .try_into()
        .map_err(|_| invalid("host name is not a valid IA5 string"))?;
    Ok((SanType::DnsName(ia5), name))
}

#[cfg(test)]
mod tests;
