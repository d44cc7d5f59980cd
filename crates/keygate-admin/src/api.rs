//! The REST API under `/api/v1` (bearer admin token), used by the CLI and
//! by scripts. The dashboard calls the same [`Store`](keygate_store::Store)
//! operations through [`crate::ops`].

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use zeroize::Zeroizing;

use crate::{ops, AdminState, ApiResult};

pub(crate) async fn ca_pem(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        state.ca_pem.as_str().to_string(),
    )
}

pub(crate) async fn ca_json(State(state): State<AdminState>) -> impl IntoResponse {
    Json(json!({ "pem": state.ca_pem.as_str() }))
}

#[derive(Deserialize)]
pub(crate) struct AddSecret {
    name: String,
    host: String,
    path: Option<String>,
    header: Option<String>,
    format: Option<String>,
    value: String,
}

pub(crate) async fn add_secret(
    State(state): State<AdminState>,
    Json(body): Json<AddSecret>,
) -> ApiResult<impl IntoResponse> {
    let value = Zeroizing::new(body.value.into_bytes());
    let info = ops::add_secret(
        &state.store,
        ops::SecretSpec {
            name: body.name,
            host: body.host,
            path: body.path,
            header: body.header,
            format: body.format,
        },
        value,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(info)))
}

#[derive(Deserialize)]
pub(crate) struct RotateSecret {
    value: String,
}

pub(crate) async fn rotate_secret(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    Json(body): Json<RotateSecret>,
) -> ApiResult<impl IntoResponse> {
    let value = Zeroizing::new(body.value.into_bytes());
    Ok(Json(state.store.rotate_secret(&name, value).await?))
}

pub(crate) async fn list_secrets(State(state): State<AdminState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.store.list_secrets().await?))
}

pub(crate) async fn get_secret(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.store.secret(&name).await?))
}

pub(crate) async fn remove_secret(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    state.store.remove_secret(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub(crate) struct CreateAgent {
    name: String,
    #[serde(default)]
    grants: Vec<String>,
}

pub(crate) async fn create_agent(
    State(state): State<AdminState>,
    Json(body): Json<CreateAgent>,
) -> ApiResult<impl IntoResponse> {
    let (agent, token) = state.store.create_agent(&body.name, &body.grants).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "agent": agent, "token": token })),
    ))
}

pub(crate) async fn list_agents(State(state): State<AdminState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.store.list_agents().await?))
}

pub(crate) async fn get_agent(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.store.agent(&name).await?))
}

pub(crate) async fn remove_agent(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    state.store.remove_agent(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn disable_agent(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    state.store.set_agent_disabled(&name, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn enable_agent(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    state.store.set_agent_disabled(&name, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn regenerate_token(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let token = state.store.regenerate_token(&name).await?;
    Ok(Json(json!({ "token": token })))
}

pub(crate) async fn grant(
    State(state): State<AdminState>,
    Path((name, secret)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    state.store.grant(&name, &secret).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn revoke(
    State(state): State<AdminState>,
    Path((name, secret)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    state.store.revoke(&name, &secret).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub(crate) struct AuditParams {
    agent: Option<String>,
    decision: Option<String>,
    host: Option<String>,
    before: Option<i64>,
    after: Option<i64>,
    since_ms: Option<i64>,
    limit: Option<i64>,
}

pub(crate) async fn audit(
    State(state): State<AdminState>,
    Query(p): Query<AuditParams>,
) -> ApiResult<impl IntoResponse> {
    ops::check_decision(p.decision.as_deref())?;
    let filter = keygate_store::AuditFilter {
        agent: p.agent,
        decision: p.decision,
        host: p.host,
        before_seq: p.before,
        after_seq: p.after,
        since_ms: p.since_ms,
        limit: p.limit,
    };
    Ok(Json(state.store.audit_query(&filter).await?))
}

pub(crate) async fn audit_verify(State(state): State<AdminState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.store.audit_verify().await?))
}

#[derive(Deserialize)]
pub(crate) struct SetPassword {
    password: String,
}

/// `PUT /api/v1/admin/password`: sets the dashboard's admin password
/// (stored as an argon2id hash; the admin token keeps working).
pub(crate) async fn set_password(
    State(state): State<AdminState>,
    Json(body): Json<SetPassword>,
) -> ApiResult<impl IntoResponse> {
    let password = Zeroizing::new(body.password);
    ops::set_admin_password(&state.store, password).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/key/rotate`: re-wraps every data key under a new master key
/// and replaces the key file (`keygate key rotate`). Answers key ids only.
/// 409 `conflict` when the key comes from `KEYGATE_MASTER_KEY` (nothing is
/// changed).
pub(crate) async fn rotate_master_key(
    State(state): State<AdminState>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.store.rotate_master_key().await?))
}
