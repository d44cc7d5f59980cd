//! The dashboard's store queries (counts, time boundaries, last use, the
//! admin password hash) on SQLite always and on PostgreSQL when
//! KEYGATE_TEST_POSTGRES_URL names a server (a fresh database per run).

use std::sync::Arc;

use keygate_core::{AuditEvent, Decision};
use keygate_store::testing::TestPostgres;
use keygate_store::{AuditFilter, Store};
use keygate_vault::{MasterKey, Vault};

fn event(ts_ms: i64, agent: &str, host: &str, decision: Decision, secrets: &[&str]) -> AuditEvent {
    AuditEvent {
        ts_ms,
        agent: Some(agent.into()),
        method: "GET".into(),
        scheme: "https".into(),
        host: host.into(),
        port: 443,
        path: "/v1/x".into(),
        status: 200,
        decision,
        reason: None,
        secrets: secrets.iter().map(|s| s.to_string()).collect(),
        duration_us: 1,
        bytes_up: None,
        bytes_down: None,
    }
}

async fn scenario(url: &str) {
    let store = Store::open(url, Arc::new(Vault::new(MasterKey::generate())))
        .await
        .expect("open");
    assert_eq!(store.admin_password_hash().await.expect("read"), None);
    store
        .set_admin_password_hash("$argon2id$one")
        .await
        .expect("set");
    store
        .set_admin_password_hash("$argon2id$two")
        .await
        .expect("replace");
    assert_eq!(
        store.admin_password_hash().await.expect("read").as_deref(),
        Some("$argon2id$two")
    );

    let now = keygate_core::now_ms();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let writer = store.audit_writer(rx).await.expect("writer");
    let task = tokio::spawn(writer.run());
    let day = 86_400_000;
    for e in [
        event(now - 3 * day, "old", "a.test", Decision::Injected, &["k1"]),
        event(
            now - 2 * 3_600_000,
            "bot",
            "a.test",
            Decision::Injected,
            &["k1"],
        ),
        event(now - 60_000, "bot", "b.test", Decision::Denied, &[]),
        event(now - 30_000, "bot", "a.test", Decision::Injected, &["k2"]),
        event(now - 10_000, "other", "a.test", Decision::Passthrough, &[]),
    ] {
        tx.send(e).await.expect("send");
    }
    drop(tx);
    task.await.expect("writer task");

    let hour = store
        .audit_counts_since(now - 3_600_000)
        .await
        .expect("hour");
    let get = |v: &[(String, i64)], d: &str| v.iter().find(|(k, _)| k == d).map(|(_, n)| *n);
    assert_eq!(get(&hour, "injected"), Some(1));
    assert_eq!(get(&hour, "denied"), Some(1));
    assert_eq!(get(&hour, "passthrough"), Some(1));
    assert_eq!(get(&hour, "error"), Some(0));
    let dayc = store.audit_counts_since(now - day).await.expect("day");
    assert_eq!(get(&dayc, "injected"), Some(2));

    assert_eq!(
        store
            .audit_seq_at_or_before(now - 2 * day)
            .await
            .expect("seq"),
        Some(1)
    );
    assert_eq!(
        store
            .audit_seq_at_or_before(now - 5 * day)
            .await
            .expect("seq"),
        None
    );
    assert_eq!(
        store.audit_seq_at_or_before(now).await.expect("seq"),
        Some(5)
    );

    let seen = store
        .agents_last_seen(&["bot".into(), "nobody".into()])
        .await
        .expect("seen");
    assert_eq!(seen.get("bot"), Some(&(now - 30_000)));
    assert!(!seen.contains_key("nobody"));

    let used = store.secrets_last_used(100).await.expect("used");
    assert_eq!(used.get("k1"), Some(&(now - 2 * 3_600_000)));
    assert_eq!(used.get("k2"), Some(&(now - 30_000)));

    let by_host = store
        .audit_query(&AuditFilter {
            host: Some("b.test".into()),
            ..AuditFilter::default()
        })
        .await
        .expect("query");
    assert_eq!(by_host.len(), 1);
    assert!(store.audit_verify().await.expect("verify").ok);
    store.close().await;
}

#[tokio::test]
async fn sqlite_dashboard_queries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("kg.db").display());
    scenario(&url).await;
}

#[tokio::test]
async fn postgres_dashboard_queries() {
    let Some(db) = TestPostgres::create("admin_test").await else {
        return;
    };
    scenario(&db.url).await;
    db.drop_now().await;
}
