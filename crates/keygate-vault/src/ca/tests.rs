//! Tests for the CA: file handling, certificate shape, and verification of
//! minted leaves by OpenSSL (strict), rustls/webpki and Python's ssl module.

use super::*;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::X509Certificate;

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    x509_parser::parse_x509_certificate(der).unwrap().1
}

/// Runs openssl; a missing binary is a test failure with a clear message.
fn openssl(args: &[&str]) -> std::process::Output {
    match Command::new("openssl").args(args).output() {
        Ok(o) => o,
        Err(e) => panic!(
            "these tests need the `openssl` command line tool (e.g. /usr/bin/openssl) on PATH: {e}"
        ),
    }
}

/// Writes ca.pem and leaf.pem to a fresh temp dir.
fn write_pems(ca: &CertificateAuthority, leaf: &LeafCert) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    let leaf_path = dir.path().join("leaf.pem");
    std::fs::write(&ca_path, ca.cert_pem()).unwrap();
    std::fs::write(&leaf_path, pem_encode_cert(&leaf.chain[0])).unwrap();
    (dir, ca_path, leaf_path)
}

/// `openssl verify -x509_strict -purpose sslserver` plus a name/IP check.
fn openssl_verify(ca: &CertificateAuthority, leaf: &LeafCert, host: &str) {
    let (_dir, ca_path, leaf_path) = write_pems(ca, leaf);
    let ip = host.parse::<IpAddr>().is_ok();
    let out = openssl(&[
        "verify",
        "-x509_strict",
        "-purpose",
        "sslserver",
        if ip { "-verify_ip" } else { "-verify_hostname" },
        host,
        "-CAfile",
        ca_path.to_str().unwrap(),
        leaf_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "openssl verify failed for {host}:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": OK"));

    // The CA on its own also passes strict checks.
    let out = openssl(&[
        "verify",
        "-x509_strict",
        "-CAfile",
        ca_path.to_str().unwrap(),
        ca_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "openssl verify of the CA failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn openssl_san(ca: &CertificateAuthority, leaf: &LeafCert) -> String {
    let (_dir, _ca, leaf_path) = write_pems(ca, leaf);
    let out = openssl(&[
        "x509",
        "-noout",
        "-ext",
        "subjectAltName",
        "-in",
        leaf_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "openssl x509 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// webpki path validation, then a full in-memory TLS handshake with the
/// leaf's key (proves the key matches the certificate).
fn rustls_verify(ca: &CertificateAuthority, leaf: &LeafCert, host: &str) {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls_pki_types::{ServerName, UnixTime};

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der()).unwrap();
    let roots = Arc::new(roots);
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .unwrap();
    let name = ServerName::try_from(host.to_owned()).unwrap();
    verifier
        .verify_server_cert(
            &leaf.chain[0],
            &leaf.chain[1..],
            &name,
            &[],
            UnixTime::now(),
        )
        .unwrap_or_else(|e| panic!("webpki rejected the leaf for {host}: {e}"));
    // Another name must be rejected.
    let other = ServerName::try_from("not-this-host.example").unwrap();
    assert!(verifier
        .verify_server_cert(
            &leaf.chain[0],
            &leaf.chain[1..],
            &other,
            &[],
            UnixTime::now()
        )
        .is_err());

    let server_config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(leaf.chain.clone(), leaf.key.clone_key())
        .unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    test_support::handshake_in_memory(Arc::new(client_config), Arc::new(server_config), host)
        .unwrap_or_else(|e| panic!("TLS handshake for {host} failed: {e}"));
}

/// Python's ssl with VERIFY_X509_STRICT | VERIFY_X509_PARTIAL_CHAIN (the
/// Python 3.13 defaults), as a real handshake over memory BIOs. Skipped (with
/// a message) only when python3 is not installed.
fn python_verify(ca: &CertificateAuthority, leaf: &LeafCert, host: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    let chain_path = dir.path().join("chain.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&ca_path, ca.cert_pem()).unwrap();
    let chain: String = leaf.chain.iter().map(|c| pem_encode_cert(c)).collect();
    std::fs::write(&chain_path, chain).unwrap();
    let key_pem = PrivatePkcs8KeyDer::from(leaf.key.secret_der().to_vec());
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(key_pem.secret_pkcs8_der());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    std::fs::write(&key_path, pem).unwrap();

    let script = r#"
import ssl, sys
ca, chain, key, host = sys.argv[1:5]
cctx = ssl.create_default_context(cafile=ca)
cctx.verify_flags |= ssl.VERIFY_X509_STRICT | getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0)
sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
sctx.load_cert_chain(chain, key)
c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
client = cctx.wrap_bio(c_in, c_out, server_hostname=host)
server = sctx.wrap_bio(s_in, s_out, server_side=True)
done_c = done_s = False
for _ in range(50):
    for name, obj in (("client", client), ("server", server)):
        if (done_c if name == "client" else done_s):
            continue
        try:
            obj.do_handshake()
            if name == "client": done_c = True
            else: done_s = True
        except ssl.SSLWantReadError:
            pass
    data = c_out.read()
    if data: s_in.write(data)
    data = s_out.read()
    if data: c_in.write(data)
    if done_c and done_s:
        print("OK")
        sys.exit(0)
print("handshake did not finish")
sys.exit(1)
"#;
    let out = match Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&ca_path)
        .arg(&chain_path)
        .arg(&key_path)
        .arg(host)
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("python3 not installed; skipping the Python strict-verification check");
            return;
        }
        Err(e) => panic!("running python3: {e}"),
    };
    assert!(
        out.status.success(),
        "python strict verification failed for {host}:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ext_ski(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

fn ext_aki(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(k) => {
                k.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
}

#[test]
fn ca_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CertificateAuthority>();
    assert_send_sync::<LeafCert>();
}

#[test]
fn ca_files_created_with_modes_and_reloaded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let ca = CertificateAuthority::load_or_create(&dir).unwrap();
    assert_eq!(mode_of(&dir), 0o700);
    assert_eq!(mode_of(&dir.join("ca.pem")), 0o644);
    assert_eq!(mode_of(&dir.join("ca-key.pem")), 0o600);
    let on_disk = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    assert_eq!(on_disk, ca.cert_pem());
    assert!(std::fs::read_to_string(dir.join("ca-key.pem"))
        .unwrap()
        .starts_with("-----BEGIN PRIVATE KEY-----"));

    let again = CertificateAuthority::load_or_create(&dir).unwrap();
    assert_eq!(again.cert_der(), ca.cert_der());
    assert_eq!(again.cert_pem(), ca.cert_pem());
    assert_eq!(again.not_after, ca.not_after);

    // A fresh directory gives a different CA.
    let other = CertificateAuthority::load_or_create(&tmp.path().join("other")).unwrap();
    assert_ne!(other.cert_der(), ca.cert_der());
}

#[test]
fn ca_certificate_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(tmp.path()).unwrap();
    let der = ca.cert_der();
    let cert = parse(&der);
    let subject = cert.subject().to_string();
    assert!(subject.contains("CN=keygate local CA"), "{subject}");
    assert!(subject.contains("O=keygate"), "{subject}");
    assert_eq!(cert.subject(), cert.issuer());

    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical);
    assert!(bc.value.ca);
    assert_eq!(bc.value.path_len_constraint, Some(0));
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
    assert!(!ku.value.digital_signature());
    assert!(ext_ski(&cert).is_some_and(|k| !k.is_empty()));

    let now = OffsetDateTime::now_utc().unix_timestamp();
    let nb = cert.validity().not_before.timestamp();
    let na = cert.validity().not_after.timestamp();
    assert!(
        (now - 86400 - 60..=now - 86400 + 60).contains(&nb),
        "not_before {nb} now {now}"
    );
    let ten_years = 3650 * 86400;
    assert!(
        na - now >= ten_years && na - now <= ten_years + 4 * 86400,
        "not_after {na}"
    );

    let serial = cert.raw_serial();
    assert!(!serial.is_empty() && serial.len() <= 20);
    assert_eq!(serial[0] & 0x80, 0, "serial must be positive");
    assert_eq!(
        cert.public_key().algorithm.algorithm.to_id_string(),
        "1.2.840.10045.2.1",
        "EC public key"
    );

    // Two CAs get different serials.
    let ca2 = CertificateAuthority::load_or_create(&tmp.path().join("b")).unwrap();
    let der2 = ca2.cert_der();
    assert_ne!(parse(&der2).raw_serial(), serial);
}

#[test]
fn ca_key_permissions_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    CertificateAuthority::load_or_create(tmp.path()).unwrap();
    let key = tmp.path().join("ca-key.pem");
    for bad in [0o640, 0o604, 0o644] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(bad)).unwrap();
        match CertificateAuthority::load_or_create(tmp.path()) {
            Err(VaultError::InsecurePermissions { path, mode }) => {
                assert_eq!(path, key);
                assert_eq!(mode, bad);
            }
            other => panic!("expected InsecurePermissions, got {other:?}"),
        }
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    CertificateAuthority::load_or_create(tmp.path()).unwrap();
}

