//! The same store scenario on SQLite (always) and PostgreSQL (when
//! KEYGATE_TEST_POSTGRES_URL names a server; `.ci/run` sets it). Each
//! PostgreSQL run creates a fresh database and drops it afterwards.

use std::sync::Arc;

use keygate_core::{AuditEvent, Decision};
use keygate_store::testing::TestPostgres;
use keygate_store::{AuditFilter, NewSecret, Store, StoreError};
use keygate_vault::{MasterKey, Vault};
use zeroize::Zeroizing;

fn vault() -> Arc<Vault> {
    Arc::new(Vault::new(MasterKey::generate()))
}

fn secret(name: &str, host: &str, path: &str, value: &str) -> NewSecret {
    NewSecret {
        name: name.into(),
        host: host.into(),
        path: path.into(),
        header: "Authorization".into(),
        format: "Bearer {secret}".into(),
        value: Zeroizing::new(value.as_bytes().to_vec()),
    }
}

fn event(agent: &str, status: u16) -> AuditEvent {
    AuditEvent {
        ts_ms: keygate_core::now_ms(),
        agent: Some(agent.into()),
        method: "GET".into(),
        scheme: "https".into(),
        host: "api.test".into(),
        port: 443,
        path: "/v1/models".into(),
        status,
        decision: Decision::Injected,
        reason: None,
        secrets: vec!["openai".into()],
        duration_us: 42,
        bytes_up: None,
        bytes_down: None,
    }
}

/// Runs `scenario` on a SQLite store file in a temporary directory.
async fn on_sqlite(scenario: impl AsyncFnOnce(&str)) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("kg.db").display());
    scenario(&url).await;
}

/// Runs `scenario` on a fresh PostgreSQL database, dropped afterwards, when
/// `KEYGATE_TEST_POSTGRES_URL` names a server.
async fn on_postgres(tag: &str, scenario: impl AsyncFnOnce(&str)) {
    let Some(db) = TestPostgres::create(tag).await else {
        return;
    };
    scenario(&db.url).await;
    db.drop_now().await;
}

