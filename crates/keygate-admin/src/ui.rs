//! Page layout, shared fragments, formatting and the embedded assets (CSS
//! and a few lines of JavaScript; nothing is fetched from elsewhere).

use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};

const CSS: &str = include_str!("assets/app.css");
const JS: &str = include_str!("assets/app.js");

pub async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        CSS,
    )
}

pub async fn js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        JS,
    )
}

/// Headers on every admin response: no framing, no sniffing, no referrer,
/// and a policy that allows only this origin's own styles and script.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    resp
}

/// Which navigation entry is current.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Secrets,
    Agents,
    Audit,
    Ca,
}

/// A whole dashboard page.
pub fn page(title: &str, nav: Nav, csrf: &str, body: Markup) -> Html<String> {
    let item = |n: Nav, href: &str, label: &str| {
        html! {
            a href=(href) aria-current=[(n == nav).then_some("page")] { (label) }
        }
    };
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " · keygate" }
                    link rel="stylesheet" href="/assets/app.css";
                    script src="/assets/app.js" defer {}
                }
                body {
                    header.top {
                        a.brand href="/" { "keygate" }
                        nav aria-label="Main" {
                            (item(Nav::Overview, "/", "Overview"))
                            (item(Nav::Secrets, "/secrets", "Secrets"))
                            (item(Nav::Agents, "/agents", "Agents"))
                            (item(Nav::Audit, "/audit", "Audit log"))
                            (item(Nav::Ca, "/ca", "CA"))
                        }
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(csrf);
                            button.link type="submit" { "Sign out" }
                        }
                    }
                    main id="main" {
                        h1 { (title) }
                        (body)
                    }
                }
            }
        }
        .into_string(),
    )
}

/// The sign-in page.
pub fn login_page(error: Option<&str>, has_password: bool) -> Html<String> {
    let hint = if has_password {
        "Paste the admin token (the admin-token file in the data dir) or type the admin password."
    } else {
        "Paste the admin token: the admin-token file in keygate's data dir. Set a password with `keygate admin set-password`."
    };
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { "Sign in · keygate" }
                    link rel="stylesheet" href="/assets/app.css";
                }
                body.signin {
                    main.card {
                        h1 { "keygate" }
                        p.muted { "Credential vault and HTTPS gateway for AI agents." }
                        form method="post" action="/login" {
                            @if let Some(e) = error {
                                p.error role="alert" id="login-error" { (e) }
                            }
                            label for="credential" { "Admin token or password" }
                            input id="credential" name="credential" type="password"
                                autocomplete="current-password" required autofocus
                                aria-describedby="credential-hint";
                            p.hint id="credential-hint" { (hint) }
                            button.primary type="submit" { "Sign in" }
                        }
                    }
                }
            }
        }
        .into_string(),
    )
}

/// A small stand-alone error page (refused forms, missing things).
pub fn error_page(title: &str, message: &str) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " · keygate" }
                    link rel="stylesheet" href="/assets/app.css";
                }
                body.signin {
                    main.card {
                        h1 { (title) }
                        p role="alert" { (message) }
                        p { a href="/" { "Back to the dashboard" } }
                    }
                }
            }
        }
        .into_string(),
    )
}

/// A `<pre>` with a copy button.
pub fn copyable(id: &str, label: &str, text: &str) -> Markup {
    html! {
        div.copyable {
            pre id=(id) aria-label=(label) { code { (text) } }
            button.copy type="button" data-copy=(id) aria-label={ "Copy " (label) } { "Copy" }
        }
    }
}

/// A notice shown after a redirect.
pub fn notice(text: Option<&str>) -> Markup {
    html! {
        @if let Some(t) = text {
            p.notice role="status" { (t) }
        }
    }
}

/// `2026-01-31 12:34:56 UTC`.
pub fn fmt_ms(ms: i64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) else {
        return ms.to_string();
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// RFC 3339 with milliseconds, for exports.
pub fn rfc3339_ms(ms: i64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) else {
        return ms.to_string();
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// `<time>` with a relative hint in the title.
pub fn time_cell(ms: Option<i64>) -> Markup {
    match ms {
        Some(ms) => html! { time datetime=(rfc3339_ms(ms)) { (fmt_ms(ms)) } },
        None => html! { span.muted { "never" } },
    }
}

/// Parses `YYYY-MM-DDTHH:MM[:SS]` (an HTML datetime-local value, read as
/// UTC) into epoch milliseconds.
pub fn parse_datetime_local(s: &str) -> Option<i64> {
    let (d, t) = s.trim().split_once('T')?;
    let mut dp = d.split('-');
    let year: i32 = dp.next()?.parse().ok()?;
    let month: u8 = dp.next()?.parse().ok()?;
    let day: u8 = dp.next()?.parse().ok()?;
    let mut tp = t.split(':');
    let hour: u8 = tp.next()?.parse().ok()?;
    let minute: u8 = tp.next()?.parse().ok()?;
    let second: u8 = match tp.next() {
        Some(s) => s.split('.').next()?.parse().ok()?,
        None => 0,
    };
    let date =
        time::Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()?;
    let tm = time::Time::from_hms(hour, minute, second).ok()?;
    let dt = time::PrimitiveDateTime::new(date, tm).assume_utc();
    i64::try_from(dt.unix_timestamp_nanos() / 1_000_000).ok()
}

/// A decision badge.
pub fn decision_badge(d: &str) -> Markup {
    let class = match d {
        "injected" => "badge ok",
        "passthrough" => "badge neutral",
        "denied" => "badge bad",
        _ => "badge warn",
    };
    html! { span class=(class) { (d) } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetime_local_round_trips() {
        let ms = parse_datetime_local("2026-01-31T12:34").expect("parse");
        assert_eq!(fmt_ms(ms), "2026-01-31 12:34:00 UTC");
        assert_eq!(parse_datetime_local("2026-13-01T00:00"), None);
        assert_eq!(parse_datetime_local("garbage"), None);
    }
}
