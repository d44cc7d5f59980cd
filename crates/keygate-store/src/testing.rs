//! Test helper: a fresh PostgreSQL database per test run, for the suites
//! that run the store on PostgreSQL when `KEYGATE_TEST_POSTGRES_URL` names a
//! server (`.ci/run` sets it). Not used by keygate itself.

use sqlx::Connection;

/// A database created for one test (`CREATE DATABASE`), dropped by
/// [`TestPostgres::drop_now`].
pub struct TestPostgres {
    admin: sqlx::AnyConnection,
    name: String,
    /// URL of the fresh database.
    pub url: String,
}

impl TestPostgres {
    /// Creates `keygate_<tag>_<pid>_<ms>` on the server named by
    /// `KEYGATE_TEST_POSTGRES_URL`; `None` (with a note on stderr) when the
    /// variable is not set. Panics when the server cannot be used: a test
    /// asked for it explicitly.
    pub async fn create(tag: &str) -> Option<TestPostgres> {
        let Ok(base) = std::env::var("KEYGATE_TEST_POSTGRES_URL") else {
            eprintln!("KEYGATE_TEST_POSTGRES_URL not set: PostgreSQL variant not run here (.ci/run runs it)");
            return None;
        };
        sqlx::any::install_default_drivers();
        let name = format!(
            "keygate_{tag}_{}_{}",
            std::process::id(),
            keygate_core::now_ms()
        );
        let mut admin = sqlx::AnyConnection::connect(&base)
            .await
            .expect("connect to PostgreSQL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create database");
        let (prefix, _) = base.rsplit_once('/').expect("URL with a database");
        let url = format!("{prefix}/{name}");
        Some(TestPostgres { admin, name, url })
    }

    /// Drops the database (also when connections are still open).
    pub async fn drop_now(mut self) {
        sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .execute(&mut self.admin)
            .await
            .expect("drop database");
    }
}
