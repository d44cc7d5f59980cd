//! Persistence for keygate: one [`Store`] over a sqlx `Any` pool (SQLite as
//! the embedded default, PostgreSQL with the same SQL), migrations run at
//! start-up, the [`Snapshot`](keygate_core::Snapshot) builder the gateway
//! reads, and the hash-chained audit log with its batch writer.
//!
//! Every mutation rebuilds and swaps the snapshot before it returns, so a
//! change made through the admin API is visible to the very next request.
//!
//! Master-key rotation (`keygate key rotate`) lives in `keys.rs`: it re-wraps
//! every data key and the token-hash key in one write transaction, and
//! [`Store::open`] settles a rotation that a crash interrupted.
#![forbid(unsafe_code)]

mod agents;
mod audit;
mod audit_chunk;
mod dashboard;
mod error;
mod keys;
mod model;
mod secrets;
mod snapshot;
#[doc(hidden)]
pub mod testing;

use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine;
use keygate_core::Snapshot;
use keygate_vault::{TokenHasher, Vault};
use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;
use tokio::sync::Mutex;

pub use audit::{AuditFilter, AuditRecord, AuditWriter, VerifyReport};
pub use error::StoreError;
pub use keys::KeyRotation;
pub use model::{AgentInfo, NewSecret, SecretInfo};

pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub(crate) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub(crate) fn unb64(s: &str) -> Result<Vec<u8>, StoreError> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| StoreError::Corrupt("invalid base64 in stored value".into()))
}

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The database, the vault that seals secret values, and the published
/// snapshot.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    vault: Arc<Vault>,
    hasher: Arc<TokenHasher>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    /// Serialises snapshot rebuilds so that an older build never replaces a
    /// newer one.
    rebuild: Arc<Mutex<u64>>,
    /// Serialises this process's write transactions (mutations and audit
    /// batches): SQLite allows one writer, and a deferred transaction that
    /// reads first would fail to upgrade instead of waiting.
    writer: Arc<Mutex<()>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .finish()
    }
}

impl Store {
    /// Connects, runs migrations, loads (or creates) the token-hash key and
    /// publishes the first snapshot.
    pub async fn open(url: &str, vault: Arc<Vault>) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::Invalid(
                "database URL must start with sqlite:// or postgres://".into(),
            ));
        };
        let url = match backend {
            Backend::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_string(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 4,
                Backend::Postgres => 8,
            })
            .connect(&url)
            .await
            .map_err(|e| StoreError::Connect(redact_url(&url), e.to_string()))?;
        if backend == Backend::Sqlite {
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await?;
        }
        MIGRATOR.run(&pool).await?;
        // A database written before migration 0007 has its audit records in
        // a table of their own: moved into chunks once, in one transaction.
        let moved = audit_chunk::move_legacy_records(&pool, backend)
            .await
            .map_err(|e| {
                StoreError::Corrupt(format!(
                    "cannot move the audit log into its new layout (nothing was changed): {e}"
                ))
            })?;
        if moved > 0 {
            tracing::info!(records = moved, "audit log moved into chunks");
        }
        // Before the token-hash key is read: it may be wrapped by a key that
        // only an interrupted rotation's `<key file>.next` holds.
        keys::settle_pending_key(&pool, backend, &vault).await?;
        let hasher = Arc::new(load_token_hasher(&pool, &vault).await?);
        let store = Store {
            pool,
            backend,
            vault,
            hasher,
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            rebuild: Arc::new(Mutex::new(0)),
            writer: Arc::new(Mutex::new(())),
        };
        store.refresh().await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The published snapshot, shared with the gateway.
    pub fn snapshot(&self) -> Arc<ArcSwap<Snapshot>> {
        self.snapshot.clone()
    }

    /// The keyed hash used for agent tokens.
    pub fn token_hasher(&self) -> Arc<TokenHasher> {
        self.hasher.clone()
    }

    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Begins a write transaction: one at a time in this process, and
    /// `BEGIN IMMEDIATE` on SQLite so the write lock is taken up front (other
    /// processes then wait on the busy timeout instead of failing).
    pub(crate) async fn write_tx(&self) -> Result<WriteTx, StoreError> {
        let guard = self.lock_writer().await;
        let tx = begin_write(&self.pool, self.backend).await?;
        Ok(WriteTx { tx, _guard: guard })
    }

    /// This process's writer slot alone, for work that spans more than one
    /// transaction (a key rotation holds it until the vault has switched
    /// keys, so that nothing is sealed under the old key in between).
    pub(crate) async fn lock_writer(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.writer.clone().lock_owned().await
    }

    /// Closes the pool (after the audit writer has flushed).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Begins a write transaction (`BEGIN IMMEDIATE` on SQLite). The caller
