//! The audit log: a batch writer fed by a bounded channel (off the hot path),
//! a SHA-256 hash chain over every record, queries and chain verification.

use std::borrow::Cow;
use std::time::Duration;

use aws_lc_rs::digest;
use keygate_core::{AuditEvent, Decision};
use serde::Serialize;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use crate::{Backend, Store, StoreError};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const BATCH: usize = 512;
/// How long the first event of a burst waits for company. 20 ms rather
/// than 5 ms halved the SQLite audit CPU per request at c=1 (16 → 9 µs,
/// bench/README.md); a record is in the log ~20 ms after its response.
const LINGER: Duration = Duration::from_millis(20);
const HEAD_KEY: &str = "audit_head";
/// SQLite, on the writer's own connection: one cached statement per record.
const INSERT_ONE_SQLITE: &str = "INSERT INTO audit (seq, ts_ms, agent, method, scheme, host, port, path, status, decision, reason, secrets, duration_us, bytes_up, bytes_down, prev_hash, hash) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)";
const UPSERT_HEAD: &str = "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value";
const UPSERT_HEAD_SQLITE: &str = "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value";
/// PostgreSQL: the whole batch in one statement, as a JSON array of rows in
/// [`COLUMNS`] order (see [`batch_json`]), unpacked by the server.
const INSERT_BATCH_POSTGRES: &str = "INSERT INTO audit (seq, ts_ms, agent, method, scheme, host, port, path, status, decision, reason, secrets, duration_us, bytes_up, bytes_down, prev_hash, hash) \
     SELECT (r->>0)::bigint, (r->>1)::bigint, r->>2, r->>3, r->>4, r->>5, (r->>6)::bigint, r->>7, \
     (r->>8)::bigint, r->>9, r->>10, r->>11, (r->>12)::bigint, (r->>13)::bigint, (r->>14)::bigint, r->>15, r->>16 \
     FROM jsonb_array_elements($1::text::jsonb) WITH ORDINALITY AS t(r, n) ORDER BY n";

