//! Management commands: thin clients of the admin API.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::cli::{AgentCmd, AuditArgs, AuditCmd, CaCmd, Command, KeyCmd, SecretCmd};
use crate::paths;

/// A client of the admin API with its token.
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: Option<Zeroizing<String>>,
}

impl AdminClient {
    pub fn new(admin_url: &str, data_dir: Option<&Path>) -> Result<AdminClient> {
        let token = match std::env::var("KEYGATE_ADMIN_TOKEN") {
            Ok(t) if !t.trim().is_empty() => Some(Zeroizing::new(t.trim().to_string())),
            _ => data_dir.and_then(|d| {
                keygate_vault::read_private_file(&paths::admin_token(d))
                    .ok()
                    .and_then(|b| String::from_utf8(b.to_vec()).ok())
                    .map(|s| Zeroizing::new(s.trim().to_string()))
            }),
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(AdminClient {
            http,
            base: admin_url.trim_end_matches('/').to_string(),
            token,
        })
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.as_str());
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            anyhow!(
                "cannot reach the keygate admin API at {}: {e}\n  is `keygate serve` running? (set KEYGATE_ADMIN_URL otherwise)",
                self.base
            )
        })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if status.is_success() {
            if text.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text).context("invalid JSON from the admin API");
        }
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        if status == StatusCode::UNAUTHORIZED {
            bail!("{message}\n  (set KEYGATE_ADMIN_TOKEN or run on the keygate machine with access to the data dir)");
        }
        bail!("{message}")
    }

    pub async fn get_text(&self, path: &str) -> Result<String> {
        let url = format!("{}{}", self.base, path);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| anyhow!("cannot reach the keygate admin API at {}: {e}", self.base))?;
        if !resp.status().is_success() {
            bail!("{url} answered {}", resp.status());
        }
        Ok(resp.text().await?)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub fn main(data_dir: Option<PathBuf>, admin_url: &str, cmd: Command) -> Result<ExitCode> {
    let dir = paths::data_dir(data_dir).ok();
    let client = AdminClient::new(admin_url, dir.as_deref())?;
    runtime()?.block_on(async {
        match cmd {
            Command::Secret(c) => secret(&client, c).await,
            Command::Agent(c) => agent(&client, c).await,
            Command::Audit(a) => audit(&client, a).await,
            Command::Key(c) => key(&client, c).await,
            Command::Ca(CaCmd::Cert) => {
                let pem = match dir.as_deref().map(paths::ca_cert) {
                    Some(p) if p.exists() => std::fs::read_to_string(&p)
                        .with_context(|| format!("cannot read {}", p.display()))?,
                    _ => client.get_text("/ca.pem").await?,
                };
                print!("{pem}");
                Ok(ExitCode::SUCCESS)
            }
            Command::Serve(_) | Command::Run(_) | Command::Admin(_) => unreachable_command(),
        }
    })
}

fn unreachable_command() -> Result<ExitCode> {
    bail!("internal: command dispatched to the wrong handler")
}

/// Reads a secret value: --value-file (or "-"), stdin when it is not a
/// terminal, else a hidden prompt. One trailing newline is removed.
fn read_value(value_file: Option<&Path>) -> Result<Zeroizing<String>> {
    let mut buf = Zeroizing::new(Vec::new());
    match value_file {
        Some(p) if p == Path::new("-") => {
            std::io::stdin().read_to_end(&mut buf)?;
        }
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
            buf = Zeroizing::new(bytes);
        }
        None if !std::io::stdin().is_terminal() => {
            std::io::stdin().read_to_end(&mut buf)?;
        }
        None => {
            let v = rpassword::prompt_password("secret value (hidden): ")
                .context("cannot read the value from the terminal")?;
            buf = Zeroizing::new(v.into_bytes());
        }
    }
    if buf.ends_with(b"\n") {
        buf.pop();
        if buf.ends_with(b"\r") {
            buf.pop();
        }
    }
    if buf.is_empty() {
        bail!("the secret value is empty");
    }
    let s =
        String::from_utf8(buf.to_vec()).map_err(|_| anyhow!("the secret value is not UTF-8"))?;
    Ok(Zeroizing::new(s))
}

