//! The admin API on :10254: REST under `/api/v1` (bearer admin token),
//! `GET /healthz` and the public `GET /ca.pem`. It changes state only
//! through the [`Store`], which republishes the gateway's snapshot before
//! each call returns.
#![forbid(unsafe_code)]

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use keygate_store::{AuditFilter, NewSecret, Store, StoreError};
use serde::Deserialize;
use serde_json::json;
use zeroize::Zeroizing;

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    pub store: Store,
    pub admin_token: Arc<Zeroizing<String>>,
    pub ca_pem: Arc<String>,
}

/// An API error: JSON `{"error":{"code","message"}}` with a fitting status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let (status, code) = match &e {
            StoreError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            StoreError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            StoreError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "admin API internal error");
        }
        ApiError::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The whole admin router.
pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/secrets", get(list_secrets).post(add_secret))
        .route("/secrets/{name}", get(get_secret).delete(remove_secret))
        .route("/secrets/{name}/rotate", post(rotate_secret))
        .route("/agents", get(list_agents).post(create_agent))
        .route("/agents/{name}", get(get_agent).delete(remove_agent))
        .route("/agents/{name}/token", post(regenerate_token))
        .route("/agents/{name}/grants/{secret}", put(grant).delete(revoke))
        .route("/audit", get(audit))
        .route("/audit/verify", get(audit_verify))
        .route("/ca", get(ca_json))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such API route")
        });
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ca.pem", get(ca_pem))
        .nest("/api/v1", api)
        .with_state(state)
}

async fn require_admin(
    State(state): State<AdminState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match presented {
        Some(t) if keygate_vault::ct_eq(t.as_bytes(), state.admin_token.as_bytes()) => {
            next.run(req).await
        }
        _ => {
            let mut resp = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "admin token required: Authorization: Bearer <token from the data dir's admin-token file>",
            )
            .into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"keygate\""),
            );
            resp
        }
    }
}

async fn ca_pem(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        state.ca_pem.as_str().to_string(),
    )
}

async fn ca_json(State(state): State<AdminState>) -> impl IntoResponse {
    Json(json!({ "pem": state.ca_pem.as_str() }))
}

#[derive(Deserialize)]
struct AddSecret {
    name: String,
    host: String,
    path: Option<String>,
    header: Option<String>,
    format: Option<String>,
    value: String,
}

async fn add_secret(
    State(state): State<AdminState>,
    Json(body): Json<AddSecret>,
) -> ApiResult<impl IntoResponse> {
    let value = Zeroizing::new(body.value.into_bytes());
    let info = state
        .store
        .add_secret(NewSecret {
            name: body.name,
            host: body.host,
            path: body.path.unwrap_or_else(|| "*".into()),
            header: body.header.unwrap_or_else(|| "Authorization".into()),
            format: body.format.unwrap_or_else(|| "Bearer {secret}".into()),
            value,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(info)))
}

#[derive(Deserialize)]
struct RotateSecret {
    value: String,
}

async fn rotate_secret(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    Json(body): Json<RotateSecret>,
) -> ApiResult<impl IntoResponse> {
    let value = Zeroizing::new(body.value.into_bytes());
    Ok(Json(state.store.rotate_secret(&name, value).await?))
}

async fn list_secrets(State(state): State<AdminState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.store.list_secrets().await?))
}

async fn get_secret(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.store.secret(&name).await?))
}

async fn remove_secret(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    state.store.remove_secret(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct CreateAgent {
    name: String,
    #[serde(default)]
    grants: Vec<String>,
}

async fn create_agent(
    State(state): State<AdminState>,
    Json(body): Json<CreateAgent>,
) -> ApiResult<impl IntoResponse> {
    let (agent, token) = state.store.create_agent(&body.name, &body.grants).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "agent": agent, "token": token })),
    ))
}

async fn list_agents(State(state): State<AdminState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.store.list_agents().await?))
}

async fn get_agent(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.store.agent(&name).await?))
}

async fn remove_agent(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    state.store.remove_agent(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn regenerate_token(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let token = state.store.regenerate_token(&name).await?;
    Ok(Json(json!({ "token": token })))
}

async fn grant(
    State(state): State<AdminState>,
    Path((name, secret)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    state.store.grant(&name, &secret).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn revoke(
    State(state): State<AdminState>,
    Path((name, secret)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    state.store.revoke(&name, &secret).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct AuditParams {
    agent: Option<String>,
    decision: Option<String>,
    host: Option<String>,
    before: Option<i64>,
    after: Option<i64>,
    since_ms: Option<i64>,
    limit: Option<i64>,
}

async fn audit(
    State(state): State<AdminState>,
    Query(p): Query<AuditParams>,
) -> ApiResult<impl IntoResponse> {
    if let Some(d) = &p.decision {
        if keygate_core::Decision::parse(d).is_none() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                "decision must be injected, passthrough, denied or error",
            ));
        }
    }
    let filter = AuditFilter {
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

async fn audit_verify(State(state): State<AdminState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.store.audit_verify().await?))
}

/// Serves the admin router on a bound listener until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
