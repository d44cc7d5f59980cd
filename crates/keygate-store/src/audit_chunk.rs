//! How the audit log is stored: records in chunks (migration 0007).
//!
//! A chunk is what the writer commits in one transaction (a burst of up to
//! 512 records): one `audit_chunk` row holding the records as a JSON array
//! of rows, with a summary (seq range, time range, counts per decision),
//! plus one `audit_chunk_key` row for each agent, host, decision and pair
//! of them found in it. A record therefore costs a share of one row
//! instead of a row and three or four index entries of its own, and a
//! filtered page reads only the chunks that hold what it asks for.
//!
//! Every record keeps its own place in the hash chain. [`Store::audit_verify`]
//! checks the chain and that every chunk's summary and keys are what its
//! records say, so an edit of any of them is reported.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::audit::AuditRecord;
use crate::{Backend, StoreError};

/// The decisions counted in a chunk's summary, in column order.
pub(crate) const DECISIONS: [&str; 4] = ["injected", "passthrough", "denied", "error"];

/// Where `decision` is counted in a chunk's summary ([`DECISIONS`] order).
pub(crate) fn decision_slot(decision: &str) -> Option<usize> {
    DECISIONS.iter().position(|d| *d == decision)
}

pub(crate) const INSERT_CHUNK: &str = "INSERT INTO audit_chunk (first_seq, last_seq, ts_min, ts_max, n_injected, n_passthrough, n_denied, n_error, records) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
pub(crate) const INSERT_KEY: &str =
    "INSERT INTO audit_chunk_key (key, first_seq, last_ts) VALUES ($1, $2, $3)";

/// A chunk as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub first_seq: i64,
    pub last_seq: i64,
    pub ts_min: i64,
    pub ts_max: i64,
    /// Records per decision, in [`DECISIONS`] order.
    pub counts: [i64; 4],
    /// The records, a JSON array of rows (see [`encode_records`]).
    pub records: String,
    /// Its keys, sorted, each with the time of its newest record.
    pub keys: Vec<(String, i64)>,
}

impl Chunk {
    /// The chunk for `records` (in seq order, at least one).
    pub fn build(records: &[AuditRecord]) -> Result<Chunk, StoreError> {
        let json = encode_records(records)?;
        Chunk::describe(records, json)
    }

    /// The summary and keys `records` call for, with `json` as their
    /// stored form.
    pub fn describe(records: &[AuditRecord], json: String) -> Result<Chunk, StoreError> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Err(StoreError::Corrupt("an audit chunk without records".into()));
        };
        let mut counts = [0; 4];
        let (mut ts_min, mut ts_max) = (i64::MAX, i64::MIN);
        for r in records {
            ts_min = ts_min.min(r.ts_ms);
            ts_max = ts_max.max(r.ts_ms);
            if let Some(i) = decision_slot(&r.decision) {
                counts[i] += 1;
            }
        }
        Ok(Chunk {
            first_seq: first.seq,
            last_seq: last.seq,
            ts_min,
            ts_max,
            counts,
            records: json,
            keys: chunk_keys(records),
        })
    }
}

/// The key of records of one agent (`a`), host (`h`) or decision (`d`), or
/// of a pair (`ad`, `ah`, `hd`: the values in that order).
pub(crate) fn key(kind: &str, a: &str, b: Option<&str>) -> String {
    match b {
        None => format!("{kind}:{a}"),
        Some(b) => format!("{kind}:{a}\n{b}"),
    }
}

/// Every key of `records`, sorted, with the newest matching record's time.
pub(crate) fn chunk_keys(records: &[AuditRecord]) -> Vec<(String, i64)> {
    let mut keys: BTreeMap<(&str, &str, Option<&str>), i64> = BTreeMap::new();
    // Consecutive records mostly share agent, host and decision: each run
    // of them adds its keys once, with the run's newest time.
    let same = |x: &AuditRecord, y: &AuditRecord| {
        x.agent == y.agent && x.host == y.host && x.decision == y.decision
    };
    for run in records.chunk_by(same) {
        let r = &run[0];
        let ts = run.iter().map(|r| r.ts_ms).max().unwrap_or(r.ts_ms);
        let mut add = |k: (&'static str, _, _)| {
            let newest = keys.entry(k).or_insert(ts);
            *newest = (*newest).max(ts);
        };
        add(("h", r.host.as_str(), None));
        add(("d", r.decision.as_ref(), None));
        add(("hd", r.host.as_str(), Some(r.decision.as_ref())));
        if let Some(agent) = r.agent.as_deref() {
            add(("a", agent, None));
            add(("ad", agent, Some(r.decision.as_ref())));
            add(("ah", agent, Some(r.host.as_str())));
        }
    }
    keys.into_iter()
        .map(|((kind, a, b), ts)| (key(kind, a, b), ts))
        .collect()
}