/// One stored audit record, as the API and CLI show it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: i64,
    pub ts_ms: i64,
    pub agent: Option<String>,
    pub method: Cow<'static, str>,
    pub scheme: Cow<'static, str>,
    pub host: String,
    pub port: i64,
    pub path: String,
    pub status: i64,
    pub decision: Cow<'static, str>,
    pub reason: Option<String>,
    pub secrets: Vec<String>,
    pub duration_us: i64,
    /// Bytes piped agent → upstream over an upgraded (WebSocket)
    /// connection; `None` for ordinary requests.
    pub bytes_up: Option<i64>,
    /// Bytes piped upstream → agent over an upgraded connection.
    pub bytes_down: Option<i64>,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRecord {
    /// The record for an event (its fields moved, not copied), not yet
    /// linked into the chain: see [`AuditRecord::link`].
    fn unlinked(e: AuditEvent) -> AuditRecord {
        AuditRecord {
            seq: 0,
            ts_ms: e.ts_ms,
            agent: e.agent,
            method: e.method,
            scheme: e.scheme,
            host: e.host,
            port: i64::from(e.port),
            path: e.path,
            status: i64::from(e.status),
            decision: Cow::Borrowed(e.decision.as_str()),
            reason: e.reason,
            secrets: e.secrets,
            duration_us: i64::try_from(e.duration_us).unwrap_or(i64::MAX),
            bytes_up: e.bytes_up.map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
            bytes_down: e.bytes_down.map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    /// Gives the record its place in the chain: sequence number, previous
    /// hash, and its own hash over both and every field. `scratch` is a
    /// buffer for the hash input, reused across a batch.
    fn link(&mut self, seq: i64, prev_hash: String, scratch: &mut Vec<u8>) {
        self.seq = seq;
        self.prev_hash = prev_hash;
        self.hash = self.hash_with(scratch);
    }

    #[cfg(test)]
    fn from_event(seq: i64, e: &AuditEvent, prev_hash: String) -> AuditRecord {
        let mut r = AuditRecord::unlinked(e.clone());
        r.link(seq, prev_hash, &mut Vec::new());
        r
    }

    /// SHA-256 over the previous hash and every field, in a fixed order and
    /// an unambiguous (JSON array) encoding.
    pub fn compute_hash(&self) -> String {
        self.hash_with(&mut Vec::new())
    }

    /// [`AuditRecord::compute_hash`], serialising into `body` (cleared
    /// first) rather than a new buffer.
    fn hash_with(&self, body: &mut Vec<u8>) -> String {
        // Serialised straight from the fields (a tuple is a JSON array);
        // the bytes are those of the `serde_json::json!` array this chain
        // was first defined with (a test pins them). The byte counts of an
        // upgraded connection came later: they are appended only when set,
        // so every record without them hashes as it always did.
        body.clear();
        let fields = (
            self.seq,
            self.ts_ms,
            &self.agent,
            &self.method,
            &self.scheme,
            &self.host,
            self.port,
            &self.path,
            self.status,
            &self.decision,
            &self.reason,
            &self.secrets,
            self.duration_us,
        );
        if serde_json::to_writer(&mut *body, &fields).is_err() {
            body.clear();
        }
        if self.bytes_up.is_some() || self.bytes_down.is_some() {
            // The same array with the two counts as its last elements.
            if let Ok(tail) = serde_json::to_vec(&(self.bytes_up, self.bytes_down)) {
                body.pop(); // `]`
                body.push(b',');
                body.extend_from_slice(&tail[1..]); // without its `[`
            }
        }
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(self.prev_hash.as_bytes());
        ctx.update(b"\n");
        ctx.update(body);
        let digest = ctx.finish();
        // Table-driven hex into a buffer (`hex::encode` collects chars one
        // at a time); a SHA-256 digest always fills the 64 bytes.
        let mut out = [0u8; 64];
        match hex::encode_to_slice(digest.as_ref(), &mut out)
            .ok()
            .and_then(|()| std::str::from_utf8(&out).ok())
        {
            Some(hex) => hex.to_owned(),
            None => hex::encode(digest.as_ref()),
        }
    }
}

/// Filters for [`Store::audit_query`]. Newest first unless `after_seq` is
/// given (then oldest first, for `--follow`).
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub agent: Option<String>,
    pub decision: Option<String>,
    pub host: Option<String>,
    pub before_seq: Option<i64>,
    pub after_seq: Option<i64>,
    pub since_ms: Option<i64>,
    pub limit: Option<i64>,
}

/// Result of walking the hash chain.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub ok: bool,
    pub records: i64,
    /// First record whose hash or link does not match, if any.
    pub first_bad_seq: Option<i64>,
    pub message: String,
}

/// Drains audit events from the gateway's channel and writes them in
/// batches, extending the hash chain.
pub struct AuditWriter {
    store: Store,
    /// SQLite: the writer's own connection and thread.
    sqlite: Option<SqliteSink>,
    rx: mpsc::Receiver<AuditEvent>,
    next_seq: i64,
    prev_hash: String,
}

impl AuditWriter {
    /// Runs until every sender is dropped, then flushes what is left.
    pub async fn run(mut self) {
        let mut events = Vec::with_capacity(BATCH);
        while self.rx.recv_many(&mut events, BATCH).await > 0 {
            // The first event of a burst waits for company: one transaction
            // per burst rather than per request at low and moderate rates.
            // Sleeping rather than receiving meanwhile: senders then never
            // wake this task, only the first event of a burst does.
            if events.len() < BATCH {
                tokio::time::sleep(LINGER).await;
                while events.len() < BATCH {
                    match self.rx.try_recv() {
                        Ok(event) => events.push(event),
                        Err(_) => break,
                    }
                }
            }
            let records = events.drain(..).map(AuditRecord::unlinked).collect();
            self.write_batch(records).await;
        }
    }

    async fn write_batch(&mut self, mut records: Vec<AuditRecord>) {
        let mut delay = Duration::from_millis(50);
        loop {
            match self.try_write(records).await {
                Ok(()) => return,
                Err((e, back)) => {
                    tracing::error!(error = %e, batch = back.len(), "audit write failed; retrying");
                    records = back;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    // Another writer may have extended the chain.
                    if let Ok((seq, hash)) = chain_tail(&self.store).await {
                        self.next_seq = seq + 1;
                        self.prev_hash = hash;
                    }
                }
            }
        }
    }