async fn scenario(url: &str) {
    let vault = vault();
    let store = Store::open(url, vault.clone()).await.expect("open store");
    let snap = store.snapshot();

    let info = store
        .add_secret(secret("openai", "api.test", "/v1/*", "sk-value-0123456789"))
        .await
        .unwrap();
    assert_eq!(info.hint, "6789");
    assert_eq!(info.version, 1);
    // Same patterns and header: refused as a tie; other header: fine.
    let tie = store
        .add_secret(secret("dup", "API.test", "/v1/*", "other-value-000000"))
        .await;
    assert!(matches!(tie, Err(StoreError::Conflict(_))), "{tie:?}");
    let mut other = secret("org", "api.test", "/v1/*", "org-0000000000000");
    other.header = "OpenAI-Organization".into();
    other.format = "{secret}".into();
    store.add_secret(other).await.unwrap();
    assert!(matches!(
        store
            .add_secret(secret("openai", "b.test", "*", "zzzzzzzzzzzzzz"))
            .await,
        Err(StoreError::Conflict(_))
    ));

    let (agent, token) = store
        .create_agent("bot", &["openai".to_string()])
        .await
        .unwrap();
    assert_eq!(agent.grants, vec!["openai".to_string()]);
    let hash = store.token_hasher().hash(&token);
    let entry = snap
        .load()
        .agent(&hash)
        .cloned()
        .expect("agent in snapshot");
    assert_eq!(entry.grants.len(), 1);
    let sealed = &entry.grants[0];
    let plain = vault
        .open(&sealed.id, sealed.version, &sealed.sealed)
        .unwrap();
    assert_eq!(&plain[..], b"sk-value-0123456789");

    // Rotation publishes a new version at once.
    store
        .rotate_secret("openai", Zeroizing::new(b"sk-rotated-99999999".to_vec()))
        .await
        .unwrap();
    let entry = snap.load().agent(&hash).cloned().unwrap();
    let s = &entry.grants[0];
    assert_eq!(s.version, 2);
    assert_eq!(
        &vault.open(&s.id, s.version, &s.sealed).unwrap()[..],
        b"sk-rotated-99999999"
    );

    store.grant("bot", "org").await.unwrap();
    assert_eq!(snap.load().agent(&hash).unwrap().grants.len(), 2);
    store.revoke("bot", "org").await.unwrap();
    assert_eq!(snap.load().agent(&hash).unwrap().grants.len(), 1);
    assert!(matches!(
        store.revoke("bot", "org").await,
        Err(StoreError::NotFound(_))
    ));

    store.set_agent_disabled("bot", true).await.unwrap();
    assert!(snap.load().agent(&hash).is_none(), "disabled agent refused");
    assert!(store.agent("bot").await.unwrap().disabled);
    store.set_agent_disabled("bot", false).await.unwrap();
    assert_eq!(
        snap.load().agent(&hash).unwrap().grants.len(),
        1,
        "grants kept"
    );
    assert!(matches!(
        store.set_agent_disabled("nobody", true).await,
        Err(StoreError::NotFound(_))
    ));

    let new_token = store.regenerate_token("bot").await.unwrap();
    assert!(
        snap.load().agent(&hash).is_none(),
        "old token stops working"
    );
    let new_hash = store.token_hasher().hash(&new_token);
    assert!(snap.load().agent(&new_hash).is_some());

    // Audit: batch writer, query, verify, tamper detection.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let writer = tokio::spawn(store.audit_writer(rx).await.unwrap().run());
    for i in 0..20 {
        let mut e = event(if i % 2 == 0 { "bot" } else { "other" }, 200);
        // A few of the rarer decisions (seq 4 and 16 denied, 6 passthrough).
        match i {
            3 | 15 => e.decision = Decision::Denied,
            5 => e.decision = Decision::Passthrough,
            _ => {}
        }
        if i == 10 {
            // seq 11: a WebSocket session, with the bytes piped each way.
            e.status = 101;
            e = e.with_bytes(1234, 5678);
        }
        tx.send(e).await.unwrap();
    }
    drop(tx);
    writer.await.unwrap();
    let all = store
        .audit_query(&AuditFilter {
            limit: Some(100),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 20);
    assert_eq!(all[0].seq, 20, "newest first");
    let bots = store
        .audit_query(&AuditFilter {
            agent: Some("bot".into()),
            limit: Some(100),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(bots.len(), 10);
    let page = store
        .audit_query(&AuditFilter {
            before_seq: Some(5),
            limit: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4, 3]);
    // Each decision filter (the rarer ones through a partial index, the
    // injected ones by walking the table), with an agent and a page.
    let by_decision = |decision: &str, agent: Option<&str>, before_seq: Option<i64>| {
        let filter = AuditFilter {
            decision: Some(decision.into()),
            agent: agent.map(Into::into),
            before_seq,
            limit: Some(100),
            ..Default::default()
        };
        let store = &store;
        async move {
            let rows = store.audit_query(&filter).await.unwrap();
            rows.iter().map(|r| r.seq).collect::<Vec<_>>()
        }
    };
    assert_eq!(by_decision("denied", None, None).await, vec![16, 4]);
    assert_eq!(by_decision("denied", None, Some(16)).await, vec![4]);
    assert_eq!(
        by_decision("denied", Some("other"), None).await,
        vec![16, 4]
    );
    assert_eq!(
        by_decision("denied", Some("bot"), None).await,
        Vec::<i64>::new()
    );
    assert_eq!(by_decision("passthrough", None, None).await, vec![6]);
    assert_eq!(by_decision("error", None, None).await, Vec::<i64>::new());
    let injected: Vec<i64> = (1..=20).rev().filter(|s| ![4, 6, 16].contains(s)).collect();
    assert_eq!(by_decision("injected", None, None).await, injected);
    assert_eq!(
        by_decision("injected", Some("bot"), Some(10)).await,
        vec![9, 7, 5, 3, 1]
    );
    assert!(store.audit_verify().await.unwrap().ok);
    let set_path = |path: &'static str| {
        let store = &store;
        async move {
            assert!(store
                .tamper_audit_record(7, |r| {
                    r.path = path.into();
                    true
                })
                .await
                .unwrap());
        }
    };
    set_path("/v1/other").await;
    let report = store.audit_verify().await.unwrap();
    assert!(!report.ok);
    assert_eq!(report.first_bad_seq, Some(7));
    set_path("/v1/models").await;
    assert!(store.audit_verify().await.unwrap().ok, "edit undone");

    // Byte counts round-trip (only on the upgrade record) and are covered
    // by the hash chain.
    let around = store
        .audit_query(&AuditFilter {
            before_seq: Some(13),
            limit: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    let counts = |seq: i64| {
        around
            .iter()
            .find(|r| r.seq == seq)
            .map(|r| (r.status, r.bytes_up, r.bytes_down))
    };
    assert_eq!(counts(11), Some((101, Some(1234), Some(5678))));
    assert_eq!(counts(12), Some((200, None, None)));
    type Edit = fn(&mut keygate_store::AuditRecord);
    let edits: [(&str, i64, Edit); 5] = [
        ("bytes_up = 1235", 11, |r| r.bytes_up = Some(1235)),
        ("bytes_down = 0", 11, |r| r.bytes_down = Some(0)),
        ("bytes_down = NULL", 11, |r| r.bytes_down = None),
        ("bytes_up = NULL, bytes_down = NULL", 11, |r| {
            (r.bytes_up, r.bytes_down) = (None, None)
        }),
        ("bytes_up = 0, bytes_down = 0", 12, |r| {
            (r.bytes_up, r.bytes_down) = (Some(0), Some(0))
        }),
    ];
    for (tamper, seq, edit) in edits {
        let before = store
            .audit_query(&AuditFilter {
                before_seq: Some(seq + 1),
                limit: Some(1),
                ..Default::default()
            })
            .await
            .unwrap()
            .remove(0);
        store
            .tamper_audit_record(seq, |r| {
                edit(r);
                true
            })
            .await
            .unwrap();
        let report = store.audit_verify().await.unwrap();
        assert!(!report.ok, "{tamper} went unnoticed");
        assert_eq!(report.first_bad_seq, Some(seq), "{tamper}");
        store
            .tamper_audit_record(seq, |r| {
                *r = before;
                true
            })
            .await
            .unwrap();
        assert!(store.audit_verify().await.unwrap().ok, "{tamper} undone");
    }

    // The chunk index the dashboard pages by is checked too: a key renamed
    // (it would hide records from a filtered view), a count or a time
    // range edited.
    for (tamper, undo) in [
        (
            "UPDATE audit_chunk_key SET key = 'd:gone' WHERE key = 'd:denied'",
            "UPDATE audit_chunk_key SET key = 'd:denied' WHERE key = 'd:gone'",
        ),
        (
            "UPDATE audit_chunk_key SET last_ts = last_ts - 1 WHERE key = 'a:bot'",
            "UPDATE audit_chunk_key SET last_ts = last_ts + 1 WHERE key = 'a:bot'",
        ),
        (
            "UPDATE audit_chunk SET n_denied = n_denied + 1",
            "UPDATE audit_chunk SET n_denied = n_denied - 1",
        ),
        (
            "UPDATE audit_chunk SET ts_max = ts_max + 1",
            "UPDATE audit_chunk SET ts_max = ts_max - 1",
        ),
        (
            "UPDATE audit_chunk SET last_seq = last_seq + 1",
            "UPDATE audit_chunk SET last_seq = last_seq - 1",
        ),
    ] {
        assert!(store.execute_raw(tamper).await.unwrap() > 0, "{tamper}");
        let report = store.audit_verify().await.unwrap();
        assert!(!report.ok, "{tamper} went unnoticed");
        assert!(report.message.contains("does not match"), "{report:?}");
        store.execute_raw(undo).await.unwrap();
        assert!(store.audit_verify().await.unwrap().ok, "{tamper} undone");
    }

    // A second store on the same database (another process) sees the same
    // token-hash key and continues the audit chain.
    let again = Store::open(url, vault.clone()).await.unwrap();
    assert!(again.snapshot().load().agent(&new_hash).is_some());

    // Opening with another master key fails clearly.
    let wrong = Store::open(url, self::vault()).await;
    assert!(matches!(wrong, Err(StoreError::Corrupt(_))), "{wrong:?}");

    store.remove_secret("openai").await.unwrap();
    assert!(snap.load().agent(&new_hash).unwrap().grants.is_empty());
    store.remove_agent("bot").await.unwrap();
    assert!(snap.load().agents.is_empty());
    store.close().await;
}

#[tokio::test]
async fn sqlite_backend() {
    on_sqlite(scenario).await;
}

#[tokio::test]
async fn postgres_backend() {
    on_postgres("test", scenario).await;
}

#[tokio::test]
async fn large_audit_batches_keep_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("kg.db").display());
    let store = Store::open(&url, vault()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    // Fill the channel before the writer starts so batches span several
    // multi-row INSERT chunks.
    for i in 0..700 {
        tx.send(event("bot", 200 + (i % 3) as u16)).await.unwrap();
    }
    let writer = tokio::spawn(store.audit_writer(rx).await.unwrap().run());
    drop(tx);
    writer.await.unwrap();
    let report = store.audit_verify().await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 700);
    let newest = store
        .audit_query(&AuditFilter {
            limit: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(newest[0].seq, 700);
    assert_eq!(
        newest[0].status, 200,
        "seq 700 was event 699: status 200 + 699 % 3"
    );
}

#[tokio::test]
async fn a_failed_audit_write_is_retried_with_the_same_records() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kg.db");
    let store = Store::open(&format!("sqlite://{}", file.display()), vault())
        .await
        .unwrap();
    // Every audit write fails until the trigger goes.
    let other = rusqlite::Connection::open(&file).unwrap();
    other
        .execute_batch(
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_chunk \
             BEGIN SELECT RAISE(ABORT, 'test: audit refused'); END;",
        )
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let writer = tokio::spawn(store.audit_writer(rx).await.unwrap().run());
    for status in [200, 201, 202] {
        tx.send(event("bot", status)).await.unwrap();
    }
    // The writer has tried (and retried) by now; nothing got in.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(store.audit_verify().await.unwrap().records, 0);
    other.execute_batch("DROP TRIGGER refuse_audit").unwrap();
    drop(tx);
    // The writer ends once the batch it holds is written.
    tokio::time::timeout(std::time::Duration::from_secs(20), writer)
        .await
        .expect("the writer retried and finished")
        .unwrap();
    let report = store.audit_verify().await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 3);
    let mut rows = store.audit_query(&AuditFilter::default()).await.unwrap();
    rows.sort_by_key(|r| r.seq);
    let got: Vec<(i64, i64)> = rows.iter().map(|r| (r.seq, r.status)).collect();
    assert_eq!(got, vec![(1, 200), (2, 201), (3, 202)]);
}

async fn write_events(store: &Store, statuses: &[u16]) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let writer = tokio::spawn(store.audit_writer(rx).await.unwrap().run());
    for &status in statuses {
        tx.send(event("bot", status)).await.unwrap();
    }
    drop(tx);
    writer.await.unwrap();
}

/// The per-record `audit` table of migrations 0001–0006 (portable form).
const LEGACY_AUDIT: &str = "CREATE TABLE audit (seq BIGINT PRIMARY KEY, ts_ms BIGINT NOT NULL, \
    agent TEXT, method TEXT NOT NULL, scheme TEXT NOT NULL, host TEXT NOT NULL, port BIGINT NOT NULL, \
    path TEXT NOT NULL, status BIGINT NOT NULL, decision TEXT NOT NULL, reason TEXT, \
    secrets TEXT NOT NULL, duration_us BIGINT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL, \
    bytes_up BIGINT, bytes_down BIGINT)";

/// Fills a legacy `audit` table with `n` chained records (every third by
/// agent `ci`, every tenth denied, record 7 an upgrade with byte counts)
/// and the chain head, as keygate before migration 0007 wrote them.
async fn fill_legacy(store: &Store, n: i64) -> Vec<keygate_store::AuditRecord> {
    store.execute_raw(LEGACY_AUDIT).await.unwrap();
    let mut prev = "0".repeat(64);
    let mut records = Vec::new();
    for seq in 1..=n {
        let mut r = keygate_store::AuditRecord {
            seq,
            ts_ms: 1_700_000_000_000 + seq * 1000,
            agent: Some(if seq % 3 == 0 { "ci" } else { "bot" }.into()),
            method: "GET".into(),
            scheme: "https".into(),
            host: format!("h{}.test", seq % 4),
            port: 443,
            path: "/v1/x".into(),
            status: 200,
            decision: if seq % 10 == 0 { "denied" } else { "injected" }.into(),
            reason: None,
            secrets: vec!["openai".into()],
            duration_us: seq,
            bytes_up: (seq == 7).then_some(100),
            bytes_down: (seq == 7).then_some(200),
            prev_hash: prev.clone(),
            hash: String::new(),
        };
        r.hash = r.compute_hash();
        prev.clone_from(&r.hash);
        records.push(r);
    }
    for part in records.chunks(200) {
        let values: Vec<String> = part
            .iter()
            .map(|r| {
                let bytes = |b: Option<i64>| b.map_or("NULL".to_string(), |b| b.to_string());
                format!(
                    "({}, {}, '{}', 'GET', 'https', '{}', 443, '/v1/x', 200, '{}', NULL, '[\"openai\"]', {}, '{}', '{}', {}, {})",
                    r.seq,
                    r.ts_ms,
                    r.agent.as_deref().unwrap(),
                    r.host,
                    r.decision,
                    r.duration_us,
                    r.prev_hash,
                    r.hash,
                    bytes(r.bytes_up),
                    bytes(r.bytes_down)
                )
            })
            .collect();
        store
            .execute_raw(&format!(
                "INSERT INTO audit (seq, ts_ms, agent, method, scheme, host, port, path, status, decision, reason, secrets, duration_us, prev_hash, hash, bytes_up, bytes_down) VALUES {}",
                values.join(", ")
            ))
            .await
            .unwrap();
    }
    store
        .execute_raw(&format!(
            "INSERT INTO meta (key, value) VALUES ('audit_head', '{n}:{prev}') \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        ))
        .await
        .unwrap();
    records
}

/// A database written before migration 0007 keeps its audit log: its
/// records move into chunks when the store opens, exactly as stored (an
/// edit made before the move is still reported), the old table goes, and
/// the chain continues after them.
async fn legacy_records_move_into_chunks(url: &str) {
    let vault = vault();
    let store = Store::open(url, vault.clone()).await.unwrap();
    let records = fill_legacy(&store, 1200).await;
    store.close().await;

    let store = Store::open(url, vault.clone()).await.unwrap();
    let report = store.audit_verify().await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 1200);
    assert!(
        store.execute_raw("SELECT 1 FROM audit").await.is_err(),
        "the old table is gone"
    );
    let chunks = store
        .execute_raw("UPDATE audit_chunk SET ts_min = ts_min")
        .await
        .unwrap();
    assert_eq!(chunks, 3, "1200 records in chunks of 512");
    let all = store
        .audit_query(&AuditFilter {
            limit: Some(10_000),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut want = records.clone();
    want.reverse();
    assert_eq!(all, want, "every record as it was, newest first");
    let denied_ci = store
        .audit_query(&AuditFilter {
            agent: Some("ci".into()),
            decision: Some("denied".into()),
            host: Some("H2.test".into()),
            before_seq: Some(1000),
            limit: Some(3),
            ..Default::default()
        })
        .await
        .unwrap();
    let seqs: Vec<i64> = denied_ci.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![990, 930, 870], "seq % 30 == 0, seq % 4 == 2");
    let since = store
        .audit_query(&AuditFilter {
            since_ms: Some(1_700_000_000_000 + 1195 * 1000),
            after_seq: Some(1196),
            ..Default::default()
        })
        .await
        .unwrap();
    let seqs: Vec<i64> = since.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![1197, 1198, 1199, 1200]);
    write_events(&store, &[201]).await;
    let report = store.audit_verify().await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 1201);
    store.close().await;
}

#[tokio::test]
async fn sqlite_legacy_records_move_into_chunks() {
    on_sqlite(legacy_records_move_into_chunks).await;
}

#[tokio::test]
async fn postgres_legacy_records_move_into_chunks() {
    on_postgres("legacy", legacy_records_move_into_chunks).await;
}

/// An edit made in the old table before the move is reported after it;
/// a move that fails (here a trigger refuses the chunks; in life a full
/// disk) changes nothing and the store does not open, with a clear error.
#[tokio::test]
async fn a_failed_move_changes_nothing_and_edits_survive_the_move() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kg.db");
    let url = format!("sqlite://{}", file.display());
    let vault = vault();
    let store = Store::open(&url, vault.clone()).await.unwrap();
    fill_legacy(&store, 600).await;
    store
        .execute_raw("UPDATE audit SET status = 500 WHERE seq = 555")
        .await
        .unwrap();
    store.close().await;

    let conn = rusqlite::Connection::open(&file).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER refuse_chunks BEFORE INSERT ON audit_chunk \
         BEGIN SELECT RAISE(ABORT, 'test: no room'); END;",
    )
    .unwrap();
    let err = Store::open(&url, vault.clone()).await.unwrap_err();
    assert!(
        err.to_string().contains("cannot move the audit log"),
        "{err}"
    );
    let left: i64 = conn
        .query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 600, "the old table is untouched");
    conn.execute_batch("DROP TRIGGER refuse_chunks").unwrap();
    drop(conn);

    let store = Store::open(&url, vault).await.unwrap();
    let report = store.audit_verify().await.unwrap();
    assert!(!report.ok);
    assert_eq!(report.first_bad_seq, Some(555), "{report:?}");
    assert!(
        report.message.contains("record 555 was modified"),
        "{report:?}"
    );
}

