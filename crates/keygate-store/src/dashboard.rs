//! Read-side helpers for the web dashboard (counts, last use, time-range
//! boundaries) and the admin password hash, kept in the `meta` table.
//! Every query here is index-backed or bounded.

use std::collections::HashMap;

use crate::audit::ChunkRange;
use crate::audit_chunk::{decision_slot, decode_records, key, DECISIONS};
use crate::{Store, StoreError};

const ADMIN_PASSWORD_KEY: &str = "admin_password_hash";

impl Store {
    /// The stored admin password hash (a PHC string), if one was set.
    pub async fn admin_password_hash(&self) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as("SELECT value FROM meta WHERE key = $1")
            .bind(ADMIN_PASSWORD_KEY)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| r.0))
    }

    /// Stores (or replaces) the admin password hash. The caller hashes.
    pub async fn set_admin_password_hash(&self, phc: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(ADMIN_PASSWORD_KEY)
        .bind(phc)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Number of audit records per decision since `since_ms`: the counts
    /// of every chunk wholly inside the range (a range of the `ts_max`
    /// index), plus the records of the few chunks that straddle its start.
    pub async fn audit_counts_since(
        &self,
        since_ms: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let rows: Vec<(i64, i64, i64, i64, Option<String>)> = sqlx::query_as(
            "SELECT n_injected, n_passthrough, n_denied, n_error, \
             CASE WHEN ts_min < $1 THEN records END FROM audit_chunk WHERE ts_max >= $1",
        )
        .bind(since_ms)
        .fetch_all(self.pool())
        .await?;
        let mut counts = [0i64; 4];
        for (injected, passthrough, denied, error, straddling) in rows {
            match straddling {
                None => {
                    for (c, n) in counts
                        .iter_mut()
                        .zip([injected, passthrough, denied, error])
                    {
                        *c += n;
                    }
                }
                Some(json) => {
                    for r in decode_records(&json)? {
                        match decision_slot(&r.decision) {
                            Some(i) if r.ts_ms >= since_ms => counts[i] += 1,
                            _ => {}
                        }
                    }
                }
            }
        }
        Ok(DECISIONS
            .iter()
            .map(|d| d.to_string())
            .zip(counts)
            .collect())
    }

    /// The highest sequence number among records at or before `ts_ms`, to
    /// turn an "until" time into a keyset boundary: it is in the newest
    /// chunk whose oldest record is at or before `ts_ms`.
    pub async fn audit_seq_at_or_before(&self, ts_ms: i64) -> Result<Option<i64>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT records FROM audit_chunk WHERE ts_min <= $1 ORDER BY first_seq DESC LIMIT 1",
        )
        .bind(ts_ms)
        .fetch_optional(self.pool())
        .await?;
        let Some((json,)) = row else { return Ok(None) };
        Ok(decode_records(&json)?
            .iter()
            .filter(|r| r.ts_ms <= ts_ms)
            .map(|r| r.seq)
            .max())
    }

    /// When each agent was last seen by the gateway: one lookup of the
    /// agent's newest chunk key per agent.
    pub async fn agents_last_seen(
        &self,
        agents: &[String],
    ) -> Result<HashMap<String, i64>, StoreError> {
        let mut out = HashMap::new();
        for a in agents {
            let row: Option<(i64,)> = sqlx::query_as(
                "SELECT last_ts FROM audit_chunk_key WHERE key = $1 ORDER BY first_seq DESC LIMIT 1",
            )
            .bind(key("a", a, None))
            .fetch_optional(self.pool())
            .await?;
            if let Some((ts,)) = row {
                out.insert(a.clone(), ts);
            }
        }
        Ok(out)
    }

    /// When each secret was last injected, looking at the newest `window`
    /// records only (bounded work whatever the size of the log).
    pub async fn secrets_last_used(&self, window: i64) -> Result<HashMap<String, i64>, StoreError> {
        let mut left = window.clamp(1, 100_000);
        let mut out = HashMap::new();
        let mut range = ChunkRange {
            keys: &[],
            lower: None,
            upper: None,
            asc: false,
        };
        while left > 0 {
            let chunks = self.chunk_page(&range).await?;
            let Some(&(oldest, _)) = chunks.last() else {
                break;
            };
            range.upper = Some(oldest);
            for (_, json) in chunks {
                for r in decode_records(&json)?.into_iter().rev() {
                    if left == 0 {
                        break;
                    }
                    left -= 1;
                    for n in r.secrets {
                        out.entry(n).or_insert(r.ts_ms);
                    }
                }
            }
        }
        Ok(out)
    }
}
