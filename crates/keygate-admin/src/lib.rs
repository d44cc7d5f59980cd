//! The admin side of keygate on :10254: the REST API under `/api/v1`
//! (bearer admin token, used by the CLI), the web dashboard (session cookie
//! after signing in with the admin token or password, CSRF token on every
//! form), `GET /healthz` and the public `GET /ca.pem`.
//!
//! Layout: [`api`] holds the REST handlers, [`pages`] the dashboard pages,
//! [`auth`] sign-in, sessions and CSRF, [`ops`] the operations both share,
//! [`ui`] the page layout. Every route is registered through [`RouteTable`],
//! which records it so that a test can check the sign-in wall of each.
#![forbid(unsafe_code)]

mod api;
mod auth;
mod ops;
mod pages;
mod ui;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put, MethodRouter};
use axum::{Json, Router};
use keygate_store::{Store, StoreError};
use serde_json::json;
use zeroize::Zeroizing;

pub use auth::{Sessions, SESSION_COOKIE};
pub use ops::MIN_PASSWORD_LEN;

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    pub store: Store,
    pub admin_token: Arc<Zeroizing<String>>,
    pub ca_pem: Arc<String>,
    /// The proxy address agents use, shown in the dashboard's snippets.
    pub proxy_addr: Option<String>,
    /// Mark the session cookie `Secure` (set when served over TLS).
    pub secure_cookies: bool,
    /// Dashboard sessions (in memory; a restart signs everyone out).
    pub sessions: Sessions,
}

impl AdminState {
    pub fn new(store: Store, admin_token: Zeroizing<String>, ca_pem: String) -> AdminState {
        AdminState {
            store,
            admin_token: Arc::new(admin_token),
            ca_pem: Arc::new(ca_pem),
            proxy_addr: None,
            secure_cookies: false,
            sessions: Sessions::default(),
        }
    }

    /// Sets the proxy address shown in the "connect an agent" snippets.
    pub fn with_proxy_addr(mut self, addr: impl Into<String>) -> AdminState {
        self.proxy_addr = Some(addr.into());
        self
    }
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

    fn internal(message: impl Into<String>) -> ApiError {
        let message = message.into();
        tracing::error!(error = %message, "admin internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
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

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: health, the CA certificate, the sign-in page, static assets.
    Public,
    /// `Authorization: Bearer <admin token>`; 401 JSON otherwise.
    AdminToken,
    /// A dashboard session; the sign-in page otherwise. Unsafe methods also
    /// need the session's CSRF token.
    Session,
}

/// One registered route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    pub access: Access,
    pub method: &'static str,
    /// The full path as registered, e.g. `/api/v1/secrets/{name}`.
    pub path: String,
}

/// Builds a router out of three groups while recording every route.
struct RouteTable {
    public: Router<AdminState>,
    api: Router<AdminState>,
    pages: Router<AdminState>,
    list: Vec<RouteInfo>,
}

impl RouteTable {
    fn new() -> RouteTable {
        RouteTable {
            public: Router::new(),
            api: Router::new(),
            pages: Router::new(),
            list: Vec::new(),
        }
    }

