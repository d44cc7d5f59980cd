//! The dashboard's pages. Reads and writes go through the same store
//! operations as `/api/v1` ([`crate::ops`] where there is more than one
//! step); secret values are only ever read from a form, never written back
//! into a page, a redirect or a log line.

use std::collections::HashMap;
use std::fmt::Write as _;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use keygate_core::now_ms;
use keygate_store::{AgentInfo, AuditFilter, AuditRecord, SecretInfo};
use maud::{html, Markup};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::auth::SessionCtx;
use crate::ui::{self, copyable, decision_badge, notice, page, time_cell, Nav};
use crate::{ops, AdminState, ApiError};

type Pairs = Vec<(String, String)>;

fn field(pairs: &Pairs, key: &str) -> String {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// Takes a field out of the form (used for secret values, so that the only
/// copy is the zeroizing one).
fn take_field(pairs: &mut Pairs, key: &str) -> Zeroizing<String> {
    match pairs.iter().position(|(k, _)| k == key) {
        Some(i) => Zeroizing::new(pairs.swap_remove(i).1),
        None => Zeroizing::new(String::new()),
    }
}

fn enc(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

fn internal(e: ApiError) -> Response {
    (
        e.status(),
        ui::error_page("Something went wrong", e.message()),
    )
        .into_response()
}

pub async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        ui::error_page("Not found", "There is no such page."),
    )
        .into_response()
}

