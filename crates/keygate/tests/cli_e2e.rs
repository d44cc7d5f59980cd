//! The CLI as a user types it: `keygate run` wiring, `ca cert`, value
//! sources for `secret add`, listings and clear errors.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn run_wires_proxy_and_ca_for_curl_and_passes_the_exit_code() {
    let w = world().await;
    w.add_openai();
    let token = w.agent("bot", &["openai"]);
    let out =
        w.kg.command()
            .args(["run", "--proxy", &w.kg.proxy_url(), "--token", &token, "--"])
            .args([
                "curl",
                "-sS",
                "--max-time",
                "20",
                "-H",
                "Authorization: Bearer placeholder",
                "https://api.test/v1/models",
            ])
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = w.up.last().expect("upstream reached through keygate run");
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );

    // Environment given to the child.
    let out =
        w.kg.command()
            .env("KEYGATE_AGENT_TOKEN", &token)
            .env("KEYGATE_PROXY_URL", w.kg.proxy_url())
            .env("NO_PROXY", "corp.internal")
            .args(["run", "--", "env"])
            .output()
            .unwrap();
    assert!(out.status.success());
    let env = String::from_utf8_lossy(&out.stdout);
    let expected_proxy = format!("http://agent:{token}@{}", w.kg.proxy);
    for var in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
        assert!(
            env.contains(&format!("{var}={expected_proxy}\n")),
            "{var} missing:\n{env}"
        );
    }
    assert!(
        env.contains("NO_PROXY=corp.internal,localhost,127.0.0.1,::1\n"),
        "{env}"
    );
    assert!(env.contains("NODE_USE_ENV_PROXY=1\n"));
    assert!(
        !env.contains("KEYGATE_AGENT_TOKEN="),
        "token variable must not leak to the child"
    );
    let bundle_line = env
        .lines()
        .find(|l| l.starts_with("SSL_CERT_FILE="))
        .expect("SSL_CERT_FILE set");
    let bundle = bundle_line.trim_start_matches("SSL_CERT_FILE=");
    for var in [
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "GIT_SSL_CAINFO",
        "AWS_CA_BUNDLE",
    ] {
        assert!(env.contains(&format!("{var}={bundle}\n")), "{var}");
    }
    let text = std::fs::read_to_string(bundle).unwrap();
    assert!(
        text.contains(w.kg.ca_pem().trim()),
        "bundle holds the keygate CA"
    );

    // Exit codes pass through.
    let out =
        w.kg.command()
            .args(["run", "--token", &token, "--", "sh", "-c", "exit 7"])
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(7));

    // No token: clear error.
    let out = w.kg.command().args(["run", "--", "true"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEYGATE_AGENT_TOKEN"));
}

#[tokio::test(flavor = "multi_thread")]
async fn run_fetches_the_ca_from_the_admin_api_without_a_data_dir() {
    let w = world().await;
    let token = w.agent("bot", &[]);
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .env("KEYGATE_DATA_DIR", empty.path().join("none"))
        .env("KEYGATE_ADMIN_URL", w.kg.admin_url())
        .args([
            "run",
            "--proxy",
            &w.kg.proxy_url(),
            "--token",
            &token,
            "--",
            "sh",
            "-c",
            "cat \"$SSL_CERT_FILE\"",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(w.kg.ca_pem().trim()));
}

#[tokio::test(flavor = "multi_thread")]
async fn ca_cert_secret_sources_listings_and_errors() {
    let w = world().await;
    let pem = w.kg.cli_ok(&["ca", "cert"], None);
    assert_eq!(pem, w.kg.ca_pem());

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("value");
    std::fs::write(&file, "from-a-file-0123456789\n").unwrap();
    w.kg.cli_ok(
        &[
            "secret",
            "add",
            "gh",
            "--host",
            "*.api.test",
            "--header",
            "X-Token",
            "--format",
            "token {secret}",
            "--value-file",
            file.to_str().unwrap(),
        ],
        None,
    );
    let token = w.agent("bot", &["gh"]);
    w.client(&token)
        .get("https://x.api.test/repos")
        .send()
        .await
        .unwrap();
    assert_eq!(
        w.up.last().unwrap().header("x-token"),
        Some("token from-a-file-0123456789")
    );

    let list = w.kg.cli_ok(&["secret", "list"], None);
    assert!(
        list.contains("gh") && list.contains("*.api.test") && list.contains("x-token"),
        "{list}"
    );
    let agents = w.kg.cli_ok(&["agent", "list"], None);
    assert!(agents.contains("bot") && agents.contains("gh"), "{agents}");

    for (args, stdin, needle) in [
        (
            vec!["secret", "add", "bad", "--host", "api.test", "--path", "v1"],
            Some("x"),
            "path",
        ),
        (
            vec!["secret", "add", "bad", "--host", "*"],
            Some("x"),
            "host",
        ),
        (
            vec![
                "secret", "add", "bad", "--host", "api.test", "--format", "Bearer",
            ],
            Some("x"),
            "{secret}",
        ),
        (
            vec![
                "secret", "add", "bad", "--host", "api.test", "--header", "Host",
            ],
            Some("x"),
            "header",
        ),
        (
            vec!["secret", "add", "bad", "--host", "api.test"],
            Some(""),
            "empty",
        ),
        (
            vec!["secret", "add", "bad name", "--host", "api.test"],
            Some("x"),
            "name",
        ),
        (vec!["secret", "rm", "nope"], None, "not found"),
        (vec!["agent", "grant", "bot", "nope"], None, "not found"),
        (vec!["agent", "create", "bot"], None, "already exists"),
    ] {
        let out = w.kg.cli(&args, stdin.map(str::as_bytes));
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }

    // No server: a clear message, not a stack trace.
    let out = std::process::Command::new(BIN)
        .env("KEYGATE_ADMIN_URL", "http://127.0.0.1:9")
        .env("KEYGATE_DATA_DIR", dir.path())
        .args(["secret", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("keygate serve"));
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_reuses_keys_and_refuses_readable_key_files() {
    use std::os::unix::fs::PermissionsExt;
    let up = Upstream::start(&["api.test"]).await;
    let keep = tempfile::tempdir().unwrap();
    let data = keep.path().join("data");
    let args = vec![
        "--upstream-ca".to_string(),
        up.ca_file.display().to_string(),
        "--allow-net".into(),
        "127.0.0.0/8".into(),
        "--resolve".into(),
        format!("api.test:443={}", up.tls_addr),
    ];
    let kg = Keygate::start_with_data_dir(std::path::Path::new(BIN), &data, &args);
    kg.cli_ok(
        &["secret", "add", "openai", "--host", "api.test"],
        Some(SECRET.as_bytes()),
    );
    let token = kg
        .cli_ok(&["agent", "create", "bot", "--grant", "openai"], None)
        .trim()
        .to_string();
    let ca_before = kg.ca_pem();
    let mode = |p: &str| {
        std::fs::metadata(data.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(""), 0o700);
    assert_eq!(mode("master.key"), 0o600);
    assert_eq!(mode("ca-key.pem"), 0o600);
    assert_eq!(mode("admin-token"), 0o600);
    let status = kg.stop();
    assert!(status.success(), "SIGTERM gives a clean exit: {status}");

    // Restart on the same data dir: same CA, same token, same secret.
    let kg2 = Keygate::start_with_data_dir(std::path::Path::new(BIN), &data, &args);
    assert_eq!(kg2.ca_pem(), ca_before);
    let c = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(format!("http://agent:{token}@{}", kg2.proxy)).unwrap())
        .tls_certs_only([reqwest::Certificate::from_pem(ca_before.as_bytes()).unwrap()])
        .build()
        .unwrap();
    c.get("https://api.test/v1/models").send().await.unwrap();
    assert_eq!(
        up.last().unwrap().header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    drop(kg2);

    // A group-readable master key makes serve refuse to start.
    std::fs::set_permissions(
        data.join("master.key"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let err = serve_refused(&data, &[]);
    assert!(err.contains("master.key"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn busy_polling_serves_requests_and_sleeps_when_idle() {
    let w = world_with(&["--workers", "1", "--busy-poll-us", "500"]).await;
    w.add_openai();
    let token = w.agent("bot", &["openai"]);
    for proto in ["--http1.1", "--http2", "--http1.1"] {
        w.curl_gets_the_real_key(&token, proto);
    }
    assert!(w.kg.logs().contains("busy_poll_us=500"), "{}", w.kg.logs());
    // Polling stops 500 µs after the last wake-up: a second of idleness
    // costs keygate (almost) nothing. A spinner that never stopped would
    // cost the whole second.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let stat = format!("/proc/{}/stat", w.kg.pid());
    let before = test_support::cpu_time(&stat);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let spent = test_support::cpu_time(&stat) - before;
    assert!(
        spent < std::time::Duration::from_millis(300),
        "idle keygate used {spent:?}"
    );
}

/// Runs `keygate serve` on `data` with `extra` arguments, expects it to
/// refuse to start and returns what it printed on stderr.
fn serve_refused(data: &std::path::Path, extra: &[&str]) -> String {
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--proxy-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .env("KEYGATE_DATA_DIR", data)
        .env_remove("KEYGATE_BUSY_POLL_US")
        .env_remove("KEYGATE_WORKERS")
        .output()
        .expect("run keygate");
    assert!(!out.status.success(), "keygate serve {extra:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn busy_polling_needs_a_single_worker() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let err = serve_refused(&data, &["--workers", "2", "--busy-poll-us", "100"]);
    assert!(
        err.contains("--busy-poll-us needs a single worker thread"),
        "{err}"
    );
    // Refused before anything was created.
    assert!(!data.exists());
}