#[test]
fn cert_without_key_is_an_error_and_key_without_cert_is_recovered() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(tmp.path()).unwrap();
    let key_pem = std::fs::read(tmp.path().join("ca-key.pem")).unwrap();

    std::fs::remove_file(tmp.path().join("ca-key.pem")).unwrap();
    let err = CertificateAuthority::load_or_create(tmp.path()).unwrap_err();
    assert!(matches!(err, VaultError::InvalidCa { .. }), "{err:?}");
    assert!(err.to_string().contains("ca-key.pem"), "{err}");
    // Nothing was generated in the attempt.
    assert!(!tmp.path().join("ca-key.pem").exists());

    // Key back, certificate gone: a new certificate for the same key.
    crate::write_private_file(&tmp.path().join("ca-key.pem"), &key_pem).unwrap();
    std::fs::remove_file(tmp.path().join("ca.pem")).unwrap();
    let re = CertificateAuthority::load_or_create(tmp.path()).unwrap();
    let (d1, d2) = (ca.cert_der(), re.cert_der());
    assert_eq!(parse(&d1).public_key().raw, parse(&d2).public_key().raw);
    assert_eq!(mode_of(&tmp.path().join("ca.pem")), 0o644);
    let leaf = re.mint_leaf("example.com").unwrap();
    openssl_verify(&re, &leaf, "example.com");
}