/// The keys that select the chunks holding records with this agent, host
/// and decision (all that are given); none when nothing is filtered.
pub(crate) fn filter_keys(
    agent: Option<&str>,
    host: Option<&str>,
    decision: Option<&str>,
) -> Vec<String> {
    match (agent, host, decision) {
        (None, None, None) => vec![],
        (Some(a), None, None) => vec![key("a", a, None)],
        (None, Some(h), None) => vec![key("h", h, None)],
        (None, None, Some(d)) => vec![key("d", d, None)],
        (Some(a), Some(h), None) => vec![key("ah", a, Some(h))],
        (Some(a), None, Some(d)) => vec![key("ad", a, Some(d))],
        (None, Some(h), Some(d)) => vec![key("hd", h, Some(d))],
        (Some(a), Some(h), Some(d)) => vec![
            key("ad", a, Some(d)),
            key("ah", a, Some(h)),
            key("hd", h, Some(d)),
        ],
    }
}

/// The records as a JSON array of rows, each an array in this order: seq,
/// ts_ms, agent, method, scheme, host, port, path, status, decision,
/// reason, secrets (an array), duration_us, bytes_up, bytes_down,
/// prev_hash, hash.
pub(crate) fn encode_records(records: &[AuditRecord]) -> Result<String, StoreError> {
    let rows: Vec<Row<'_>> = records.iter().map(Row).collect();
    serde_json::to_string(&rows).map_err(|e| StoreError::Corrupt(format!("audit chunk: {e}")))
}

/// Appends `r`'s stored row to `out`, given `hash_input`, the JSON array
/// its hash was computed over ([`AuditRecord::compute_hash`]: the row's
/// first 13 fields, then the byte counts when set). Falls back to
/// serialising the whole row when the input is not such an array.
pub(crate) fn push_row(out: &mut Vec<u8>, hash_input: &[u8], r: &AuditRecord) {
    let Some(open) = hash_input
        .strip_suffix(b"]")
        .filter(|h| h.starts_with(b"["))
    else {
        if serde_json::to_writer(&mut *out, &Row(r)).is_err() {
            out.extend_from_slice(b"null");
        }
        return;
    };
    out.extend_from_slice(open);
    if r.bytes_up.is_none() && r.bytes_down.is_none() {
        out.extend_from_slice(b",null,null");
    }
    for h in [&r.prev_hash, &r.hash] {
        out.push(b',');
        if serde_json::to_writer(&mut *out, h).is_err() {
            out.extend_from_slice(b"\"\"");
        }
    }
    out.push(b']');
}

/// The records of a stored chunk, in seq order.
pub(crate) fn decode_records(json: &str) -> Result<Vec<AuditRecord>, StoreError> {
    let rows: Vec<Stored> = serde_json::from_str(json)
        .map_err(|e| StoreError::Corrupt(format!("unreadable audit chunk: {e}")))?;
    Ok(rows.into_iter().map(|s| s.0).collect())
}

const FIELDS: usize = 17;

/// One row of [`encode_records`] (written element by element: there are
/// more fields than serde has tuple sizes).
struct Row<'a>(&'a AuditRecord);

impl Serialize for Row<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let r = self.0;
        let mut row = s.serialize_tuple(FIELDS)?;
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
        row.serialize_element(&r.secrets)?;
        row.serialize_element(&r.duration_us)?;
        row.serialize_element(&r.bytes_up)?;
        row.serialize_element(&r.bytes_down)?;
        row.serialize_element(&r.prev_hash)?;
        row.serialize_element(&r.hash)?;
        row.end()
    }
}

/// A row of [`encode_records`] read back.
struct Stored(AuditRecord);

impl<'de> Deserialize<'de> for Stored {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Stored, D::Error> {
        d.deserialize_seq(RowVisitor)
    }
}

struct RowVisitor;

