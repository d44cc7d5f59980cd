//! The audit log: a batch writer fed by a bounded channel (off the hot path),
//! a SHA-256 hash chain over every record, queries and chain verification.

use std::borrow::Cow;
use std::time::Duration;

use aws_lc_rs::digest;
use keygate_core::AuditEvent;
use serde::Serialize;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use crate::audit_chunk::{self, Chunk};
use crate::{Backend, Store, StoreError};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const BATCH: usize = 512;
/// How long the first event of a burst waits for company. 20 ms rather
/// than 5 ms halved the SQLite audit CPU per request at c=1 (16 → 9 µs,
/// bench/README.md); a record is in the log ~20 ms after its response.
const LINGER: Duration = Duration::from_millis(20);
const HEAD_KEY: &str = "audit_head";
const UPSERT_HEAD: &str = "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value";
/// Chunks read at a time when paging (each holds up to [`BATCH`] records).
const CHUNKS_PER_READ: i64 = 4;

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
                let (tail, head, json) = link_batch(&mut records, tail);
                if let Err(e) = self.write_postgres(&records, json, head).await {
                    return Err((e, records));
                }
                tail
            }
        };
        self.next_seq = tail.next_seq;
        self.prev_hash = tail.prev_hash;
        Ok(())
    }

    /// PostgreSQL: the batch as one chunk (a row, its keys in one multi-row
    /// INSERT) and the chain head, in one transaction: three statements,
    /// whatever the batch's size.
    async fn write_postgres(
        &self,
        records: &[AuditRecord],
        json: String,
        head: String,
    ) -> Result<(), StoreError> {
        let chunk = Chunk::describe(records, json)?;
        let mut tx = self.store.write_tx().await?;
        audit_chunk::write_chunk_sqlx(&mut tx, &chunk).await?;
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

/// Links `records` after `tail`; returns the new tail, the chain head
/// (`seq:hash` of the last record) stored with them, and the records'
/// stored form (as [`audit_chunk::encode_records`] writes it), built from
/// each record's hash input: the first 13 fields of a stored row are that
/// JSON array's, so they are serialised once, not twice.
fn link_batch(records: &mut [AuditRecord], tail: ChainTail) -> (ChainTail, String, String) {
    let ChainTail {
        next_seq: mut seq,
        prev_hash: mut prev,
    } = tail;
    let mut scratch = Vec::with_capacity(512);
    let mut json = Vec::with_capacity(records.len() * 384 + 2);
    json.push(b'[');
    for (i, r) in records.iter_mut().enumerate() {
        r.link(seq, std::mem::take(&mut prev), &mut scratch);
        if i > 0 {
            json.push(b',');
        }
        audit_chunk::push_row(&mut json, &scratch, r);
        prev = r.hash.clone();
        seq += 1;
    }
    json.push(b']');
    let json = String::from_utf8(json)
        .ok()
        .or_else(|| audit_chunk::encode_records(records).ok())
        .unwrap_or_default();
    let head = format!("{}:{}", seq - 1, prev);
    let tail = ChainTail {
        next_seq: seq,
        prev_hash: prev,
    };
    (tail, head, json)
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
                        let (tail, head, json) = link_batch(&mut records, tail);
                        write_sqlite(&mut conn, &records, json, &head).map(|()| tail)
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
    json: String,
    head: &str,
) -> Result<(), StoreError> {
    let chunk = Chunk::describe(records, json)?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    audit_chunk::write_chunk_rusqlite(&tx, &chunk)?;
    // The head lets verify notice records deleted from the end.
    tx.prepare_cached(UPSERT_HEAD)?
        .execute(rusqlite::params![HEAD_KEY, head])?;
    tx.commit()?;
    Ok(())
}

/// Where the chain ends: the newest record's seq and hash (0 and the
/// genesis hash for an empty log).
async fn chain_tail(store: &Store) -> Result<(i64, String), StoreError> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT records FROM audit_chunk ORDER BY first_seq DESC LIMIT 1")
            .fetch_optional(store.pool())
            .await?;
    let Some((json,)) = row else {
        return Ok((0, GENESIS.to_string()));
    };
    let newest = audit_chunk::decode_records(&json)?.pop();
    let r = newest.ok_or_else(|| StoreError::Corrupt("an audit chunk without records".into()))?;
    Ok((r.seq, r.hash))
}

