//! `keygate run`: execute a command with the proxy and the CA bundle wired
//! through the standard variables, so that any HTTP client uses keygate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};

use crate::cli::RunArgs;
use crate::client::AdminClient;
use crate::paths;

/// System root bundles, in the order they are looked for.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The proxy URL with the agent's token as password: `http://agent:TOKEN@host:port`.
pub fn proxy_url_with_token(proxy: &str, token: &str) -> Result<String> {
    let rest = proxy
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("proxy URL {proxy:?} must start with http://"))?;
    let hostport = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
    let hostport = hostport.trim_end_matches('/');
    if hostport.is_empty() || hostport.contains('/') {
        bail!("proxy URL {proxy:?} must be http://HOST:PORT");
    }
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
    {
        bail!("the agent token has unexpected characters; is it a keygate token (kg_…)?");
    }
    Ok(format!("http://agent:{token}@{hostport}"))
}

/// `NO_PROXY` for the child: the caller's value plus loopback.
pub fn no_proxy(existing: Option<&str>) -> String {
    let mut parts: Vec<String> = existing
        .unwrap_or("")
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    for local in ["localhost", "127.0.0.1", "::1"] {
        if !parts.iter().any(|p| p == local) {
            parts.push(local.to_string());
        }
    }
    parts.join(",")
}

fn keygate_ca(args: &RunArgs, dir: Option<&Path>, admin_url: &str) -> Result<String> {
    if let Some(p) = &args.ca {
        return std::fs::read_to_string(p)
            .with_context(|| format!("cannot read --ca {}", p.display()));
    }
    if let Some(p) = dir.map(paths::ca_cert).filter(|p| p.exists()) {
        return std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()));
    }
    let client = AdminClient::new(admin_url, None)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(client.get_text("/ca.pem"))
        .context("no CA file found and the admin API's /ca.pem is unreachable; pass --ca FILE")
}

/// System roots (the caller's SSL_CERT_FILE first) followed by the keygate CA.
fn bundle_text(ca_pem: &str) -> String {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(f) = std::env::var_os("SSL_CERT_FILE") {
        candidates.push(PathBuf::from(f));
    }
    candidates.extend(SYSTEM_BUNDLES.iter().map(PathBuf::from));
    let mut out = String::new();
    if let Some(system) = candidates
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
    {
        out.push_str(&system);
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    out.push_str(ca_pem);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// Writes the bundle where only this user can replace it: the data dir when
/// it exists, else a fresh private temporary directory.
fn write_bundle(dir: Option<&Path>, text: &str) -> Result<PathBuf> {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    let name = format!("ca-bundle-{}.pem", &hex::encode(digest.as_ref())[..16]);
    let base = match dir.filter(|d| d.is_dir()) {
        Some(d) => d.to_path_buf(),
        None => tempfile::Builder::new()
            .prefix("keygate-run-")
            .tempdir()?
            .keep(),
    };
    let path = base.join(name);
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text) {
        let tmp = tempfile::NamedTempFile::new_in(&base)?;
        std::fs::write(tmp.path(), text)?;
        tmp.persist(&path)
            .map_err(|e| anyhow!("cannot write {}: {}", path.display(), e.error))?;
    }
    Ok(path)
}

pub fn main(data_dir: Option<PathBuf>, admin_url: &str, args: RunArgs) -> Result<ExitCode> {
    let token = args
        .token
        .clone()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| anyhow!("no agent token: pass --token or set KEYGATE_AGENT_TOKEN"))?;
    let dir = paths::data_dir(data_dir).ok();
    let proxy = args
        .proxy
        .clone()
        .unwrap_or_else(|| "http://127.0.0.1:10255".to_string());
    let proxy = proxy_url_with_token(&proxy, &token)?;
    let ca = keygate_ca(&args, dir.as_deref(), admin_url)?;
    if !ca.contains("-----BEGIN CERTIFICATE-----") {
        bail!("the keygate CA is not a PEM certificate");
    }
    let bundle = write_bundle(dir.as_deref(), &bundle_text(&ca))?;
    let no_proxy = no_proxy(
        std::env::var("NO_PROXY")
            .ok()
            .or_else(|| std::env::var("no_proxy").ok())
            .as_deref(),
    );

    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| anyhow!("no command given: keygate run -- CMD [ARGS...]"))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest);
    for var in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
        cmd.env(var, &proxy);
    }
    cmd.env("NO_PROXY", &no_proxy).env("no_proxy", &no_proxy);
    for var in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "GIT_SSL_CAINFO",
        "AWS_CA_BUNDLE",
    ] {
        cmd.env(var, &bundle);
    }
    cmd.env("NODE_USE_ENV_PROXY", "1");
    // The token reaches the child only inside the proxy URL.
    cmd.env_remove("KEYGATE_AGENT_TOKEN");
    cmd.env_remove("KEYGATE_ADMIN_TOKEN");
    exec(cmd, program)
}

#[cfg(unix)]
fn exec(mut cmd: std::process::Command, program: &str) -> Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    // exec replaces this process: signals and the exit code are the child's.
    let err = cmd.exec();
    bail!("cannot run {program:?}: {err}")
}

#[cfg(not(unix))]
fn exec(mut cmd: std::process::Command, program: &str) -> Result<ExitCode> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {program:?}"))?;
    Ok(ExitCode::from(status.code().unwrap_or(1) as u8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_url_carries_the_token() {
        assert_eq!(
            proxy_url_with_token("http://127.0.0.1:10255", "kg_abc").unwrap(),
            "http://agent:kg_abc@127.0.0.1:10255"
        );
        assert_eq!(
            proxy_url_with_token("http://old:x@localhost:1/", "kg_abc").unwrap(),
            "http://agent:kg_abc@localhost:1"
        );
        assert!(proxy_url_with_token("https://x:1", "kg_abc").is_err());
        assert!(proxy_url_with_token("http://x:1", "kg a").is_err());
    }

    #[test]
    fn no_proxy_adds_loopback_once() {
        assert_eq!(no_proxy(None), "localhost,127.0.0.1,::1");
        assert_eq!(
            no_proxy(Some("corp.internal, localhost")),
            "corp.internal,localhost,127.0.0.1,::1"
        );
    }
}
