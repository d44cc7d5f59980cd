//! End-to-end: `keygate key rotate` against the real binary. Traffic keeps
//! getting the real credential before, right after (in the same tunnel) and
//! after a restart with only the new key file; agent tokens keep working; the
//! old key opens nothing; a key from KEYGATE_MASTER_KEY is refused; an
//! interrupted rotation is settled at start-up; key material never shows up
//! in logs or CLI output.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use keygate_store::Store;
use keygate_vault::{MasterKey, Vault};

fn bin() -> &'static Path {
    Path::new(BIN)
}

fn args_for(up: &Upstream) -> Vec<String> {
    vec![
        "--upstream-ca".to_string(),
        up.ca_file.display().to_string(),
        "--allow-net".into(),
        "127.0.0.0/8".into(),
        "--resolve".into(),
        format!("api.test:443={}", up.tls_addr),
    ]
}

/// Adds the secret `openai` for api.test and an agent granted it; returns
/// the agent's token.
fn seed(kg: &Keygate) -> String {
    kg.cli_ok(
        &["secret", "add", "openai", "--host", "api.test"],
        Some(format!("{SECRET}\n").as_bytes()),
    );
    kg.cli_ok(&["agent", "create", "bot", "--grant", "openai"], None)
        .trim()
        .to_string()
}

fn read_key(path: &Path) -> MasterKey {
    MasterKey::from_base64(&std::fs::read_to_string(path).expect("key file")).expect("key")
}

/// Renderings of a key that must never appear in output: its base64 (and a
/// prefix of it) and the hex of its bytes.
fn renderings(key: &MasterKey) -> Vec<String> {
    use base64::Engine;
    let b64 = key.to_base64().to_string();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&b64)
        .expect("base64");
    vec![
        b64.clone(),
        b64.trim_end_matches('=').to_string(),
        b64[..16].to_string(),
        hex::encode(&raw),
        hex::encode(&raw[..12]),
    ]
}

fn assert_no_key_material(text: &str, keys: &[&MasterKey], what: &str) {
    for key in keys {
        for r in renderings(key) {
            assert!(
                !text.contains(&r),
                "{what} contains key material of key {}",
                key.id()
            );
        }
    }
}

/// One request through a fresh connection; asserts the real key was injected.
async fn assert_injects(kg: &Keygate, up: &Upstream, token: &str, what: &str) {
    up.clear();
    let c = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(format!("http://agent:{token}@{}", kg.proxy)).expect("proxy"))
        .tls_certs_only([reqwest::Certificate::from_pem(kg.ca_pem().as_bytes()).expect("ca")])
        .build()
        .expect("client");
    let resp = c
        .get("https://api.test/v1/models")
        .header("Authorization", "Bearer placeholder")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: request failed: {e}"));
    assert_eq!(
        resp.status(),
        200,
        "{what}: {}",
        resp.text().await.unwrap_or_default()
    );
    let seen = up
        .last()
        .unwrap_or_else(|| panic!("{what}: upstream saw nothing"));
    assert_eq!(
        seen.header_all("authorization"),
        vec![format!("Bearer {SECRET}")],
        "{what}"
    );
}

