//! The dashboard in a real browser: sign in, add a secret, create an agent
//! with a grant, send a request through the gateway as that agent, find it in
//! the audit log (live tail and detail view), revoke, see the next request
//! go out without the credential, delete the agent and see it refused; plus
//! the phone layout and that no secret value reaches the page or storage.
//!
//! Needs /usr/bin/chromium and chromedriver (`bash .ci/browser.sh` installs
//! them and runs `cargo test -p browser-tests -- --ignored`). Screenshots and
//! page sources go to `target/browser-screenshots/` (always for the final
//! layouts, and for the failing step on failure).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use test_support::{Keygate, Upstream};

const SECRET: &str = "sk-browser-REAL-4c1d9e7a22";
const PASSWORD: &str = "correct horse battery staple\n";

type Res<T> = Result<T, String>;

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from("."))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn keygate_bin() -> PathBuf {
    std::env::var_os("KEYGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("debug/keygate"))
}

fn shots_dir() -> PathBuf {
    let d = target_dir().join("browser-screenshots");
    let _ = std::fs::create_dir_all(&d);
    d
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(9515)
}

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromedriver() -> Res<Driver> {
    let bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
    let port = free_port();
    let child = Command::new(&bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(err("cannot start chromedriver (install chromium-driver)"))?;
    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            return Err("chromedriver did not start listening".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Driver { child, url })
}

async fn browser(driver: &Driver, profile: &Path) -> Res<Client> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--no-proxy-server",
                "--window-size=1280,800",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .map_err(err("cannot open a Chromium session"))
}

async fn shot(c: &Client, name: &str) {
    if let Ok(png) = c.screenshot().await {
        let _ = std::fs::write(shots_dir().join(format!("{name}.png")), png);
    }
}

async fn dump(c: &Client, name: &str) {
    shot(c, name).await;
    if let Ok(src) = c.source().await {
        let _ = std::fs::write(shots_dir().join(format!("{name}.html")), src);
    }
}

/// A keygate dialing the echo upstream for api.test.
async fn world() -> (Upstream, Keygate) {
    let up = Upstream::start(&["api.test"]).await;
    let args = vec![
        "--upstream-ca".to_string(),
        up.ca_file.display().to_string(),
        "--allow-net".to_string(),
        "127.0.0.0/8".to_string(),
        "--resolve".to_string(),
        format!("api.test:443={}", up.tls_addr),
    ];
    let bin = keygate_bin();
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p keygate` first or set KEYGATE_BIN",
        bin.display()
    );
    let kg = Keygate::start(&bin, &args);
    (up, kg)
}

fn agent_client(kg: &Keygate, token: &str) -> Res<reqwest::Client> {
    let proxy =
        reqwest::Proxy::all(format!("http://agent:{token}@{}", kg.proxy)).map_err(err("proxy"))?;
    let ca = reqwest::Certificate::from_pem(kg.ca_pem().as_bytes()).map_err(err("ca"))?;
    reqwest::Client::builder()
        .proxy(proxy)
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(err("client"))
}

async fn call(kg: &Keygate, token: &str) -> Res<u16> {
    let resp = agent_client(kg, token)?
        .get("https://api.test/v1/models")
        .header("authorization", "Bearer placeholder")
        .send()
        .await
        .map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            format!("request through keygate: {msg}")
        })?;
    Ok(resp.status().as_u16())
}

fn upstream_auth(up: &Upstream) -> Option<String> {
    up.last().and_then(|s| {
        s.headers
            .iter()
            .find(|(n, _)| n == "authorization")
            .map(|(_, v)| v.clone())
    })
}

async fn text_of(c: &Client, css: &str) -> Res<String> {
    c.find(Locator::Css(css))
        .await
        .map_err(err(css))?
        .text()
        .await
        .map_err(err(css))
}

async fn fill(c: &Client, css: &str, value: &str) -> Res<()> {
    let el = c.find(Locator::Css(css)).await.map_err(err(css))?;
    el.clear().await.map_err(err(css))?;
    el.send_keys(value).await.map_err(err(css))
}

async fn click(c: &Client, css: &str) -> Res<()> {
    c.find(Locator::Css(css))
        .await
        .map_err(err(css))?
        .click()
        .await
        .map_err(err(css))
}

/// Clicks something that loads a new page and waits until it has.
async fn click_nav(c: &Client, css: &str) -> Res<()> {
    c.execute("window.__kgOld = true;", vec![])
        .await
        .map_err(err("mark page"))?;
    click(c, css).await?;
    let start = Instant::now();
    loop {
        let v = c
            .execute(
                "return window.__kgOld === undefined && document.readyState === 'complete';",
                vec![],
            )
            .await;
        if let Ok(serde_json::Value::Bool(true)) = v {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(15) {
            return Err(format!("clicking {css} did not load a page"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn h1(c: &Client) -> Res<String> {
    text_of(c, "h1").await
}

/// Reloads `url` until `css` matches (the audit writer batches).
async fn wait_on_page(c: &Client, url: &str, css: &str) -> Res<()> {
    let start = Instant::now();
    loop {
        c.goto(url).await.map_err(err(url))?;
        if c.find(Locator::Css(css)).await.is_ok() {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(15) {
            return Err(format!("{css} never appeared on {url}"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn assert_no_secret(c: &Client, where_: &str) -> Res<()> {
    let src = c.source().await.map_err(err("source"))?;
    if src.contains(SECRET) {
        return Err(format!("the secret value is in the page at {where_}"));
    }
    let storage = c
        .execute(
            "return JSON.stringify([document.cookie, Object.entries(localStorage), Object.entries(sessionStorage)]);",
            vec![],
        )
        .await
        .map_err(err("storage"))?;
    let storage = storage.as_str().unwrap_or_default().to_string();
    if storage.contains(SECRET) {
        return Err(format!(
            "the secret value is in browser storage at {where_}"
        ));
    }
    if storage.contains("keygate_session") {
        return Err("the session cookie is readable from JavaScript".into());
    }
    Ok(())
}

async fn flow(c: &Client, up: &Upstream, kg: &Keygate, step: &mut &'static str) -> Res<()> {
    let admin = kg.admin_url();

    *step = "01-sign-in-wall";
    c.goto(&format!("{admin}/secrets"))
        .await
        .map_err(err("goto"))?;
    let url = c.current_url().await.map_err(err("url"))?;
    if url.path() != "/login" {
        return Err(format!("unauthenticated /secrets went to {url}"));
    }
    fill(c, "#credential", "not-the-token").await?;
    click_nav(c, "button[type=submit]").await?;
    let e = text_of(c, "#login-error").await?;
    if !e.contains("not the admin token") {
        return Err(format!("wrong token: {e}"));
    }

    *step = "02-sign-in";
    fill(c, "#credential", &kg.admin_token()).await?;
    click_nav(c, "button[type=submit]").await?;
    if h1(c).await? != "Overview" {
        return Err("no overview after sign-in".into());
    }
    let proxy_shown = c.source().await.map_err(err("source"))?;
    if !proxy_shown.contains(&kg.proxy.to_string()) {
        return Err("the overview does not show the gateway address".into());
    }

    *step = "03-add-secret-invalid";
    click_nav(c, "nav a[href='/secrets']").await?;
    fill(c, "#name", "openai").await?;
    fill(c, "#host", "api test").await?;
    fill(c, "#path", "/v1/*").await?;
    fill(c, "#value", SECRET).await?;
    click_nav(c, "#add-secret button[type=submit]").await?;
    text_of(c, "#host-error").await?;
    let v = c
        .find(Locator::Css("#value"))
        .await
        .map_err(err("#value"))?
        .prop("value")
        .await
        .map_err(err("value"))?
        .unwrap_or_default();
    if !v.is_empty() {
        return Err("the value field was refilled after an error".into());
    }
    assert_no_secret(c, "secret form error").await?;

    *step = "04-add-secret";
    fill(c, "#host", "api.test").await?;
    fill(c, "#value", SECRET).await?;
    click_nav(c, "#add-secret button[type=submit]").await?;
    text_of(c, "tr[data-secret=openai]").await?;
    let notice = text_of(c, ".notice").await?;
    if !notice.contains("openai added") {
        return Err(format!("notice: {notice}"));
    }
    let url = c.current_url().await.map_err(err("url"))?;
    if url.as_str().contains(SECRET) {
        return Err("the value is in the URL".into());
    }
    assert_no_secret(c, "secrets list").await?;

    *step = "05-create-agent";
    click_nav(c, "nav a[href='/agents']").await?;
    fill(c, "#agent-name", "browser-bot").await?;
    click(c, "#grant-openai").await?;
    click_nav(c, "#create-agent button[type=submit]").await?;
    let token = text_of(c, "#agent-token").await?.trim().to_string();
    if token.len() < 20 {
        return Err(format!("no token shown: {token:?}"));
    }
    click(c, "button[data-copy=agent-token]").await?;
    assert_no_secret(c, "token page").await?;

    *step = "06-live-tail";
    c.goto(&format!("{admin}/audit"))
        .await
        .map_err(err("goto"))?;
    click(c, "#live").await?;

    *step = "07-proxied-request";
    let status = call(kg, &token).await?;
    if status != 200 {
        return Err(format!("proxied request answered {status}"));
    }
    if upstream_auth(up).as_deref() != Some(&format!("Bearer {SECRET}")) {
        return Err("the upstream did not get the injected credential".into());
    }

    *step = "08-audit-live-row";
    c.wait()
        .at_most(Duration::from_secs(15))
        .for_element(Locator::Css("#audit-rows tr.d-injected"))
        .await
        .map_err(err("live tail row"))?;
    let row = text_of(c, "#audit-rows tr.d-injected").await?;
    for want in [
        "browser-bot",
        "GET",
        "api.test",
        "/v1/models",
        "200",
        "injected",
        "openai",
    ] {
        if !row.contains(want) {
            return Err(format!("audit row {row:?} lacks {want}"));
        }
    }

    *step = "09-audit-detail";
    click_nav(c, "#audit-rows tr.d-injected a").await?;
    if !h1(c).await?.starts_with("Audit record") {
        return Err("no detail view".into());
    }
    let record = text_of(c, "#record").await?;
    if !record.contains("https://api.test:443/v1/models") {
        return Err(format!("detail: {record}"));
    }

    *step = "10-audit-filters";
    c.goto(&format!("{admin}/audit?decision=denied"))
        .await
        .map_err(err("goto"))?;
    if c.find(Locator::Css("tr.d-injected")).await.is_ok() {
        return Err("decision filter let an injected row through".into());
    }
    c.goto(&format!("{admin}/audit?agent=browser-bot&host=api.test"))
        .await
        .map_err(err("goto"))?;
    text_of(c, "tr.d-injected").await?;

    *step = "10b-rotate-master-key";
    c.goto(&format!("{admin}/")).await.map_err(err("goto"))?;
    let before = text_of(c, "#master-key code").await?;
    click_nav(c, "#rotate-key button[type=submit]").await?;
    let notice = text_of(c, ".notice").await?;
    let after = text_of(c, "#master-key code").await?;
    if !notice.contains("Master key rotated") || after == before || !notice.contains(&after) {
        return Err(format!(
            "rotation: notice {notice:?}, key {before:?} -> {after:?}"
        ));
    }
    // The agent's next request still gets the real key.
    up.clear();
    let status = call(kg, &token).await?;
    if status != 200 || upstream_auth(up).as_deref() != Some(&format!("Bearer {SECRET}")) {
        return Err(format!(
            "after the key rotation: status {status}, upstream saw {:?}",
            upstream_auth(up)
        ));
    }
    shot(c, "desktop-key-rotated").await;

    *step = "11-revoke";
    c.goto(&format!("{admin}/agents/browser-bot"))
        .await
        .map_err(err("goto"))?;
    click_nav(c, "li[data-grant=openai] button").await?;
    let notice = text_of(c, ".notice").await?;
    if !notice.contains("Revoked openai") {
        return Err(format!("notice: {notice}"));
    }

    *step = "12-request-after-revoke";
    up.clear();
    let status = call(kg, &token).await?;
    let auth = upstream_auth(up);
    if auth.as_deref() == Some(&format!("Bearer {SECRET}")) {
        return Err(format!(
            "after revoke the credential was still injected (status {status})"
        ));
    }
    wait_on_page(
        c,
        &format!("{admin}/audit?agent=browser-bot&decision=passthrough"),
        "tr.d-passthrough",
    )
    .await?;

    *step = "13-delete-agent";
    c.goto(&format!("{admin}/agents/browser-bot"))
        .await
        .map_err(err("goto"))?;
    click_nav(c, "a.danger").await?;
    click_nav(c, "form.confirm button.danger").await?;
    text_of(c, ".notice").await?;
    // The CONNECT is refused with 407, which reqwest reports as an error.
    match call(kg, &token).await {
        Ok(407) => {}
        Ok(status) => return Err(format!("a deleted agent's token answered {status}")),
        Err(e) if e.contains("407") || e.to_ascii_lowercase().contains("proxy auth") => {}
        Err(e) => return Err(format!("a deleted agent's request failed oddly: {e}")),
    }
    wait_on_page(c, &format!("{admin}/audit?decision=denied"), "tr.d-denied").await?;

    *step = "14-verify-and-export";
    c.goto(&format!("{admin}/audit/verify"))
        .await
        .map_err(err("goto"))?;
    let v = text_of(c, "#verify-result").await?;
    if !v.starts_with("Intact") {
        return Err(format!("hash chain: {v}"));
    }
    c.goto(&format!("{admin}/ca")).await.map_err(err("goto"))?;
    text_of(c, "a[href='/ca.pem']").await?;
    shot(c, "desktop-ca").await;

    *step = "15-desktop-layout-and-labels";
    for (path, name) in [
        ("/", "overview"),
        ("/secrets", "secrets"),
        ("/secrets/openai", "secret"),
        ("/secrets/openai/delete", "secret-delete"),
        ("/agents", "agents"),
        ("/audit", "audit"),
        ("/audit/1", "audit-record"),
        ("/ca", "ca"),
    ] {
        c.goto(&format!("{admin}{path}"))
            .await
            .map_err(err("goto"))?;
        shot(c, &format!("desktop-{name}")).await;
        assert_no_secret(c, path).await?;
        let unlabelled = c
            .execute(
                "return Array.from(document.querySelectorAll('input:not([type=hidden]), select, textarea, button')).filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim()).map(e => e.outerHTML);",
                vec![],
            )
            .await
            .map_err(err("labels"))?;
        if unlabelled.as_array().is_some_and(|a| !a.is_empty()) {
            return Err(format!("{path}: controls without a label: {unlabelled}"));
        }
    }

    *step = "16-phone-layout";
    c.set_window_size(390, 844).await.map_err(err("resize"))?;
    for (path, name) in [
        ("/", "overview"),
        ("/secrets", "secrets"),
        ("/agents", "agents"),
        ("/audit", "audit"),
        ("/ca", "ca"),
    ] {
        c.goto(&format!("{admin}{path}"))
            .await
            .map_err(err("goto"))?;
        let dims = c
            .execute(
                "return [window.innerWidth, document.documentElement.scrollWidth];",
                vec![],
            )
            .await
            .map_err(err("dims"))?;
        let inner = dims[0].as_i64().unwrap_or(0);
        let scroll = dims[1].as_i64().unwrap_or(i64::MAX);
        shot(c, &format!("phone-{name}")).await;
        if inner > 500 {
            return Err(format!(
                "the window did not shrink to a phone width ({inner})"
            ));
        }
        if scroll > inner + 1 {
            return Err(format!(
                "{path} overflows a {inner}px screen horizontally ({scroll}px)"
            ));
        }
    }

    *step = "17-sign-out";
    c.set_window_size(1280, 800).await.map_err(err("resize"))?;
    c.goto(&admin).await.map_err(err("goto"))?;
    click_nav(c, "form.logout button").await?;
    c.goto(&format!("{admin}/audit"))
        .await
        .map_err(err("goto"))?;
    let url = c.current_url().await.map_err(err("url"))?;
    if url.path() != "/login" {
        return Err("still signed in after sign-out".into());
    }

    *step = "18-password-sign-in";
    let out = kg.cli(&["admin", "set-password"], Some(b"too short\n"));
    if out.status.success() {
        return Err("a short admin password was accepted".into());
    }
    kg.cli_ok(&["admin", "set-password"], Some(PASSWORD.as_bytes()));
    fill(c, "#credential", PASSWORD.trim_end()).await?;
    click_nav(c, "button[type=submit]").await?;
    if h1(c).await? != "Overview" {
        return Err("the admin password did not sign in".into());
    }

    *step = "19-logs";
    if kg.logs().contains(PASSWORD.trim_end()) {
        return Err("the admin password is in keygate's logs".into());
    }
    if kg.logs().contains(SECRET) {
        return Err("the secret value is in keygate's logs".into());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and chromedriver: run `bash .ci/browser.sh`"]
async fn dashboard_end_to_end_in_chromium() {
    let (up, kg) = world().await;
    let driver = chromedriver().expect("chromedriver");
    let profile = tempfile::tempdir().expect("profile dir");
    let c = browser(&driver, profile.path()).await.expect("browser");
    let mut step = "start";
    let result = flow(&c, &up, &kg, &mut step).await;
    if let Err(e) = &result {
        dump(&c, &format!("FAILED-{step}")).await;
        eprintln!(
            "keygate logs:\n{}\nscreenshot: {}",
            kg.logs(),
            shots_dir().join(format!("FAILED-{step}.png")).display()
        );
        let _ = c.close().await;
        panic!("step {step}: {e}");
    }
    let _ = c.close().await;
}
