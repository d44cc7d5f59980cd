//! Master-key rotation (`keygate key rotate`) and the start-up step that
//! settles a rotation a crash interrupted.
//!
//! A rotation, in this order, so that a key the database needs is always on
//! disk:
//!
//! 1. a fresh key is written durably to `<key file>.next` and added to the
//!    vault's keyring (it opens, it does not seal yet);
//! 2. one write transaction re-wraps every secret's data key and the wrapped
//!    token-hash key under it (ciphertexts are untouched), then commits;
//! 3. `<key file>.next` is renamed over the key file;
//! 4. the vault seals with the new key (it keeps the old one in memory so that
//!    a request holding an older snapshot still decrypts) and the snapshot is
//!    rebuilt.
//!
//! This process's writer slot is held from 1 to 4, so no mutation seals
//! anything under the old key after the commit.
//!
//! At start-up, [`settle_pending_key`] looks at a leftover `<key file>.next`:
//! if nothing in the database uses its key, the rotation never committed and
//! the file is removed; otherwise the rotation committed and is finished
//! (anything still under the old key is re-wrapped, then the rename is done).

use keygate_core::SealedSecret;
use keygate_vault::{KeySource, MasterKey, Vault};
use serde::Serialize;
use sqlx::{AnyConnection, AnyPool, Row};

use crate::{b64, begin_write, unb64, Backend, Store, StoreError, TOKEN_KEY};

/// What a rotation did. Key ids only, never key material.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeyRotation {
    /// Id of the new master key.
    pub key_id: String,
    /// Id of the master key it replaced.
    pub previous_key_id: String,
    /// Secrets whose data key was re-wrapped.
    pub secrets: u64,
}

const ENV_KEY_REFUSAL: &str = "the master key comes from KEYGATE_MASTER_KEY, and keygate cannot \
     change an environment variable: put the key in a file (mode 0600), start keygate with \
     KEYGATE_MASTER_KEY_FILE naming it instead of KEYGATE_MASTER_KEY, then rotate again. \
     Nothing was changed";

const MEMORY_KEY_REFUSAL: &str = "this keygate's master key is not kept in a key file keygate \
     can replace, so it cannot be rotated. Nothing was changed";

/// A stored secret, still sealed.
struct SealedRow {
    id: String,
    name: String,
    version: i64,
    sealed: SealedSecret,
}