#[test]
fn mismatched_or_bad_files_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    CertificateAuthority::load_or_create(&a).unwrap();
    CertificateAuthority::load_or_create(&b).unwrap();
    std::fs::copy(b.join("ca.pem"), a.join("ca.pem")).unwrap();
    let err = CertificateAuthority::load_or_create(&a).unwrap_err();
    assert!(
        matches!(&err, VaultError::InvalidCa { reason, .. } if reason.contains("does not belong")),
        "{err:?}"
    );

    std::fs::write(a.join("ca.pem"), "garbage").unwrap();
    assert!(matches!(
        CertificateAuthority::load_or_create(&a),
        Err(VaultError::InvalidCa { .. })
    ));

    crate::write_private_file(&b.join("ca-key.pem"), b"not a key").unwrap();
    let err = CertificateAuthority::load_or_create(&b).unwrap_err();
    assert!(matches!(err, VaultError::InvalidCa { .. }), "{err:?}");
    assert!(!err.to_string().contains("not a key"));
}

#[test]
fn expired_or_non_ca_certificate_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    crate::write_private_file(
        &tmp.path().join("ca-key.pem"),
        key.serialize_pem().as_bytes(),
    )
    .unwrap();

    // Not a CA.
    let params = CertificateParams::new(vec!["x.example".to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(tmp.path().join("ca.pem"), cert.pem()).unwrap();
    let err = CertificateAuthority::load_or_create(tmp.path()).unwrap_err();
    assert!(
        matches!(&err, VaultError::InvalidCa { reason, .. } if reason.contains("not a CA")),
        "{err:?}"
    );

    // Expired CA.
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.not_before = OffsetDateTime::now_utc() - Duration::days(30);
    params.not_after = OffsetDateTime::now_utc() - Duration::days(1);
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(tmp.path().join("ca.pem"), cert.pem()).unwrap();
    let err = CertificateAuthority::load_or_create(tmp.path()).unwrap_err();
    assert!(
        matches!(&err, VaultError::InvalidCa { reason, .. } if reason.contains("expired")),
        "{err:?}"
    );
}

fn check_leaf_shape(ca: &CertificateAuthority, leaf: &LeafCert, expect_cn: &str) {
    assert_eq!(leaf.chain.len(), 2);
    assert_eq!(leaf.chain[1], ca.cert_der());
    let ca_der = ca.cert_der();
    let ca_cert = parse(&ca_der);
    let cert = parse(&leaf.chain[0]);

    assert_eq!(cert.issuer(), ca_cert.subject());
    assert!(
        cert.subject()
            .to_string()
            .contains(&format!("CN={expect_cn}")),
        "{}",
        cert.subject()
    );
    // AKI of the leaf = SKI of the CA.
    assert_eq!(ext_aki(&cert), ext_ski(&ca_cert));
    assert!(ext_aki(&cert).is_some());

    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(
        !san.critical,
        "SAN must be non-critical when the subject is non-empty"
    );

    let now = OffsetDateTime::now_utc().unix_timestamp();
    let nb = cert.validity().not_before.timestamp();
    let na = cert.validity().not_after.timestamp();
    assert_eq!(na, leaf.not_after_unix);
    assert!(
        (now - 3600 - 60..=now - 3600 + 60).contains(&nb),
        "not_before {nb}"
    );
    assert!(
        (now + 7 * 86400 - 60..=now + 7 * 86400 + 60).contains(&na),
        "not_after {na}"
    );
    assert_eq!(cert.raw_serial()[0] & 0x80, 0);

    // The private key belongs to the certificate.
    let kp = KeyPair::try_from(&leaf.key).unwrap();
    assert_eq!(
        cert.public_key().raw,
        kp.subject_public_key_info().as_slice()
    );
}

#[test]
fn leaf_for_dns_name() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(tmp.path()).unwrap();
    let leaf = ca.mint_leaf("api.example.com").unwrap();
    check_leaf_shape(&ca, &leaf, "api.example.com");
    let cert = parse(&leaf.chain[0]);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::DNSName("api.example.com")]
    );
    let text = openssl_san(&ca, &leaf);
    assert!(text.contains("DNS:api.example.com"), "{text}");
    assert!(!text.contains("IP Address"), "{text}");
    openssl_verify(&ca, &leaf, "api.example.com");
    rustls_verify(&ca, &leaf, "api.example.com");
    python_verify(&ca, &leaf, "api.example.com");
}

