//! Secrets: create, rotate, delete, list. Values are sealed by the vault
//! before they reach the database and are never read back out of it except
//! by the snapshot (still sealed).

use keygate_core::select::{would_tie, Rule};
use keygate_core::{now_ms, HostPattern, PathPattern, Template};
use sqlx::Row;
use zeroize::Zeroizing;

use crate::{b64, new_id, validate_name, NewSecret, SecretInfo, Store, StoreError};

/// Headers keygate will not inject into: they steer the connection itself.
const FORBIDDEN_HEADERS: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "proxy-connection",
];

/// Checks a header name (an RFC 9110 token) and returns its lower-case form.
pub fn validate_header(name: &str) -> Result<String, StoreError> {
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || name.len() > 128 || !name.bytes().all(is_tchar) {
        return Err(StoreError::Invalid(format!(
            "header {name:?} is not a valid HTTP header name"
        )));
    }
    let lower = name.to_ascii_lowercase();
    if FORBIDDEN_HEADERS.contains(&lower.as_str()) || lower.starts_with(':') {
        return Err(StoreError::Invalid(format!(
            "header {name:?} cannot carry a credential"
        )));
    }
    Ok(lower)
}

struct RuleSpec {
    host: HostPattern,
    path: PathPattern,
    header: String,
}

impl Rule for RuleSpec {
    fn host(&self) -> &HostPattern {
        &self.host
    }
    fn path(&self) -> &PathPattern {
        &self.path
    }
    fn header(&self) -> &str {
        &self.header
    }
}

fn invalid(field: &str) -> impl Fn(keygate_core::PatternError) -> StoreError + '_ {
    move |e| StoreError::Invalid(format!("{field}: {}", e.message()))
}

impl Store {
    /// Creates a secret after validating its patterns and refusing one that
    /// would tie with an existing secret for the same request and header.
    pub async fn add_secret(&self, new: NewSecret) -> Result<SecretInfo, StoreError> {
        validate_name("secret", &new.name)?;
        let host = HostPattern::parse(&new.host).map_err(invalid("host"))?;
        let path = PathPattern::parse(&new.path).map_err(invalid("path"))?;
        let format = Template::parse(&new.format).map_err(invalid("format"))?;
        let header = validate_header(&new.header)?;
        if new.value.is_empty() {
            return Err(StoreError::Invalid("secret value is empty".into()));
        }
        if new
            .value
            .iter()
            .any(|&b| b == b'\r' || b == b'\n' || b == 0)
        {
            return Err(StoreError::Invalid(
                "secret value contains a line break or NUL (a trailing newline is stripped)".into(),
            ));
        }
        let spec = RuleSpec { host, path, header };

        let mut tx = self.write_tx().await?;
        let rows = sqlx::query("SELECT name, host_pattern, path_pattern, header FROM secrets")
            .fetch_all(&mut *tx)
            .await?;
        for row in rows {
            let name: String = row.try_get("name")?;
            if name == new.name {
                return Err(StoreError::Conflict(format!(
                    "a secret named {name:?} already exists"
                )));
            }
            let other = RuleSpec {
                host: HostPattern::parse(&row.try_get::<String, _>("host_pattern")?)
                    .map_err(|e| StoreError::Corrupt(e.message().to_string()))?,
                path: PathPattern::parse(&row.try_get::<String, _>("path_pattern")?)
                    .map_err(|e| StoreError::Corrupt(e.message().to_string()))?,
                header: row.try_get("header")?,
            };
            if would_tie(&spec, &other) {
                return Err(StoreError::Conflict(format!(
                    "secret {name:?} already injects header {:?} for host {} and path {}: the two would tie",
                    spec.header, spec.host, spec.path
                )));
            }
        }
        let id = new_id("sec");
        let version = 1;
        let sealed = self.vault().seal(&id, version, &new.value)?;
        let hint = keygate_vault::suffix_hint(&new.value);
        let now = now_ms();
        sqlx::query(
            "INSERT INTO secrets (id, name, host_pattern, path_pattern, header, format, version, key_id, wrapped_key, ciphertext, hint, created_ms, rotated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, NULL)",
        )
        .bind(&id)
        .bind(&new.name)
        .bind(spec.host.to_string())
        .bind(spec.path.to_string())
        .bind(&spec.header)
        .bind(format.to_string())
        .bind(version)
        .bind(&sealed.key_id)
        .bind(b64(&sealed.wrapped_key))
        .bind(b64(&sealed.ciphertext))
        .bind(&hint)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.refresh().await?;
        self.secret(&new.name).await
    }