    fn add(
        &mut self,
        access: Access,
        path: &'static str,
        methods: &[&'static str],
        handler: MethodRouter<AdminState>,
    ) -> &mut RouteTable {
        let full = match access {
            Access::AdminToken => format!("/api/v1{path}"),
            _ => path.to_string(),
        };
        for m in methods {
            self.list.push(RouteInfo {
                access,
                method: m,
                path: full.clone(),
            });
        }
        let r = match access {
            Access::Public => &mut self.public,
            Access::AdminToken => &mut self.api,
            Access::Session => &mut self.pages,
        };
        *r = std::mem::take(r).route(path, handler);
        self
    }
}

fn table() -> RouteTable {
    use Access::{AdminToken as A, Public as P, Session as S};
    let mut t = RouteTable::new();
    t.add(
        P,
        "/healthz",
        &["GET"],
        get(|| async { Json(json!({"status": "ok"})) }),
    )
    .add(P, "/ca.pem", &["GET"], get(api::ca_pem))
    .add(
        P,
        "/login",
        &["GET", "POST"],
        get(auth::login_page).post(auth::login),
    )
    .add(P, "/assets/app.css", &["GET"], get(ui::css))
    .add(P, "/assets/app.js", &["GET"], get(ui::js));

    t.add(
        A,
        "/secrets",
        &["GET", "POST"],
        get(api::list_secrets).post(api::add_secret),
    )
    .add(
        A,
        "/secrets/{name}",
        &["GET", "DELETE"],
        get(api::get_secret).delete(api::remove_secret),
    )
    .add(
        A,
        "/secrets/{name}/rotate",
        &["POST"],
        post(api::rotate_secret),
    )
    .add(
        A,
        "/agents",
        &["GET", "POST"],
        get(api::list_agents).post(api::create_agent),
    )
    .add(
        A,
        "/agents/{name}",
        &["GET", "DELETE"],
        get(api::get_agent).delete(api::remove_agent),
    )
    .add(
        A,
        "/agents/{name}/token",
        &["POST"],
        post(api::regenerate_token),
    )
    .add(
        A,
        "/agents/{name}/disable",
        &["POST"],
        post(api::disable_agent),
    )
    .add(
        A,
        "/agents/{name}/enable",
        &["POST"],
        post(api::enable_agent),
    )
    .add(
        A,
        "/agents/{name}/grants/{secret}",
        &["PUT", "DELETE"],
        put(api::grant).delete(api::revoke),
    )
    .add(A, "/audit", &["GET"], get(api::audit))
    .add(A, "/audit/verify", &["GET"], get(api::audit_verify))
    .add(A, "/ca", &["GET"], get(api::ca_json))
    .add(A, "/admin/password", &["PUT"], put(api::set_password))
    .add(A, "/key/rotate", &["POST"], post(api::rotate_master_key));

    t.add(S, "/", &["GET"], get(pages::overview))
        .add(S, "/key/rotate", &["POST"], post(pages::rotate_master_key))
        .add(S, "/logout", &["POST"], post(auth::logout))
        .add(
            S,
            "/secrets",
            &["GET", "POST"],
            get(pages::secrets).post(pages::add_secret),
        )
        .add(S, "/secrets/{name}", &["GET"], get(pages::secret))
        .add(
            S,
            "/secrets/{name}/rotate",
            &["POST"],
            post(pages::rotate_secret),
        )
        .add(
            S,
            "/secrets/{name}/delete",
            &["GET", "POST"],
            get(pages::confirm_delete_secret).post(pages::delete_secret),
        )
        .add(
            S,
            "/agents",
            &["GET", "POST"],
            get(pages::agents).post(pages::create_agent),
        )
        .add(S, "/agents/{name}", &["GET"], get(pages::agent))
        .add(S, "/agents/{name}/grants", &["POST"], post(pages::grant))
        .add(
            S,
            "/agents/{name}/grants/{secret}/revoke",
            &["POST"],
            post(pages::revoke),
        )
        .add(
            S,
            "/agents/{name}/token",
            &["POST"],
            post(pages::regenerate_token),
        )
        .add(
            S,
            "/agents/{name}/disable",
            &["POST"],
            post(pages::disable_agent),
        )
        .add(
            S,
            "/agents/{name}/enable",
            &["POST"],
            post(pages::enable_agent),
        )
        .add(
            S,
            "/agents/{name}/delete",
            &["GET", "POST"],
            get(pages::confirm_delete_agent).post(pages::delete_agent),
        )
        .add(S, "/audit", &["GET"], get(pages::audit))
        .add(S, "/audit/rows", &["GET"], get(pages::audit_rows))
        .add(S, "/audit/export", &["GET"], get(pages::audit_export))
        .add(S, "/audit/verify", &["GET"], get(pages::audit_verify))
        .add(S, "/audit/{seq}", &["GET"], get(pages::audit_record))
        .add(S, "/ca", &["GET"], get(pages::ca));
    t
}

/// Every route the admin listener serves, with who may call it.
pub fn routes() -> Vec<RouteInfo> {
    table().list
}

/// The whole admin router.
pub fn router(state: AdminState) -> Router {
    let t = table();
    let api = t
        .api
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin_token,
        ))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such API route")
        });
    let pages = t.pages.route_layer(middleware::from_fn_with_state(
        state.clone(),
        auth::require_session,
    ));
    Router::new()
        .merge(t.public)
        .merge(pages)
        .nest("/api/v1", api)
        .fallback(pages::not_found)
        .layer(middleware::from_fn(ui::security_headers))
        .with_state(state)
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