fn fmt_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// A JSON array of strings as "a,b,c".
fn names(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn seg(s: &str) -> String {
    // Names are validated server-side to [A-Za-z0-9._-]; encode anything else.
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn secret(client: &AdminClient, cmd: SecretCmd) -> Result<ExitCode> {
    match cmd {
        SecretCmd::Add {
            name,
            host,
            path,
            header,
            format,
            value_file,
        } => {
            let value = read_value(value_file.as_deref())?;
            let body = json!({
                "name": name, "host": host, "path": path, "header": header,
                "format": format, "value": value.as_str(),
            });
            let info = client
                .call(Method::POST, "/api/v1/secrets", Some(body))
                .await?;
            eprintln!(
                "secret {} added: {} {} -> {}",
                info["name"].as_str().unwrap_or(""),
                info["host"].as_str().unwrap_or(""),
                info["path"].as_str().unwrap_or(""),
                info["header"].as_str().unwrap_or("")
            );
        }
        SecretCmd::List { json } => {
            let list = client.call(Method::GET, "/api/v1/secrets", None).await?;
            let items = list.as_array().cloned().unwrap_or_default();
            if json {
                for s in items {
                    println!("{s}");
                }
            } else {
                println!(
                    "{:<20} {:<28} {:<12} {:<16} {:<6} {:<25} AGENTS",
                    "NAME", "HOST", "PATH", "HEADER", "HINT", "CREATED"
                );
                for s in items {
                    println!(
                        "{:<20} {:<28} {:<12} {:<16} {:<6} {:<25} {}",
                        s["name"].as_str().unwrap_or(""),
                        s["host"].as_str().unwrap_or(""),
                        s["path"].as_str().unwrap_or(""),
                        s["header"].as_str().unwrap_or(""),
                        s["hint"].as_str().unwrap_or(""),
                        fmt_ms(s["created_ms"].as_i64().unwrap_or(0)),
                        names(&s["agents"])
                    );
                }
            }
        }
        SecretCmd::Rotate { name, value_file } => {
            let value = read_value(value_file.as_deref())?;
            let info = client
                .call(
                    Method::POST,
                    &format!("/api/v1/secrets/{}/rotate", seg(&name)),
                    Some(json!({ "value": value.as_str() })),
                )
                .await?;
            eprintln!(
                "secret {name} rotated to version {}",
                info["version"].as_i64().unwrap_or(0)
            );
        }
        SecretCmd::Rm { name } => {
            client
                .call(
                    Method::DELETE,
                    &format!("/api/v1/secrets/{}", seg(&name)),
                    None,
                )
                .await?;
            eprintln!("secret {name} deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn agent(client: &AdminClient, cmd: AgentCmd) -> Result<ExitCode> {
    match cmd {
        AgentCmd::Create { name, grants } => {
            let v = client
                .call(
                    Method::POST,
                    "/api/v1/agents",
                    Some(json!({ "name": name, "grants": grants })),
                )
                .await?;
            let token = v["token"]
                .as_str()
                .ok_or_else(|| anyhow!("the admin API returned no token"))?;
            println!("{token}");
            if std::io::stdout().is_terminal() {
                eprintln!("(this token is shown once; keep it in the agent's environment)");
            }
        }
        AgentCmd::List { json } => {
            let list = client.call(Method::GET, "/api/v1/agents", None).await?;
            let items = list.as_array().cloned().unwrap_or_default();
            if json {
                for a in items {
                    println!("{a}");
                }
            } else {
                println!("{:<24} {:<25} GRANTS", "NAME", "CREATED");
                for a in items {
                    println!(
                        "{:<24} {:<25} {}",
                        a["name"].as_str().unwrap_or(""),
                        fmt_ms(a["created_ms"].as_i64().unwrap_or(0)),
                        names(&a["grants"])
                    );
                }
            }
        }
        AgentCmd::Grant { name, secret } => {
            client
                .call(
                    Method::PUT,
                    &format!("/api/v1/agents/{}/grants/{}", seg(&name), seg(&secret)),
                    None,
                )
                .await?;
            eprintln!("agent {name} may now use secret {secret}");
        }
        AgentCmd::Revoke { name, secret } => {
            client
                .call(
                    Method::DELETE,
                    &format!("/api/v1/agents/{}/grants/{}", seg(&name), seg(&secret)),
                    None,
                )
                .await?;
            eprintln!("agent {name} no longer uses secret {secret}");
        }
        AgentCmd::Disable { name } => {
            client
                .call(
                    Method::POST,
                    &format!("/api/v1/agents/{}/disable", seg(&name)),
                    None,
                )
                .await?;
            eprintln!(
                "agent {name} disabled: its token is refused until `keygate agent enable {name}`"
            );
        }
        AgentCmd::Enable { name } => {
            client
                .call(
                    Method::POST,
                    &format!("/api/v1/agents/{}/enable", seg(&name)),
                    None,
                )
                .await?;
            eprintln!("agent {name} enabled");
        }
        AgentCmd::Rm { name } => {
            client
                .call(
                    Method::DELETE,
                    &format!("/api/v1/agents/{}", seg(&name)),
                    None,
                )
                .await?;
            eprintln!("agent {name} deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn key(client: &AdminClient, cmd: KeyCmd) -> Result<ExitCode> {
    match cmd {
        KeyCmd::Rotate { json } => {
            let r = client
                .call(Method::POST, "/api/v1/key/rotate", None)
                .await?;
            if json {
                // Only the known fields: ids and a count, never key material.
                println!(
                    "{}",
                    json!({
                        "key_id": r["key_id"],
                        "previous_key_id": r["previous_key_id"],
                        "secrets": r["secrets"],
                    })
                );
            } else {
                let n = r["secrets"].as_u64().unwrap_or(0);
                println!(
                    "master key rotated: {} -> {} ({n} secret{} re-wrapped)",
                    r["previous_key_id"].as_str().unwrap_or("?"),
                    r["key_id"].as_str().unwrap_or("?"),
                    if n == 1 { "" } else { "s" }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One audit record as `audit --json` prints it (SPEC field names).
fn audit_line(r: &Value) -> Value {
    json!({
        "seq": r["seq"],
        "ts": fmt_ms(r["ts_ms"].as_i64().unwrap_or(0)),
        "agent": r["agent"],
        "method": r["method"],
        "scheme": r["scheme"],
        "host": r["host"],
        "port": r["port"],
        "path": r["path"],
        "status": r["status"],
        "decision": r["decision"],
        "reason": r["reason"],
        "secrets": r["secrets"],
        "duration_us": r["duration_us"],
        "bytes_up": r["bytes_up"],
        "bytes_down": r["bytes_down"],
    })
}

fn print_audit(r: &Value, as_json: bool) {
    if as_json {
        println!("{}", audit_line(r));
        return;
    }
    // Upgraded (WebSocket) connections: the bytes piped each way.
    let bytes = match (r["bytes_up"].as_i64(), r["bytes_down"].as_i64()) {
        (None, None) => String::new(),
        (up, down) => format!(" ↑{} B ↓{} B", up.unwrap_or(0), down.unwrap_or(0)),
    };
    println!(
        "{} {:<14} {:<7} {}://{}:{}{} {} {}{}{} {}",
        fmt_ms(r["ts_ms"].as_i64().unwrap_or(0)),
        r["agent"].as_str().unwrap_or("-"),
        r["method"].as_str().unwrap_or(""),
        r["scheme"].as_str().unwrap_or(""),
        r["host"].as_str().unwrap_or(""),
        r["port"].as_i64().unwrap_or(0),
        r["path"].as_str().unwrap_or(""),
        r["status"].as_i64().unwrap_or(0),
        r["decision"].as_str().unwrap_or(""),
        r["reason"]
            .as_str()
            .map(|x| format!(" ({x})"))
            .unwrap_or_default(),
        bytes,
        names(&r["secrets"])
    );
}

async fn audit(client: &AdminClient, args: AuditArgs) -> Result<ExitCode> {
    if let Some(AuditCmd::Verify) = args.verify {
        let report = client
            .call(Method::GET, "/api/v1/audit/verify", None)
            .await?;
        let ok = report["ok"].as_bool().unwrap_or(false);
        let msg = report["message"].as_str().unwrap_or("");
        if ok {
            println!("ok: {msg}");
            return Ok(ExitCode::SUCCESS);
        }
        println!("TAMPERED: {msg}");
        return Ok(ExitCode::from(1));
    }
    if args.limit < 1 {
        bail!("--limit must be at least 1");
    }
    let mut q = format!("/api/v1/audit?limit={}", args.limit);
    if let Some(a) = &args.agent {
        q.push_str(&format!("&agent={}", seg(a)));
    }
    let list = client.call(Method::GET, &q, None).await?;
    let mut items = list.as_array().cloned().unwrap_or_default();
    items.reverse(); // oldest first, like a log
    let mut last = items.last().and_then(|r| r["seq"].as_i64()).unwrap_or(0);
    for r in &items {
        print_audit(r, args.json);
    }
    if !args.follow {
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout();
    loop {
        let _ = out.flush();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut q = format!("/api/v1/audit?limit=500&after={last}");
        if let Some(a) = &args.agent {
            q.push_str(&format!("&agent={}", seg(a)));
        }
        let list = client.call(Method::GET, &q, None).await?;
        for r in list.as_array().cloned().unwrap_or_default() {
            last = r["seq"].as_i64().unwrap_or(last);
            print_audit(&r, args.json);
        }
    }
}
