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
    store
        .execute_raw("UPDATE audit SET path = '/v1/other' WHERE seq = 7")
        .await
        .unwrap();
    let report = store.audit_verify().await.unwrap();
    assert!(!report.ok);
    assert_eq!(report.first_bad_seq, Some(7));
    store
        .execute_raw("UPDATE audit SET path = '/v1/models' WHERE seq = 7")
        .await
        .unwrap();
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
    for (tamper, seq) in [
        ("bytes_up = 1235", 11),
        ("bytes_down = 0", 11),
        ("bytes_down = NULL", 11),
        ("bytes_up = NULL, bytes_down = NULL", 11),
        ("bytes_up = 0, bytes_down = 0", 12),
    ] {
        store
            .execute_raw(&format!("UPDATE audit SET {tamper} WHERE seq = {seq}"))
            .await
            .unwrap();
        let report = store.audit_verify().await.unwrap();
        assert!(!report.ok, "{tamper} went unnoticed");
        assert_eq!(report.first_bad_seq, Some(seq), "{tamper}");
        store
            .execute_raw(
                "UPDATE audit SET bytes_up = CASE WHEN seq = 11 THEN 1234 END, \
                 bytes_down = CASE WHEN seq = 11 THEN 5678 END WHERE seq IN (11, 12)",
            )
            .await
            .unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("kg.db").display());
    scenario(&url).await;
}

#[tokio::test]
async fn postgres_backend() {
    let Some(db) = TestPostgres::create("test").await else {
        return;
    };
    scenario(&db.url).await;
    db.drop_now().await;
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
    // Every INSERT into audit fails until the trigger goes.
    let other = rusqlite::Connection::open(&file).unwrap();
    other
        .execute_batch(
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit \
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

/// The audit table's definition and its index names, read with rusqlite.
fn audit_schema(conn: &rusqlite::Connection) -> (String, Vec<(String, Option<String>)>) {
    let table: String = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'audit'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let mut stmt = conn
        .prepare("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit' ORDER BY name")
        .unwrap();
    let indexes = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    (table, indexes)
}

/// Rebuilds `audit` with `seq BIGINT PRIMARY KEY`, as migration 0001 made it
/// and keygate left it before the rowid rebuild (with its autoindex).
fn to_bigint_seq(conn: &rusqlite::Connection, table: &str, indexes: &[(String, Option<String>)]) {
    let mut old = format!(
        "BEGIN; CREATE TABLE audit_old {}; INSERT INTO audit_old SELECT * FROM audit; \
         DROP TABLE audit; ALTER TABLE audit_old RENAME TO audit;",
        table[table.find('(').unwrap()..]
            .replace("seq INTEGER PRIMARY KEY", "seq BIGINT PRIMARY KEY")
    );
    for (_, sql) in indexes {
        old.push_str(sql.as_deref().unwrap());
        old.push(';');
    }
    old.push_str("COMMIT;");
    conn.execute_batch(&old).unwrap();
    let (table, old_indexes) = audit_schema(conn);
    assert!(table.contains("seq BIGINT PRIMARY KEY"), "{table}");
    assert!(
        old_indexes
            .iter()
            .any(|(n, _)| n == "sqlite_autoindex_audit_1"),
        "{old_indexes:?}"
    );
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

/// A SQLite store in a temporary directory, `statuses` written to its audit
/// log, closed again.
struct WrittenDb {
    _dir: tempfile::TempDir,
    file: std::path::PathBuf,
    url: String,
    vault: Arc<Vault>,
}

async fn written_sqlite_db(statuses: &[u16]) -> WrittenDb {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kg.db");
    let url = format!("sqlite://{}", file.display());
    let vault = vault();
    let store = Store::open(&url, vault.clone()).await.unwrap();
    write_events(&store, statuses).await;
    store.close().await;
    WrittenDb {
        _dir: dir,
        file,
        url,
        vault,
    }
}

/// On SQLite `audit.seq` is the table's rowid, so a record is one B-tree
/// insert fewer (no `sqlite_autoindex_audit_1`). A database written before
/// that (seq as `BIGINT PRIMARY KEY`, as migration 0001 defines it) is
/// rebuilt when opened, with its records, chain and indexes intact.
#[tokio::test]
async fn sqlite_audit_seq_is_the_rowid_and_older_databases_are_rebuilt() {
    let WrittenDb {
        _dir,
        file,
        url,
        vault,
    } = written_sqlite_db(&[200, 201, 202]).await;

    let conn = rusqlite::Connection::open(&file).unwrap();
    let (table, indexes) = audit_schema(&conn);
    assert!(table.contains("seq INTEGER PRIMARY KEY"), "{table}");
    let names: Vec<&str> = indexes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "audit_agent_seq",
            "audit_decision_rare_seq",
            "audit_host_seq",
            "audit_ts_decision"
        ]
    );

    // Back to the table as older keygate versions left it.
    to_bigint_seq(&conn, &table, &indexes);
    drop(conn);

    let store = Store::open(&url, vault).await.unwrap();
    let conn = rusqlite::Connection::open(&file).unwrap();
    let (table, rebuilt) = audit_schema(&conn);
    assert!(table.contains("seq INTEGER PRIMARY KEY"), "{table}");
    assert_eq!(rebuilt, indexes, "the same indexes, and no autoindex");
    let report = store.audit_verify().await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 3);
    // The chain continues after the copied records.
    write_events(&store, &[203]).await;
    let report = store.audit_verify().await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 4);
    let mut rows = store.audit_query(&AuditFilter::default()).await.unwrap();
    rows.sort_by_key(|r| r.seq);
    let got: Vec<(i64, i64)> = rows.iter().map(|r| (r.seq, r.status)).collect();
    assert_eq!(got, vec![(1, 200), (2, 201), (3, 202), (4, 203)]);
}

/// A rebuild that fails (here: its scratch table name is taken; in life a
/// full disk) rolls back whole: the store still opens, on the old layout,
/// with every record and a working writer.
#[tokio::test]
async fn a_failed_audit_rebuild_leaves_the_old_table_and_the_store_opens() {
    let WrittenDb {
        _dir,
        file,
        url,
        vault,
    } = written_sqlite_db(&[200, 201]).await;
    let conn = rusqlite::Connection::open(&file).unwrap();
    let (table, indexes) = audit_schema(&conn);
    to_bigint_seq(&conn, &table, &indexes);
    conn.execute_batch("CREATE TABLE audit_rebuilt (x)")
        .unwrap();
    drop(conn);

    let store = Store::open(&url, vault)
        .await
        .expect("opens despite the failed rebuild");
    let conn = rusqlite::Connection::open(&file).unwrap();
    let (table, _) = audit_schema(&conn);
    assert!(table.contains("seq BIGINT PRIMARY KEY"), "{table}");
    write_events(&store, &[202]).await;
    let report = store.audit_verify().await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 3);
}