#[test]
fn leaf_for_ipv4() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(tmp.path()).unwrap();
    let leaf = ca.mint_leaf("127.0.0.1").unwrap();
    check_leaf_shape(&ca, &leaf, "127.0.0.1");
    let cert = parse(&leaf.chain[0]);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::IPAddress(&[127, 0, 0, 1])]
    );
    let text = openssl_san(&ca, &leaf);
    assert!(text.contains("IP Address:127.0.0.1"), "{text}");
    assert!(!text.contains("DNS:"), "{text}");
    openssl_verify(&ca, &leaf, "127.0.0.1");
    rustls_verify(&ca, &leaf, "127.0.0.1");
    python_verify(&ca, &leaf, "127.0.0.1");
}

#[test]
fn leaf_for_ipv6() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(tmp.path()).unwrap();
    for host in ["::1", "[::1]"] {
        let leaf = ca.mint_leaf(host).unwrap();
        check_leaf_shape(&ca, &leaf, "::1");
        let cert = parse(&leaf.chain[0]);
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let mut one = [0u8; 16];
        one[15] = 1;
        assert_eq!(san.value.general_names, vec![GeneralName::IPAddress(&one)]);
        let text = openssl_san(&ca, &leaf);
        assert!(text.contains("IP Address:0:0:0:0:0:0:0:1"), "{text}");
        assert!(!text.contains("DNS:"), "{text}");
        openssl_verify(&ca, &leaf, "::1");
        rustls_verify(&ca, &leaf, "::1");
        python_verify(&ca, &leaf, "::1");
    }
}