fn csrf_input(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

#[derive(Deserialize, Default)]
pub struct Done {
    done: Option<String>,
    name: Option<String>,
}

impl Done {
    fn text(&self) -> Option<String> {
        let name = self.name.as_deref().unwrap_or("");
        Some(match self.done.as_deref()? {
            "added" => format!("Secret {name} added."),
            "rotated" => format!("Secret {name} rotated: the next request uses the new value."),
            "deleted" => format!("Secret {name} deleted, with its grants."),
            "granted" => format!("Granted {name}."),
            "revoked" => format!("Revoked {name}: the agent's next request gets no credential."),
            "agent_deleted" => format!("Agent {name} deleted: its token no longer works."),
            "disabled" => {
                format!("Agent {name} disabled: its token is refused from the next request.")
            }
            "enabled" => format!("Agent {name} enabled."),
            "key_rotated" => format!(
                "Master key rotated: every secret's data key is now wrapped by key {name}; \
                 requests keep their credentials."
            ),
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------- overview

fn admin_base(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1:10254");
    format!("http://{host}")
}

pub async fn overview(
    State(state): State<AdminState>,
    Extension(s): Extension<SessionCtx>,
    Query(done): Query<Done>,
    headers: HeaderMap,
) -> Response {
    let now = now_ms();
    let data = async {
        let secrets = state.store.list_secrets().await?;
        let agents = state.store.list_agents().await?;
        let hour = state.store.audit_counts_since(now - 3_600_000).await?;
        let day = state.store.audit_counts_since(now - 86_400_000).await?;
        let denied = state
            .store
            .audit_query(&AuditFilter {
                decision: Some("denied".into()),
                limit: Some(8),
                ..AuditFilter::default()
            })
            .await?;
        Ok::<_, keygate_store::StoreError>((secrets, agents, hour, day, denied))
    };
    let (secrets, agents, hour, day, denied) = match data.await {
        Ok(d) => d,
        Err(e) => return internal(e.into()),
    };
    let count =
        |v: &[(String, i64)], d: &str| v.iter().find(|(k, _)| k == d).map(|(_, n)| *n).unwrap_or(0);
    let proxy = state
        .proxy_addr
        .clone()
        .unwrap_or_else(|| "127.0.0.1:10255".into());
    let admin = admin_base(&headers);
    let key_id = state.store.vault().key_id();
    let body = html! {
        (notice(done.text().as_deref()))
        section.cards aria-label="Totals" {
            a.stat href="/secrets" { span.num { (secrets.len()) } span { "secrets" } }
            a.stat href="/agents" { span.num { (agents.len()) } span { "agents" } }
            div.stat { span.num { (hour.iter().map(|(_, n)| n).sum::<i64>()) } span { "requests, last hour" } }
            div.stat { span.num { (day.iter().map(|(_, n)| n).sum::<i64>()) } span { "requests, last 24 h" } }
        }
        section {
            h2 { "Requests by decision" }
            div.table-wrap {
                table {
                    thead { tr { th scope="col" { "Decision" } th scope="col" { "Last hour" } th scope="col" { "Last 24 h" } } }
                    tbody {
                        @for d in ["injected", "passthrough", "denied", "error"] {
                            tr {
                                td { a href={ "/audit?decision=" (d) } { (decision_badge(d)) } }
                                td.num { (count(&hour, d)) }
                                td.num { (count(&day, d)) }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Latest denied requests" }
            @if denied.is_empty() {
                p.muted { "None. Denied requests appear here." }
            } @else {
                (audit_table(&denied, false))
            }
        }
        section id="connect" {
            h2 { "Connect an agent" }
            p {
                "Gateway (proxy) address: " code { (proxy) } ". "
                "Create an agent on the " a href="/agents" { "Agents" } " page to get its token, "
                "then use one of these. Keep the agent's API key set to a placeholder: keygate injects the real one."
            }
            (snippets(&proxy, &admin, "$KEYGATE_AGENT_TOKEN"))
        }
        section id="master-key" {
            h2 { "Master key" }
            p {
                "Secrets are sealed under data keys wrapped by master key " code { (key_id) } ". "
                "Rotating makes a new master key, re-wraps every data key in one transaction and "
                "replaces the key file; traffic keeps flowing. A key given in "
                code { "KEYGATE_MASTER_KEY" } " cannot be rotated here (use a key file)."
            }
            form id="rotate-key" method="post" action="/key/rotate" {
                (csrf_input(&s.csrf))
                button type="submit" { "Rotate master key" }
            }
        }
    };
    page("Overview", Nav::Overview, &s.csrf, body).into_response()
}

pub async fn rotate_master_key(State(state): State<AdminState>) -> Response {
    match state.store.rotate_master_key().await {
        Ok(r) => {
            Redirect::to(&format!("/?done=key_rotated&name={}", enc(&r.key_id))).into_response()
        }
        Err(e) => op_error(e),
    }
}

fn snippets(proxy: &str, admin: &str, token: &str) -> Markup {
    let run = format!(
        "export KEYGATE_PROXY_URL=http://{proxy}\nexport KEYGATE_ADMIN_URL={admin}\nkeygate run --token \"{token}\" -- python3 agent.py"
    );
    let env = format!(
        "curl -fsS {admin}/ca.pem -o keygate-ca.pem\nexport HTTPS_PROXY=\"http://agent:{token}@{proxy}\"\nexport HTTP_PROXY=\"$HTTPS_PROXY\" NO_PROXY=localhost,127.0.0.1,::1\n# a bundle of the system roots plus keygate's CA\ncat /etc/ssl/certs/ca-certificates.crt keygate-ca.pem > keygate-bundle.pem\nexport SSL_CERT_FILE=$PWD/keygate-bundle.pem REQUESTS_CA_BUNDLE=$PWD/keygate-bundle.pem \\\n       CURL_CA_BUNDLE=$PWD/keygate-bundle.pem NODE_EXTRA_CA_CERTS=$PWD/keygate-ca.pem"
    );
    let port = proxy.rsplit(':').next().unwrap_or("10255");
    let docker = format!(
        "# keygate must listen where the container can reach it (e.g. --proxy-listen 0.0.0.0:{port})\ndocker run --rm \\\n  --add-host host.docker.internal:host-gateway \\\n  -e HTTPS_PROXY=\"http://agent:{token}@host.docker.internal:{port}\" \\\n  -v \"$PWD/keygate-ca.pem:/usr/local/share/ca-certificates/keygate.crt:ro\" \\\n  -e REQUESTS_CA_BUNDLE=/usr/local/share/ca-certificates/keygate.crt \\\n  -e NODE_EXTRA_CA_CERTS=/usr/local/share/ca-certificates/keygate.crt \\\n  my-agent-image"
    );
    let python = format!(
        "# run with HTTPS_PROXY and REQUESTS_CA_BUNDLE/SSL_CERT_FILE set as above\nimport os\nfrom openai import OpenAI\n\nassert os.environ.get(\"HTTPS_PROXY\"), \"start me with keygate run\"\nclient = OpenAI(api_key=\"placeholder\")  # keygate injects the real key\nprint(client.models.list())\n# requests / httpx read HTTPS_PROXY too: requests.get(\"https://api.example.com/v1/...\")\n# proxy: http://agent:{token}@{proxy}"
    );
    let node = format!(
        "# Node 22+ (20.x with NODE_USE_ENV_PROXY) honours the proxy variables in fetch\nexport NODE_USE_ENV_PROXY=1 NODE_EXTRA_CA_CERTS=$PWD/keygate-ca.pem\nexport HTTPS_PROXY=\"http://agent:{token}@{proxy}\"\nnode -e 'fetch(\"https://api.example.com/v1/models\", {{headers: {{authorization: \"Bearer placeholder\"}}}}).then(r => console.log(r.status))'"
    );
    html! {
        div.snippets {
            details open {
                summary { "keygate run (recommended)" }
                (copyable("snip-run", "keygate run snippet", &run))
            }
            details {
                summary { "Plain HTTPS_PROXY and CA variables" }
                (copyable("snip-env", "environment snippet", &env))
            }
            details {
                summary { "Docker" }
                (copyable("snip-docker", "Docker snippet", &docker))
            }
            details {
                summary { "Python" }
                (copyable("snip-python", "Python snippet", &python))
            }
            details {
                summary { "Node" }
                (copyable("snip-node", "Node snippet", &node))
            }
        }
    }
}

// ----------------------------------------------------------------- secrets

/// Field values and errors of the add-secret form. Never the value.
#[derive(Default)]
struct SecretForm {
    name: String,
    host: String,
    path: String,
    header: String,
    format: String,
    errors: HashMap<&'static str, String>,
}

impl SecretForm {
    fn blank() -> SecretForm {
        SecretForm {
            path: "*".into(),
            header: "Authorization".into(),
            format: "Bearer {secret}".into(),
            ..SecretForm::default()
        }
    }
}

/// Which form field a store error is about.
fn secret_error_field(e: &ApiError) -> &'static str {
    let m = e.message();
    if m.starts_with("host:") || m.contains("would tie") {
        "host"
    } else if m.starts_with("path:") {
        "path"
    } else if m.starts_with("format:") {
        "format"
    } else if m.starts_with("header ") {
        "header"
    } else if m.starts_with("secret name") || m.contains("already exists") {
        "name"
    } else if m.starts_with("secret value") {
        "value"
    } else {
        "form"
    }
}

fn text_field(
    id: &str,
    label: &str,
    value: &str,
    hint: &str,
    errors: &HashMap<&'static str, String>,
    required: bool,
) -> Markup {
    let err = errors.get(id);
    let err_id = format!("{id}-error");
    let hint_id = format!("{id}-hint");
    let described = if err.is_some() {
        format!("{hint_id} {err_id}")
    } else {
        hint_id.clone()
    };
    html! {
        div.field.invalid[err.is_some()] {
            label for=(id) { (label) }
            input id=(id) name=(id) type="text" value=(value) required[required]
                autocomplete="off" spellcheck="false"
                aria-invalid=[err.map(|_| "true")] aria-describedby=(described);
            @if let Some(e) = err { p.error id=(err_id) { (e) } }
            p.hint id=(hint_id) { (hint) }
        }
    }
}

fn value_field(id: &str, label: &str, errors: &HashMap<&'static str, String>) -> Markup {
    let err = errors.get("value");
    html! {
        div.field.invalid[err.is_some()] {
            label for=(id) { (label) }
            // Never given a value attribute: what was typed is not echoed back.
            input id=(id) name="value" type="password" required autocomplete="new-password"
                spellcheck="false" aria-invalid=[err.map(|_| "true")]
                aria-describedby={ (id) "-hint" @if err.is_some() { " " (id) "-error" } };
            @if let Some(e) = err { p.error id={ (id) "-error" } { (e) } }
            p.hint id={ (id) "-hint" } { "Write-only: keygate encrypts it and never shows it again (only its last 4 characters)." }
        }
    }
}

fn add_secret_form(csrf: &str, f: &SecretForm) -> Markup {
    html! {
        form.panel method="post" action="/secrets" id="add-secret" novalidate {
            h2 { "Add a secret" }
            (csrf_input(csrf))
            @if let Some(e) = f.errors.get("form") { p.error role="alert" { (e) } }
            div.grid {
                (text_field("name", "Name", &f.name, "Letters, digits, '.', '_' or '-', e.g. openai.", &f.errors, true))
                (text_field("host", "Host pattern", &f.host, "api.example.com, *.example.com or api.example.com:8443.", &f.errors, true))
                (text_field("path", "Path pattern", &f.path, "* (all), /exact or /prefix/*.", &f.errors, false))
                (text_field("header", "Header", &f.header, "Header the credential goes into.", &f.errors, false))
                (text_field("format", "Header value format", &f.format, "{secret} is replaced by the value, e.g. Bearer {secret}.", &f.errors, false))
                (value_field("value", "Value", &f.errors))
            }
            button.primary type="submit" { "Add secret" }
        }
    }
}

fn secrets_page(
    csrf: &str,
    list: &[SecretInfo],
    last_used: &HashMap<String, i64>,
    form: &SecretForm,
    done: Option<String>,
) -> Html<String> {
    let body = html! {
        (notice(done.as_deref()))
        @if list.is_empty() {
            p.muted { "No secrets yet. Add the first one below." }
        } @else {
            div.table-wrap {
                table id="secrets" {
                    thead { tr {
                        th scope="col" { "Name" } th scope="col" { "Host" } th scope="col" { "Path" }
                        th scope="col" { "Header" } th scope="col" { "Value" } th scope="col" { "Created" }
                        th scope="col" { "Rotated" } th scope="col" { "Agents" } th scope="col" { "Last used" }
                    } }
                    tbody {
                        @for s in list {
                            tr data-secret=(s.name) {
                                td { a href={ "/secrets/" (enc(&s.name)) } { (s.name) } }
                                td { code { (s.host) } }
                                td { code { (s.path) } }
                                td { code { (s.header) } }
                                td { @if s.hint.is_empty() { span.muted { "hidden" } } @else { code { "…" (s.hint) } } }
                                td { (time_cell(Some(s.created_ms))) }
                                td { (time_cell(s.rotated_ms)) }
                                td { @if s.agents.is_empty() { span.muted { "none" } } @else {
                                    @for (i, a) in s.agents.iter().enumerate() {
                                        @if i > 0 { ", " }
                                        a href={ "/agents/" (enc(a)) } { (a) }
                                    }
                                } }
                                td { (time_cell(last_used.get(&s.name).copied())) }
                            }
                        }
                    }
                }
            }
            p.hint { "Last used looks at the newest 10 000 audit records." }
        }
        (add_secret_form(csrf, form))
    };
    page("Secrets", Nav::Secrets, csrf, body)
}

pub async fn secrets(
    State(state): State<AdminState>,
    Extension(s): Extension<SessionCtx>,
    Query(done): Query<Done>,
) -> Response {
    render_secrets(
        &state,
        &s.csrf,
        &SecretForm::blank(),
        done.text(),
        StatusCode::OK,
    )
    .await
}

async fn render_secrets(
    state: &AdminState,
    csrf: &str,
    form: &SecretForm,
    done: Option<String>,
    status: StatusCode,
) -> Response {
    let list = match state.store.list_secrets().await {
        Ok(l) => l,
        Err(e) => return internal(e.into()),
    };
    let last_used = state
        .store
        .secrets_last_used(10_000)
        .await
        .unwrap_or_default();
    (status, secrets_page(csrf, &list, &last_used, form, done)).into_response()
}

pub async fn add_secret(
    State(state): State<AdminState>,
    Extension(s): Extension<SessionCtx>,
    Form(mut pairs): Form<Pairs>,
) -> Response {
    let value = take_field(&mut pairs, "value");
    let mut form = SecretForm {
        name: field(&pairs, "name").trim().to_string(),
        host: field(&pairs, "host").trim().to_string(),
        path: field(&pairs, "path"),
        header: field(&pairs, "header"),
        format: field(&pairs, "format"),
        errors: HashMap::new(),
    };
    if form.name.is_empty() {
        form.errors.insert("name", "A name is required.".into());
    }
    if form.host.is_empty() {
        form.errors
            .insert("host", "A host pattern is required.".into());
    }
    if value.is_empty() {
        form.errors.insert("value", "A value is required.".into());
    }
    let mut status = StatusCode::BAD_REQUEST;
    if form.errors.is_empty() {
        let spec = ops::SecretSpec {
            name: form.name.clone(),
            host: form.host.clone(),
            path: Some(form.path.clone()),
            header: Some(form.header.clone()),
            format: Some(form.format.clone()),
        };
        let bytes = Zeroizing::new(value.as_bytes().to_vec());
        drop(value);
        match ops::add_secret(&state.store, spec, bytes).await {
            Ok(info) => {
                tracing::info!(secret = %info.name, "secret added from the dashboard");
                return Redirect::to(&format!("/secrets?done=added&name={}", enc(&info.name)))
                    .into_response();
            }
            Err(e) if e.status() == StatusCode::INTERNAL_SERVER_ERROR => return internal(e),
            Err(e) => {
                status = e.status();
                form.errors
                    .insert(secret_error_field(&e), e.message().to_string());
            }
        }
    }
    render_secrets(&state, &s.csrf, &form, None, status).await
}

fn secret_detail(
    csrf: &str,
    info: &SecretInfo,
    agents: &[AgentInfo],
    rotate_error: Option<&str>,
    done: Option<String>,
) -> Html<String> {
    let mut errors = HashMap::new();
    if let Some(e) = rotate_error {
        errors.insert("value", e.to_string());
    }
    let holders: Vec<&AgentInfo> = agents
        .iter()
        .filter(|a| a.grants.contains(&info.name))
        .collect();
    let body = html! {
        (notice(done.as_deref()))
        dl.facts {
            dt { "Host" } dd { code { (info.host) } }
            dt { "Path" } dd { code { (info.path) } }
            dt { "Header" } dd { code { (info.header) } }
            dt { "Format" } dd { code { (info.format) } }
            dt { "Value" } dd { @if info.hint.is_empty() { span.muted { "hidden" } } @else { code { "…" (info.hint) } } }
            dt { "Version" } dd { (info.version) }
            dt { "Created" } dd { (time_cell(Some(info.created_ms))) }
            dt { "Rotated" } dd { (time_cell(info.rotated_ms)) }
            dt { "Granted to" } dd {
                @if holders.is_empty() { span.muted { "no agent" } }
                @for (i, a) in holders.iter().enumerate() {
                    @if i > 0 { ", " }
                    a href={ "/agents/" (enc(&a.name)) } { (a.name) }
                }
            }
        }
        form.panel method="post" action={ "/secrets/" (enc(&info.name)) "/rotate" } id="rotate-secret" {
            h2 { "Rotate" }
            (csrf_input(csrf))
            (value_field("rotate-value", "New value", &errors))
            button.primary type="submit" { "Rotate secret" }
        }
        p { a.danger href={ "/secrets/" (enc(&info.name)) "/delete" } { "Delete this secret…" } }
    };
    page(&format!("Secret {}", info.name), Nav::Secrets, csrf, body)
}

pub async fn secret(
    State(state): State<AdminState>,
    Extension(s): Extension<SessionCtx>,
    Path(name): Path<String>,
    Query(done): Query<Done>,
) -> Response {
    let info = match state.store.secret(&name).await {
        Ok(i) => i,
        Err(keygate_store::StoreError::NotFound(_)) => return not_found().await,
        Err(e) => return internal(e.into()),
    };
    let agents = state.store.list_agents().await.unwrap_or_default();
    secret_detail(&s.csrf, &info, &agents, None, done.text()).into_response()
}

pub async fn rotate_secret(
    State(state): State<AdminState>,
    Extension(s): Extension<SessionCtx>,
    Path(name): Path<String>,
    Form(mut pairs): Form<Pairs>,
) -> Response {
    let value = take_field(&mut pairs, "value");
    let err = if value.is_empty() {
        "A new value is required.".to_string()
    } else {
        let bytes = Zeroizing::new(value.as_bytes().to_vec());
        drop(value);
        match state.store.rotate_secret(&name, bytes).await {
            Ok(_) => {
                tracing::info!(secret = %name, "secret rotated from the dashboard");
                return Redirect::to(&format!(
                    "/secrets/{}?done=rotated&name={}",
                    enc(&name),
                    enc(&name)
                ))
                .into_response();
            }
            Err(keygate_store::StoreError::NotFound(_)) => return not_found().await,
            Err(e) => {
                let e = ApiError::from(e);
                if e.status() == StatusCode::INTERNAL_SERVER_ERROR {
                    return internal(e);
                }
                e.message().to_string()
            }
        }
    };
    let info = match state.store.secret(&name).await {
        Ok(i) => i,
        Err(e) => return internal(e.into()),
    };
    let agents = state.store.list_agents().await.unwrap_or_default();
    (
        StatusCode::BAD_REQUEST,
        secret_detail(&s.csrf, &info, &agents, Some(&err), None),
    )
        .into_response()
}

fn confirm_page(
    csrf: &str,
    nav: Nav,
    title: &str,
    what: Markup,
    action: &str,
    back: &str,
) -> Html<String> {
    page(
        title,
        nav,
        csrf,
        html! {
            form.panel.confirm method="post" action=(action) {
                (csrf_input(csrf))
                (what)
                div.actions {
                    button.danger type="submit" { "Delete" }
                    a.button href=(back) { "Cancel" }
                }
            }
        },
    )
}

pub async fn confirm_delete_secret(
    State(state): State<AdminState>,
    Extension(s): Extension<SessionCtx>,
    Path(name): Path<String>,
) -> Response {
    let info = match state.store.secret(&name).await {
        Ok(i) => i,
        Err(keygate_store::StoreError::NotFound(_)) => return not_found().await,
        Err(e) => return internal(e.into()),
    };
    let what = html! {
        p { "Delete secret " strong { (info.name) } " (" code { (info.host) (if info.path == "*" { String::new() } else { info.path.clone() }) } ")?" }
        @if !info.agents.is_empty() {
            p { "It is granted to " (info.agents.join(", ")) "; their next requests get no credential." }
        }
        p.muted { "The encrypted value is destroyed. This cannot be undone." }
    };
    confirm_page(
        &s.csrf,
        Nav::Secrets,
        &format!("Delete secret {}", info.name),
        what,
        &format!("/secrets/{}/delete", enc(&info.name)),
        &format!("/secrets/{}", enc(&info.name)),
    )
    .into_response()
}

pub async fn delete_secret(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    match state.store.remove_secret(&name).await {
        Ok(()) => {
            tracing::info!(secret = %name, "secret deleted from the dashboard");
            Redirect::to(&format!("/secrets?done=deleted&name={}", enc(&name))).into_response()
        }
        Err(keygate_store::StoreError::NotFound(_)) => not_found().await,
        Err(e) => internal(e.into()),
    }
}

// ------------------------------------------------------------------ agents

fn create_agent_form(
    csrf: &str,
    secrets: &[SecretInfo],
    name: &str,
    error: Option<&str>,
    checked: &[String],
) -> Markup {
    let mut errors = HashMap::new();
    if let Some(e) = error {
        errors.insert("agent-name", e.to_string());
    }
    html! {
        form.panel method="post" action="/agents" id="create-agent" novalidate {
            h2 { "Create an agent" }
            (csrf_input(csrf))
            div.field.invalid[error.is_some()] {
                label for="agent-name" { "Name" }
                input id="agent-name" name="name" type="text" value=(name) required autocomplete="off"
                    aria-invalid=[error.map(|_| "true")] aria-describedby="agent-name-hint agent-name-error";
                @if let Some(e) = error { p.error id="agent-name-error" { (e) } }
                p.hint id="agent-name-hint" { "Letters, digits, '.', '_' or '-', e.g. invoice-bot." }
            }
            @if !secrets.is_empty() {
                fieldset {
                    legend { "Grant secrets" }
                    @for sec in secrets {
                        div.check {
                            input type="checkbox" name="grant" value=(sec.name) id={ "grant-" (sec.name) }
                                checked[checked.contains(&sec.name)];
                            label for={ "grant-" (sec.name) } { (sec.name) " " span.muted { "(" (sec.host) ")" } }
                        }
                    }
                }
            }
            button.primary type="submit" { "Create agent" }
        }
    }
}

async fn render_agents(
    state: &AdminState,
    csrf: &str,
    name: &str,
    error: Option<&str>,
    checked: &[String],
    done: Option<String>,
    status: StatusCode,
) -> Response {
    let (agents, secrets) = match (
        state.store.list_agents().await,
        state.store.list_secrets().await,
    ) {
        (Ok(a), Ok(s)) => (a, s),
        (Err(e), _) | (_, Err(e)) => return internal(e.into()),
    };
    let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    let seen = state
        .store
        .agents_last_seen(&names)
        .await
        .unwrap_or_default();
    let body = html! {
        (notice(done.as_deref()))
        @if agents.is_empty() {
            p.muted { "No agents yet. Create one below; its token is shown once." }
        } @else {
            div.table-wrap {
                table id="agents" {
                    thead { tr { th scope="col" { "Name" } th scope="col" { "Created" } th scope="col" { "Last seen" } th scope="col" { "Grants" } } }
                    tbody {
                        @for a in &agents {
                            tr data-agent=(a.name) {
                                td {
                                    a href={ "/agents/" (enc(&a.name)) } { (a.name) }
                                    @if a.disabled { " " span.muted { "(disabled)" } }
                                }
                                td { (time_cell(Some(a.created_ms))) }
                                td { (time_cell(seen.get(&a.name).copied())) }
                                td { @if a.grants.is_empty() { span.muted { "none" } } @else { (a.grants.join(", ")) } }
                            }
                        }
                    }
                }
            }
        }
        (create_agent_form(csrf, &secrets, name, error, checked))
    };
    (status, page("Agents", Nav::Agents, csrf, body)).into_response()
}

pub async fn agents(
    State(state): State<AdminState>,
    Extension(s): Extension<SessionCtx>,
    Query(done): Query<Done>,
) -> Response {
    render_agents(&state, &s.csrf, "", None, &[], done.text(), StatusCode::OK).await
}

fn token_page(
    csrf: &str,
    state: &AdminState,
    headers: &HeaderMap,
    agent: &str,
    token: &str,
    fresh: bool,
) -> Html<String> {
    let proxy = state
        .proxy_addr
        .clone()
        .unwrap_or_else(|| "127.0.0.1:10255".into());
    let admin = admin_base(headers);
    let body = html! {
        p.notice role="status" {
            @if fresh { "Agent " strong { (agent) } " created. " } @else { "New token for " strong { (agent) } "; the old one no longer works. " }
            "Copy the token now: it is shown only once."
        }
        (copyable("agent-token", "agent token", token))
        h2 { "Connect it" }
        (snippets(&proxy, &admin, token))
        p { a href={ "/agents/" (enc(agent)) } { "Go to agent " (agent) } " · " a href="/agents" { "All agents" } }
    };
    page(&format!("Token for {agent}"), Nav::Agents, csrf, body)
}

pub async fn create_agent(
    State(state): State<AdminState>,
    Extension(s): Extension<SessionCtx>,
    headers: HeaderMap,
    Form(pairs): Form<Pairs>,
) -> Response {
    let name = field(&pairs, "name").trim().to_string();
    let grants: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "grant")
        .map(|(_, v)| v.clone())
        .collect();
    if name.is_empty() {
        return render_agents(
            &state,
            &s.csrf,
            &name,
            Some("A name is required."),
            &grants,
            None,
            StatusCode::BAD_REQUEST,
        )
        .await;
    }
    match state.store.create_agent(&name, &grants).await {
        Ok((agent, token)) => {
            tracing::info!(agent = %agent.name, "agent created from the dashboard");
            token_page(&s.csrf, &state, &headers, &agent.name, &token, true).into_response()
        }
        Err(e) => {
            let e = ApiError::from(e);
            if e.status() == StatusCode::INTERNAL_SERVER_ERROR {
                return internal(e);
            }
            render_agents(
                &state,
                &s.csrf,
                &name,
                Some(e.message()),
                &grants,
                None,
                e.status(),
            )
            .await
        }
    }
}

pub async fn agent(
    State(state): State<AdminState>,
    Extension(s): Extension<SessionCtx>,
    Path(name): Path<String>,
    Query(done): Query<Done>,
) -> Response {
    let info = match state.store.agent(&name).await {
        Ok(i) => i,
        Err(keygate_store::StoreError::NotFound(_)) => return not_found().await,
        Err(e) => return internal(e.into()),
    };
    let secrets = state.store.list_secrets().await.unwrap_or_default();
    let seen = state
        .store
        .agents_last_seen(std::slice::from_ref(&info.name))
        .await
        .unwrap_or_default();
    let ungranted: Vec<&SecretInfo> = secrets
        .iter()
        .filter(|x| !info.grants.contains(&x.name))
        .collect();
    let base = format!("/agents/{}", enc(&info.name));
    let body = html! {
        (notice(done.text().as_deref()))
        dl.facts {
            dt { "Created" } dd { (time_cell(Some(info.created_ms))) }
            dt { "Last seen" } dd { (time_cell(seen.get(&info.name).copied())) }
            dt { "Requests" } dd { a href={ "/audit?agent=" (enc(&info.name)) } { "Audit log for " (info.name) } }
        }
        section {
            h2 { "Grants" }
            @if info.grants.is_empty() {
                p.muted { "No grants: requests pass through without a credential." }
            } @else {
                ul.grants id="grants" {
                    @for g in &info.grants {
                        li data-grant=(g) {
                            a href={ "/secrets/" (enc(g)) } { (g) }
                            form.inline method="post" action={ (base) "/grants/" (enc(g)) "/revoke" } {
                                (csrf_input(&s.csrf))
                                button.small type="submit" aria-label={ "Revoke " (g) } { "Revoke" }
                            }
                        }
                    }
                }
            }
            @if !ungranted.is_empty() {
                form.inline-form method="post" action={ (base) "/grants" } id="grant-form" {
                    (csrf_input(&s.csrf))
                    label for="grant-secret" { "Grant a secret" }
                    select id="grant-secret" name="secret" {
                        @for x in &ungranted { option value=(x.name) { (x.name) " (" (x.host) ")" } }
                    }
                    button type="submit" { "Grant" }
                }
            }
        }
        section {
            h2 { "Status" }
            @if info.disabled {
                p { strong { "Disabled" } ": its token is refused (407); grants are kept." }
                form method="post" action={ (base) "/enable" } {
                    (csrf_input(&s.csrf))
                    button type="submit" { "Enable agent" }
                }
            } @else {
                p.muted { "Enabled." }
                form method="post" action={ (base) "/disable" } {
                    (csrf_input(&s.csrf))
                    button type="submit" { "Disable agent" }
                }
            }
        }
        section {
            h2 { "Token" }
            form method="post" action={ (base) "/token" } {
                (csrf_input(&s.csrf))
                p.hint { "A new token replaces the old one at once." }
                button type="submit" { "Regenerate token" }
            }
        }
        p { a.danger href={ (base) "/delete" } { "Delete this agent…" } }
    };
    page(&format!("Agent {}", info.name), Nav::Agents, &s.csrf, body).into_response()
}

fn back_to_agent(name: &str, done: &str, what: &str) -> Response {
    Redirect::to(&format!(
        "/agents/{}?done={done}&name={}",
        enc(name),
        enc(what)
    ))
    .into_response()
}

fn op_error(e: keygate_store::StoreError) -> Response {
    let e = ApiError::from(e);
    if e.status() == StatusCode::INTERNAL_SERVER_ERROR {
        return internal(e);
    }
    (e.status(), ui::error_page("Not done", e.message())).into_response()
}

pub async fn grant(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    Form(pairs): Form<Pairs>,
) -> Response {
    let secret = field(&pairs, "secret");
    match state.store.grant(&name, &secret).await {
        Ok(()) => back_to_agent(&name, "granted", &secret),
        Err(e) => op_error(e),
    }
}

pub async fn revoke(
    State(state): State<AdminState>,
    Path((name, secret)): Path<(String, String)>,
) -> Response {
    match state.store.revoke(&name, &secret).await {
        Ok(()) => back_to_agent(&name, "revoked", &secret),
        Err(e) => op_error(e),
    }
}

pub async fn disable_agent(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    match state.store.set_agent_disabled(&name, true).await {
        Ok(()) => back_to_agent(&name, "disabled", &name),
        Err(e) => op_error(e),
    }
}

pub async fn enable_agent(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    match state.store.set_agent_disabled(&name, false).await {
        Ok(()) => back_to_agent(&name, "enabled", &name),
        Err(e) => op_error(e),
    }
}

pub async fn regenerate_token(
    State(state): State<AdminState>,
    Extension(s): Extension<SessionCtx>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    match state.store.regenerate_token(&name).await {
        Ok(token) => token_page(&s.csrf, &state, &headers, &name, &token, false).into_response(),
        Err(e) => op_error(e),
    }
}

pub async fn confirm_delete_agent(
    State(state): State<AdminState>,
    Extension(s): Extension<SessionCtx>,
    Path(name): Path<String>,
) -> Response {
    let info = match state.store.agent(&name).await {
        Ok(i) => i,
        Err(keygate_store::StoreError::NotFound(_)) => return not_found().await,
        Err(e) => return internal(e.into()),
    };
    let what = html! {
        p { "Delete agent " strong { (info.name) } "? Its token stops working at once." }
        p.muted { "Its audit records stay." }
    };
    confirm_page(
        &s.csrf,
        Nav::Agents,
        &format!("Delete agent {}", info.name),
        what,
        &format!("/agents/{}/delete", enc(&info.name)),
        &format!("/agents/{}", enc(&info.name)),
    )
    .into_response()
}

pub async fn delete_agent(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    match state.store.remove_agent(&name).await {
        Ok(()) => {
            Redirect::to(&format!("/agents?done=agent_deleted&name={}", enc(&name))).into_response()
        }
        Err(e) => op_error(e),
    }
}

// ------------------------------------------------------------------- audit

const PAGE_SIZE: i64 = 50;
const EXPORT_MAX: i64 = 100_000;

#[derive(Deserialize, Default, Clone)]
pub struct AuditQuery {
    agent: Option<String>,
    host: Option<String>,
    decision: Option<String>,
    from: Option<String>,
    to: Option<String>,
    before: Option<i64>,
    after: Option<i64>,
    limit: Option<i64>,
    format: Option<String>,
}

fn nonempty(v: &Option<String>) -> Option<String> {
    v.as_ref()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

impl AuditQuery {
    /// The filter part as a query string (no paging), for links.
    fn filter_qs(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("agent", &self.agent),
            ("host", &self.host),
            ("decision", &self.decision),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if let Some(v) = nonempty(v) {
                parts.push(format!("{k}={}", enc(&v)));
            }
        }
        parts.join("&")
    }

    /// The store filter, or a message about what is wrong.
    async fn filter(&self, state: &AdminState) -> Result<Option<AuditFilter>, String> {
        let decision = nonempty(&self.decision);
        ops::check_decision(decision.as_deref()).map_err(|e| e.message().to_string())?;
        let since_ms = match nonempty(&self.from) {
            Some(f) => {
                Some(ui::parse_datetime_local(&f).ok_or("the From time is not a date and time")?)
            }
            None => None,
        };
        let mut before_seq = self.before;
        if let Some(t) = nonempty(&self.to) {
            let until = ui::parse_datetime_local(&t).ok_or("the To time is not a date and time")?;
            match state.store.audit_seq_at_or_before(until).await {
                Ok(Some(seq)) => before_seq = Some(before_seq.map_or(seq + 1, |b| b.min(seq + 1))),
                Ok(None) => return Ok(None),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(Some(AuditFilter {
            agent: nonempty(&self.agent),
            decision,
            host: nonempty(&self.host),
            before_seq,
            after_seq: self.after,
            since_ms,
            limit: Some(self.limit.unwrap_or(PAGE_SIZE).clamp(1, 500)),
        }))
    }
}

fn audit_row(r: &AuditRecord) -> Markup {
    html! {
        tr data-seq=(r.seq) class={ "d-" (r.decision) } {
            td { a href={ "/audit/" (r.seq) } aria-label={ "Record " (r.seq) } { (ui::fmt_ms(r.ts_ms)) } }
            td { @if let Some(a) = &r.agent { (a) } @else { span.muted { "—" } } }
            td { (r.method) }
            td { (r.host) @if r.port != 443 && r.port != 80 { ":" (r.port) } }
            td.path { (r.path) }
            td.num { (r.status) }
            td { (decision_badge(&r.decision)) }
            td { (r.reason.as_deref().unwrap_or("")) }
            td { (r.secrets.join(", ")) }
        }
    }
}

fn audit_table(rows: &[AuditRecord], live: bool) -> Markup {
    html! {
        div.table-wrap {
            table.audit id="audit-table" {
                thead { tr {
                    th scope="col" { "Time" } th scope="col" { "Agent" } th scope="col" { "Method" }
                    th scope="col" { "Host" } th scope="col" { "Path" } th scope="col" { "Status" }
                    th scope="col" { "Decision" } th scope="col" { "Reason" } th scope="col" { "Secret" }
                } }
                tbody id=[live.then_some("audit-rows")] {
                    @for r in rows { (audit_row(r)) }
                }
            }
        }
    }
}

pub async fn audit(
    State(state): State<AdminState>,
    Extension(s): Extension<SessionCtx>,
    Query(q): Query<AuditQuery>,
) -> Response {
    let agents = state.store.list_agents().await.unwrap_or_default();
    let (rows, error) = match q.filter(&state).await {
        Ok(Some(f)) => match state.store.audit_query(&f).await {
            Ok(mut rows) => {
                if f.after_seq.is_some() {
                    rows.reverse();
                }
                (rows, None)
            }
            Err(e) => (Vec::new(), Some(e.to_string())),
        },
        Ok(None) => (Vec::new(), None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let fq = q.filter_qs();
    let sep = if fq.is_empty() { "" } else { "&" };
    let paged = q.before.is_some() || q.after.is_some();
    let live_ok = !paged && nonempty(&q.to).is_none();
    let limit = q.limit.unwrap_or(PAGE_SIZE).clamp(1, 500);
    let max_seq = rows.first().map(|r| r.seq).unwrap_or(0);
    let decision = nonempty(&q.decision).unwrap_or_default();
    let body = html! {
        form.filters method="get" action="/audit" aria-label="Filter the audit log" {
            div.field {
                label for="f-agent" { "Agent" }
                input id="f-agent" name="agent" type="text" list="f-agents"
                    value=(q.agent.clone().unwrap_or_default()) placeholder="any" autocomplete="off";
                datalist id="f-agents" {
                    @for a in &agents { option value=(a.name) {} }
                }
            }
            div.field {
                label for="f-host" { "Host" }
                input id="f-host" name="host" type="text" value=(q.host.clone().unwrap_or_default()) placeholder="api.example.com";
            }
            div.field {
                label for="f-decision" { "Decision" }
                select id="f-decision" name="decision" {
                    option value="" { "any" }
                    @for d in ["injected", "passthrough", "denied", "error"] {
                        option value=(d) selected[decision == d] { (d) }
                    }
                }
            }
            div.field {
                label for="f-from" { "From (UTC)" }
                input id="f-from" name="from" type="datetime-local" step="1" value=(q.from.clone().unwrap_or_default());
            }
            div.field {
                label for="f-to" { "To (UTC)" }
                input id="f-to" name="to" type="datetime-local" step="1" value=(q.to.clone().unwrap_or_default());
            }
            div.actions {
                button.primary type="submit" { "Filter" }
                a.button href="/audit" { "Clear" }
            }
        }
        div.toolbar {
            @if live_ok {
                div.check {
                    input type="checkbox" id="live" data-after=(max_seq) data-filter=(fq);
                    label for="live" { "Live tail" }
                }
            }
            span.spacer {}
            a.button href={ "/audit/export?format=csv" (sep) (fq) } download { "Export CSV" }
            a.button href={ "/audit/export?format=jsonl" (sep) (fq) } download { "Export JSONL" }
            a.button href="/audit/verify" { "Check hash chain" }
        }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        (audit_table(&rows, live_ok))
        @if rows.is_empty() { p.muted id="audit-empty" { "No matching requests." } }
        nav.pager aria-label="Pages" {
            @if paged {
                a.button href={ "/audit?" (fq) } { "Newest" }
                @if let Some(first) = rows.first() {
                    a.button href={ "/audit?" (fq) (sep) "after=" (first.seq) } rel="prev" { "Newer" }
                }
            }
            @if rows.len() as i64 >= limit {
                @if let Some(last) = rows.last() {
                    a.button href={ "/audit?" (fq) (sep) "before=" (last.seq) } rel="next" { "Older" }
                }
            }
        }
    };
    page("Audit log", Nav::Audit, &s.csrf, body).into_response()
}

/// New rows for the live tail: records after `after`, newest first, as
/// `<tr>` elements.
pub async fn audit_rows(
    State(state): State<AdminState>,
    Query(mut q): Query<AuditQuery>,
) -> Response {
    q.before = None;
    q.to = None;
    if q.after.is_none() {
        q.after = Some(0);
    }
    q.limit = Some(200);
    let rows = match q.filter(&state).await {
        Ok(Some(f)) => state.store.audit_query(&f).await.unwrap_or_default(),
        Ok(None) => Vec::new(),
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let markup = html! { @for r in rows.iter().rev() { (audit_row(r)) } };
    Html(markup.into_string()).into_response()
}

fn csv_field(out: &mut String, s: &str) {
    if s.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
    }
}

pub async fn audit_export(
    State(state): State<AdminState>,
    Query(q): Query<AuditQuery>,
) -> Response {
    let csv = q.format.as_deref() != Some("jsonl");
    let mut q2 = q.clone();
    q2.after = None;
    q2.before = None;
    q2.limit = Some(500);
    let mut filter = match q2.filter(&state).await {
        Ok(Some(f)) => Some(f),
        Ok(None) => None,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let mut out = String::new();
    if csv {
        out.push_str("seq,ts,agent,method,scheme,host,port,path,status,decision,reason,secrets,duration_us,bytes_up,bytes_down,hash\n");
    }
    let mut n = 0;
    while let Some(f) = filter.as_mut() {
        f.limit = Some(5000.min(EXPORT_MAX - n));
        let rows = match state.store.audit_query(f).await {
            Ok(r) => r,
            Err(e) => return internal(e.into()),
        };
        for r in &rows {
            if csv {
                let _ = write!(out, "{},{},", r.seq, ui::rfc3339_ms(r.ts_ms));
                csv_field(&mut out, r.agent.as_deref().unwrap_or(""));
                out.push(',');
                csv_field(&mut out, &r.method);
                let _ = write!(out, ",{},", r.scheme);
                csv_field(&mut out, &r.host);
                let _ = write!(out, ",{},", r.port);
                csv_field(&mut out, &r.path);
                let _ = write!(out, ",{},{},", r.status, r.decision);
                csv_field(&mut out, r.reason.as_deref().unwrap_or(""));
                out.push(',');
                csv_field(&mut out, &r.secrets.join(" "));
                let count = |b: Option<i64>| b.map(|b| b.to_string()).unwrap_or_default();
                let _ = writeln!(
                    out,
                    ",{},{},{},{}",
                    r.duration_us,
                    count(r.bytes_up),
                    count(r.bytes_down),
                    r.hash
                );
            } else {
                let line = serde_json::json!({
                    "seq": r.seq, "ts": ui::rfc3339_ms(r.ts_ms), "agent": r.agent,
                    "method": r.method, "scheme": r.scheme, "host": r.host, "port": r.port,
                    "path": r.path, "status": r.status, "decision": r.decision,
                    "reason": r.reason, "secrets": r.secrets, "duration_us": r.duration_us,
                    "bytes_up": r.bytes_up, "bytes_down": r.bytes_down, "hash": r.hash,
                });
                out.push_str(&line.to_string());
                out.push('\n');
            }
        }
        n += rows.len() as i64;
        match rows.last() {
            Some(last) if (rows.len() as i64) == f.limit.unwrap_or(0) && n < EXPORT_MAX => {
                f.before_seq = Some(last.seq);
            }
            _ => break,
        }
    }
    let (ctype, name) = if csv {
        ("text/csv; charset=utf-8", "keygate-audit.csv")
    } else {
        ("application/x-ndjson", "keygate-audit.jsonl")
    };
    (
        [
            (header::CONTENT_TYPE, ctype.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        out,
    )
        .into_response()
}

pub async fn audit_record(
    State(state): State<AdminState>,
    Extension(s): Extension<SessionCtx>,
    Path(seq): Path<String>,
) -> Response {
    let Ok(seq) = seq.parse::<i64>() else {
        return not_found().await;
    };
    let rows = match state
        .store
        .audit_query(&AuditFilter {
            before_seq: Some(seq.saturating_add(1)),
            limit: Some(1),
            ..AuditFilter::default()
        })
        .await
    {
        Ok(r) => r,
        Err(e) => return internal(e.into()),
    };
    let Some(r) = rows.into_iter().find(|r| r.seq == seq) else {
        return not_found().await;
    };
    let body = html! {
        dl.facts id="record" {
            dt { "Sequence" } dd { (r.seq) }
            dt { "Time" } dd { (time_cell(Some(r.ts_ms))) " (" (ui::rfc3339_ms(r.ts_ms)) ")" }
            dt { "Agent" } dd { @if let Some(a) = &r.agent { a href={ "/agents/" (enc(a)) } { (a) } } @else { span.muted { "not authenticated" } } }
            dt { "Request" } dd { code { (r.method) " " (r.scheme) "://" (r.host) ":" (r.port) (r.path) } }
            dt { "Status" } dd { (r.status) }
            dt { "Decision" } dd { (decision_badge(&r.decision)) }
            dt { "Reason" } dd { (r.reason.as_deref().unwrap_or("—")) }
            dt { "Secrets injected" } dd { @if r.secrets.is_empty() { "none" } @else { (r.secrets.join(", ")) } }
            dt { "Duration" } dd { (r.duration_us) " µs" }
            @if r.bytes_up.is_some() || r.bytes_down.is_some() {
                dt { "Bytes piped" } dd { "↑ " (r.bytes_up.unwrap_or(0)) " B to the upstream, ↓ " (r.bytes_down.unwrap_or(0)) " B to the agent" }
            }
            dt { "Hash" } dd { code.hash { (r.hash) } }
            dt { "Previous hash" } dd { code.hash { (r.prev_hash) } }
        }
        p {
            a href={ "/audit?before=" (r.seq + 1) } { "Back to the log around this record" }
        }
    };
    page(
        &format!("Audit record {}", r.seq),
        Nav::Audit,
        &s.csrf,
        body,
    )
    .into_response()
}

pub async fn audit_verify(
    State(state): State<AdminState>,
    Extension(s): Extension<SessionCtx>,
) -> Response {
    let report = match state.store.audit_verify().await {
        Ok(r) => r,
        Err(e) => return internal(e.into()),
    };
    let body = html! {
        @if report.ok {
            p.notice.ok role="status" id="verify-result" { "Intact: " (report.message) "." }
        } @else {
            p.error role="alert" id="verify-result" {
                "Broken: " (report.message) "."
                @if let Some(seq) = report.first_bad_seq { " " a href={ "/audit/" (seq) } { "First bad record: " (seq) } }
            }
        }
        p.hint { "Every record carries the SHA-256 of the record before it; editing or deleting a record breaks the chain." }
        p { a href="/audit" { "Back to the audit log" } }
    };
    page("Hash chain check", Nav::Audit, &s.csrf, body).into_response()
}

// ---------------------------------------------------------------------- CA

pub async fn ca(
    State(state): State<AdminState>,
    Extension(s): Extension<SessionCtx>,
    headers: HeaderMap,
) -> Response {
    let admin = admin_base(&headers);
    let body = html! {
        p {
            "Agents must trust keygate's local CA, because keygate terminates their TLS to inject credentials. "
            "The certificate is public (no admin token needed); its private key never leaves the data dir."
        }
        p { a.button.primary href="/ca.pem" download="keygate-ca.pem" { "Download keygate-ca.pem" } }
        (copyable("ca-fetch", "download command", &format!("curl -fsS {admin}/ca.pem -o keygate-ca.pem")))
        h2 { "Install it" }
        div.snippets {
            details open { summary { "keygate run (no install)" }
                p { "keygate run writes a bundle (system roots + this CA) and points every common variable at it." } }
            details { summary { "Debian / Ubuntu" }
                (copyable("ca-debian", "Debian commands", "sudo cp keygate-ca.pem /usr/local/share/ca-certificates/keygate.crt\nsudo update-ca-certificates")) }
            details { summary { "Fedora / RHEL" }
                (copyable("ca-fedora", "Fedora commands", "sudo cp keygate-ca.pem /etc/pki/ca-trust/source/anchors/keygate.pem\nsudo update-ca-trust")) }
            details { summary { "macOS" }
                (copyable("ca-macos", "macOS command", "sudo security add-trusted-cert -d -r trustRoot \\\n  -k /Library/Keychains/System.keychain keygate-ca.pem")) }
            details { summary { "Windows" }
                (copyable("ca-windows", "Windows command", "certutil -addstore -f Root keygate-ca.pem")) }
            details { summary { "Python (requests, httpx, openai)" }
                (copyable("ca-python", "Python variables", "cat \"$(python3 -m certifi)\" keygate-ca.pem > bundle.pem\nexport REQUESTS_CA_BUNDLE=$PWD/bundle.pem SSL_CERT_FILE=$PWD/bundle.pem")) }
            details { summary { "Node.js" }
                (copyable("ca-node", "Node variable", "export NODE_EXTRA_CA_CERTS=$PWD/keygate-ca.pem")) }
            details { summary { "curl, git, Go, AWS" }
                (copyable("ca-misc", "variables", "curl --cacert keygate-ca.pem …\nexport GIT_SSL_CAINFO=$PWD/bundle.pem\nexport SSL_CERT_FILE=$PWD/bundle.pem   # Go\nexport AWS_CA_BUNDLE=$PWD/bundle.pem")) }
            details { summary { "Java" }
                (copyable("ca-java", "keytool command", "keytool -importcert -noprompt -alias keygate -file keygate-ca.pem \\\n  -keystore \"$JAVA_HOME/lib/security/cacerts\" -storepass changeit")) }
            details { summary { "Docker" }
                (copyable("ca-docker", "Dockerfile lines", "COPY keygate-ca.pem /usr/local/share/ca-certificates/keygate.crt\nRUN update-ca-certificates")) }
        }
        h2 { "Certificate" }
        (copyable("ca-pem", "CA certificate", state.ca_pem.as_str()))
    };
    page("CA certificate", Nav::Ca, &s.csrf, body).into_response()
}