/// holds the writer slot, or is [`Store::open`] before anyone else can write.
pub(crate) async fn begin_write(
    pool: &AnyPool,
    backend: Backend,
) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
    Ok(match backend {
        Backend::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await?,
        Backend::Postgres => pool.begin().await?,
    })
}

/// A write transaction holding this process's writer slot until dropped.
pub(crate) struct WriteTx {
    pub tx: sqlx::Transaction<'static, sqlx::Any>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl WriteTx {
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

/// `meta` key (and AAD label) of the wrapped token-hash key.
pub(crate) const TOKEN_KEY: &str = "token_hash_key";

/// The token-hash key lives in the database, wrapped by the master key, so
/// that every keygate process sharing the database hashes tokens alike.
async fn load_token_hasher(pool: &AnyPool, vault: &Vault) -> Result<TokenHasher, StoreError> {
    let row: Option<(String,)> = sqlx::query_as("SELECT value FROM meta WHERE key = $1")
        .bind(TOKEN_KEY)
        .fetch_optional(pool)
        .await?;
    if let Some((value,)) = row {
        let key = vault.unwrap_blob(TOKEN_KEY, &unb64(&value)?).map_err(|_| {
            StoreError::Corrupt(
                "cannot unwrap the token-hash key: is this the master key this database was created with?"
                    .into(),
            )
        })?;
        return Ok(TokenHasher::new(&key));
    }
    let key = keygate_vault::random_key();
    let wrapped = vault.wrap_blob(TOKEN_KEY, &key[..])?;
    // Another process may have won the race: insert-if-absent, then re-read.
    sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
        .bind(TOKEN_KEY)
        .bind(b64(&wrapped))
        .execute(pool)
        .await?;
    let (value,): (String,) = sqlx::query_as("SELECT value FROM meta WHERE key = $1")
        .bind(TOKEN_KEY)
        .fetch_one(pool)
        .await?;
    let key = vault.unwrap_blob(TOKEN_KEY, &unb64(&value)?)?;
    Ok(TokenHasher::new(&key))
}

/// Removes a password from a database URL before it is shown anywhere.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@') {
            let user = userinfo.split(':').next().unwrap_or("");
            return format!("{scheme}://{user}:***@{host}");
        }
    }
    url.to_string()
}

pub(crate) fn new_id(prefix: &str) -> String {
    let bytes: [u8; 12] = rand::random();
    format!("{prefix}_{}", hex::encode(bytes))
}

/// Names of secrets and agents: 1–64 of `A-Z a-z 0-9 . _ -`, starting with a
/// letter or digit.
pub fn validate_name(kind: &str, name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{kind} name must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:pw@localhost/db"),
            "postgres://u:***@localhost/db"
        );
        assert_eq!(redact_url("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("secret", "openai").is_ok());
        assert!(validate_name("secret", "gh-token_2.x").is_ok());
        assert!(validate_name("secret", "").is_err());
        assert!(validate_name("secret", "-x").is_err());
        assert!(validate_name("secret", "a b").is_err());
        assert!(validate_name("secret", &"a".repeat(65)).is_err());
    }
}