/// Which chunks a page reads: those holding every key in `keys` (all
/// chunks when empty), with `first_seq` in `lower..upper`, newest first
/// unless `asc`.
pub(crate) struct ChunkRange<'a> {
    pub keys: &'a [String],
    pub lower: Option<i64>,
    pub upper: Option<i64>,
    pub asc: bool,
}

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

    /// The next `CHUNKS_PER_READ` chunks of `range`: `(first_seq, records)`.
    pub(crate) async fn chunk_page(
        &self,
        range: &ChunkRange<'_>,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let (sql, binds) = chunk_page_sql(range);
        let rows = bind_all(sqlx::query(&sql), binds)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Audit records matching `filter`: keyset paging on seq over the
    /// chunks that hold matching records (found through their keys).
    pub async fn audit_query(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let limit = usize::try_from(filter.limit.unwrap_or(100).clamp(1, 10_000)).unwrap_or(100);
        let host = filter.host.as_deref().map(str::to_ascii_lowercase);
        let keys = audit_chunk::filter_keys(
            filter.agent.as_deref(),
            host.as_deref(),
            filter.decision.as_deref(),
        );
        let mut range = ChunkRange {
            keys: &keys,
            lower: None,
            // Chunks starting below `before` may hold records below it.
            upper: filter.before_seq,
            asc: filter.after_seq.is_some(),
        };
        if let Some(after) = filter.after_seq {
            // From the chunk holding the first record after `after`.
            range.lower = self.chunk_holding(after.saturating_add(1)).await?;
        }
        if let Some(since) = filter.since_ms {
            // Every record at or after `since` is in a chunk whose newest
            // record is, and no such chunk starts before this one.
            let (first,): (Option<i64>,) =
                sqlx::query_as("SELECT MIN(first_seq) FROM audit_chunk WHERE ts_max >= $1")
                    .bind(since)
                    .fetch_one(self.pool())
                    .await?;
            let Some(first) = first else {
                return Ok(Vec::new());
            };
            range.lower = Some(range.lower.map_or(first, |l| l.max(first)));
        }
        let wanted = |r: &AuditRecord| {
            filter
                .agent
                .as_ref()
                .is_none_or(|a| r.agent.as_ref() == Some(a))
                && host.as_ref().is_none_or(|h| r.host == *h)
                && filter
                    .decision
                    .as_ref()
                    .is_none_or(|d| r.decision == d.as_str())
                && filter.before_seq.is_none_or(|b| r.seq < b)
                && filter.after_seq.is_none_or(|a| r.seq > a)
                && filter.since_ms.is_none_or(|t| r.ts_ms >= t)
        };
        let mut out = Vec::new();
        loop {
            let page = self.chunk_page(&range).await?;
            for (_, json) in &page {
                let mut records = audit_chunk::decode_records(json)?;
                if !range.asc {
                    records.reverse();
                }
                for r in records.into_iter().filter(|r| wanted(r)) {
                    out.push(r);
                    if out.len() == limit {
                        return Ok(out);
                    }
                }
            }
            match page.last() {
                Some(&(first, _)) if page.len() as i64 == CHUNKS_PER_READ => {
                    if range.asc {
                        range.lower = Some(first + 1);
                    } else {
                        range.upper = Some(first);
                    }
                }
                _ => return Ok(out),
            }
        }
    }

    /// The first seq of the chunk that holds `seq` (or would: the newest
    /// chunk starting at or before it).
    async fn chunk_holding(&self, seq: i64) -> Result<Option<i64>, StoreError> {
        let (first,): (Option<i64>,) =
            sqlx::query_as("SELECT MAX(first_seq) FROM audit_chunk WHERE first_seq <= $1")
                .bind(seq)
                .fetch_one(self.pool())
                .await?;
        Ok(first)
    }

    /// Walks the whole chain in seq order and reports the first record whose
    /// stored hash, link to its predecessor or sequence number is wrong, or
    /// the first chunk whose summary or keys do not describe its records.
    pub async fn audit_verify(&self) -> Result<VerifyReport, StoreError> {
        let mut prev_hash = GENESIS.to_string();
        let mut expected_seq = 1;
        let mut count = 0;
        let mut next_chunk = i64::MIN;
        loop {
            let rows = sqlx::query(
                "SELECT first_seq, last_seq, ts_min, ts_max, n_injected, n_passthrough, n_denied, n_error, records \
                 FROM audit_chunk WHERE first_seq >= $1 ORDER BY first_seq ASC LIMIT 64",
            )
            .bind(next_chunk)
            .fetch_all(self.pool())
            .await?;
            let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
                break;
            };
            let (lo, hi): (i64, i64) = (first.try_get(0)?, last.try_get(0)?);
            next_chunk = hi.saturating_add(1);
            let key_rows: Vec<(i64, String, i64)> = sqlx::query_as(
                "SELECT first_seq, key, last_ts FROM audit_chunk_key \
                 WHERE first_seq >= $1 AND first_seq <= $2 ORDER BY first_seq, key",
            )
            .bind(lo)
            .bind(hi)
            .fetch_all(self.pool())
            .await?;
            let mut stored_keys: std::collections::HashMap<i64, Vec<(String, i64)>> =
                std::collections::HashMap::new();
            for (first_seq, key, ts) in key_rows {
                stored_keys.entry(first_seq).or_default().push((key, ts));
            }
            for row in &rows {
                let first_seq: i64 = row.try_get(0)?;
                let bad = |count: i64, seq: i64, msg: String| VerifyReport {
                    ok: false,
                    records: count,
                    first_bad_seq: Some(seq),
                    message: msg,
                };
                let json: String = row.try_get(8)?;
                let Ok(records) = audit_chunk::decode_records(&json) else {
                    return Ok(bad(
                        count,
                        first_seq,
                        format!("the records stored from record {first_seq} on are unreadable"),
                    ));
                };
                if records.is_empty() {
                    return Ok(bad(
                        count,
                        first_seq,
                        format!("the chunk stored for record {first_seq} holds no records"),
                    ));
                }
                for r in &records {
                    if r.seq != expected_seq {
                        return Ok(bad(
                            count,
                            r.seq,
                            format!(
                                "record {} is missing (next stored record is {})",
                                expected_seq, r.seq
                            ),
                        ));
                    }
                    if r.prev_hash != prev_hash {
                        return Ok(bad(
                            count,
                            r.seq,
                            format!("record {} does not link to the record before it", r.seq),
                        ));
                    }
                    if r.compute_hash() != r.hash {
                        return Ok(bad(count, r.seq, format!("record {} was modified", r.seq)));
                    }
                    prev_hash.clone_from(&r.hash);
                    expected_seq += 1;
                    count += 1;
                }
                // The summary and keys the dashboard pages by must be the
                // records' own: an edit there could hide records from a
                // filtered view while the chain still verifies.
                // Compared without the records' text: they were checked
                // above, record by record.
                let want = Chunk::describe(&records, String::new())?;
                let stored = Chunk {
                    first_seq,
                    last_seq: row.try_get(1)?,
                    ts_min: row.try_get(2)?,
                    ts_max: row.try_get(3)?,
                    counts: [
                        row.try_get(4)?,
                        row.try_get(5)?,
                        row.try_get(6)?,
                        row.try_get(7)?,
                    ],
                    records: String::new(),
                    keys: stored_keys.remove(&first_seq).unwrap_or_default(),
                };
                if stored != want {
                    return Ok(bad(
                        count,
                        first_seq,
                        format!(
                            "the index of records {}..={} does not match them (edited)",
                            want.first_seq, want.last_seq
                        ),
                    ));
                }
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

    /// For tests that tamper with the audit log: rewrites the stored form
    /// of record `seq` after `edit` (or removes it, when `edit` returns
    /// false), leaving hashes, chunk summaries and keys as they were, as
    /// someone editing the database by hand would. Returns whether the
    /// record was found.
    #[doc(hidden)]
    pub async fn tamper_audit_record(
        &self,
        seq: i64,
        edit: impl FnOnce(&mut AuditRecord) -> bool,
    ) -> Result<bool, StoreError> {
        let Some(first) = self.chunk_holding(seq).await? else {
            return Ok(false);
        };
        let (json,): (String,) =
            sqlx::query_as("SELECT records FROM audit_chunk WHERE first_seq = $1")
                .bind(first)
                .fetch_one(self.pool())
                .await?;
        let mut records = audit_chunk::decode_records(&json)?;
        let Some(i) = records.iter().position(|r| r.seq == seq) else {
            return Ok(false);
        };
        if !edit(&mut records[i]) {
            records.remove(i);
            if records.is_empty() {
                sqlx::query("DELETE FROM audit_chunk WHERE first_seq = $1")
                    .bind(first)
                    .execute(self.pool())
                    .await?;
                return Ok(true);
            }
        }
        sqlx::query("UPDATE audit_chunk SET records = $1 WHERE first_seq = $2")
            .bind(audit_chunk::encode_records(&records)?)
            .bind(first)
            .execute(self.pool())
            .await?;
        Ok(true)
    }
}

/// The SQL of [`Store::chunk_page`] and its parameters, in order.
fn chunk_page_sql(range: &ChunkRange<'_>) -> (String, Vec<Bind>) {
    let mut binds: Vec<Bind> = Vec::new();
    let mut sql = String::new();
    let col = match range.keys.split_first() {
        None => {
            sql.push_str("SELECT c.first_seq, c.records FROM audit_chunk c WHERE 1=1");
            "c.first_seq"
        }
        Some((first, rest)) => {
            binds.push(Bind::Text(first.clone()));
            sql.push_str(
                "SELECT c.first_seq, c.records FROM audit_chunk_key k \
                 JOIN audit_chunk c ON c.first_seq = k.first_seq WHERE k.key = $1",
            );
            for key in rest {
                binds.push(Bind::Text(key.clone()));
                sql.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM audit_chunk_key k2 WHERE k2.key = ${} AND k2.first_seq = k.first_seq)",
                    binds.len()
                ));
            }
            "k.first_seq"
        }
    };
    if let Some(l) = range.lower {
        binds.push(Bind::Int(l));
        sql.push_str(&format!(" AND {col} >= ${}", binds.len()));
    }
    if let Some(u) = range.upper {
        binds.push(Bind::Int(u));
        sql.push_str(&format!(" AND {col} < ${}", binds.len()));
    }
    let order = if range.asc { "ASC" } else { "DESC" };
    sql.push_str(&format!(" ORDER BY {col} {order} LIMIT {CHUNKS_PER_READ}"));
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

    /// SQLite's plans for the pages of a filtered and an unfiltered log:
    /// a range of the keys' primary key or of the chunks' (no full scan, no
    /// sort in memory, whichever direction and bounds).
    #[tokio::test]
    async fn chunk_pages_are_index_range_scans() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("kg.db").display());
        let vault = std::sync::Arc::new(keygate_vault::Vault::new(
            keygate_vault::MasterKey::generate(),
        ));
        let store = Store::open(&url, vault).await.unwrap();
        let one = ["a:bot".to_string()];
        let three = audit_chunk::filter_keys(Some("bot"), Some("h.test"), Some("denied"));
        for keys in [&[][..], &one[..], &three[..]] {
            for (lower, upper, asc) in [
                (None, None, false),
                (Some(5), Some(900), true),
                (None, Some(10), false),
            ] {
                let range = ChunkRange {
                    keys,
                    lower,
                    upper,
                    asc,
                };
                let (sql, binds) = chunk_page_sql(&range);
                let explain = format!("EXPLAIN QUERY PLAN {sql}");
                let rows = bind_all(sqlx::query(&explain), binds)
                    .fetch_all(store.pool())
                    .await
                    .unwrap();
                let plan = rows
                    .iter()
                    .map(|r| r.try_get::<String, _>("detail").unwrap())
                    .collect::<Vec<_>>()
                    .join("; ");
                assert!(
                    !plan.contains("TEMP B-TREE"),
                    "{keys:?}: sorted in memory: {plan}"
                );
                if keys.is_empty() {
                    assert!(
                        plan.contains("SEARCH c") || plan.contains("SCAN c"),
                        "{plan}"
                    );
                    if lower.is_some() || upper.is_some() {
                        assert!(plan.contains("SEARCH c"), "{plan}");
                    }
                } else {
                    assert!(
                        plan.contains("INDEX sqlite_autoindex_audit_chunk_key_1 (key=?"),
                        "{keys:?}: {plan}"
                    );
                    assert!(!plan.contains("SCAN"), "{keys:?}: {plan}");
                }
            }
        }
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

    /// The stored rows the writer builds from the hash inputs are exactly
    /// what serialising the records gives, with and without byte counts,
    /// agent or reason, and with strings that need escaping.
    #[test]
    fn linked_rows_are_the_encoded_records() {
        let mut records: Vec<AuditRecord> = (0..4)
            .map(|i| {
                let mut e = AuditEvent {
                    ts_ms: 1_764_000_000_000 + i,
                    agent: (i != 1).then(|| format!("bot \"{i}\" é\u{1}")),
                    method: "POST".into(),
                    scheme: "https".into(),
                    host: "api.example.com".into(),
                    port: 443,
                    path: "/v1/ünï\tcode\\x".into(),
                    status: 200,
                    decision: keygate_core::Decision::Injected,
                    reason: (i == 2).then(|| "path_ambiguous".to_string()),
                    secrets: (0..i).map(|n| format!("s{n}")).collect(),
                    duration_us: 7,
                    bytes_up: None,
                    bytes_down: None,
                };
                if i == 3 {
                    e = e.with_bytes(0, u64::MAX);
                }
                AuditRecord::unlinked(e)
            })
            .collect();
        let tail = ChainTail {
            next_seq: 41,
            prev_hash: GENESIS.to_string(),
        };
        let (tail, head, json) = link_batch(&mut records, tail);
        assert_eq!(json, audit_chunk::encode_records(&records).unwrap());
        assert_eq!(audit_chunk::decode_records(&json).unwrap(), records);
        assert_eq!(tail.next_seq, 45);
        assert_eq!(head, format!("44:{}", records[3].hash));
        assert!(records.iter().all(|r| r.compute_hash() == r.hash));
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
