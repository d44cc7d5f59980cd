//! Master-key rotation at the store level: every data key and the token-hash
//! key move to the new key in one transaction, the key file is replaced, the
//! old key alone opens nothing, and a rotation interrupted by a crash (before
//! or after its commit) is settled when the store opens again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keygate_core::SealedSecret;
use keygate_store::testing::TestPostgres;
use keygate_store::{NewSecret, Store, StoreError};
use keygate_vault::{KeySource, MasterKey, Vault};
use sqlx::{Connection, Row};
use zeroize::Zeroizing;

const VALUES: [(&str, &str, &str); 3] = [
    ("openai", "api.openai.test", "sk-openai-0123456789abcdef"),
    ("anthropic", "api.anthropic.test", "sk-ant-0123456789abcdef"),
    ("github", "api.github.test", "ghp_0123456789abcdef0123"),
];

fn secret(name: &str, host: &str, value: &str) -> NewSecret {
    NewSecret {
        name: name.into(),
        host: host.into(),
        path: "*".into(),
        header: "Authorization".into(),
        format: "Bearer {secret}".into(),
        value: Zeroizing::new(value.as_bytes().to_vec()),
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    url: String,
}

/// A data dir and a SQLite database.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", tmp.path().join("kg.db").display());
    fixture_with(tmp, url)
}

fn fixture_with(tmp: tempfile::TempDir, url: String) -> Fixture {
    Fixture {
        data: tmp.path().join("data"),
        _tmp: tmp,
        url,
    }
}

impl Fixture {
    fn key_file(&self) -> PathBuf {
        self.data.join("master.key")
    }

    fn next_file(&self) -> PathBuf {
        self.data.join("master.key.next")
    }

    /// The key the data dir's key file holds now.
    fn file_key(&self) -> MasterKey {
        read_key(&self.key_file())
    }

    async fn open(&self) -> (Store, Arc<Vault>) {
        let vault = Arc::new(Vault::load(&self.data, None, None).unwrap());
        let store = Store::open(&self.url, vault.clone()).await.unwrap();
        (store, vault)
    }

    /// Secrets (three, one of them at version 2) and an agent granted all;
    /// returns the agent's token.
    async fn seed(&self, store: &Store) -> String {
        for (name, host, value) in VALUES {
            store.add_secret(secret(name, host, value)).await.unwrap();
        }
        // Version 2 under the same key: re-wrapping must keep the version AAD.
        store
            .rotate_secret("github", Zeroizing::new(VALUES[2].2.as_bytes().to_vec()))
            .await
            .unwrap();
        let names: Vec<String> = VALUES.iter().map(|v| v.0.to_string()).collect();
        let (_, token) = store.create_agent("bot", &names).await.unwrap();
        token.to_string()
    }

    async fn rows(&self) -> Vec<StoredRow> {
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&self.url).await.unwrap();
        let rows = sqlx::query(
            "SELECT id, name, version, key_id, wrapped_key, ciphertext FROM secrets ORDER BY name",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        rows.into_iter()
            .map(|r| StoredRow {
                id: r.try_get("id").unwrap(),
                name: r.try_get("name").unwrap(),
                version: r.try_get("version").unwrap(),
                key_id: r.try_get("key_id").unwrap(),
                wrapped_key: r.try_get("wrapped_key").unwrap(),
                ciphertext: r.try_get("ciphertext").unwrap(),
            })
            .collect()
    }

