//! Audit records for every decision, the hash chain, and the promise that a
//! secret value never leaves the vault: not in logs, the database file, the
//! audit table or any API response.

mod common;

use common::*;
use keygate_store::Store;
use keygate_vault::{MasterKey, Vault};
use std::sync::Arc;

async fn open_store(w: &World) -> Store {
    let master = MasterKey::load_or_create(&w.kg.data_dir, None, None).unwrap();
    let url = format!("sqlite://{}", w.kg.data_dir.join("keygate.db").display());
    Store::open(&url, Arc::new(Vault::new(master)))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_decision_is_audited_and_edits_are_detected() {
    let w = world().await;
    w.add_openai();
    let token = w.agent("bot", &["openai"]);
    let c = w.client(&token);
    c.get("https://api.test/v1/models?api_key=should-not-be-stored")
        .send()
        .await
        .unwrap();
    c.get("https://other.test/hello").send().await.unwrap();
    w.curl(&token, &["http://api.test/v1/models"]);
    let _ = connect_raw(w.kg.proxy, "api.test:443", Some(&basic_auth("kg_nope"))).await;
    let _ = connect_raw(w.kg.proxy, "169.254.169.254:443", Some(&basic_auth(&token))).await;

    let records = w.audit();
    assert_eq!(records.len(), 5, "{records:#?}");
    let find = |decision: &str, host: &str| {
        records
            .iter()
            .find(|r| r["decision"] == decision && r["host"] == host)
            .unwrap_or_else(|| panic!("no {decision} record for {host}: {records:#?}"))
            .clone()
    };
    let injected = find("injected", "api.test");
    assert_eq!(injected["agent"], "bot");
    assert_eq!(injected["method"], "GET");
    assert_eq!(injected["scheme"], "https");
    assert_eq!(injected["port"], 443);
    assert_eq!(injected["path"], "/v1/models");
    assert_eq!(injected["status"], 200);
    assert_eq!(injected["secrets"], serde_json::json!(["openai"]));
    assert!(injected["reason"].is_null());
    assert!(injected["ts"].as_str().unwrap().contains('T'));
    let pass = find("passthrough", "other.test");
    assert_eq!(pass["secrets"], serde_json::json!([]));
    let plain = find("denied", "api.test");
    assert_eq!(plain["reason"], "plaintext_refused");
    assert_eq!(plain["status"], 403);
    let blocked = find("denied", "169.254.169.254");
    assert_eq!(blocked["reason"], "destination_blocked");
    let auth = records
        .iter()
        .find(|r| r["reason"] == "proxy_auth_required")
        .expect("refused authentication is audited");
    assert!(auth["agent"].is_null());
    assert_eq!(auth["status"], 407);
    let all = serde_json::to_string(&records).unwrap();
    assert!(
        !all.contains("should-not-be-stored"),
        "query strings are never stored"
    );

    // --agent filter
    let only: Vec<_> =
        w.kg.cli_ok(&["audit", "--json", "--agent", "bot"], None)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect();
    assert_eq!(only.len(), 4);
    assert!(only.iter().all(|r| r["agent"] == "bot"));

    let out = w.kg.cli(&["audit", "verify"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Edit one row: verify fails and names it.
    let store = open_store(&w).await;
    assert!(store
        .tamper_audit_record(2, |r| {
            r.status = 201;
            true
        })
        .await
        .unwrap());
    let out = w.kg.cli(&["audit", "verify"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("record 2 was modified"));
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_audit_rows_is_detected() {
    let w = world().await;
    let token = w.agent("bot", &[]);
    let c = w.client(&token);
    for _ in 0..4 {
        c.get("https://other.test/x").send().await.unwrap();
    }
    assert_eq!(w.audit().len(), 4);
    let store = open_store(&w).await;
    assert!(store.tamper_audit_record(4, |_| false).await.unwrap());
    let out = w.kg.cli(&["audit", "verify"], None);
    assert_eq!(out.status.code(), Some(1), "tail deletion must be detected");
    assert!(store.tamper_audit_record(2, |_| false).await.unwrap());
    let out = w.kg.cli(&["audit", "verify"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("record 2 is missing"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_secret_value_never_leaves_the_vault() {
    let w = world().await;
    w.add_openai();
    let token = w.agent("bot", &["openai"]);
    let c = w.client(&token);
    c.get("https://api.test/v1/models").send().await.unwrap();
    // A duplicate add with the same value: the error must not echo it.
    let dup = w.kg.cli(
        &["secret", "add", "openai", "--host", "api.test"],
        Some(SECRET.as_bytes()),
    );
    assert!(!dup.status.success());
    let mut seen_text = String::from_utf8_lossy(&dup.stderr).into_owned();
    seen_text.push_str(&String::from_utf8_lossy(&dup.stdout));
    w.kg.cli_ok(
        &["secret", "rotate", "openai"],
        Some(b"sk-second-value-abcdef"),
    );
    c.get("https://api.test/v1/models").send().await.unwrap();
    c.get("https://api.test/v1/../../x").send().await.unwrap();
    w.curl(&token, &["http://api.test/v1/models"]);

    // Every read API.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let admin = w.kg.admin_token();
    for path in [
        "/api/v1/secrets",
        "/api/v1/secrets/openai",
        "/api/v1/agents",
        "/api/v1/agents/bot",
        "/api/v1/audit?limit=1000",
        "/api/v1/audit/verify",
        "/api/v1/ca",
        "/ca.pem",
        "/healthz",
    ] {
        let body = http
            .get(format!("{}{path}", w.kg.admin_url()))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        seen_text.push_str(&body);
    }
    for args in [
        vec!["secret", "list"],
        vec!["secret", "list", "--json"],
        vec!["agent", "list", "--json"],
        vec!["audit", "--json"],
        vec!["audit"],
    ] {
        seen_text.push_str(&w.kg.cli_ok(&args, None));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    seen_text.push_str(&w.kg.logs());
    for value in [SECRET, "sk-second-value-abcdef"] {
        assert!(!seen_text.contains(value), "secret value leaked");
        // Not in the database file or its WAL, in any plaintext form.
        for file in ["keygate.db", "keygate.db-wal"] {
            if let Ok(bytes) = std::fs::read(w.kg.data_dir.join(file)) {
                assert!(
                    !bytes
                        .windows(value.len())
                        .any(|win| win == value.as_bytes()),
                    "{value} in {file}"
                );
                let b64 = {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD.encode(value)
                };
                assert!(!bytes.windows(b64.len()).any(|win| win == b64.as_bytes()));
            }
        }
    }
    // The listing shows a 4-character hint only.
    let list = w.kg.cli_ok(&["secret", "list", "--json"], None);
    assert!(list.contains("\"hint\":\"cdef\""), "{list}");
    // Tokens are not stored either.
    let db = std::fs::read(w.kg.data_dir.join("keygate.db")).unwrap();
    assert!(!db.windows(token.len()).any(|win| win == token.as_bytes()));
    assert!(!seen_text.contains(&token), "agent token leaked");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_requires_the_admin_token() {
    let w = world().await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for path in [
        "/api/v1/secrets",
        "/api/v1/agents",
        "/api/v1/audit",
        "/api/v1/audit/verify",
    ] {
        let r = http
            .get(format!("{}{path}", w.kg.admin_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let r = http
            .get(format!("{}{path}", w.kg.admin_url()))
            .bearer_auth("kga_wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unauthorized");
    }
    let r = http
        .post(format!("{}/api/v1/agents", w.kg.admin_url()))
        .json(&serde_json::json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Public endpoints.
    let r = http
        .get(format!("{}/ca.pem", w.kg.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("BEGIN CERTIFICATE"));
    let r = http
        .get(format!("{}/healthz", w.kg.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Bad input gets a JSON error, not a crash.
    let r = http
        .post(format!("{}/api/v1/secrets", w.kg.admin_url()))
        .bearer_auth(w.kg.admin_token())
        .json(&serde_json::json!({"name": "x", "host": "*", "value": "v"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid");
    assert!(v["error"]["message"].as_str().unwrap().starts_with("host"));
}