    /// Links the batch after the chain's tail and writes it in one
    /// transaction; on failure the records come back, to be linked again.
    /// SQLite: linking (the SHA-256 of every record) happens on the writer
    /// thread too, so that no audit work runs on the request path's workers.
    async fn try_write(
        &mut self,
        mut records: Vec<AuditRecord>,
    ) -> Result<(), (StoreError, Vec<AuditRecord>)> {
        let tail = ChainTail {
            next_seq: self.next_seq,
            prev_hash: self.prev_hash.clone(),
        };
        let tail = match &self.sqlite {
            Some(sink) => sink.write(&self.store, records, tail).await?,
            None => {
                let (tail, head) = link_batch(&mut records, tail);
                if let Err(e) = self.write_postgres(&records, head).await {
                    return Err((e, records));
                }
                tail
            }
        };
        self.next_seq = tail.next_seq;
        self.prev_hash = tail.prev_hash;
        Ok(())
    }

    /// PostgreSQL. One statement for the whole batch: through sqlx every
    /// statement is a network round trip.
    async fn write_postgres(
        &self,
        records: &[AuditRecord],
        head: String,
    ) -> Result<(), StoreError> {
        let rows = batch_json(records)?;
        let mut tx = self.store.write_tx().await?;
        sqlx::query(INSERT_BATCH_POSTGRES)
            .bind(rows)
            .execute(&mut *tx)
            .await?;
        // The head lets verify notice records deleted from the end.
        sqlx::query(UPSERT_HEAD)
            .bind(HEAD_KEY)
            .bind(head)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Where the chain continues: the next record's sequence number and the
/// hash it links to.
struct ChainTail {
    next_seq: i64,
    prev_hash: String,
}

/// Links `records` after `tail`; returns the new tail and the chain head
/// (`seq:hash` of the last record) stored with them.
fn link_batch(records: &mut [AuditRecord], tail: ChainTail) -> (ChainTail, String) {
    let ChainTail {
        next_seq: mut seq,
        prev_hash: mut prev,
    } = tail;
    let mut scratch = Vec::with_capacity(512);
    for r in records.iter_mut() {
        r.link(seq, std::mem::take(&mut prev), &mut scratch);
        prev = r.hash.clone();
        seq += 1;
    }
    let head = format!("{}:{}", seq - 1, prev);
    let tail = ChainTail {
        next_seq: seq,
        prev_hash: prev,
    };
    (tail, head)
}

/// A batch as one JSON array of rows in [`COLUMNS`] order; `secrets` is
/// stored as its own JSON text, as the column holds it.
fn batch_json(records: &[AuditRecord]) -> Result<String, StoreError> {
    let rows: Vec<BatchRow<'_>> = records.iter().map(BatchRow).collect();
    serde_json::to_string(&rows).map_err(|e| StoreError::Corrupt(format!("audit batch: {e}")))
}

/// One row of [`batch_json`]: a JSON array in [`COLUMNS`] order (written
/// element by element: there are more columns than serde has tuple sizes).
struct BatchRow<'a>(&'a AuditRecord);

impl Serialize for BatchRow<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let r = self.0;
        let secrets = serde_json::to_string(&r.secrets).unwrap_or_else(|_| "[]".into());
        let mut row = s.serialize_tuple(17)?;
        row.serialize_element(&r.seq)?;
        row.serialize_element(&r.ts_ms)?;
        row.serialize_element(&r.agent)?;
        row.serialize_element(&r.method)?;
        row.serialize_element(&r.scheme)?;
        row.serialize_element(&r.host)?;
        row.serialize_element(&r.port)?;
        row.serialize_element(&r.path)?;
        row.serialize_element(&r.status)?;
        row.serialize_element(&r.decision)?;
        row.serialize_element(&r.reason)?;
        row.serialize_element(&secrets)?;
        row.serialize_element(&r.duration_us)?;
        row.serialize_element(&r.bytes_up)?;
        row.serialize_element(&r.bytes_down)?;
        row.serialize_element(&r.prev_hash)?;
        row.serialize_element(&r.hash)?;
        row.end()
    }
}

/// A batch for the SQLite writer thread, with this process's writer slot
/// and where to report the outcome.
struct SqliteJob {
    /// Not yet linked: the thread links them after `tail`.
    records: Vec<AuditRecord>,
    tail: ChainTail,
    slot: tokio::sync::OwnedMutexGuard<()>,
    /// The outcome: the new tail, or the error and the records, for a retry.
    done: oneshot::Sender<SqliteOutcome>,
}

