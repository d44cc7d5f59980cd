//! Builds the immutable [`Snapshot`] from the database and publishes it.

use std::collections::HashMap;
use std::sync::Arc;

use keygate_core::{
    AgentEntry, HostPattern, PathPattern, SealedSecret, SecretEntry, Snapshot, Template, TokenHash,
};
use sqlx::Row;

use crate::{unb64, Store, StoreError};

fn corrupt(what: &str) -> impl Fn(keygate_core::PatternError) -> StoreError + '_ {
    move |e| StoreError::Corrupt(format!("{what}: {}", e.message()))
}

impl Store {
    /// Rebuilds the snapshot from the database and swaps it in. Called after
    /// every mutation and by the safety-net poll.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let mut generation = self.rebuild.lock().await;
        let snapshot = self.build_snapshot(*generation + 1).await?;
        *generation += 1;
        self.snapshot.store(Arc::new(snapshot));
        Ok(())
    }

    async fn build_snapshot(&self, generation: u64) -> Result<Snapshot, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, host_pattern, path_pattern, header, format, version, key_id, wrapped_key, ciphertext FROM secrets",
        )
        .fetch_all(self.pool())
        .await?;
        let mut secrets: HashMap<String, Arc<SecretEntry>> = HashMap::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("id")?;
            let entry = SecretEntry {
                name: row.try_get("name")?,
                host: HostPattern::parse(&row.try_get::<String, _>("host_pattern")?)
                    .map_err(corrupt("host pattern"))?,
                path: PathPattern::parse(&row.try_get::<String, _>("path_pattern")?)
                    .map_err(corrupt("path pattern"))?,
                header: row.try_get("header")?,
                format: Template::parse(&row.try_get::<String, _>("format")?)
                    .map_err(corrupt("format"))?,
                version: row.try_get("version")?,
                sealed: SealedSecret {
                    key_id: row.try_get("key_id")?,
                    wrapped_key: unb64(&row.try_get::<String, _>("wrapped_key")?)?,
                    ciphertext: unb64(&row.try_get::<String, _>("ciphertext")?)?,
                },
                id: id.clone(),
            };
            secrets.insert(id, Arc::new(entry));
        }

        let grants: Vec<(String, String)> =
            sqlx::query_as("SELECT agent_id, secret_id FROM grants")
                .fetch_all(self.pool())
                .await?;
        let mut by_agent: HashMap<String, Vec<Arc<SecretEntry>>> = HashMap::new();
        for (agent_id, secret_id) in grants {
            if let Some(secret) = secrets.get(&secret_id) {
                by_agent.entry(agent_id).or_default().push(secret.clone());
            }
        }

        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT id, name, token_hash FROM agents WHERE disabled = 0")
                .fetch_all(self.pool())
                .await?;
        let mut agents: HashMap<TokenHash, Arc<AgentEntry>> = HashMap::with_capacity(rows.len());
        for (id, name, hash_hex) in rows {
            let mut hash: TokenHash = [0; 32];
            hex::decode_to_slice(&hash_hex, &mut hash)
                .map_err(|_| StoreError::Corrupt(format!("token hash of agent {name:?}")))?;
            let grants = by_agent.remove(&id).unwrap_or_default();
            agents.insert(hash, Arc::new(AgentEntry { id, name, grants }));
        }
        Ok(Snapshot { agents, generation })
    }

    /// Refreshes the snapshot every `every` as a safety net for changes made
    /// by another process sharing the database.
    pub fn spawn_poll(&self, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = store.refresh().await {
                    tracing::warn!(error = %e, "snapshot refresh failed");
                }
            }
        })
    }
}