    /// Replaces a secret's value with a new version; the next request uses it.
    pub async fn rotate_secret(
        &self,
        name: &str,
        value: Zeroizing<Vec<u8>>,
    ) -> Result<SecretInfo, StoreError> {
        if value.is_empty() {
            return Err(StoreError::Invalid("secret value is empty".into()));
        }
        if value.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(StoreError::Invalid(
                "secret value contains a line break or NUL".into(),
            ));
        }
        let mut tx = self.write_tx().await?;
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT id, version FROM secrets WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((id, version)) = row else {
            return Err(StoreError::NotFound(format!("secret {name:?}")));
        };
        let version = version + 1;
        let sealed = self.vault().seal(&id, version, &value)?;
        sqlx::query(
            "UPDATE secrets SET version = $1, key_id = $2, wrapped_key = $3, ciphertext = $4, hint = $5, rotated_ms = $6 WHERE id = $7",
        )
        .bind(version)
        .bind(&sealed.key_id)
        .bind(b64(&sealed.wrapped_key))
        .bind(b64(&sealed.ciphertext))
        .bind(keygate_vault::suffix_hint(&value))
        .bind(now_ms())
        .bind(&id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.refresh().await?;
        self.secret(name).await
    }

    /// Deletes a secret and every grant of it.
    pub async fn remove_secret(&self, name: &str) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let row: Option<(String,)> = sqlx::query_as("SELECT id FROM secrets WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some((id,)) = row else {
            return Err(StoreError::NotFound(format!("secret {name:?}")));
        };
        sqlx::query("DELETE FROM grants WHERE secret_id = $1")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM secrets WHERE id = $1")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.refresh().await
    }

    /// One secret's listing entry.
    pub async fn secret(&self, name: &str) -> Result<SecretInfo, StoreError> {
        self.list_secrets()
            .await?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| StoreError::NotFound(format!("secret {name:?}")))
    }

    /// All secrets, by name, without values.
    pub async fn list_secrets(&self) -> Result<Vec<SecretInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, host_pattern, path_pattern, header, format, version, hint, created_ms, rotated_ms FROM secrets ORDER BY name",
        )
        .fetch_all(self.pool())
        .await?;
        let grants: Vec<(String, String)> = sqlx::query_as(
            "SELECT g.secret_id, a.name FROM grants g JOIN agents a ON a.id = g.agent_id ORDER BY a.name",
        )
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("id")?;
            let agents = grants
                .iter()
                .filter(|(sid, _)| *sid == id)
                .map(|(_, a)| a.clone())
                .collect();
            out.push(SecretInfo {
                name: row.try_get("name")?,
                host: row.try_get("host_pattern")?,
                path: row.try_get("path_pattern")?,
                header: row.try_get("header")?,
                format: row.try_get("format")?,
                version: row.try_get("version")?,
                hint: row.try_get("hint")?,
                created_ms: row.try_get("created_ms")?,
                rotated_ms: row.try_get("rotated_ms")?,
                agents,
                id,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::validate_header;

    #[test]
    fn header_names_are_checked() {
        assert_eq!(validate_header("Authorization").unwrap(), "authorization");
        assert_eq!(validate_header("x-api-key").unwrap(), "x-api-key");
        assert!(validate_header("Host").is_err());
        assert!(validate_header("Proxy-Authorization").is_err());
        assert!(validate_header("bad header").is_err());
        assert!(validate_header("x\r\ny").is_err());
        assert!(validate_header("").is_err());
    }
}