type SqliteOutcome = Result<ChainTail, (StoreError, Vec<AuditRecord>)>;

/// The SQLite audit writer: a thread (`keygate-audit`) with a connection of
/// its own. sqlx runs every statement as a round trip to its worker thread
/// (two thread wake-ups per record); here a whole batch is one hand-over,
/// written with a cached statement in one `BEGIN IMMEDIATE` transaction.
struct SqliteSink {
    jobs: std::sync::mpsc::Sender<SqliteJob>,
}

impl SqliteSink {
    /// Opens the writer's connection to the store's SQLite file and starts
    /// the thread; it ends when the sink is dropped.
    async fn open(store: &Store) -> Result<SqliteSink, StoreError> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT file FROM pragma_database_list WHERE name = 'main'")
                .fetch_optional(store.pool())
                .await?;
        let Some((file,)) = row.filter(|(f,)| !f.is_empty()) else {
            // Each pooled connection would see a different in-memory database.
            return Err(StoreError::Invalid(
                "the SQLite database must be a file (an in-memory database is not supported)"
                    .into(),
            ));
        };
        let conn = rusqlite::Connection::open_with_flags(
            &file,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // Another process may hold the write lock for a moment.
        conn.busy_timeout(Duration::from_secs(10))?;
        // WAL with synchronous=NORMAL: a commit survives a crash of keygate
        // (the WAL is in the OS's hands) and the fsync happens at checkpoints
        // instead of at every batch. A power loss can take the last batches,
        // whole (records and chain head commit together, so the chain stays
        // verifiable).
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let (jobs, rx) = std::sync::mpsc::channel::<SqliteJob>();
        std::thread::Builder::new()
            .name("keygate-audit".into())
            .spawn(move || {
                let mut conn = conn;
                while let Ok(job) = rx.recv() {
                    let SqliteJob {
                        mut records,
                        tail,
                        slot,
                        done,
                    } = job;
                    // A panic inside SQLite must not lose the batch: the
                    // transaction rolls back as it unwinds and the records
                    // go back for a retry.
                    let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let (tail, head) = link_batch(&mut records, tail);
                        write_sqlite(&mut conn, &records, &head).map(|()| tail)
                    }));
                    drop(slot);
                    let outcome = match written {
                        Ok(Ok(tail)) => Ok(tail),
                        Ok(Err(e)) => Err((e, records)),
                        Err(_) => Err((
                            StoreError::Corrupt("the audit writer panicked".into()),
                            records,
                        )),
                    };
                    let _ = done.send(outcome);
                }
            })
            .map_err(|e| StoreError::Corrupt(format!("cannot start the audit writer: {e}")))?;
        Ok(SqliteSink { jobs })
    }

    async fn write(
        &self,
        store: &Store,
        records: Vec<AuditRecord>,
        tail: ChainTail,
    ) -> SqliteOutcome {
        let slot = store.lock_writer().await;
        let (done, outcome) = oneshot::channel();
        let job = SqliteJob {
            records,
            tail,
            slot,
            done,
        };
        let gone = || StoreError::Corrupt("the audit writer thread stopped".into());
        if let Err(std::sync::mpsc::SendError(job)) = self.jobs.send(job) {
            return Err((gone(), job.records));
        }
        // The thread answers every job (a panic included) unless it was
        // killed from outside; then the batch is gone with it.
        outcome.await.map_err(|_| (gone(), Vec::new()))?
    }
}

fn write_sqlite(
    conn: &mut rusqlite::Connection,
    records: &[AuditRecord],
    head: &str,
) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut insert = tx.prepare_cached(INSERT_ONE_SQLITE)?;
        for r in records {
            let secrets = serde_json::to_string(&r.secrets).unwrap_or_else(|_| "[]".into());
            insert.execute(rusqlite::params![
                r.seq,
                r.ts_ms,
                r.agent,
                r.method,
                r.scheme,
                r.host,
                r.port,
                r.path,
                r.status,
                r.decision,
                r.reason,
                secrets,
                r.duration_us,
                r.bytes_up,
                r.bytes_down,
                r.prev_hash,
                r.hash,
            ])?;
        }
        // The head lets verify notice records deleted from the end.
        tx.prepare_cached(UPSERT_HEAD_SQLITE)?
            .execute(rusqlite::params![HEAD_KEY, head])?;
    }
    tx.commit()?;
    Ok(())
}