impl<'de> Visitor<'de> for RowVisitor {
    type Value = Stored;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an audit record: an array of {FIELDS} fields")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Stored, A::Error> {
        let mut n = 0;
        let mut next = || {
            n += 1;
            n - 1
        };
        macro_rules! field {
            () => {{
                let i = next();
                seq.next_element()?
                    .ok_or_else(|| de::Error::invalid_length(i, &self))?
            }};
        }
        let r = AuditRecord {
            seq: field!(),
            ts_ms: field!(),
            agent: field!(),
            method: field!(),
            scheme: field!(),
            host: field!(),
            port: field!(),
            path: field!(),
            status: field!(),
            decision: field!(),
            reason: field!(),
            secrets: field!(),
            duration_us: field!(),
            bytes_up: field!(),
            bytes_down: field!(),
            prev_hash: field!(),
            hash: field!(),
        };
        if seq.next_element::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::invalid_length(FIELDS + 1, &self));
        }
        Ok(Stored(r))
    }
}

/// Writes `chunk` (row and keys) through sqlx: the PostgreSQL writer and
/// the move of a pre-chunk `audit` table. The keys go in as multi-row
/// INSERTs, a few hundred per statement.
pub(crate) async fn write_chunk_sqlx(
    conn: &mut sqlx::AnyConnection,
    chunk: &Chunk,
) -> Result<(), StoreError> {
    let [injected, passthrough, denied, error] = chunk.counts;
    sqlx::query(INSERT_CHUNK)
        .bind(chunk.first_seq)
        .bind(chunk.last_seq)
        .bind(chunk.ts_min)
        .bind(chunk.ts_max)
        .bind(injected)
        .bind(passthrough)
        .bind(denied)
        .bind(error)
        .bind(chunk.records.as_str())
        .execute(&mut *conn)
        .await?;
    for part in chunk.keys.chunks(300) {
        let mut sql = String::from("INSERT INTO audit_chunk_key (key, first_seq, last_ts) VALUES ");
        for i in 0..part.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("(${}, ${}, ${})", 3 * i + 1, 3 * i + 2, 3 * i + 3));
        }
        let mut q = sqlx::query(&sql);
        for (k, ts) in part {
            q = q.bind(k.as_str()).bind(chunk.first_seq).bind(*ts);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Writes `chunk` on the SQLite audit thread's own connection, with cached
/// statements.
pub(crate) fn write_chunk_rusqlite(
    tx: &rusqlite::Transaction<'_>,
    chunk: &Chunk,
) -> Result<(), StoreError> {
    let [injected, passthrough, denied, error] = chunk.counts;
    tx.prepare_cached(INSERT_CHUNK)?.execute(rusqlite::params![
        chunk.first_seq,
        chunk.last_seq,
        chunk.ts_min,
        chunk.ts_max,
        injected,
        passthrough,
        denied,
        error,
        chunk.records,
    ])?;
    let mut insert = tx.prepare_cached(INSERT_KEY)?;
    for (k, ts) in &chunk.keys {
        insert.execute(rusqlite::params![k, chunk.first_seq, ts])?;
    }
    Ok(())
}

/// The per-record `audit` table of migrations 0001–0006, if this database
/// still has it.
async fn has_legacy_table(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
) -> Result<bool, StoreError> {
    let sql = match backend {
        Backend::Sqlite => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'audit'",
        Backend::Postgres => "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'audit' AND table_schema = current_schema()",
    };
    let (n,): (i64,) = sqlx::query_as(sql).fetch_one(&mut *conn).await?;
    Ok(n > 0)
}

const LEGACY_COLUMNS: &str = "seq, ts_ms, agent, method, scheme, host, port, path, status, decision, reason, secrets, duration_us, bytes_up, bytes_down, prev_hash, hash";

/// Moves the records of the per-record `audit` table (databases written
/// before migration 0007) into chunks of 512 and drops the table, in one
/// transaction: an interrupted or failed move leaves the database as it
/// was, and the store does not open (the chain cannot continue across two
/// layouts). Records are moved exactly as stored, hashes included, so an
/// edit or a gap made before the move is still reported by verify.
/// Returns how many records were moved.
pub(crate) async fn move_legacy_records(
    pool: &sqlx::AnyPool,
    backend: Backend,
) -> Result<u64, StoreError> {
    use sqlx::Row;
    {
        let mut conn = pool.acquire().await?;
        if !has_legacy_table(&mut conn, backend).await? {
            return Ok(0);
        }
    }
    let mut tx = crate::begin_write(pool, backend).await?;
    if backend == Backend::Postgres {
        // Another keygate process opening the same database waits here, and
        // then finds the table gone.
        sqlx::query("LOCK TABLE audit_chunk IN EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
    }
    if !has_legacy_table(&mut tx, backend).await? {
        return Ok(0);
    }
    let mut moved = 0u64;
    let mut after = i64::MIN;
    loop {
        let rows = sqlx::query(&format!(
            "SELECT {LEGACY_COLUMNS} FROM audit WHERE seq > $1 ORDER BY seq ASC LIMIT 512"
        ))
        .bind(after)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.try_get("seq")?;
        let records = rows
            .iter()
            .map(legacy_record)
            .collect::<Result<Vec<_>, _>>()?;
        write_chunk_sqlx(&mut tx, &Chunk::build(&records)?).await?;
        moved += records.len() as u64;
    }
    sqlx::query("DROP TABLE audit").execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(moved)
}

fn legacy_record(row: &sqlx::any::AnyRow) -> Result<AuditRecord, StoreError> {
    use sqlx::Row;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: i64, ts: i64, agent: Option<&str>, host: &str, decision: &str) -> AuditRecord {
        AuditRecord {
            seq,
            ts_ms: ts,
            agent: agent.map(str::to_string),
            method: "GET".into(),
            scheme: "https".into(),
            host: host.into(),
            port: 443,
            path: "/p \"q\" ü".into(),
            status: 200,
            decision: decision.to_string().into(),
            reason: None,
            secrets: vec!["s".into(), "t".into()],
            duration_us: 9,
            bytes_up: (seq == 2).then_some(12),
            bytes_down: (seq == 2).then_some(34),
            prev_hash: "ab".repeat(32),
            hash: format!("{seq:064}"),
        }
    }

    #[test]
    fn records_round_trip_and_the_summary_describes_them() {
        let records = vec![
            record(1, 50, Some("bot"), "a.test", "injected"),
            record(2, 40, None, "b.test", "denied"),
            record(3, 70, Some("bot"), "b.test", "injected"),
        ];
        let chunk = Chunk::build(&records).unwrap();
        assert_eq!(decode_records(&chunk.records).unwrap(), records);
        assert_eq!((chunk.first_seq, chunk.last_seq), (1, 3));
        assert_eq!((chunk.ts_min, chunk.ts_max), (40, 70));
        assert_eq!(chunk.counts, [2, 0, 1, 0]);
        let keys: Vec<(&str, i64)> = chunk.keys.iter().map(|(k, t)| (k.as_str(), *t)).collect();
        assert_eq!(
            keys,
            vec![
                ("a:bot", 70),
                ("ad:bot\ninjected", 70),
                ("ah:bot\na.test", 50),
                ("ah:bot\nb.test", 70),
                ("d:denied", 40),
                ("d:injected", 70),
                ("h:a.test", 50),
                ("h:b.test", 70),
                ("hd:a.test\ninjected", 50),
                ("hd:b.test\ndenied", 40),
                ("hd:b.test\ninjected", 70),
            ]
        );
        // What a filter asks for is among the keys of the chunks it needs.
        for k in filter_keys(Some("bot"), Some("b.test"), Some("injected")) {
            assert!(chunk.keys.iter().any(|(c, _)| *c == k), "{k}");
        }
        assert!(Chunk::build(&[]).is_err());
        // A run of alike records keys with its newest time, wherever it is.
        let run = [
            record(1, 10, Some("bot"), "a.test", "injected"),
            record(2, 30, Some("bot"), "a.test", "injected"),
            record(3, 20, Some("bot"), "a.test", "injected"),
        ];
        let keys = chunk_keys(&run);
        assert_eq!(keys.len(), 6);
        assert!(keys.iter().all(|(_, ts)| *ts == 30), "{keys:?}");
    }

    #[test]
    fn malformed_chunks_are_errors_not_panics() {
        let good = encode_records(&[record(1, 1, None, "h", "injected")]).unwrap();
        for bad in [
            "",
            "{}",
            "[[1]]",
            "[[\"x\"]]",
            &good.replace("]]", ",1]]"),
            &good.replace("443", "\"443\""),
            &good[..good.len() - 3],
        ] {
            assert!(
                matches!(decode_records(bad), Err(StoreError::Corrupt(_))),
                "{bad}"
            );
        }
    }
}