/// One request inside an already open tunnel; asserts the injection.
async fn assert_tunnel_injects(t: &mut Tunnel, up: &Upstream, what: &str) {
    up.clear();
    let a = t
        .get(
            "/v1/models",
            &[
                ("host", "api.test"),
                ("authorization", "Bearer placeholder"),
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(a.status, 200, "{what}: {}", a.body);
    let seen = up
        .last()
        .unwrap_or_else(|| panic!("{what}: upstream saw nothing"));
    assert_eq!(
        seen.header_all("authorization"),
        vec![format!("Bearer {SECRET}")],
        "{what}"
    );
}

/// Runs `keygate key rotate --json`; returns (key_id, previous_key_id, all output).
fn rotate_json(kg: &Keygate) -> (String, String, String) {
    let out = kg.cli(&["key", "rotate", "--json"], None);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "key rotate failed: {stderr}\n{stdout}"
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let id = v["key_id"].as_str().expect("key_id").to_string();
    let prev = v["previous_key_id"]
        .as_str()
        .expect("previous_key_id")
        .to_string();
    assert_eq!(v["secrets"], 1, "{v}");
    assert_eq!(
        v.as_object().map(|o| o.len()),
        Some(3),
        "only ids and a count: {v}"
    );
    for k in [&id, &prev] {
        assert_eq!(k.len(), 16, "{v}");
        assert!(k.bytes().all(|b| b.is_ascii_hexdigit()), "{v}");
    }
    (id, prev, format!("{stdout}{stderr}"))
}

/// Opens the database beside a (running) keygate with `key` alone.
async fn open_store(data: &Path, key: &MasterKey) -> Result<Store, keygate_store::StoreError> {
    let url = format!("sqlite://{}", data.join("keygate.db").display());
    Store::open(&url, Arc::new(Vault::new(key.clone()))).await
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_keeps_traffic_flowing_and_survives_a_restart() {
    let up = Upstream::start(&["api.test"]).await;
    let keep = tempfile::tempdir().unwrap();
    let data = keep.path().join("data");
    let args = args_for(&up);
    let kg = Keygate::start_with_data_dir(bin(), &data, &args);
    let token = seed(&kg);
    let key_file = data.join("master.key");
    let old_key = read_key(&key_file);

    let mut tunnel = Tunnel::open(kg.proxy, "api.test:443", &token, "api.test", &kg.ca_pem())
        .await
        .expect("tunnel");
    assert_tunnel_injects(&mut tunnel, &up, "before the rotation").await;

    let (key_id, previous, out1) = rotate_json(&kg);
    assert_eq!(previous, old_key.id());
    assert_ne!(key_id, previous);
    let new_key = read_key(&key_file);
    assert_eq!(new_key.id(), key_id, "the key file holds the new key");
    assert!(!data.join("master.key.next").exists());

    // Right after, in the tunnel opened before the rotation, and on a new
    // connection (the token still authenticates: its hash key was re-wrapped).
    assert_tunnel_injects(&mut tunnel, &up, "same tunnel, after the rotation").await;
    assert_injects(&kg, &up, &token, "new connection, after the rotation").await;

    // Every secret in the database is under the new key; the old key alone
    // opens none of them and cannot even open the database.
    let store = open_store(&data, &new_key)
        .await
        .expect("new key opens the store");
    let snap = store.snapshot().load_full();
    let hash = store.token_hasher().hash(&token);
    let agent = snap.agent(&hash).expect("token known under the new key");
    assert_eq!(agent.grants.len(), 1);
    let old_only = Vault::new(old_key.clone());
    let new_only = Vault::new(new_key.clone());
    for s in &agent.grants {
        assert_eq!(s.sealed.key_id, key_id, "{}", s.name);
        assert!(old_only.open(&s.id, s.version, &s.sealed).is_err());
        assert_eq!(
            &new_only.open(&s.id, s.version, &s.sealed).unwrap()[..],
            SECRET.as_bytes()
        );
    }
    store.close().await;
    let err = open_store(&data, &old_key).await.unwrap_err();
    assert!(err.to_string().contains("token-hash key"), "{err}");

    // The human form: one line with both ids.
    let out2 = kg.cli_ok(&["key", "rotate"], None);
    let third = read_key(&key_file);
    assert_eq!(
        out2.trim(),
        format!(
            "master key rotated: {key_id} -> {} (1 secret re-wrapped)",
            third.id()
        )
    );
    assert_tunnel_injects(&mut tunnel, &up, "same tunnel, second rotation").await;

    let logs = kg.logs();
    assert!(logs.contains("master key rotated"), "{logs}");
    for (text, what) in [
        (&logs, "server log"),
        (&out1, "--json output"),
        (&out2, "output"),
    ] {
        assert_no_key_material(text, &[&old_key, &new_key, &third], what);
    }
    drop(tunnel);
    let status = kg.stop();
    assert!(status.success(), "{status}");

    // A restart with only the new key file on disk.
    let names: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("master"))
        .collect();
    assert_eq!(names, vec!["master.key".to_string()]);
    let kg2 = Keygate::start_with_data_dir(bin(), &data, &args);
    assert_injects(&kg2, &up, &token, "after a restart").await;
    assert_no_key_material(
        &kg2.logs(),
        &[&old_key, &new_key, &third],
        "log after restart",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_from_the_environment_is_refused_and_nothing_changes() {
    let up = Upstream::start(&["api.test"]).await;
    let key = MasterKey::generate();
    let b64 = key.to_base64().to_string();
    let kg = Keygate::start_with_env(bin(), &args_for(&up), &[("KEYGATE_MASTER_KEY", &b64)]);
    let token = seed(&kg);

    let out = kg.cli(&["key", "rotate"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stderr.contains("KEYGATE_MASTER_KEY_FILE"), "{stderr}");
    assert!(stderr.contains("Nothing was changed"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");

    // The API says so with the error format and a 409.
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{}/api/v1/key/rotate", kg.admin_url()))
        .bearer_auth(kg.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "conflict", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("KEYGATE_MASTER_KEY"),
        "{body}"
    );

    // No key file was written, the database still uses the same key, and
    // traffic is unaffected.
    assert!(!kg.data_dir.join("master.key").exists());
    assert!(!kg.data_dir.join("master.key.next").exists());
    let store = open_store(&kg.data_dir, &key)
        .await
        .expect("same key opens the store");
    let snap = store.snapshot().load_full();
    let agent = snap
        .agent(&store.token_hasher().hash(&token))
        .expect("agent");
    assert!(agent.grants.iter().all(|s| s.sealed.key_id == key.id()));
    store.close().await;
    assert_injects(&kg, &up, &token, "after the refusal").await;
    assert_no_key_material(&kg.logs(), &[&key], "server log");
    assert_no_key_material(&format!("{stdout}{stderr}"), &[&key], "CLI output");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_file_named_by_the_environment_is_rotated_in_place() {
    let up = Upstream::start(&["api.test"]).await;
    let keep = tempfile::tempdir().unwrap();
    let data = keep.path().join("data");
    let keys = keep.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let key_file: PathBuf = keys.join("keygate.key");
    let old_key = MasterKey::generate();
    keygate_vault::write_private_file(&key_file, old_key.to_base64().as_bytes()).unwrap();
    let env_value = key_file.display().to_string();
    let env = [("KEYGATE_MASTER_KEY_FILE", env_value.as_str())];
    let args = args_for(&up);

    let kg = Keygate::start_with_data_dir_and_env(bin(), &data, &args, &env);
    let token = seed(&kg);
    let (key_id, previous, out) = rotate_json(&kg);
    assert_eq!(previous, old_key.id());
    let new_key = read_key(&key_file);
    assert_eq!(new_key.id(), key_id);
    assert!(!keys.join("keygate.key.next").exists());
    assert!(
        !data.join("master.key").exists(),
        "the data dir key is not involved"
    );
    assert_injects(&kg, &up, &token, "after the rotation").await;
    assert_no_key_material(&out, &[&old_key, &new_key], "CLI output");
    assert_no_key_material(&kg.logs(), &[&old_key, &new_key], "server log");
    assert!(kg.stop().success());

    let kg2 = Keygate::start_with_data_dir_and_env(bin(), &data, &args, &env);
    assert_injects(&kg2, &up, &token, "after a restart").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_rotation_is_settled_at_start() {
    let up = Upstream::start(&["api.test"]).await;
    let keep = tempfile::tempdir().unwrap();
    let data = keep.path().join("data");
    let args = args_for(&up);
    let key_file = data.join("master.key");
    let next_file = data.join("master.key.next");

    let kg = Keygate::start_with_data_dir(bin(), &data, &args);
    let token = seed(&kg);
    let old_text = std::fs::read(&key_file).unwrap();
    let (key_id, _, _) = rotate_json(&kg);
    let new_text = std::fs::read(&key_file).unwrap();
    assert!(kg.stop().success());

    // The state of a crash after the commit, before the rename: the database
    // is under the new key, which is only in `.next`; the key file is old.
    std::fs::rename(&key_file, &next_file).unwrap();
    keygate_vault::write_private_file(&key_file, &old_text).unwrap();
    let kg = Keygate::start_with_data_dir(bin(), &data, &args);
    assert_injects(&kg, &up, &token, "after finishing the rotation").await;
    assert_eq!(std::fs::read(&key_file).unwrap(), new_text);
    assert_eq!(read_key(&key_file).id(), key_id);
    assert!(!next_file.exists());
    assert!(
        kg.logs().contains("finished a master key rotation"),
        "{}",
        kg.logs()
    );
    assert!(kg.stop().success());

    // The state of a crash before the commit: a new key nobody uses.
    let stray = MasterKey::generate();
    keygate_vault::write_private_file(&next_file, stray.to_base64().as_bytes()).unwrap();
    let kg = Keygate::start_with_data_dir(bin(), &data, &args);
    assert_injects(&kg, &up, &token, "after discarding the stray key").await;
    assert!(!next_file.exists());
    assert_eq!(std::fs::read(&key_file).unwrap(), new_text);
    assert_no_key_material(&kg.logs(), &[&stray, &read_key(&key_file)], "server log");
}

#[test]
fn help_explains_the_rotation_and_the_shared_database_caveat() {
    let out = std::process::Command::new(BIN)
        .args(["key", "rotate", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "master key",
        "KEYGATE_MASTER_KEY_FILE",
        "PostgreSQL",
        "restart",
    ] {
        assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
    }
}