impl Store {
    /// Rotates the master key: re-wraps every data key and the token-hash key
    /// under a fresh master key and replaces the key file, without stopping
    /// the gateway (see the module docs for the order of steps).
    ///
    /// Refused with [`StoreError::Conflict`] (nothing changed) when the key
    /// comes from `KEYGATE_MASTER_KEY` or is held only in memory, or when a
    /// secret is sealed under a key this process does not hold.
    pub async fn rotate_master_key(&self) -> Result<KeyRotation, StoreError> {
        let vault = self.vault().clone();
        let file = match vault.source() {
            KeySource::File(file) => file.clone(),
            KeySource::Env => return Err(StoreError::Conflict(ENV_KEY_REFUSAL.into())),
            KeySource::Memory => return Err(StoreError::Conflict(MEMORY_KEY_REFUSAL.into())),
        };
        file.check_replaceable()?;

        let writer = self.lock_writer().await;
        // A `.next` left by an earlier failure is resolved first: writing a
        // new one must never replace a key the database may still use.
        settle_pending_key(self.pool(), self.backend(), &vault).await?;

        let previous_key_id = vault.key_id();
        let new_key = MasterKey::generate();
        let key_id = new_key.id();

        let mut tx = begin_write(self.pool(), self.backend()).await?;
        lock_key_tables(&mut tx, self.backend()).await?;
        let rows = sealed_rows(&mut tx).await?;
        let mut rewrapped = Vec::with_capacity(rows.len());
        for row in &rows {
            let sealed = vault
                .rewrap(&row.id, row.version, &row.sealed, &new_key)
                .map_err(|_| {
                    StoreError::Conflict(format!(
                        "secret {:?} is sealed under master key {}, which this keygate does not \
                         hold, so it cannot be re-wrapped. Nothing was changed: give it a new \
                         value (`keygate secret rotate`) or remove it, then rotate the master \
                         key again",
                        row.name, row.sealed.key_id
                    ))
                })?;
            rewrapped.push((row.id.as_str(), sealed));
        }
        let token_blob = match token_blob(&mut tx).await? {
            Some(wrapped) => Some(vault.rewrap_blob(TOKEN_KEY, &wrapped, &new_key).map_err(
                |_| {
                    StoreError::Corrupt(
                        "the token-hash key does not unwrap with this keygate's master key; \
                             nothing was changed"
                            .into(),
                    )
                },
            )?),
            None => None,
        };

        // 1. The new key is durable before anything is wrapped under it.
        file.write_next(&new_key)?;
        vault.add_key(new_key.clone());

        // 2. Everything under the new key, in one transaction.
        let written = write_wrapped(&mut tx, &rewrapped, token_blob.as_deref()).await;
        if let Err(e) = written {
            drop(tx); // rolled back: the database still uses the old key
            vault.forget_key(&key_id);
            if let Err(d) = file.discard_next() {
                tracing::warn!(error = %d, "cannot remove the unused new master key file");
            }
            return Err(e);
        }
        if let Err(e) = tx.commit().await {
            // The commit may or may not have happened: keep the new key file
            // (and the key in memory); the next start, or the next rotation,
            // looks at the database and finishes or undoes it.
            tracing::error!(
                error = %e,
                file = %file.next_path().display(),
                "master key rotation: the commit failed and may or may not have been applied; \
                 the new key file is kept and settled at the next start"
            );
            return Err(e.into());
        }

        // 3. The key file now holds the new key (4. follows either way: the
        // database already uses it).
        let promoted = file.promote_next();
        // 4.
        vault.install_current(new_key);
        drop(writer);
        if let Err(e) = self.refresh().await {
            tracing::warn!(error = %e, "snapshot refresh after the key rotation failed; the next poll retries");
        }
        if let Err(e) = promoted {
            tracing::error!(
                error = %e,
                file = %file.next_path().display(),
                "the database uses the new master key but the key file could not be replaced; \
                 the new key stays in the .next file (do not delete it) and is installed at the next start"
            );
            return Err(e.into());
        }
        let secrets = rows.len() as u64;
        tracing::info!(
            key_id = %key_id,
            previous_key_id = %previous_key_id,
            secrets,
            file = %file.path().display(),
            "master key rotated"
        );
        Ok(KeyRotation {
            key_id,
            previous_key_id,
            secrets,
        })
    }
}

