//! In-process handler tests (tower `oneshot`): the sign-in wall of every
//! route, sessions, CSRF, form validation and that secret values never come
//! back out.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use keygate_admin::{routes, Access, AdminState};
use keygate_store::Store;
use keygate_vault::{MasterKey, Vault};
use tower::ServiceExt;
use zeroize::Zeroizing;

const TOKEN: &str = "kg_admin_test_token_0123456789abcdef";
const VALUE: &str = "sk-live-VALUE-must-never-leak-7781";

struct App {
    state: AdminState,
    _dir: tempfile::TempDir,
}

async fn app() -> App {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("kg.db").display());
    let store = Store::open(&url, Arc::new(Vault::new(MasterKey::generate())))
        .await
        .expect("store");
    let state = AdminState::new(store, Zeroizing::new(TOKEN.into()), "PEM".into())
        .with_proxy_addr("127.0.0.1:10255");
    App { state, _dir: dir }
}

impl App {
    fn router(&self) -> Router {
        keygate_admin::router(self.state.clone())
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
        let resp = self.router().oneshot(req).await.expect("response");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    async fn login(&self) -> (String, String) {
        let (status, headers, _) = self
            .send(form_req("/login", None, &format!("credential={TOKEN}")))
            .await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        let cookie = headers
            .get(header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .expect("set-cookie")
            .to_string();
        let pair = cookie.split(';').next().expect("pair").to_string();
        let (_, _, page) = self.send(get_req("/", Some(&pair))).await;
        (pair, csrf_of(&page))
    }
}

fn get_req(path: &str, cookie: Option<&str>) -> Request<Body> {
    let mut b = Request::get(path).header(header::HOST, "127.0.0.1:10254");
    if let Some(c) = cookie {
        b = b.header(header::COOKIE, c);
    }
    b.body(Body::empty()).expect("request")
}

fn form_req(path: &str, cookie: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::post(path)
        .header(header::HOST, "127.0.0.1:10254")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        b = b.header(header::COOKIE, c);
    }
    b.body(Body::from(body.to_string())).expect("request")
}

fn csrf_of(page: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = page.find(marker).expect("csrf field") + marker.len();
    page[start..].split('"').next().expect("csrf").to_string()
}

fn concrete(path: &str) -> String {
    path.replace("{name}", "bot")
        .replace("{secret}", "openai")
        .replace("{seq}", "1")
}

async fn seed(app: &App) {
    app.state
        .store
        .add_secret(keygate_store::NewSecret {
            name: "openai".into(),
            host: "api.openai.com".into(),
            path: "*".into(),
            header: "Authorization".into(),
            format: "Bearer {secret}".into(),
            value: Zeroizing::new(VALUE.as_bytes().to_vec()),
        })
        .await
        .expect("secret");
    app.state
        .store
        .create_agent("bot", &["openai".into()])
        .await
        .expect("agent");
}

#[tokio::test]
async fn every_route_is_behind_the_sign_in_wall() {
    let app = app().await;
    seed(&app).await;
    let all = routes();
    // The public surface is exactly this; adding a public route must be a
    // deliberate change to this list.
    let mut public: Vec<String> = all
        .iter()
        .filter(|r| r.access == Access::Public)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    public.sort();
    assert_eq!(
        public,
        [
            "GET /assets/app.css",
            "GET /assets/app.js",
            "GET /ca.pem",
            "GET /healthz",
            "GET /login",
            "POST /login",
        ]
    );
    assert!(all.iter().any(|r| r.access == Access::Session));
    assert!(all.iter().any(|r| r.access == Access::AdminToken));
    for r in all.iter().filter(|r| r.access != Access::Public) {
        let path = concrete(&r.path);
        for cookie in [None, Some("keygate_session=forged0123")] {
            let mut b = Request::builder()
                .method(r.method)
                .uri(&path)
                .header(header::HOST, "127.0.0.1:10254")
                .header(header::CONTENT_TYPE, "application/json");
            if let Some(c) = cookie {
                b = b.header(header::COOKIE, c);
            }
            // A request that would succeed if the wall were missing.
            let body = match r.method {
                "POST" | "PUT" => r#"{"name":"x1","host":"a.test","value":"v","password":"p"}"#,
                _ => "",
            };
            let (status, headers, text) =
                app.send(b.body(Body::from(body)).expect("request")).await;
            let what = format!("{} {path} (cookie {cookie:?})", r.method);
            match (r.access, r.method) {
                (Access::AdminToken, _) | (Access::Session, "POST") => {
                    assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
                }
                _ => {
                    assert_eq!(status, StatusCode::SEE_OTHER, "{what}");
                    assert_eq!(
                        headers.get(header::LOCATION).and_then(|v| v.to_str().ok()),
                        Some("/login"),
                        "{what}"
                    );
                }
            }
            assert!(!text.contains("api.openai.com"), "{what} leaked data");
            assert!(!text.contains("bot"), "{what} leaked data");
        }
        // The admin token is for the API; it does not open the pages.
        if r.access == Access::Session {
            let req = Request::builder()
                .method(r.method)
                .uri(&path)
                .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                .body(Body::empty())
                .expect("request");
            let (status, _, _) = app.send(req).await;
            assert!(
                status == StatusCode::SEE_OTHER || status == StatusCode::UNAUTHORIZED,
                "{} {path} with a bearer token: {status}",
                r.method
            );
        }
    }
    // Nothing was created by the refused requests.
    assert_eq!(app.state.store.list_secrets().await.expect("list").len(), 1);
    assert_eq!(app.state.store.list_agents().await.expect("list").len(), 1);
}

#[tokio::test]
async fn sign_in_sets_a_strict_cookie_and_sign_out_ends_the_session() {
    let app = app().await;
    let (status, _, body) = app.send(form_req("/login", None, "credential=wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("not the admin token"));

    let (status, headers, _) = app
        .send(form_req("/login", None, &format!("credential={TOKEN}")))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = headers
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("cookie");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    assert!(!cookie.contains(TOKEN));

    let (pair, csrf) = app.login().await;
    let (status, headers, page) = app.send(get_req("/", Some(&pair))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("Connect an agent"));
    assert!(page.contains("127.0.0.1:10255"));
    assert_eq!(
        headers
            .get(header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    assert!(headers.contains_key(header::CONTENT_SECURITY_POLICY));

    // Sign-out needs the CSRF token too.
    let (status, _, _) = app.send(form_req("/logout", Some(&pair), "")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = app
        .send(form_req("/logout", Some(&pair), &format!("csrf={csrf}")))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, _, _) = app.send(get_req("/", Some(&pair))).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "session ended");
}

#[tokio::test]
async fn sessions_expire() {
    let app = app().await;
    let (pair, _) = app.login().await;
    app.state.sessions.age_all(2 * 3600 * 1000);
    let (status, headers, _) = app.send(get_req("/secrets", Some(&pair))).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(
        headers.get(header::LOCATION).and_then(|v| v.to_str().ok()),
        Some("/login")
    );
}

#[tokio::test]
async fn secure_cookie_over_tls() {
    let mut app = app().await;
    app.state.secure_cookies = true;
    let (_, headers, _) = app
        .send(form_req("/login", None, &format!("credential={TOKEN}")))
        .await;
    let cookie = headers
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("cookie");
    assert!(cookie.contains("; Secure"), "{cookie}");
}

#[tokio::test]
async fn forms_need_the_csrf_token_and_same_origin() {
    let app = app().await;
    let (pair, csrf) = app.login().await;
    let body = format!("name=gh&host=api.github.com&value={VALUE}");
    let (status, _, page) = app.send(form_req("/secrets", Some(&pair), &body)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(!page.contains(VALUE));
    let (status, _, _) = app
        .send(form_req(
            "/secrets",
            Some(&pair),
            &format!("{body}&csrf=deadbeef"),
        ))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Right token, wrong origin.
    let mut req = form_req("/secrets", Some(&pair), &format!("{body}&csrf={csrf}"));
    req.headers_mut().insert(
        header::ORIGIN,
        "http://evil.example".parse().expect("origin"),
    );
    let (status, _, _) = app.send(req).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(app
        .state
        .store
        .list_secrets()
        .await
        .expect("list")
        .is_empty());
    // Another session's token does not work either.
    let (_, other_csrf) = app.login().await;
    assert_ne!(other_csrf, csrf);
    let (status, _, _) = app
        .send(form_req(
            "/secrets",
            Some(&pair),
            &format!("{body}&csrf={other_csrf}"),
        ))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let mut req = form_req("/secrets", Some(&pair), &format!("{body}&csrf={csrf}"));
    req.headers_mut().insert(
        header::ORIGIN,
        "http://127.0.0.1:10254".parse().expect("origin"),
    );
    let (status, headers, _) = app.send(req).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let location = headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .expect("location");
    assert!(!location.contains(VALUE));
    assert_eq!(app.state.store.list_secrets().await.expect("list").len(), 1);
}

#[tokio::test]
async fn validation_errors_sit_next_to_their_field_and_never_echo_the_value() {
    let app = app().await;
    seed(&app).await;
    let (pair, csrf) = app.login().await;
    let cases = [
        // (form, field with the error, status)
        (
            format!("name=bad&host=exa%20mple..com&value={VALUE}"),
            "host",
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("name=bad&host=api.x.test&path=v1&value={VALUE}"),
            "path",
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("name=bad&host=api.x.test&header=Host&value={VALUE}"),
            "header",
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("name=-bad&host=api.x.test&value={VALUE}"),
            "name",
            StatusCode::BAD_REQUEST,
        ),
        (
            "name=bad&host=api.x.test&value=".to_string(),
            "value",
            StatusCode::BAD_REQUEST,
        ),
        // Ties with the seeded secret (same host, path and header).
        (
            format!("name=other&host=api.openai.com&value={VALUE}"),
            "host",
            StatusCode::CONFLICT,
        ),
        (
            format!("name=openai&host=api.y.test&value={VALUE}"),
            "name",
            StatusCode::CONFLICT,
        ),
    ];
    for (form, field, want) in cases {
        let (status, _, page) = app
            .send(form_req(
                "/secrets",
                Some(&pair),
                &format!("{form}&csrf={csrf}"),
            ))
            .await;
        assert_eq!(status, want, "{form}");
        assert!(
            page.contains(&format!("id=\"{field}-error\"")),
            "{form}: no error next to {field}"
        );
        assert!(!page.contains(VALUE), "{form}: the value was echoed");
        // The other fields are kept.
        let name = form
            .split('&')
            .find_map(|kv| kv.strip_prefix("name="))
            .unwrap_or_default();
        assert!(
            page.contains(&format!("name=\"name\" type=\"text\" value=\"{name}\"")),
            "{form}: name not kept"
        );
    }
    assert_eq!(app.state.store.list_secrets().await.expect("list").len(), 1);
}

#[tokio::test]
async fn secret_values_never_come_back_out() {
    let app = app().await;
    seed(&app).await;
    let (pair, csrf) = app.login().await;
    let rotated = "sk-rotated-ALSO-secret-5512";
    let (status, headers, _) = app
        .send(form_req(
            "/secrets/openai/rotate",
            Some(&pair),
            &format!("value={rotated}&csrf={csrf}"),
        ))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(!format!("{headers:?}").contains(rotated));
    for path in [
        "/",
        "/secrets",
        "/secrets/openai",
        "/secrets/openai/delete",
        "/agents",
        "/agents/bot",
        "/audit",
        "/audit/export?format=csv",
        "/audit/export?format=jsonl",
        "/ca",
    ] {
        let (status, _, page) = app.send(get_req(path, Some(&pair))).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(!page.contains(VALUE) && !page.contains(rotated), "{path}");
    }
    let (_, _, page) = app.send(get_req("/secrets", Some(&pair))).await;
    assert!(page.contains("…5512"), "suffix hint shown");
}

#[tokio::test]
async fn agent_pages_create_grant_revoke_and_delete() {
    let app = app().await;
    seed(&app).await;
    let (pair, csrf) = app.login().await;
    let (status, _, page) = app
        .send(form_req(
            "/agents",
            Some(&pair),
            &format!("name=worker&grant=openai&csrf={csrf}"),
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("shown only once"));
    assert!(page.contains("id=\"agent-token\""));
    let agent = app.state.store.agent("worker").await.expect("agent");
    assert_eq!(agent.grants, ["openai"]);
    // The token is not shown again.
    let (_, _, again) = app.send(get_req("/agents/worker", Some(&pair))).await;
    assert!(!again.contains("id=\"agent-token\""));

    let (status, _, _) = app
        .send(form_req(
            "/agents/worker/grants/openai/revoke",
            Some(&pair),
            &format!("csrf={csrf}"),
        ))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(app
        .state
        .store
        .agent("worker")
        .await
        .expect("a")
        .grants
        .is_empty());
    let (status, _, _) = app
        .send(form_req(
            "/agents/worker/grants",
            Some(&pair),
            &format!("secret=openai&csrf={csrf}"),
        ))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(
        app.state.store.agent("worker").await.expect("a").grants,
        ["openai"]
    );

    // Invalid names are reported next to the field.
    let (status, _, page) = app
        .send(form_req(
            "/agents",
            Some(&pair),
            &format!("name=a%20b&csrf={csrf}"),
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(page.contains("id=\"agent-name-error\""));

    let (status, _, _) = app
        .send(form_req(
            "/agents/worker/delete",
            Some(&pair),
            &format!("csrf={csrf}"),
        ))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(app.state.store.agent("worker").await.is_err());
}

#[tokio::test]
async fn admin_password_is_argon2id_and_signs_in() {
    let app = app().await;
    let put = |body: &str, token: Option<&str>| {
        let mut b =
            Request::put("/api/v1/admin/password").header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        b.body(Body::from(body.to_string())).expect("request")
    };
    let (status, _, _) = app
        .send(put(r#"{"password":"correct horse battery"}"#, None))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, body) = app.send(put(r#"{"password":"short"}"#, Some(TOKEN))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _, _) = app
        .send(put(r#"{"password":"correct horse battery"}"#, Some(TOKEN)))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let hash = app
        .state
        .store
        .admin_password_hash()
        .await
        .expect("read")
        .expect("set");
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains("correct horse"));

    let (status, _, _) = app
        .send(form_req("/login", None, "credential=wrong+horse+battery"))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, headers, _) = app
        .send(form_req("/login", None, "credential=correct+horse+battery"))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(headers.contains_key(header::SET_COOKIE));
    // The token still works.
    app.login().await;
}

#[tokio::test]
async fn api_keeps_its_json_shapes() {
    let app = app().await;
    let req = Request::post("/api/v1/secrets")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(format!(
            r#"{{"name":"openai","host":"api.openai.com","value":"{VALUE}"}}"#
        )))
        .expect("request");
    let (status, _, body) = app.send(req).await;
    assert_eq!(status, StatusCode::CREATED);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["name"], "openai");
    assert_eq!(v["path"], "*");
    assert_eq!(v["header"], "authorization");
    assert!(!body.contains(VALUE));
    let req = Request::get("/api/v1/nope")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .expect("request");
    let (status, _, body) = app.send(req).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("not_found"));
    let (status, _, body) = app.send(get_req("/healthz", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("ok"));
    let (status, _, body) = app.send(get_req("/ca.pem", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "PEM");
}

#[tokio::test]
async fn overview_shows_the_master_key_and_rotation_needs_the_csrf_token() {
    let app = app().await;
    let (pair, csrf) = app.login().await;
    let key_id = app.state.store.vault().key_id();
    let (_, _, page) = app.send(get_req("/", Some(&pair))).await;
    assert!(page.contains("id=\"rotate-key\""), "{page}");
    assert!(page.contains(&key_id), "the overview names the master key");
    // Without the form token: refused, nothing happens.
    let (status, _, _) = app.send(form_req("/key/rotate", Some(&pair), "")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // This test's key lives only in memory: the rotation is refused with
    // the store's reason, and the key stays.
    let (status, _, page) = app
        .send(form_req(
            "/key/rotate",
            Some(&pair),
            &format!("csrf={csrf}"),
        ))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{page}");
    assert!(page.contains("cannot be rotated"), "{page}");
    assert_eq!(app.state.store.vault().key_id(), key_id);
}
