//! Who may call what: the bearer admin token for `/api/v1`, and for the
//! dashboard a session cookie (HttpOnly, SameSite=Strict, Secure over TLS)
//! obtained by signing in with the admin token or the admin password, plus a
//! per-session CSRF token on every state-changing request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use keygate_core::now_ms;
use zeroize::Zeroizing;

use crate::{ops, ui, AdminState, ApiError};

/// Name of the dashboard's session cookie.
pub const SESSION_COOKIE: &str = "keygate_session";
/// A session ends this long after sign-in, whatever happens.
const ABSOLUTE_TTL_MS: i64 = 12 * 3600 * 1000;
/// A session ends after this long without a request.
const IDLE_TTL_MS: i64 = 3600 * 1000;
/// At most this many live sessions; the oldest go first.
const MAX_SESSIONS: usize = 1000;
/// Largest form body the CSRF check reads.
const MAX_FORM_BYTES: usize = 256 * 1024;

#[derive(Clone)]
struct Session {
    csrf: String,
    created_ms: i64,
    last_ms: i64,
}

/// The live dashboard sessions, keyed by the (random, 256-bit) session id.
#[derive(Clone, Default)]
pub struct Sessions {
    inner: Arc<Mutex<HashMap<String, Session>>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a session; returns its id.
    pub fn create(&self) -> String {
        let id = hex::encode(rand::random::<[u8; 32]>());
        let csrf = hex::encode(rand::random::<[u8; 32]>());
        let now = now_ms();
        let mut map = self.lock();
        map.retain(|_, s| alive(s, now));
        while map.len() >= MAX_SESSIONS {
            let oldest = map
                .iter()
                .min_by_key(|(_, s)| s.created_ms)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
        map.insert(
            id.clone(),
            Session {
                csrf,
                created_ms: now,
                last_ms: now,
            },
        );
        id
    }

    /// The CSRF token of a live session, refreshing its idle timer.
    fn touch(&self, id: &str) -> Option<String> {
        let now = now_ms();
        let mut map = self.lock();
        match map.get_mut(id) {
            Some(s) if alive(s, now) => {
                s.last_ms = now;
                Some(s.csrf.clone())
            }
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    fn end(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Number of live sessions (for tests).
    pub fn len(&self) -> usize {
        let now = now_ms();
        self.lock().values().filter(|s| alive(s, now)).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ages every session by `ms` (for expiry tests).
    #[doc(hidden)]
    pub fn age_all(&self, ms: i64) {
        for s in self.lock().values_mut() {
            s.created_ms -= ms;
            s.last_ms -= ms;
        }
    }
}

fn alive(s: &Session, now: i64) -> bool {
    now - s.created_ms < ABSOLUTE_TTL_MS && now - s.last_ms < IDLE_TTL_MS
}

/// What an authenticated page request knows about its session.
#[derive(Clone)]
pub struct SessionCtx {
    pub csrf: String,
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn session_cookie(state: &AdminState, id: &str, max_age_s: i64) -> HeaderValue {
    let secure = if state.secure_cookies { "; Secure" } else { "" };
    let v = format!(
        "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}"
    );
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `/api/v1`: `Authorization: Bearer <admin token>` or 401.
pub async fn require_admin_token(
    State(state): State<AdminState>,
    req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
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
                HeaderValue::from_static("Bearer realm=\"keygate\""),
            );
            resp
        }
    }
}

fn is_safe(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD)
}

/// Dashboard pages: a live session, else the sign-in page (a 303 to
/// `/login` for page loads, 401 for scripted requests). Unsafe methods also
/// need a same-origin request carrying the session's CSRF token, as the
/// `csrf` form field or an `x-csrf-token` header.
pub async fn require_session(
    State(state): State<AdminState>,
    req: Request,
    next: Next,
) -> Response {
    let csrf = cookie(req.headers(), SESSION_COOKIE).and_then(|id| state.sessions.touch(id));
    let Some(csrf) = csrf else {
        return sign_in_required(&req);
    };
    let req = if is_safe(req.method()) {
        req
    } else {
        match check_csrf(req, &csrf).await {
            Ok(req) => req,
            Err(resp) => return resp,
        }
    };
    let mut req = req;
    req.extensions_mut().insert(SessionCtx { csrf });
    let mut resp = next.run(req).await;
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn sign_in_required(req: &Request) -> Response {
    let scripted = req.headers().get("x-requested-with").is_some() || !is_safe(req.method());
    if scripted {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::CACHE_CONTROL, "no-store")],
            "sign in required",
        )
            .into_response();
    }
    Redirect::to("/login").into_response()
}

fn forbidden(msg: &'static str) -> Response {
    (
        StatusCode::FORBIDDEN,
        ui::error_page("Request refused", msg),
    )
        .into_response()
}

/// Same-origin check (when the browser says where the request came from)
/// and the CSRF token, from a header or the urlencoded body.
async fn check_csrf(req: Request, expected: &str) -> Result<Request, Response> {
    let (parts, body) = req.into_parts();
    if let Some(origin) = parts.headers.get(header::ORIGIN) {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let origin = origin.to_str().unwrap_or("");
        let same = origin
            .split_once("://")
            .map(|(_, rest)| rest == host)
            .unwrap_or(false);
        if !same {
            return Err(forbidden("cross-origin form submissions are refused"));
        }
    }
    let from_header = parts
        .headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| forbidden("the form is too large"))?;
    let presented = match from_header {
        Some(t) => Some(t),
        None => serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
            .ok()
            .and_then(|pairs| pairs.into_iter().find(|(k, _)| k == "csrf").map(|(_, v)| v)),
    };
    match presented {
        Some(t) if keygate_vault::ct_eq(t.as_bytes(), expected.as_bytes()) => {
            Ok(Request::from_parts(parts, Body::from(bytes)))
        }
        _ => Err(forbidden(
            "the form's security token is missing or stale: reload the page and try again",
        )),
    }
}

pub async fn login_page(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if cookie(&headers, SESSION_COOKIE)
        .and_then(|id| state.sessions.touch(id))
        .is_some()
    {
        return Redirect::to("/").into_response();
    }
    let has_password = matches!(state.store.admin_password_hash().await, Ok(Some(_)));
    ui::login_page(None, has_password).into_response()
}

#[derive(serde::Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    credential: String,
}

pub async fn login(State(state): State<AdminState>, Form(form): Form<LoginForm>) -> Response {
    let credential = Zeroizing::new(form.credential);
    let presented = credential.trim();
    let ok = (!presented.is_empty()
        && keygate_vault::ct_eq(presented.as_bytes(), state.admin_token.as_bytes()))
        || (!presented.is_empty()
            && ops::verify_admin_password(&state.store, Zeroizing::new(credential.to_string()))
                .await);
    if !ok {
        tracing::warn!("dashboard sign-in failed");
        // Slow down guessing a little; the token has 256 bits anyway.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let has_password = matches!(state.store.admin_password_hash().await, Ok(Some(_)));
        return (
            StatusCode::UNAUTHORIZED,
            ui::login_page(
                Some("That is not the admin token or password."),
                has_password,
            ),
        )
            .into_response();
    }
    let id = state.sessions.create();
    tracing::info!("dashboard sign-in");
    let mut resp = Redirect::to("/").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(&state, &id, ABSOLUTE_TTL_MS / 1000),
    );
    resp
}

pub async fn logout(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        state.sessions.end(id);
    }
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&state, "", 0));
    resp
}
