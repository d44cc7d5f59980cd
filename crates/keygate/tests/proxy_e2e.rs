//! End-to-end: the real keygate binary between real clients (reqwest, curl,
//! a hand-driven tunnel) and a TLS upstream with its own CA.

mod common;

use common::*;

fn bearer_placeholder() -> (&'static str, &'static str) {
    ("authorization", "Bearer placeholder")
}

#[tokio::test(flavor = "multi_thread")]
async fn reqwest_through_connect_gets_the_real_key() {
    let w = world().await;
    w.add_openai();
    let token = w.agent("bot", &["openai"]);
    let resp = w
        .client(&token)
        .get("https://api.test/v1/models?limit=2")
        .header("Authorization", "Bearer placeholder")
        .send()
        .await
        .expect("request through keygate");
    assert_eq!(resp.status(), 200);
    let seen = w.up.last().expect("upstream saw the request");
    assert_eq!(
        seen.header_all("authorization"),
        vec![format!("Bearer {SECRET}")]
    );
    assert!(seen.header("proxy-authorization").is_none());
    assert_eq!(seen.target, "/v1/models?limit=2");
    assert_eq!(seen.sni.as_deref(), Some("api.test"));
    assert!(!seen
        .headers
        .iter()
        .any(|(_, v)| v.contains("placeholder") || v.contains(&token)));
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_http1_and_http2_get_the_real_key() {
    let w = world().await;
    w.add_openai();
    let token = w.agent("bot", &["openai"]);
    for proto in ["--http1.1", "--http2"] {
        w.curl_gets_the_real_key(&token, proto);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_wrong_and_deleted_tokens_get_407() {
    let w = world().await;
    w.add_openai();
    let token = w.agent("bot", &["openai"]);

    let e = connect_raw(w.kg.proxy, "api.test:443", None)
        .await
        .unwrap_err();
    assert_eq!(e.status, 407, "{}", e.head);
    assert!(
        e.head
            .contains("Proxy-Authenticate: Basic realm=\"keygate\"")
            || e.head
                .to_ascii_lowercase()
                .contains("proxy-authenticate: basic realm=\"keygate\""),
        "{}",
        e.head
    );
    assert!(e.head.contains("proxy_auth_required"), "{}", e.head);

    let e = connect_raw(w.kg.proxy, "api.test:443", Some(&basic_auth("kg_wrong")))
        .await
        .unwrap_err();
    assert_eq!(e.status, 407);

    // Bearer form and token-as-username form work.
    assert!(
        connect_raw(w.kg.proxy, "api.test:443", Some(&format!("Bearer {token}")))
            .await
            .is_ok()
    );
    let user_only = {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{token}:"))
        )
    };
    assert!(connect_raw(w.kg.proxy, "api.test:443", Some(&user_only))
        .await
        .is_ok());

    // Deleted while a tunnel is open: the next request in it gets 407.
    let mut t = Tunnel::open(
        w.kg.proxy,
        "api.test:443",
        &token,
        "api.test",
        &w.kg.ca_pem(),
    )
    .await
    .expect("tunnel");
    let a = t
        .get("/v1/x", &[("host", "api.test"), bearer_placeholder()])
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    w.kg.cli_ok(&["agent", "rm", "bot"], None);
    w.up.clear();
    let a = t
        .get("/v1/x", &[("host", "api.test"), bearer_placeholder()])
        .await
        .unwrap();
    assert_eq!(a.status, 407);
    assert_eq!(a.error_code().as_deref(), Some("proxy_auth_required"));
    assert!(
        w.up.seen().is_empty(),
        "nothing reaches the upstream after revocation"
    );
    let e = connect_raw(w.kg.proxy, "api.test:443", Some(&basic_auth(&token)))
        .await
        .unwrap_err();
    assert_eq!(e.status, 407);
}

#[tokio::test(flavor = "multi_thread")]
async fn grants_are_per_agent() {
    let w = world().await;
    w.add_openai();
    let with = w.agent("with-grant", &["openai"]);
    let without = w.agent("without-grant", &[]);

    let resp = w
        .client(&without)
        .get("https://api.test/v1/models")
        .header("Authorization", "Bearer placeholder")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = w.up.last().unwrap();
    assert_eq!(seen.header("authorization"), Some("Bearer placeholder"));

    // A grant given to another agent is never used for this one, even on a
    // connection opened after the other agent used it.
    w.client(&with)
        .get("https://api.test/v1/models")
        .send()
        .await
        .unwrap();
    assert_eq!(
        w.up.last().unwrap().header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    w.client(&without)
        .get("https://api.test/v1/models")
        .send()
        .await
        .unwrap();
    assert_eq!(w.up.last().unwrap().header("authorization"), None);

    // Granting later takes effect on the next request.
    w.kg.cli_ok(&["agent", "grant", "without-grant", "openai"], None);
    w.client(&without)
        .get("https://api.test/v1/models")
        .send()
        .await
        .unwrap();
    assert_eq!(
        w.up.last().unwrap().header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    // And revoking too.
    w.kg.cli_ok(&["agent", "revoke", "without-grant", "openai"], None);
    w.client(&without)
        .get("https://api.test/v1/models")
        .send()
        .await
        .unwrap();
    assert_eq!(w.up.last().unwrap().header("authorization"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn host_header_or_sni_for_another_host_gets_no_credential() {
    let w = world().await;
    w.add_openai();
    let token = w.agent("bot", &["openai"]);
    let ca = w.kg.ca_pem();

    // Tunnel to other.test, Host header says api.test: 421, nothing sent.
    let mut t = Tunnel::open(w.kg.proxy, "other.test:443", &token, "other.test", &ca)
        .await
        .unwrap();
    let a = t.get("/v1/models", &[("host", "api.test")]).await.unwrap();
    assert_eq!(a.status, 421);
    assert_eq!(a.error_code().as_deref(), Some("host_mismatch"));
    // Absolute-form target naming another host inside the tunnel: 421 too.
    let a = t.get("https://api.test/v1/models", &[]).await.unwrap();
    assert_eq!(a.status, 421);
    assert!(w.up.seen().is_empty());

    // Tunnel to api.test with SNI other.test: handshake refused.
    let r = Tunnel::open(w.kg.proxy, "api.test:443", &token, "other.test", &ca).await;
    assert!(r.is_err(), "SNI mismatch must be refused");

    // Tunnel to other.test with SNI api.test: refused as well.
    let r = Tunnel::open(w.kg.proxy, "other.test:443", &token, "api.test", &ca).await;
    assert!(r.is_err(), "SNI mismatch must be refused");
    assert!(w.up.seen().is_empty());

    // Same host, Host with explicit :443 is fine.
    let mut t = Tunnel::open(w.kg.proxy, "api.test:443", &token, "api.test", &ca)
        .await
        .unwrap();
    let a = t
        .get("/v1/models", &[("host", "API.test:443")])
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(
        w.up.last().unwrap().header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn path_tricks_cannot_widen_a_path_pattern() {
    let w = world().await;
    w.add_openai();
    let token = w.agent("bot", &["openai"]);
    let mut t = Tunnel::open(
        w.kg.proxy,
        "api.test:443",
        &token,
        "api.test",
        &w.kg.ca_pem(),
    )
    .await
    .unwrap();
    let real = format!("Bearer {SECRET}");
    // Normalised outside /v1: forwarded as the normalised path, no credential.
    for target in [
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1/%2E%2E/admin",
        "/v1/.%2e/admin",
        "/v1/./../admin",
        "/v1x/models",
        "//v1/models",
        "/V1/models",
    ] {
        w.up.clear();
        let a = t
            .get(target, &[("host", "api.test"), bearer_placeholder()])
            .await
            .unwrap();
        let seen = w.up.seen();
        for s in &seen {
            assert_ne!(
                s.header("authorization"),
                Some(real.as_str()),
                "{target} got the key"
            );
            assert!(
                !s.target.starts_with("/v1/") || target.starts_with("/v1/.."),
                "{target} forwarded as {}",
                s.target
            );
        }
        if target.contains("..") || target.contains("%2") {
            assert_eq!(a.status, 200, "{target}");
            assert_eq!(seen.len(), 1);
            assert_eq!(
                seen[0].target, "/admin",
                "{target} must be forwarded as it was matched"
            );
        }
    }
    // Ambiguous encodings are refused outright when a credential could apply.
    for target in [
        "/v1%2Fmodels",
        "/v1%2fmodels",
        "/v1/%252e%252e/admin",
        "/v1/%5c..%5cadmin",
        "/v1/x%00",
    ] {
        w.up.clear();
        let a = t
            .get(target, &[("host", "api.test"), bearer_placeholder()])
            .await
            .unwrap();
        assert_eq!(a.status, 400, "{target}");
        assert_eq!(
            a.error_code().as_deref(),
            Some("path_ambiguous"),
            "{target}"
        );
        assert!(w.up.seen().is_empty(), "{target} reached the upstream");
    }
    // The in-pattern path still gets the key, normalised.
    w.up.clear();
    let a = t
        .get(
            "/v1/a/../models",
            &[("host", "api.test"), bearer_placeholder()],
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    let s = w.up.last().unwrap();
    assert_eq!(s.target, "/v1/models");
    assert_eq!(s.header("authorization"), Some(real.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn port_mismatch_injects_nothing() {
    let w = world().await;
    w.add_openai();
    let token = w.agent("bot", &["openai"]);
    let (ok, _out, err) = w.curl(
        &token,
        &[
            "-H",
            "Authorization: Bearer placeholder",
            "https://api.test:8443/v1/models",
        ],
    );
    assert!(ok, "{err}");
    let s = w.up.last().unwrap();
    assert_eq!(s.header("authorization"), Some("Bearer placeholder"));
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_http_to_a_credentialed_host_is_refused() {
    let w = world().await;
    w.add_openai();
    let token = w.agent("bot", &["openai"]);
    let (ok, out, err) = w.curl(&token, &["-i", "http://api.test/v1/models"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("keygate-error: plaintext_refused"),
        "{out}"
    );
    assert!(out.contains("\"code\":\"plaintext_refused\""), "{out}");
    assert!(w.up.seen().is_empty());
    // A plaintext request no credential applies to is forwarded untouched.
    let (ok, out, err) = w.curl(
        &token,
        &["-i", "-H", "X-Keep: 1", "http://other.test/hello"],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let s = w.up.last().unwrap();
    assert_eq!(s.target, "/hello");
    assert_eq!(s.header("x-keep"), Some("1"));
    assert!(s.header("proxy-authorization").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn own_listeners_and_metadata_are_blocked() {
    let w = world().await;
    let token = w.agent("bot", &[]);
    for authority in [
        w.kg.admin.to_string(),
        w.kg.proxy.to_string(),
        "169.254.169.254:443".to_string(),
        "[fd00:ec2::254]:443".to_string(),
        "10.0.0.1:443".to_string(),
    ] {
        let e = connect_raw(w.kg.proxy, &authority, Some(&basic_auth(&token)))
            .await
            .unwrap_err();
        assert_eq!(e.status, 403, "{authority}: {}", e.head);
        assert!(
            e.head.contains("destination_blocked"),
            "{authority}: {}",
            e.head
        );
    }
    // Absolute-form to the admin API and the metadata service as well.
    let (ok, out, _) = w.curl(
        &token,
        &["-i", &format!("http://{}/api/v1/secrets", w.kg.admin)],
    );
    assert!(ok);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("destination_blocked"), "{out}");
    let (ok, out, _) = w.curl(&token, &["-i", "http://169.254.169.254/latest/meta-data/"]);
    assert!(ok);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_applies_to_the_next_request_in_an_open_tunnel() {
    let w = world().await;
    w.add_openai();
    let token = w.agent("bot", &["openai"]);
    let mut t = Tunnel::open(
        w.kg.proxy,
        "api.test:443",
        &token,
        "api.test",
        &w.kg.ca_pem(),
    )
    .await
    .unwrap();
    t.get("/v1/models", &[("host", "api.test")]).await.unwrap();
    assert_eq!(
        w.up.last().unwrap().header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    w.kg.cli_ok(
        &["secret", "rotate", "openai"],
        Some(b"sk-rotated-000111222333\n"),
    );
    t.get("/v1/models", &[("host", "api.test")]).await.unwrap();
    assert_eq!(
        w.up.last().unwrap().header("authorization"),
        Some("Bearer sk-rotated-000111222333")
    );
    w.kg.cli_ok(&["secret", "rm", "openai"], None);
    t.get("/v1/models", &[("host", "api.test")]).await.unwrap();
    assert_eq!(w.up.last().unwrap().header("authorization"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn most_specific_secret_wins_and_ties_are_refused() {
    let w = world().await;
    let add = |name: &str, host: &str, path: &str, value: &str| {
        w.kg.cli(
            &["secret", "add", name, "--host", host, "--path", path],
            Some(value.as_bytes()),
        )
    };
    assert!(add("wild", "*.api.test", "*", "wild-value-0000000")
        .status
        .success());
    assert!(add("exact", "x.api.test", "*", "exact-value-000000")
        .status
        .success());
    assert!(add("exact-v1", "x.api.test", "/v1/*", "exact-v1-value-000")
        .status
        .success());
    let tie = add("tie", "x.api.test", "/v1/*", "tie-value-00000000");
    assert!(!tie.status.success(), "a tying secret must be refused");
    assert!(String::from_utf8_lossy(&tie.stderr).contains("tie"));
    let token = w.agent("bot", &["wild", "exact", "exact-v1"]);
    let c = w.client(&token);
    c.get("https://x.api.test/v1/models").send().await.unwrap();
    assert_eq!(
        w.up.last().unwrap().header("authorization"),
        Some("Bearer exact-v1-value-000")
    );
    c.get("https://x.api.test/other").send().await.unwrap();
    assert_eq!(
        w.up.last().unwrap().header("authorization"),
        Some("Bearer exact-value-000000")
    );
    // The apex is not covered by the wildcard.
    c.get("https://api.test/v1/models").send().await.unwrap();
    assert_eq!(w.up.last().unwrap().header("authorization"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_header_and_format() {
    let w = world().await;
    w.kg.cli_ok(
        &[
            "secret",
            "add",
            "anthropic",
            "--host",
            "api.test",
            "--header",
            "x-api-key",
            "--format",
            "{secret}",
        ],
        Some(b"ak-live-1234567890"),
    );
    let token = w.agent("bot", &["anthropic"]);
    w.client(&token)
        .get("https://api.test/v1/messages")
        .header("x-api-key", "placeholder")
        .header("X-API-KEY", "second-placeholder")
        .send()
        .await
        .unwrap();
    let s = w.up.last().unwrap();
    assert_eq!(s.header_all("x-api-key"), vec!["ak-live-1234567890"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_certificate_failure_is_502_naming_the_cause() {
    // keygate without --upstream-ca: the test upstream's CA is not trusted.
    let up = Upstream::start(&["api.test"]).await;
    let kg = Keygate::start(
        std::path::Path::new(BIN),
        &[
            "--allow-net".into(),
            "127.0.0.0/8".into(),
            "--resolve".into(),
            format!("api.test:443={}", up.tls_addr),
        ],
    );
    let token = kg
        .cli_ok(&["agent", "create", "bot"], None)
        .trim()
        .to_string();
    let mut t = Tunnel::open(kg.proxy, "api.test:443", &token, "api.test", &kg.ca_pem())
        .await
        .unwrap();
    let a = t.get("/v1/models", &[("host", "api.test")]).await.unwrap();
    assert_eq!(a.status, 502);
    assert_eq!(a.error_code().as_deref(), Some("upstream_certificate"));
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("certificate"),
        "{}",
        a.body
    );
    assert!(up.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn disabled_agent_is_refused_until_enabled() {
    let w = world().await;
    w.add_openai();
    let token = w.agent("bot", &["openai"]);
    let mut t = Tunnel::open(
        w.kg.proxy,
        "api.test:443",
        &token,
        "api.test",
        &w.kg.ca_pem(),
    )
    .await
    .unwrap();
    let a = t.get("/v1/x", &[("host", "api.test")]).await.unwrap();
    assert_eq!(a.status, 200);
    w.kg.cli_ok(&["agent", "disable", "bot"], None);
    let a = t.get("/v1/x", &[("host", "api.test")]).await.unwrap();
    assert_eq!(a.status, 407, "disabled inside an open tunnel");
    let e = connect_raw(w.kg.proxy, "api.test:443", Some(&basic_auth(&token)))
        .await
        .unwrap_err();
    assert_eq!(e.status, 407);
    let list = w.kg.cli_ok(&["agent", "list", "--json"], None);
    assert!(list.contains("\"disabled\":true"), "{list}");
    w.kg.cli_ok(&["agent", "enable", "bot"], None);
    w.up.clear();
    let a = t.get("/v1/x", &[("host", "api.test")]).await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(
        w.up.last().unwrap().header("authorization"),
        Some(format!("Bearer {SECRET}").as_str()),
        "grants survive disable/enable"
    );
}

/// The timer of the local TCP socket at `local` connected to
/// `remote_port`, as the kernel lists it: (timer kind, seconds until it
/// fires).
fn socket_timer(local: std::net::SocketAddr, remote_port: u16) -> Option<(u8, f64)> {
    test_support::tcp_sockets()
        .into_iter()
        .find(|s| s.local_port == local.port() && s.remote_port == remote_port)
        .map(|s| (s.timer, s.timer_left_s))
}

/// An agent's connection has TCP keepalive: after `--header-read-timeout`
/// (30 s) of silence the kernel probes the agent, so one whose host or
/// network went away is found and its connection (an idle HTTP/2 tunnel,
/// say) closed. The kernel shows keygate's side with its keepalive timer
/// (kind 2) armed to fire within those 30 s; without keepalive an idle
/// connection has no timer at all (kind 0).
#[tokio::test(flavor = "multi_thread")]
async fn agent_connections_have_tcp_keepalive() {
    let w = world().await;
    let agent = tokio::net::TcpStream::connect(w.kg.proxy)
        .await
        .expect("connect");
    let ours = agent.local_addr().expect("local addr").port();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // Polled until keygate has accepted and set the socket up (the kernel
    // arms the timer at its 2-hour default when keepalive is switched on,
    // then re-arms it when the idle time is set).
    let left = loop {
        match socket_timer(w.kg.proxy, ours) {
            Some((2, left)) if left <= 30.0 => break left,
            seen if std::time::Instant::now() > deadline => {
                panic!("keygate's side of the connection has no 30 s keepalive timer: {seen:?}")
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    };
    assert!(left > 20.0, "keepalive fires in {left} s");
    // The agent's own side, for contrast: no keepalive, no timer.
    let agent_side = socket_timer(agent.local_addr().unwrap(), w.kg.proxy.port());
    assert_eq!(agent_side.map(|t| t.0), Some(0), "{agent_side:?}");
}
