use keygate_vault::VaultError;

/// Errors from the store. Messages never contain secret values.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot connect to the database {0}: {1}")]
    Connect(String, String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// From the audit writer's own SQLite connection.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("vault error: {0}")]
    Vault(#[from] VaultError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}
