//! Read-side helpers for the web dashboard (counts, last use, time-range
//! boundaries) and the admin password hash, kept in the `meta` table.
//! Every query here is index-backed or bounded.

use std::collections::HashMap;

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

    /// Number of audit records per decision since `since_ms`. One range
    /// scan of the covering `(ts_ms, decision)` index (a `GROUP BY decision`
    /// would tempt the planner into the `(decision, seq)` index and a full
    /// scan).
    pub async fn audit_counts_since(
        &self,
        since_ms: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        const DECISIONS: [&str; 4] = ["injected", "passthrough", "denied", "error"];
        let sums: Vec<String> = DECISIONS
            .iter()
            .map(|d| format!("COALESCE(SUM(CASE WHEN decision = '{d}' THEN 1 ELSE 0 END), 0)"))
            .collect();
        let sql = format!("SELECT {} FROM audit WHERE ts_ms >= $1", sums.join(", "));
        let row: (i64, i64, i64, i64) = sqlx::query_as(&sql)
            .bind(since_ms)
            .fetch_one(self.pool())
            .await?;
        Ok(DECISIONS
            .iter()
            .map(|d| d.to_string())
            .zip([row.0, row.1, row.2, row.3])
            .collect())
    }

    /// The highest sequence number among records at or before `ts_ms`
    /// (through the `ts_ms` index), to turn an "until" time into a keyset
    /// boundary.
    pub async fn audit_seq_at_or_before(&self, ts_ms: i64) -> Result<Option<i64>, StoreError> {
        let row: Option<(i64,)> = sqlx::query_as(
            "SELECT seq FROM audit WHERE ts_ms <= $1 ORDER BY ts_ms DESC, seq DESC LIMIT 1",
        )
        .bind(ts_ms)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| r.0))
    }

    /// When each agent was last seen by the gateway (through the
    /// `(agent, seq)` index: one indexed lookup per agent).
    pub async fn agents_last_seen(
        &self,
        agents: &[String],
    ) -> Result<HashMap<String, i64>, StoreError> {
        let mut out = HashMap::new();
        for a in agents {
            let row: Option<(i64,)> = sqlx::query_as(
                "SELECT ts_ms FROM audit WHERE agent = $1 ORDER BY seq DESC LIMIT 1",
            )
            .bind(a)
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
        let rows: Vec<(i64, String)> =
            sqlx::query_as("SELECT ts_ms, secrets FROM audit ORDER BY seq DESC LIMIT $1")
                .bind(window.clamp(1, 100_000))
                .fetch_all(self.pool())
                .await?;
        let mut out = HashMap::new();
        for (ts, secrets) in rows {
            let names: Vec<String> = serde_json::from_str(&secrets).unwrap_or_default();
            for n in names {
                out.entry(n).or_insert(ts);
            }
        }
        Ok(out)
    }
}
