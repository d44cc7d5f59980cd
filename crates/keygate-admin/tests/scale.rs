//! The audit pages at a million records: every page the dashboard serves
//! for the log answers quickly because it is keyset paging over the chunks
//! that hold what it asks for. The records are written the way a database
//! from before the chunked layout (migration 0007) held them, so opening
//! the store also moves a million records into chunks.
//! `#[ignore]`d (filling the table takes a while); `.ci/browser.sh` runs it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use keygate_admin::AdminState;
use keygate_store::Store;
use keygate_vault::{MasterKey, Vault};
use tower::ServiceExt;
use zeroize::Zeroizing;

const TOKEN: &str = "kg_admin_scale_token";
const ROWS: i64 = 1_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fills a million audit records: run with --ignored (.ci/browser.sh does)"]
async fn audit_pages_stay_fast_at_a_million_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("kg.db").display());
    let vault = Arc::new(Vault::new(MasterKey::generate()));
    let store = Store::open(&url, vault.clone()).await.expect("store");
    store
        .execute_raw(
            "CREATE TABLE audit (seq BIGINT PRIMARY KEY, ts_ms BIGINT NOT NULL, agent TEXT, \
             method TEXT NOT NULL, scheme TEXT NOT NULL, host TEXT NOT NULL, port BIGINT NOT NULL, \
             path TEXT NOT NULL, status BIGINT NOT NULL, decision TEXT NOT NULL, reason TEXT, \
             secrets TEXT NOT NULL, duration_us BIGINT NOT NULL, prev_hash TEXT NOT NULL, \
             hash TEXT NOT NULL, bytes_up BIGINT, bytes_down BIGINT)",
        )
        .await
        .expect("legacy table");
    let now = keygate_core::now_ms();
    let start = now - 2 * 86_400_000;
    // One record every ~170 ms over two days; 20 agents, 50 hosts, one
    // rare host every 100 000 records, 10 % denied.
    let t = Instant::now();
    store
        .execute_raw(&format!(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {ROWS}) \
             INSERT INTO audit (seq, ts_ms, agent, method, scheme, host, port, path, status, decision, reason, secrets, duration_us, prev_hash, hash) \
             SELECT x, {start} + x * 170, 'agent' || (x % 20), 'GET', 'https', \
                    CASE WHEN x % 100000 = 0 THEN 'rare.test' ELSE 'h' || (x % 50) || '.test' END, \
                    443, '/v1/x', 200, \
                    CASE WHEN x % 10 = 0 THEN 'denied' WHEN x % 10 = 1 THEN 'passthrough' ELSE 'injected' END, \
                    NULL, '[\"openai\"]', 10, '', '' FROM c"
        ))
        .await
        .expect("fill");
    eprintln!("filled {ROWS} records in {:?}", t.elapsed());
    store.close().await;
    let t = Instant::now();
    let store = Store::open(&url, vault).await.expect("store reopened");
    eprintln!("moved {ROWS} records into chunks in {:?}", t.elapsed());
    let chunks = store
        .execute_raw("UPDATE audit_chunk SET n_error = n_error")
        .await
        .expect("count chunks");
    assert_eq!(chunks, (ROWS as u64).div_ceil(512));

    let state = AdminState::new(store, Zeroizing::new(TOKEN.into()), "PEM".into());
    let app = keygate_admin::router(state);
    let login = Request::post("/login")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("credential={TOKEN}")))
        .expect("request");
    let resp = app.clone().oneshot(login).await.expect("login");
    let cookie = resp
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("cookie")
        .to_string();

    let pages = [
        "/audit".to_string(),
        "/audit?before=500000".to_string(),
        "/audit?after=10".to_string(),
        "/audit?host=rare.test".to_string(),
        "/audit?host=rare.test&before=500000".to_string(),
        "/audit?decision=denied&before=900000".to_string(),
        "/audit?agent=agent3&decision=denied".to_string(),
        "/audit?decision=injected&before=500000".to_string(),
        "/audit?agent=agent3&decision=injected".to_string(),
        "/audit?decision=passthrough".to_string(),
        "/audit?decision=error".to_string(),
        "/audit?agent=agent7&host=h7.test".to_string(),
        "/audit?to=2000-01-01T00:00".to_string(),
        format!("/audit?from=2000-01-01T00:00&to={}", {
            // a "to" in the middle of the data
            let mid = start + ROWS / 2 * 170;
            let t = time::OffsetDateTime::from_unix_timestamp(mid / 1000).expect("time");
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute()
            )
        }),
        "/audit/rows?after=999990".to_string(),
        "/audit/500000".to_string(),
        "/".to_string(),
        "/agents".to_string(),
        "/secrets".to_string(),
    ];
    for p in pages {
        let t = Instant::now();
        let req = Request::get(&p)
            .header(header::COOKIE, &cookie)
            .body(Body::empty())
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let took = t.elapsed();
        eprintln!("{p}: {status} in {took:?} ({} bytes)", body.len());
        assert_eq!(status, StatusCode::OK, "{p}");
        // Generous for a shared 2-core machine; they take milliseconds,
        // except the 24-hour counts of the overview (a covering index scan).
        assert!(took < Duration::from_secs(3), "{p} took {took:?}");
    }
}