#[test]
fn leaf_from_reloaded_ca_verifies_against_file_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let first = CertificateAuthority::load_or_create(tmp.path()).unwrap();
    drop(first);
    let ca = CertificateAuthority::load_or_create(tmp.path()).unwrap();
    let leaf = ca.mint_leaf("reloaded.example.org").unwrap();
    check_leaf_shape(&ca, &leaf, "reloaded.example.org");
    let ca_path = tmp.path().join("ca.pem");
    let leaf_path = tmp.path().join("leaf.pem");
    std::fs::write(&leaf_path, pem_encode_cert(&leaf.chain[0])).unwrap();
    let out = openssl(&[
        "verify",
        "-x509_strict",
        "-purpose",
        "sslserver",
        "-CAfile",
        ca_path.to_str().unwrap(),
        leaf_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rustls_verify(&ca, &leaf, "reloaded.example.org");
}

#[test]
fn leaves_are_fresh_and_names_normalized() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(tmp.path()).unwrap();
    let a = ca.mint_leaf("example.com").unwrap();
    let b = ca.mint_leaf("example.com").unwrap();
    assert_ne!(a.chain[0], b.chain[0]);
    assert_ne!(a.key.secret_der(), b.key.secret_der());
    assert_ne!(
        parse(&a.chain[0]).raw_serial(),
        parse(&b.chain[0]).raw_serial()
    );

    let c = ca.mint_leaf("Example.COM.").unwrap();
    check_leaf_shape(&ca, &c, "example.com");
    openssl_verify(&ca, &c, "example.com");

    let u = ca.mint_leaf("my_service.internal").unwrap();
    openssl_verify(&ca, &u, "my_service.internal");
}

#[test]
fn long_host_name_gets_no_cn_but_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(tmp.path()).unwrap();
    let host = format!("{}.{}.example.com", "a".repeat(40), "b".repeat(40));
    assert!(host.len() > MAX_CN_LEN);
    let leaf = ca.mint_leaf(&host).unwrap();
    let cert = parse(&leaf.chain[0]);
    let subject = cert.subject().to_string();
    assert!(!subject.contains("CN="), "{subject}");
    assert!(subject.contains("O=keygate"), "{subject}");
    openssl_verify(&ca, &leaf, &host);
    rustls_verify(&ca, &leaf, &host);
}

#[test]
fn invalid_hosts_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(tmp.path()).unwrap();
    let long_label = format!("{}.com", "a".repeat(64));
    let too_long = ["abcdefghi"; 26].join(".");
    for bad in [
        "",
        ".",
        "a..b",
        ".example.com",
        "*.example.com",
        "exa mple.com",
        "example.com:443",
        "[example.com]",
        "[127.0.0.1",
        "fe80::1%eth0",
        "bücher.de",
        "1.2.3",
        "999.1.1.1",
        "a/b",
        long_label.as_str(),
        too_long.as_str(),
    ] {
        match ca.mint_leaf(bad) {
            Err(VaultError::InvalidHost { .. }) => {}
            other => panic!("{bad:?}: expected InvalidHost, got {other:?}"),
        }
    }
}

#[test]
fn leaf_never_outlives_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ca = CertificateAuthority::load_or_create(tmp.path()).unwrap();
    ca.not_after = now_seconds() + Duration::days(2);
    let leaf = ca.mint_leaf("example.com").unwrap();
    assert_eq!(leaf.not_after_unix, ca.not_after.unix_timestamp());
}

#[test]
fn pem_encoding_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(tmp.path()).unwrap();
    let der = ca.cert_der();
    let pem = pem_encode_cert(&der);
    assert_eq!(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap(), der);
    assert!(pem.lines().all(|l| l.len() <= 64));
}