/// Settles a `<key file>.next` left by an interrupted rotation (see the
/// module docs). Called by [`Store::open`] before the token-hash key is read,
/// and by a rotation before it writes its own `.next`. The caller holds this
/// process's writer slot, or nobody else can write yet.
pub(crate) async fn settle_pending_key(
    pool: &AnyPool,
    backend: Backend,
    vault: &Vault,
) -> Result<(), StoreError> {
    let KeySource::File(file) = vault.source() else {
        return Ok(());
    };
    let Some(pending) = file.read_next()? else {
        return Ok(());
    };
    let pending_id = pending.id();
    let next = file.next_path();
    if file.read()?.id() == pending_id {
        // The key file already holds it: the copy is redundant.
        file.discard_next()?;
        return Ok(());
    }
    vault.add_key(pending.clone());

    let mut tx = begin_write(pool, backend).await?;
    lock_key_tables(&mut tx, backend).await?;
    let rows = sealed_rows(&mut tx).await?;
    let blob = token_blob(&mut tx).await?;
    let blob_key_id = blob
        .as_deref()
        .and_then(|b| vault.blob_key_id(TOKEN_KEY, b));
    let committed = blob_key_id.as_deref() == Some(pending_id.as_str())
        || rows.iter().any(|r| r.sealed.key_id == pending_id);

    if !committed {
        // Crash between writing the key and committing: nothing uses it.
        drop(tx);
        vault.forget_key(&pending_id);
        file.discard_next()?;
        tracing::warn!(
            file = %next.display(),
            "removed a new master key left by a `keygate key rotate` that never committed; \
             the master key is unchanged"
        );
        return Ok(());
    }

    // Crash after the commit, before the rename: finish the rotation. Rows
    // still under another key (written by a process that had not been
    // restarted with the new key) are moved too.
    let mut moved = 0u64;
    for row in rows.iter().filter(|r| r.sealed.key_id != pending_id) {
        match vault.rewrap(&row.id, row.version, &row.sealed, &pending) {
            Ok(sealed) => {
                set_wrapped_key(&mut tx, &row.id, &sealed).await?;
                moved += 1;
            }
            Err(_) => tracing::warn!(
                secret = %row.name,
                key_id = %row.sealed.key_id,
                "secret is sealed under a master key keygate does not hold; left as it is \
                 (give it a new value with `keygate secret rotate`)"
            ),
        }
    }
    if let (Some(wrapped), Some(id)) = (&blob, &blob_key_id) {
        if *id != pending_id {
            let rewrapped = vault.rewrap_blob(TOKEN_KEY, wrapped, &pending)?;
            set_token_blob(&mut tx, &rewrapped).await?;
        }
    }
    tx.commit().await?;
    if let Err(e) = file.promote_next() {
        // Keep going with the key the database uses; the file stays and the
        // rename is tried again at the next start or rotation.
        tracing::error!(
            error = %e,
            file = %next.display(),
            "cannot replace the master key file with the pending key; keygate uses the pending \
             key and retries at the next start (do not delete that file)"
        );
    }
    vault.install_current(pending);
    tracing::warn!(
        key_id = %pending_id,
        re_wrapped = moved,
        "finished a master key rotation that was interrupted before its key file was replaced"
    );
    Ok(())
}

/// On PostgreSQL, keeps other processes sharing the database from writing
/// secrets or meta rows until the rotation commits (SQLite's
/// `BEGIN IMMEDIATE` already does).
async fn lock_key_tables(conn: &mut AnyConnection, backend: Backend) -> Result<(), StoreError> {
    if backend == Backend::Postgres {
        sqlx::query("LOCK TABLE secrets, meta IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

async fn sealed_rows(conn: &mut AnyConnection) -> Result<Vec<SealedRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, name, version, key_id, wrapped_key, ciphertext FROM secrets ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(SealedRow {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
                version: row.try_get("version")?,
                sealed: SealedSecret {
                    key_id: row.try_get("key_id")?,
                    wrapped_key: unb64(&row.try_get::<String, _>("wrapped_key")?)?,
                    ciphertext: unb64(&row.try_get::<String, _>("ciphertext")?)?,
                },
            })
        })
        .collect()
}

async fn token_blob(conn: &mut AnyConnection) -> Result<Option<Vec<u8>>, StoreError> {
    let row: Option<(String,)> = sqlx::query_as("SELECT value FROM meta WHERE key = $1")
        .bind(TOKEN_KEY)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|(value,)| unb64(&value)).transpose()
}

async fn write_wrapped(
    conn: &mut AnyConnection,
    secrets: &[(&str, SealedSecret)],
    token_blob: Option<&[u8]>,
) -> Result<(), StoreError> {
    for (id, sealed) in secrets {
        set_wrapped_key(conn, id, sealed).await?;
    }
    if let Some(blob) = token_blob {
        set_token_blob(conn, blob).await?;
    }
    Ok(())
}

/// Stores a re-wrapped data key; the ciphertext is unchanged by a re-wrap.
async fn set_wrapped_key(
    conn: &mut AnyConnection,
    id: &str,
    sealed: &SealedSecret,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE secrets SET key_id = $1, wrapped_key = $2 WHERE id = $3")
        .bind(&sealed.key_id)
        .bind(b64(&sealed.wrapped_key))
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn set_token_blob(conn: &mut AnyConnection, blob: &[u8]) -> Result<(), StoreError> {
    sqlx::query("UPDATE meta SET value = $1 WHERE key = $2")
        .bind(b64(blob))
        .bind(TOKEN_KEY)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
