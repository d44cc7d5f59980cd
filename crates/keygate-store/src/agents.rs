//! Agents and their grants. Tokens are shown once at creation; the store
//! keeps only their keyed hash.

use keygate_core::now_ms;
use sqlx::Row;

use crate::{new_id, validate_name, AgentInfo, Store, StoreError};

impl Store {
    /// Creates an agent with the given grants and returns its token (the only
    /// time it is ever available).
    pub async fn create_agent(
        &self,
        name: &str,
        grants: &[String],
    ) -> Result<(AgentInfo, String), StoreError> {
        validate_name("agent", name)?;
        let token = keygate_vault::generate_agent_token();
        let hash = hex::encode(self.token_hasher().hash(&token));
        let id = new_id("agt");
        let now = now_ms();
        let mut tx = self.write_tx().await?;
        let exists: Option<(String,)> = sqlx::query_as("SELECT id FROM agents WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(StoreError::Conflict(format!(
                "an agent named {name:?} already exists"
            )));
        }
        sqlx::query(
            "INSERT INTO agents (id, name, token_hash, created_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(&id)
        .bind(name)
        .bind(&hash)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        for secret in grants {
            let sid = secret_id(&mut tx, secret).await?;
            sqlx::query(
                "INSERT INTO grants (agent_id, secret_id, created_ms) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .bind(&id)
            .bind(&sid)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.refresh().await?;
        Ok((self.agent(name).await?, token))
    }

    /// Grants an agent a secret (idempotent).
    pub async fn grant(&self, agent: &str, secret: &str) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let aid = agent_id(&mut tx, agent).await?;
        let sid = secret_id(&mut tx, secret).await?;
        sqlx::query(
            "INSERT INTO grants (agent_id, secret_id, created_ms) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(&aid)
        .bind(&sid)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.refresh().await
    }

    /// Revokes a grant. Takes effect on the agent's next request.
    pub async fn revoke(&self, agent: &str, secret: &str) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let aid = agent_id(&mut tx, agent).await?;
        let sid = secret_id(&mut tx, secret).await?;
        let done = sqlx::query("DELETE FROM grants WHERE agent_id = $1 AND secret_id = $2")
            .bind(&aid)
            .bind(&sid)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!(
                "grant of secret {secret:?} to agent {agent:?}"
            )));
        }
        tx.commit().await?;
        self.refresh().await
    }

    /// Deletes an agent: its token stops working on the next request.
    pub async fn remove_agent(&self, name: &str) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let aid = agent_id(&mut tx, name).await?;
        sqlx::query("DELETE FROM grants WHERE agent_id = $1")
            .bind(&aid)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM agents WHERE id = $1")
            .bind(&aid)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.refresh().await
    }

    /// Replaces an agent's token; the old one stops working at once.
    pub async fn regenerate_token(&self, name: &str) -> Result<String, StoreError> {
        let token = keygate_vault::generate_agent_token();
        let hash = hex::encode(self.token_hasher().hash(&token));
        let done = sqlx::query("UPDATE agents SET token_hash = $1 WHERE name = $2")
            .bind(&hash)
            .bind(name)
            .execute(self.pool())
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("agent {name:?}")));
        }
        self.refresh().await?;
        Ok(token)
    }

    /// Disables or re-enables an agent. A disabled agent's token gets 407 on
    /// its next request, inside open tunnels too; grants are kept.
    pub async fn set_agent_disabled(&self, name: &str, disabled: bool) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE agents SET disabled = $1 WHERE name = $2")
            .bind(i64::from(disabled))
            .bind(name)
            .execute(self.pool())
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("agent {name:?}")));
        }
        self.refresh().await
    }

    pub async fn agent(&self, name: &str) -> Result<AgentInfo, StoreError> {
        self.list_agents()
            .await?
            .into_iter()
            .find(|a| a.name == name)
            .ok_or_else(|| StoreError::NotFound(format!("agent {name:?}")))
    }

    /// All agents, by name, without tokens.
    pub async fn list_agents(&self) -> Result<Vec<AgentInfo>, StoreError> {
        let rows = sqlx::query("SELECT id, name, created_ms, disabled FROM agents ORDER BY name")
            .fetch_all(self.pool())
            .await?;
        let grants: Vec<(String, String)> = sqlx::query_as(
            "SELECT g.agent_id, s.name FROM grants g JOIN secrets s ON s.id = g.secret_id ORDER BY s.name",
        )
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("id")?;
            out.push(AgentInfo {
                grants: grants
                    .iter()
                    .filter(|(aid, _)| *aid == id)
                    .map(|(_, s)| s.clone())
                    .collect(),
                name: row.try_get("name")?,
                created_ms: row.try_get("created_ms")?,
                disabled: row.try_get::<i64, _>("disabled")? != 0,
                id,
            });
        }
        Ok(out)
    }
}

async fn agent_id(conn: &mut sqlx::AnyConnection, name: &str) -> Result<String, StoreError> {
    let row: Option<(String,)> = sqlx::query_as("SELECT id FROM agents WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| r.0)
        .ok_or_else(|| StoreError::NotFound(format!("agent {name:?}")))
}

async fn secret_id(conn: &mut sqlx::AnyConnection, name: &str) -> Result<String, StoreError> {
    let row: Option<(String,)> = sqlx::query_as("SELECT id FROM secrets WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| r.0)
        .ok_or_else(|| StoreError::NotFound(format!("secret {name:?}")))
}
