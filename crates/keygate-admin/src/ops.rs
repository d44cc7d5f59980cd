//! Operations shared by the REST API and the dashboard's forms, so that a
//! change made in the browser takes the same path as one made with the CLI.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::http::StatusCode;
use keygate_store::{NewSecret, SecretInfo, Store};
use zeroize::Zeroizing;

use crate::ApiError;

/// Shortest admin password accepted.
pub const MIN_PASSWORD_LEN: usize = 12;

/// Everything about a secret except its value; `None` takes the default.
#[derive(Debug, Default, Clone)]
pub struct SecretSpec {
    pub name: String,
    pub host: String,
    pub path: Option<String>,
    pub header: Option<String>,
    pub format: Option<String>,
}

fn or_default(v: Option<String>, default: &str) -> String {
    match v {
        Some(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => default.to_string(),
    }
}

pub async fn add_secret(
    store: &Store,
    spec: SecretSpec,
    value: Zeroizing<Vec<u8>>,
) -> Result<SecretInfo, ApiError> {
    Ok(store
        .add_secret(NewSecret {
            name: spec.name.trim().to_string(),
            host: spec.host.trim().to_string(),
            path: or_default(spec.path, "*"),
            header: or_default(spec.header, "Authorization"),
            format: match spec.format {
                Some(f) if !f.is_empty() => f,
                _ => "Bearer {secret}".into(),
            },
            value,
        })
        .await?)
}

pub fn check_decision(decision: Option<&str>) -> Result<(), ApiError> {
    match decision {
        Some(d) if keygate_core::Decision::parse(d).is_none() => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "decision must be injected, passthrough, denied or error",
        )),
        _ => Ok(()),
    }
}

/// Hashes `password` with argon2id and stores it.
pub async fn set_admin_password(
    store: &Store,
    password: Zeroizing<String>,
) -> Result<(), ApiError> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("the admin password must have at least {MIN_PASSWORD_LEN} characters"),
        ));
    }
    let phc = tokio::task::spawn_blocking(move || {
        let salt_bytes: [u8; 16] = rand::random();
        let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| e.to_string())?;
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| ApiError::internal("password hashing task failed"))?
    .map_err(|e| ApiError::internal(format!("cannot hash the password: {e}")))?;
    store.set_admin_password_hash(&phc).await?;
    Ok(())
}

/// At most this many argon2 verifications run at once (each takes ~19 MiB
/// and tens of milliseconds), so a flood of sign-in attempts queues instead
/// of exhausting memory.
static VERIFICATIONS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Checks `password` against the stored hash (false when none is set).
pub async fn verify_admin_password(store: &Store, password: Zeroizing<String>) -> bool {
    let Ok(Some(phc)) = store.admin_password_hash().await else {
        return false;
    };
    let Ok(_permit) = VERIFICATIONS.acquire().await else {
        return false;
    };
    tokio::task::spawn_blocking(move || match PasswordHash::new(&phc) {
        Ok(hash) => Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    })
    .await
    .unwrap_or(false)
}