/// Filtered paging over many small chunks (one per writer burst) gives
/// exactly what filtering the whole log gives, in both directions and
/// across the chunk reads of a page.
async fn filtered_pages_match_the_whole_log(url: &str) {
    let store = Store::open(url, vault()).await.unwrap();
    for burst in 0..30u16 {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let writer = tokio::spawn(store.audit_writer(rx).await.unwrap().run());
        for i in 0..(1 + burst % 3) {
            let n = burst * 3 + i;
            let mut e = event(if n % 2 == 0 { "bot" } else { "ci" }, 200 + n);
            e.host = format!("h{}.test", n % 3);
            e.decision = if n % 5 == 0 {
                Decision::Denied
            } else {
                Decision::Injected
            };
            tx.send(e).await.unwrap();
        }
        drop(tx);
        writer.await.unwrap();
    }
    let all = store
        .audit_query(&AuditFilter {
            limit: Some(10_000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 60);
    assert!(
        all.windows(2).all(|w| w[0].seq == w[1].seq + 1),
        "newest first, no gaps"
    );
    for agent in [None, Some("bot"), Some("ci")] {
        for host in [None, Some("h1.test"), Some("H2.TEST")] {
            for decision in [None, Some("denied"), Some("injected"), Some("error")] {
                for (before, after, limit) in [
                    (None, None, 100),
                    (Some(40), None, 5),
                    (None, Some(12), 7),
                    (Some(50), Some(3), 100),
                ] {
                    let filter = AuditFilter {
                        agent: agent.map(str::to_string),
                        host: host.map(str::to_string),
                        decision: decision.map(str::to_string),
                        before_seq: before,
                        after_seq: after,
                        since_ms: None,
                        limit: Some(limit),
                    };
                    let got: Vec<i64> = store
                        .audit_query(&filter)
                        .await
                        .unwrap()
                        .iter()
                        .map(|r| r.seq)
                        .collect();
                    let mut want: Vec<i64> = all
                        .iter()
                        .filter(|r| {
                            agent.is_none_or(|a| r.agent.as_deref() == Some(a))
                                && host.is_none_or(|h| r.host == h.to_ascii_lowercase())
                                && decision.is_none_or(|d| r.decision == d)
                                && before.is_none_or(|b| r.seq < b)
                                && after.is_none_or(|a| r.seq > a)
                        })
                        .map(|r| r.seq)
                        .collect();
                    if after.is_some() {
                        want.reverse();
                    }
                    want.truncate(limit as usize);
                    assert_eq!(got, want, "{filter:?}");
                }
            }
        }
    }
    let report = store.audit_verify().await.unwrap();
    assert!(report.ok, "{report:?}");
    store.close().await;
}

#[tokio::test]
async fn sqlite_filtered_pages_match_the_whole_log() {
    on_sqlite(filtered_pages_match_the_whole_log).await;
}

#[tokio::test]
async fn postgres_filtered_pages_match_the_whole_log() {
    on_postgres("pages", filtered_pages_match_the_whole_log).await;
}
