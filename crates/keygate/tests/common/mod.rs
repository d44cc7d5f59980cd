//! Shared set-up for the end-to-end tests: a test upstream with its own CA
//! and the real keygate binary wired to it.
#![allow(dead_code)]

use std::process::Command;

#[allow(unused_imports)]
pub use test_support::{basic_auth, connect_raw, Keygate, Tunnel, Upstream};

pub const BIN: &str = env!("CARGO_BIN_EXE_keygate");
pub const SECRET: &str = "sk-real-9f3b2c71d0e4a6";

/// An upstream named api.test / other.test / ws.api.test and a keygate that
/// dials it for those names (443 and 8443), trusting its CA.
pub struct World {
    pub up: Upstream,
    pub kg: Keygate,
}

pub async fn world() -> World {
    world_with(&[]).await
}

/// [`world`] with more `keygate serve` arguments.
pub async fn world_with(extra: &[&str]) -> World {
    let up = Upstream::start(&["api.test", "other.test", "x.api.test", "localhost"]).await;
    let tls = up.tls_addr.to_string();
    let plain = up.plain_addr.to_string();
    let mut args = vec![
        "--upstream-ca".to_string(),
        up.ca_file.display().to_string(),
        "--allow-net".to_string(),
        "127.0.0.0/8".to_string(),
    ];
    for (from, to) in [
        ("api.test:443", &tls),
        ("api.test:8443", &tls),
        ("other.test:443", &tls),
        ("x.api.test:443", &tls),
        ("api.test:80", &plain),
        ("other.test:80", &plain),
    ] {
        args.push("--resolve".into());
        args.push(format!("{from}={to}"));
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let kg = Keygate::start(std::path::Path::new(BIN), &args);
    World { up, kg }
}

impl World {
    /// Adds the standard secret: api.test, /v1/*, Authorization: Bearer.
    pub fn add_openai(&self) {
        self.kg.cli_ok(
            &[
                "secret", "add", "openai", "--host", "api.test", "--path", "/v1/*",
            ],
            Some(format!("{SECRET}\n").as_bytes()),
        );
    }

    pub fn agent(&self, name: &str, grants: &[&str]) -> String {
        let mut args = vec!["agent", "create", name];
        for g in grants {
            args.push("--grant");
            args.push(g);
        }
        self.kg.cli_ok(&args, None).trim().to_string()
    }

    /// A reqwest client going through keygate as `token`.
    pub fn client(&self, token: &str) -> reqwest::Client {
        reqwest::Client::builder()
            .proxy(
                reqwest::Proxy::all(format!("http://agent:{token}@{}", self.kg.proxy))
                    .expect("proxy"),
            )
            .tls_certs_only([
                reqwest::Certificate::from_pem(self.kg.ca_pem().as_bytes()).expect("ca")
            ])
            .build()
            .expect("client")
    }

    /// curl through keygate; returns (exit ok, stdout, stderr).
    pub fn curl(&self, token: &str, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "--proxy"])
            .arg(format!("http://agent:{token}@{}", self.kg.proxy))
            .arg("--cacert")
            .arg(self.kg.ca_file())
            .args(args)
            .env_remove("https_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("no_proxy")
            .env_remove("NO_PROXY")
            .output()
            .expect("curl must be installed");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// curl (`proto`: `--http1.1` or `--http2`) through keygate to
    /// api.test/v1/chat with the placeholder key: the request succeeds and
    /// the upstream gets the real key and no proxy credentials.
    pub fn curl_gets_the_real_key(&self, token: &str, proto: &str) {
        self.up.clear();
        let (ok, out, err) = self.curl(
            token,
            &[
                proto,
                "-H",
                "Authorization: Bearer placeholder",
                "https://api.test/v1/chat",
            ],
        );
        assert!(ok, "curl {proto} failed: {err}");
        assert!(out.contains("/v1/chat"), "{out}");
        let seen = self.up.last().expect("upstream saw the request");
        assert_eq!(
            seen.header_all("authorization"),
            vec![format!("Bearer {SECRET}")]
        );
        assert!(seen.header("proxy-authorization").is_none());
    }

    /// Audit records as `keygate audit --json` prints them (oldest first).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        // Records are written in batches off the hot path: wait briefly.
        std::thread::sleep(std::time::Duration::from_millis(300));
        self.kg
            .cli_ok(&["audit", "--json", "--limit", "1000"], None)
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }
}