/// The column definition migration 0001 gave `audit.seq` (portable, but in
/// SQLite not an alias of the rowid).
const SEQ_BIGINT: &str = "seq BIGINT PRIMARY KEY";
/// In SQLite an `INTEGER PRIMARY KEY` column is the rowid itself.
const SEQ_ROWID: &str = "seq INTEGER PRIMARY KEY";

/// SQLite only, once per database: rebuilds `audit` with `seq` as the rowid.
/// A `BIGINT PRIMARY KEY` makes SQLite keep a separate unique index beside
/// the table (`sqlite_autoindex_audit_1`): one more B-tree insert for every
/// record the gateway writes. PostgreSQL keeps the portable definition (its
/// `INTEGER` is 32-bit), so this is not a shared migration. The copy runs
/// in one transaction (SQLite's documented table rebuild): an interrupted
/// or failed rebuild leaves the old table as it was (and the store opens
/// with it, see [`Store::open`]). The table and index definitions
/// are taken from the database itself, so columns and indexes added by
/// later migrations carry over.
pub(crate) async fn sqlite_seq_as_rowid(pool: &sqlx::AnyPool) -> Result<(), StoreError> {
    const TABLE_SQL: &str = "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'audit'";
    let (table_sql,): (String,) = sqlx::query_as(TABLE_SQL).fetch_one(pool).await?;
    if !table_sql.contains(SEQ_BIGINT) {
        return Ok(()); // rebuilt already: no write lock taken
    }
    let mut tx = crate::begin_write(pool, Backend::Sqlite).await?;
    // Again under the write lock: another process may have rebuilt it.
    let (table_sql,): (String,) = sqlx::query_as(TABLE_SQL).fetch_one(&mut *tx).await?;
    if !table_sql.contains(SEQ_BIGINT) {
        return Ok(());
    }
    // `CREATE TABLE audit (…)`, or `"audit"` once SQLite has renamed it.
    let Some(rest) = table_sql.find('(').map(|at| &table_sql[at..]) else {
        return Err(StoreError::Corrupt(format!(
            "unexpected definition of the audit table: {table_sql}"
        )));
    };
    let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM audit")
        .fetch_one(&mut *tx)
        .await?;
    tracing::info!(
        records = count,
        "rebuilding the SQLite audit table with seq as its rowid (once)"
    );
    let indexes: Vec<(String,)> = sqlx::query_as(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit' AND sql IS NOT NULL",
    )
    .fetch_all(&mut *tx)
    .await?;
    let create = format!(
        "CREATE TABLE audit_rebuilt {}",
        rest.replacen(SEQ_BIGINT, SEQ_ROWID, 1)
    );
    sqlx::query(&create).execute(&mut *tx).await?;
    sqlx::query("INSERT INTO audit_rebuilt SELECT * FROM audit ORDER BY seq")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DROP TABLE audit").execute(&mut *tx).await?;
    sqlx::query("ALTER TABLE audit_rebuilt RENAME TO audit")
        .execute(&mut *tx)
        .await?;
    for (index_sql,) in &indexes {
        sqlx::query(index_sql).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn chain_tail(store: &Store) -> Result<(i64, String), StoreError> {
    let row: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            .fetch_optional(store.pool())
            .await?;
    Ok(row.unwrap_or((0, GENESIS.to_string())))
}

fn record_from_row(row: &sqlx::any::AnyRow) -> Result<AuditRecord, StoreError> {
    let secrets: String = row.try_get("secrets")?;
    Ok(AuditRecord {
        seq: row.try_get("seq")?,
        ts_ms: row.try_get("ts_ms")?,
        agent: row.try_get("agent")?,
        method: row.try_get::<String, _>("method")?.into(),
        scheme: row.try_get::<String, _>("scheme")?.into(),
        host: row.try_get("host")?,
        port: row.try_get("port")?,
        path: row.try_get("path")?,
        status: row.try_get("status")?,
        decision: row.try_get::<String, _>("decision")?.into(),
        reason: row.try_get("reason")?,
        secrets: serde_json::from_str(&secrets)
            .map_err(|_| StoreError::Corrupt("audit secrets column".into()))?,
        duration_us: row.try_get("duration_us")?,
        bytes_up: row.try_get("bytes_up")?,
        bytes_down: row.try_get("bytes_down")?,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

const COLUMNS: &str = "seq, ts_ms, agent, method, scheme, host, port, path, status, decision, reason, secrets, duration_us, bytes_up, bytes_down, prev_hash, hash";

impl Store {
    /// A writer that continues the chain from the last stored record.
    pub async fn audit_writer(
        &self,
        rx: mpsc::Receiver<AuditEvent>,
    ) -> Result<AuditWriter, StoreError> {
        let (seq, hash) = chain_tail(self).await?;
        let sqlite = match self.backend() {
            Backend::Sqlite => Some(SqliteSink::open(self).await?),
            Backend::Postgres => None,
        };
        Ok(AuditWriter {
            store: self.clone(),
            sqlite,
            rx,
            next_seq: seq + 1,
            prev_hash: hash,
        })
    }

    /// Audit records matching `filter` (index-backed keyset paging on seq).
    pub async fn audit_query(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let (sql, binds) = audit_query_sql(filter);
        let rows = bind_all(sqlx::query(&sql), binds)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(record_from_row).collect()
    }

    /// Walks the whole chain in seq order and reports the first record whose
    /// stored hash, link to its predecessor or sequence number is wrong.
    pub async fn audit_verify(&self) -> Result<VerifyReport, StoreError> {
        let mut prev_hash = GENESIS.to_string();
        let mut expected_seq = 1;
        let mut count = 0;
        loop {
            let rows = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM audit WHERE seq >= $1 ORDER BY seq ASC LIMIT 5000"
            ))
            .bind(expected_seq)
            .fetch_all(self.pool())
            .await?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                let r = record_from_row(row)?;
                let bad = |msg: String| VerifyReport {
                    ok: false,
                    records: count,
                    first_bad_seq: Some(r.seq),
                    message: msg,
                };
                if r.seq != expected_seq {
                    return Ok(bad(format!(
                        "record {} is missing (next stored record is {})",
                        expected_seq, r.seq
                    )));
                }
                if r.prev_hash != prev_hash {
                    return Ok(bad(format!(
                        "record {} does not link to the record before it",
                        r.seq
                    )));
                }
                if r.compute_hash() != r.hash {
                    return Ok(bad(format!("record {} was modified", r.seq)));
                }
                prev_hash = r.hash;
                expected_seq += 1;
                count += 1;
            }
        }
        let head: Option<(String,)> = sqlx::query_as("SELECT value FROM meta WHERE key = $1")
            .bind(HEAD_KEY)
            .fetch_optional(self.pool())
            .await?;
        if let Some((head,)) = head {
            let (head_seq, head_hash) = head.split_once(':').unwrap_or(("", ""));
            let head_seq: i64 = head_seq.parse().unwrap_or(-1);
            if head_seq != count || head_hash != prev_hash {
                return Ok(VerifyReport {
                    ok: false,
                    records: count,
                    first_bad_seq: Some(count + 1),
                    message: format!(
                        "the chain ends at record {count} but the last record written was {head_seq}: records were deleted from the end"
                    ),
                });
            }
        }
        Ok(VerifyReport {
            ok: true,
            records: count,
            first_bad_seq: None,
            message: format!("{count} records, hash chain intact"),
        })
    }

    /// Executes raw SQL; for tests that tamper with the database.
    #[doc(hidden)]
    pub async fn execute_raw(&self, sql: &str) -> Result<u64, StoreError> {
        Ok(sqlx::query(sql).execute(self.pool()).await?.rows_affected())
    }
}

/// The SQL of [`Store::audit_query`] and its parameters, in order.
fn audit_query_sql(filter: &AuditFilter) -> (String, Vec<Bind>) {
    let mut sql = format!("SELECT {COLUMNS} FROM audit WHERE 1=1");
    let mut binds: Vec<Bind> = Vec::new();
    let mut push = |clause: &str, b: Bind, sql: &mut String| {
        binds.push(b);
        sql.push_str(&format!(" AND {clause} ${}", binds.len()));
    };
    if let Some(a) = &filter.agent {
        push("agent =", Bind::Text(a.clone()), &mut sql);
    }
    if let Some(d) = &filter.decision {
        push("decision =", Bind::Text(d.clone()), &mut sql);
        if d != Decision::Injected.as_str() {
            // The condition of the partial index of the rarer decisions
            // (migration 0006), spelled out: SQLite's planner uses a partial
            // index only when the query repeats its condition. Injected
            // records are found by walking the table newest first.
            sql.push_str(" AND decision <> 'injected'");
        }
    }
    if let Some(h) = &filter.host {
        push("host =", Bind::Text(h.to_ascii_lowercase()), &mut sql);
    }
    if let Some(s) = filter.before_seq {
        push("seq <", Bind::Int(s), &mut sql);
    }
    if let Some(s) = filter.after_seq {
        push("seq >", Bind::Int(s), &mut sql);
    }
    if let Some(t) = filter.since_ms {
        push("ts_ms >=", Bind::Int(t), &mut sql);
    }
    let order = if filter.after_seq.is_some() {
        "ASC"
    } else {
        "DESC"
    };
    let limit = filter.limit.unwrap_or(100).clamp(1, 10_000);
    sql.push_str(&format!(" ORDER BY seq {order} LIMIT {limit}"));
    (sql, binds)
}

enum Bind {
    Text(String),
    Int(i64),
}

/// `q` with `binds` bound in order.
fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    binds: Vec<Bind>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for b in binds {
        q = match b {
            Bind::Text(s) => q.bind(s),
            Bind::Int(i) => q.bind(i),
        };
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLite's plan for a decision filter: a rarer decision goes through
    /// the partial index (only if the query repeats its condition), an
    /// injected one walks the table newest first (no index to maintain for
    /// the common record).
    #[tokio::test]
    async fn decision_filters_use_the_partial_index_for_the_rarer_decisions() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("kg.db").display());
        let vault = std::sync::Arc::new(keygate_vault::Vault::new(
            keygate_vault::MasterKey::generate(),
        ));
        let store = Store::open(&url, vault).await.unwrap();
        let plan = |decision: &str| {
            let (sql, binds) = audit_query_sql(&AuditFilter {
                decision: Some(decision.into()),
                ..Default::default()
            });
            let store = &store;
            async move {
                let explain = format!("EXPLAIN QUERY PLAN {sql}");
                let rows = bind_all(sqlx::query(&explain), binds)
                    .fetch_all(store.pool())
                    .await
                    .unwrap();
                rows.iter()
                    .map(|r| r.try_get::<String, _>("detail").unwrap())
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        };
        for rare in ["denied", "error", "passthrough"] {
            let p = plan(rare).await;
            assert!(p.contains("audit_decision_rare_seq"), "{rare}: {p}");
            assert!(!p.contains("TEMP B-TREE"), "{rare}: sorted in memory: {p}");
        }
        let p = plan("injected").await;
        assert!(!p.contains("audit_decision_rare_seq"), "injected: {p}");
        assert!(
            !p.contains("TEMP B-TREE"),
            "injected: sorted in memory: {p}"
        );
        store.close().await;
    }

    /// The chain's hash input must stay byte-for-byte what it was defined
    /// as (a `serde_json::json!` array), or every stored chain would fail
    /// verification after an upgrade.
    #[test]
    fn hash_input_is_the_json_array_it_was_defined_as() {
        for (agent, reason, secrets) in [
            (None, None, vec![]),
            (
                Some("bot \"q\" é\u{1}".to_string()),
                Some("path_ambiguous".to_string()),
                vec!["openai".to_string(), "a\\b".to_string()],
            ),
        ] {
            let r = AuditRecord {
                seq: 42,
                ts_ms: 1_764_000_000_123,
                agent,
                method: "POST".into(),
                scheme: "https".into(),
                host: "api.example.com".into(),
                port: 443,
                path: "/v1/ünï\tcode".into(),
                status: 200,
                decision: "injected".into(),
                reason,
                secrets,
                duration_us: i64::MAX,
                bytes_up: None,
                bytes_down: None,
                prev_hash: "ab".repeat(32),
                hash: String::new(),
            };
            let body = serde_json::json!([
                r.seq,
                r.ts_ms,
                r.agent,
                r.method,
                r.scheme,
                r.host,
                r.port,
                r.path,
                r.status,
                r.decision,
                r.reason,
                r.secrets,
                r.duration_us,
            ]);
            let mut ctx = digest::Context::new(&digest::SHA256);
            ctx.update(r.prev_hash.as_bytes());
            ctx.update(b"\n");
            ctx.update(body.to_string().as_bytes());
            assert_eq!(r.compute_hash(), hex::encode(ctx.finish().as_ref()));
        }
    }

    #[test]
    fn batch_rows_are_arrays_in_column_order() {
        let r = AuditRecord::from_event(
            7,
            &AuditEvent {
                ts_ms: 5,
                agent: Some("a".into()),
                method: "GET".into(),
                scheme: "https".into(),
                host: "h".into(),
                port: 443,
                path: "/p".into(),
                status: 204,
                decision: keygate_core::Decision::Injected,
                reason: None,
                secrets: vec!["s".into()],
                duration_us: 9,
                bytes_up: None,
                bytes_down: None,
            }
            .with_bytes(12, 34),
            GENESIS.to_string(),
        );
        let v: serde_json::Value =
            serde_json::from_str(&batch_json(std::slice::from_ref(&r)).unwrap()).unwrap();
        let row = v[0].as_array().unwrap();
        let columns: Vec<&str> = COLUMNS.split(", ").collect();
        assert_eq!(row.len(), columns.len());
        let at = |name: &str| &row[columns.iter().position(|c| *c == name).unwrap()];
        assert_eq!(at("seq"), 7);
        assert_eq!(at("agent"), "a");
        assert_eq!(at("reason"), &serde_json::Value::Null);
        assert_eq!(at("secrets"), "[\"s\"]");
        assert_eq!(at("duration_us"), 9);
        assert_eq!(at("bytes_up"), 12);
        assert_eq!(at("bytes_down"), 34);
        assert_eq!(at("prev_hash"), GENESIS);
        assert_eq!(at("hash"), r.hash.as_str());
    }

    fn upgrade_record(bytes: Option<(u64, u64)>) -> AuditRecord {
        let mut e = AuditEvent {
            ts_ms: 1_764_000_000_123,
            agent: Some("bot".into()),
            method: "GET".into(),
            scheme: "https".into(),
            host: "api.example.com".into(),
            port: 443,
            path: "/ws".into(),
            status: 101,
            decision: keygate_core::Decision::Injected,
            reason: None,
            secrets: vec!["openai".into()],
            duration_us: 7,
            bytes_up: None,
            bytes_down: None,
        };
        if let Some((up, down)) = bytes {
            e = e.with_bytes(up, down);
        }
        AuditRecord::from_event(42, &e, "ab".repeat(32))
    }

    /// Records without byte counts (every record written before they
    /// existed) hash exactly as before; with counts, the two are appended
    /// to the array. Both digests are pinned as literals (SHA-256 of
    /// `prev_hash`, a newline and the compact JSON array).
    #[test]
    fn byte_counts_are_hashed_only_when_present() {
        let plain = upgrade_record(None);
        assert_eq!(
            plain.hash,
            "5cbae79efa2feae2dab3f3a8dbaebd38fb73d9b25f76f3fc51b9bb25f3f23b6d"
        );
        let counted = upgrade_record(Some((12, 34)));
        assert_eq!((counted.bytes_up, counted.bytes_down), (Some(12), Some(34)));
        assert_eq!(
            counted.hash,
            "590f4b3a005d9d7d7dc638e6a80bbf61197ddef8a29882485a8bd21dafcee0c1"
        );
    }

    /// Editing a stored byte count (or removing it) breaks the record's
    /// hash, so `audit verify` reports it.
    #[test]
    fn editing_a_byte_count_changes_the_hash() {
        let r = upgrade_record(Some((12, 34)));
        assert_eq!(r.compute_hash(), r.hash);
        let edits: [fn(&mut AuditRecord); 6] = [
            |r| r.bytes_up = Some(13),
            |r| r.bytes_down = Some(0),
            |r| r.bytes_up = None,
            |r| r.bytes_down = None,
            |r| (r.bytes_up, r.bytes_down) = (None, None),
            |r| (r.bytes_up, r.bytes_down) = (r.bytes_down, r.bytes_up),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut tampered = r.clone();
            edit(&mut tampered);
            assert_ne!(tampered.compute_hash(), r.hash, "edit {i} went unnoticed");
        }
    }
}