    async fn token_blob(&self) -> Vec<u8> {
        let mut conn = sqlx::AnyConnection::connect(&self.url).await.unwrap();
        let (v,): (String,) = sqlx::query_as("SELECT value FROM meta WHERE key = 'token_hash_key'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        unb64(&v)
    }

    /// What a rotation does to the database, done by hand with `from` (the
    /// state after its step 2, before the key file is replaced). Secrets in
    /// `skip` are left under the old key.
    async fn rewrap_database(&self, from: &MasterKey, to: &MasterKey, skip: &[&str]) {
        let old = Vault::new(from.clone());
        let mut conn = sqlx::AnyConnection::connect(&self.url).await.unwrap();
        for row in self.rows().await {
            if skip.contains(&row.name.as_str()) {
                continue;
            }
            let re = old.rewrap(&row.id, row.version, &row.sealed(), to).unwrap();
            sqlx::query("UPDATE secrets SET key_id = $1, wrapped_key = $2 WHERE id = $3")
                .bind(&re.key_id)
                .bind(b64(&re.wrapped_key))
                .bind(&row.id)
                .execute(&mut conn)
                .await
                .unwrap();
        }
        let blob = old
            .rewrap_blob("token_hash_key", &self.token_blob().await, to)
            .unwrap();
        sqlx::query("UPDATE meta SET value = $1 WHERE key = 'token_hash_key'")
            .bind(b64(&blob))
            .execute(&mut conn)
            .await
            .unwrap();
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct StoredRow {
    id: String,
    name: String,
    version: i64,
    key_id: String,
    wrapped_key: String,
    ciphertext: String,
}

impl StoredRow {
    fn sealed(&self) -> SealedSecret {
        SealedSecret {
            key_id: self.key_id.clone(),
            wrapped_key: unb64(&self.wrapped_key),
            ciphertext: unb64(&self.ciphertext),
        }
    }

    fn open_with(&self, vault: &Vault) -> Result<Zeroizing<Vec<u8>>, keygate_vault::VaultError> {
        vault.open(&self.id, self.version, &self.sealed())
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn read_key(path: &Path) -> MasterKey {
    let text = std::fs::read_to_string(path).unwrap();
    MasterKey::from_base64(&text).unwrap()
}

fn write_key(path: &Path, key: &MasterKey) {
    let mut text = key.to_base64().to_string();
    text.push('\n');
    keygate_vault::write_private_file(path, text.as_bytes()).unwrap();
}

fn value_of(name: &str) -> &'static str {
    VALUES.iter().find(|v| v.0 == name).unwrap().2
}

/// Every secret opens with `vault` to its value.
fn assert_all_open(rows: &[StoredRow], vault: &Vault, what: &str) {
    assert_eq!(rows.len(), VALUES.len(), "{what}");
    for row in rows {
        let plain = row
            .open_with(vault)
            .unwrap_or_else(|e| panic!("{what}: {} does not open: {e}", row.name));
        assert_eq!(&plain[..], value_of(&row.name).as_bytes(), "{what}");
    }
}

fn agent_known(store: &Store, token: &str) -> bool {
    let hash = store.token_hasher().hash(token);
    store.snapshot().load().agent(&hash).is_some()
}

#[tokio::test]
async fn rotation_rewraps_everything_and_replaces_the_key_file() {
    rotation_scenario(&fixture()).await;
}

#[tokio::test]
async fn a_crash_after_the_commit_is_finished_at_the_next_start() {
    crash_after_commit_scenario(&fixture()).await;
}

#[tokio::test]
async fn postgres_rotation() {
    let Some(db) = TestPostgres::create("rot_a").await else {
        return;
    };
    rotation_scenario(&fixture_with(tempfile::tempdir().unwrap(), db.url.clone())).await;
    db.drop_now().await;
    let Some(db) = TestPostgres::create("rot_b").await else {
        return;
    };
    crash_after_commit_scenario(&fixture_with(tempfile::tempdir().unwrap(), db.url.clone())).await;
    db.drop_now().await;
}

async fn rotation_scenario(f: &Fixture) {
    use std::os::unix::fs::PermissionsExt;
    let (store, vault) = f.open().await;
    let token = f.seed(&store).await;
    let old_key = f.file_key();
    assert_eq!(vault.key_id(), old_key.id());
    let before = f.rows().await;
    assert!(before.iter().all(|r| r.key_id == old_key.id()));
    let snapshot_before = store.snapshot().load_full();

    let r = store.rotate_master_key().await.unwrap();
    assert_eq!(r.previous_key_id, old_key.id());
    assert_ne!(r.key_id, r.previous_key_id);
    assert_eq!(r.secrets, 3);

    // The key file holds the new key (0600); no `.next` is left.
    let new_key = f.file_key();
    assert_eq!(new_key.id(), r.key_id);
    assert_eq!(vault.key_id(), r.key_id);
    assert!(!f.next_file().exists());
    assert_eq!(
        std::fs::metadata(f.key_file())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // Every data key is under the new key; ciphertexts are untouched.
    let after = f.rows().await;
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a.key_id, r.key_id, "{}", a.name);
        assert_eq!(a.ciphertext, b.ciphertext, "{}", a.name);
        assert_eq!(a.version, b.version, "{}", a.name);
        assert_ne!(a.wrapped_key, b.wrapped_key, "{}", a.name);
    }
    // The old key alone opens nothing any more; the new key alone opens all.
    let old_only = Vault::new(old_key.clone());
    for row in &after {
        assert!(
            row.open_with(&old_only).is_err(),
            "{} opens with the old key",
            row.name
        );
        // Not even with the key id relabelled.
        let mut forged = row.sealed();
        forged.key_id = old_key.id();
        assert!(old_only.open(&row.id, row.version, &forged).is_err());
    }
    assert_all_open(&after, &Vault::new(new_key.clone()), "new key");
    let blob = f.token_blob().await;
    assert!(old_only.unwrap_blob("token_hash_key", &blob).is_err());
    assert!(Vault::new(new_key.clone())
        .unwrap_blob("token_hash_key", &blob)
        .is_ok());

    // Requests holding the snapshot from before the rotation still decrypt;
    // the new snapshot is under the new key.
    let hash = store.token_hasher().hash(&token);
    let old_entry = snapshot_before.agent(&hash).unwrap().clone();
    for s in &old_entry.grants {
        assert_eq!(s.sealed.key_id, old_key.id());
        assert_eq!(
            &vault.open(&s.id, s.version, &s.sealed).unwrap()[..],
            value_of(&s.name).as_bytes()
        );
    }
    let snap = store.snapshot().load_full();
    let entry = snap.agent(&hash).expect("the token still authenticates");
    for s in &entry.grants {
        assert_eq!(s.sealed.key_id, r.key_id);
        assert_eq!(
            &vault.open(&s.id, s.version, &s.sealed).unwrap()[..],
            value_of(&s.name).as_bytes()
        );
    }
    // New secrets are sealed under the new key.
    store
        .add_secret(secret("later", "later.test", "later-0123456789"))
        .await
        .unwrap();
    let later = f
        .rows()
        .await
        .into_iter()
        .find(|r| r.name == "later")
        .unwrap();
    assert_eq!(later.key_id, r.key_id);
    store.remove_secret("later").await.unwrap();
    store.close().await;

    // A restart with the key file alone: tokens and secrets still work.
    let (store, vault) = f.open().await;
    assert_eq!(vault.key_ids(), vec![r.key_id.clone()]);
    assert!(agent_known(&store, &token));
    assert_all_open(&f.rows().await, &vault, "after restart");
    store.close().await;

    // The old key alone cannot even open the database any more.
    let err = Store::open(&f.url, Arc::new(Vault::new(old_key)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("token-hash key"), "{err}");

    // Rotating again moves on to a third key.
    let (store, _) = f.open().await;
    let r2 = store.rotate_master_key().await.unwrap();
    assert_eq!(r2.previous_key_id, r.key_id);
    assert_eq!(f.file_key().id(), r2.key_id);
    assert!(f.rows().await.iter().all(|row| row.key_id == r2.key_id));
    assert!(agent_known(&store, &token));
}

#[tokio::test]
async fn a_key_from_the_environment_is_refused_and_nothing_changes() {
    let f = fixture();
    let key = MasterKey::generate();
    let vault = Arc::new(Vault::load(&f.data, Some(&key.to_base64()), None).unwrap());
    assert_eq!(vault.source(), &KeySource::Env);
    let store = Store::open(&f.url, vault.clone()).await.unwrap();
    let token = f.seed(&store).await;
    let before = f.rows().await;
    let blob_before = f.token_blob().await;

    let err = store.rotate_master_key().await.unwrap_err();
    let StoreError::Conflict(msg) = &err else {
        panic!("expected a conflict, got {err:?}");
    };
    assert!(msg.contains("KEYGATE_MASTER_KEY_FILE"), "{msg}");
    assert!(msg.contains("Nothing was changed"), "{msg}");
    assert!(!msg.contains(key.to_base64().as_str()));

    assert_eq!(f.rows().await, before);
    assert_eq!(f.token_blob().await, blob_before);
    assert_eq!(vault.key_ids(), vec![key.id()]);
    assert!(!f.data.exists(), "no key file may appear in the data dir");
    assert!(agent_known(&store, &token));

    // A key held only in memory cannot be rotated either.
    let f2 = fixture();
    let store = Store::open(&f2.url, Arc::new(Vault::new(MasterKey::generate())))
        .await
        .unwrap();
    assert!(matches!(
        store.rotate_master_key().await,
        Err(StoreError::Conflict(_))
    ));
}

#[tokio::test]
async fn a_key_file_named_by_the_environment_is_rotated_in_place() {
    let f = fixture();
    let keys = f._tmp.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let path = keys.join("keygate.key");
    let old_key = MasterKey::generate();
    write_key(&path, &old_key);
    let vault = Arc::new(Vault::load(&f.data, None, Some(&path)).unwrap());
    let store = Store::open(&f.url, vault.clone()).await.unwrap();
    let token = f.seed(&store).await;

    let r = store.rotate_master_key().await.unwrap();
    assert_eq!(r.previous_key_id, old_key.id());
    let new_key = read_key(&path);
    assert_eq!(new_key.id(), r.key_id);
    assert!(!keys.join("keygate.key.next").exists());
    assert!(!f.key_file().exists(), "the data dir key file is not used");
    assert_all_open(&f.rows().await, &Vault::new(new_key), "new key");
    store.close().await;

    let vault = Arc::new(Vault::load(&f.data, None, Some(&path)).unwrap());
    let store = Store::open(&f.url, vault).await.unwrap();
    assert!(agent_known(&store, &token));
}

async fn crash_after_commit_scenario(f: &Fixture) {
    let (store, _) = f.open().await;
    let token = f.seed(&store).await;
    store.close().await;
    let old_key = f.file_key();

    // Steps 1 and 2 of a rotation, then the "crash": the new key is only in
    // `.next`, the database is entirely under it, the key file still holds
    // the old key. One secret is left under the old key, as if a process
    // still on the old key had written it after the commit.
    let new_key = MasterKey::generate();
    write_key(&f.next_file(), &new_key);
    f.rewrap_database(&old_key, &new_key, &["anthropic"]).await;
    assert!(f.rows().await.iter().any(|r| r.key_id == old_key.id()));
    // The key file alone cannot open the database any more.
    assert!(Store::open(&f.url, Arc::new(Vault::new(old_key.clone())))
        .await
        .is_err());

    let (store, vault) = f.open().await;
    assert_eq!(vault.key_id(), new_key.id());
    assert_eq!(f.file_key().id(), new_key.id(), "the rename was finished");
    assert!(!f.next_file().exists());
    let rows = f.rows().await;
    assert!(rows.iter().all(|r| r.key_id == new_key.id()), "{rows:?}");
    assert_all_open(&rows, &Vault::new(new_key.clone()), "new key alone");
    assert!(rows
        .iter()
        .all(|r| r.open_with(&Vault::new(old_key.clone())).is_err()));
    assert!(agent_known(&store, &token));
    store.close().await;

    // And a plain restart afterwards needs nothing else.
    let (store, vault) = f.open().await;
    assert_eq!(vault.key_ids(), vec![new_key.id()]);
    assert!(agent_known(&store, &token));
}

#[tokio::test]
async fn a_crash_before_the_commit_leaves_the_old_key_in_place() {
    let f = fixture();
    let (store, _) = f.open().await;
    let token = f.seed(&store).await;
    store.close().await;
    let old_key = f.file_key();
    let before = f.rows().await;

    // Step 1 only: a new key in `.next`, nothing in the database uses it.
    let stray = MasterKey::generate();
    write_key(&f.next_file(), &stray);

    let (store, vault) = f.open().await;
    assert!(!f.next_file().exists(), "the unused key file is removed");
    assert_eq!(f.file_key().id(), old_key.id());
    assert_eq!(vault.key_ids(), vec![old_key.id()]);
    assert_eq!(f.rows().await, before);
    assert!(agent_known(&store, &token));
    assert_all_open(&before, &vault, "old key");

    // A stray `.next` appearing later is settled the same way by a rotation,
    // which then goes ahead with a fresh key.
    write_key(&f.next_file(), &stray);
    let r = store.rotate_master_key().await.unwrap();
    assert_eq!(r.previous_key_id, old_key.id());
    assert_ne!(r.key_id, stray.id());
    assert_eq!(f.file_key().id(), r.key_id);
    assert!(!f.next_file().exists());
    assert_all_open(&f.rows().await, &Vault::new(f.file_key()), "rotated");
}

#[tokio::test]
async fn a_secret_under_an_unknown_key_stops_the_rotation_before_anything_changes() {
    let f = fixture();
    let (store, vault) = f.open().await;
    f.seed(&store).await;
    let old_key = f.file_key();
    // Seal one row under a key this keygate does not hold.
    let foreign = Vault::new(MasterKey::generate());
    let row = f
        .rows()
        .await
        .into_iter()
        .find(|r| r.name == "openai")
        .unwrap();
    let sealed = foreign
        .seal(&row.id, row.version, value_of("openai").as_bytes())
        .unwrap();
    let mut conn = sqlx::AnyConnection::connect(&f.url).await.unwrap();
    sqlx::query("UPDATE secrets SET key_id = $1, wrapped_key = $2, ciphertext = $3 WHERE id = $4")
        .bind(&sealed.key_id)
        .bind(b64(&sealed.wrapped_key))
        .bind(b64(&sealed.ciphertext))
        .bind(&row.id)
        .execute(&mut conn)
        .await
        .unwrap();
    let before = f.rows().await;
    let blob_before = f.token_blob().await;

    let err = store.rotate_master_key().await.unwrap_err();
    let StoreError::Conflict(msg) = &err else {
        panic!("expected a conflict, got {err:?}");
    };
    assert!(msg.contains("\"openai\""), "{msg}");
    assert!(msg.contains(&sealed.key_id), "{msg}");
    assert_eq!(f.rows().await, before);
    assert_eq!(f.token_blob().await, blob_before);
    assert_eq!(f.file_key().id(), old_key.id());
    assert!(!f.next_file().exists());
    assert_eq!(vault.key_ids(), vec![old_key.id()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_racing_a_rotation_end_up_under_the_new_key() {
    let f = fixture();
    let (store, vault) = f.open().await;
    f.seed(&store).await;
    for round in 0..3 {
        let rotation = tokio::spawn({
            let store = store.clone();
            async move { store.rotate_master_key().await }
        });
        let mut writers = Vec::new();
        for i in 0..4 {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                let name = format!("race-{round}-{i}");
                store
                    .add_secret(secret(
                        &name,
                        &format!("{name}.test"),
                        "race-value-0123456789",
                    ))
                    .await
                    .unwrap();
                store
                    .rotate_secret(
                        "github",
                        Zeroizing::new(value_of("github").as_bytes().to_vec()),
                    )
                    .await
                    .unwrap();
            }));
        }
        rotation.await.unwrap().unwrap();
        for w in writers {
            w.await.unwrap();
        }
        let current = f.file_key();
        assert_eq!(vault.key_id(), current.id());
        let rows = f.rows().await;
        let by_key: HashMap<&str, usize> = rows.iter().fold(HashMap::new(), |mut m, r| {
            *m.entry(r.key_id.as_str()).or_default() += 1;
            m
        });
        assert_eq!(by_key.len(), 1, "round {round}: mixed keys {by_key:?}");
        let only = Vault::new(current);
        for row in &rows {
            assert!(row.open_with(&only).is_ok(), "round {round}: {}", row.name);
        }
    }
}
