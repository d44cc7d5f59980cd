//! Per-request forwarding: re-authenticate, check the Host, normalise the
//! path, select and inject credentials, send over the destination's HTTP/2
//! connection or through the pooled client, and emit the audit event.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use keygate_core::audit::path_without_query;
use keygate_core::pattern::{is_canonical_authority, parse_authority};
use keygate_core::select::{any_host_match, select};
use keygate_core::{
    normalize_path, AgentEntry, AuditEvent, Decision, ErrorCode, SecretEntry, TokenHash,
};

use crate::upgrade::AgentSide;
use crate::{auth, Body, BodyError, GatewayError, Shared};

/// The destination the agent asked for (CONNECT or absolute-form authority).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    /// Canonical host (lower-case, IDNA ASCII, IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

/// A map keyed by destination. The fast path's pool hashes the request's
/// destination on every take and return: SipHash (std's default) cost
/// ~285 instructions per hash of a host name, foldhash a fraction of it.
/// Its seed is random per process, and the keys are hosts that
/// authenticated agents were allowed to reach.
pub(crate) type DestMap<V> = HashMap<Destination, V, foldhash::fast::RandomState>;

impl Destination {
    /// `host` (IPv6 in brackets), for a Host header on the default port.
    pub(crate) fn authority_without_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    /// `https://authority/path?query`, built in one buffer (the URI takes
    /// it over without a copy).
    pub(crate) fn https_uri(&self, path: &str, query: Option<&str>) -> String {
        let mut uri = String::with_capacity(
            8 + self.host.len() + 8 + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        uri.push_str("https://");
        self.write_authority(&mut uri);
        uri.push_str(path);
        if let Some(q) = query {
            uri.push('?');
            uri.push_str(q);
        }
        uri
    }

    /// `host:port`, IPv6 in brackets.
    pub(crate) fn authority(&self) -> String {
        let mut out = String::with_capacity(self.host.len() + 8);
        self.write_authority(&mut out);
        out
    }

    fn write_authority(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = if self.host.contains(':') {
            write!(out, "[{}]:{}", self.host, self.port)
        } else {
            write!(out, "{}:{}", self.host, self.port)
        };
    }
}

/// What the audit record needs to know about a request.
pub(crate) struct RequestLog {
    method: Cow<'static, str>,
    scheme: &'static str,
    host: String,
    port: u16,
    path: String,
    started: Instant,
}

impl RequestLog {
    pub fn new<B>(
        req: &Request<B>,
        scheme: &'static str,
        host: &str,
        port: u16,
        started: Instant,
    ) -> RequestLog {
        // A tunnel CONNECT names no path; an extended CONNECT (RFC 8441) does.
        let path = if req.method() == http::Method::CONNECT
            && req.extensions().get::<hyper::ext::Protocol>().is_none()
        {
            String::new()
        } else {
            path_without_query(req.uri().path()).to_string()
        };
        RequestLog {
            method: keygate_core::method_name(req.method().as_str()),
            scheme,
            host: host.to_string(),
            port,
            path,
            started,
        }
    }

    pub fn bare(
        method: &str,
        scheme: &'static str,
        host: &str,
        port: u16,
        started: Instant,
    ) -> RequestLog {
        RequestLog {
            method: keygate_core::method_name(method),
            scheme,
            host: host.to_string(),
            port,
            path: String::new(),
            started,
        }
    }

    /// When the request arrived.
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    pub(crate) fn event(
        self,
        agent: Option<String>,
        status: u16,
        decision: Decision,
        reason: Option<String>,
        secrets: Vec<String>,
    ) -> AuditEvent {
        AuditEvent {
            ts_ms: keygate_core::now_ms(),
            agent,
            method: self.method,
            scheme: Cow::Borrowed(self.scheme),
            host: self.host,
            port: self.port,
            path: self.path,
            status,
            decision,
            reason,
            secrets,
            duration_us: u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            bytes_up: None,
            bytes_down: None,
        }
    }
}

/// Hands an event to the audit writer. When its channel is full (the writer
/// is behind) the request waits for room: a record is never dropped.
pub(crate) async fn emit(shared: &Shared, event: AuditEvent) {
    send_event(&shared.audit, event).await
}

async fn send_event(audit: &tokio::sync::mpsc::Sender<AuditEvent>, event: AuditEvent) {
    use tokio::sync::mpsc::error::TrySendError;
    let event = match audit.try_send(event) {
        Ok(()) => return,
        Err(TrySendError::Full(event)) => event,
        Err(TrySendError::Closed(_)) => {
            tracing::error!("audit channel closed: record lost");
            return;
        }
    };
    // Boxed: inline, the wait's state would size the future of every
    // request (moved into its task or its connection's slot each time).
    if Box::pin(audit.send(event)).await.is_err() {
        tracing::error!("audit channel closed: record lost");
    }
}

/// Records a refusal or failure.
pub(crate) async fn record(
    shared: &Shared,
    log: RequestLog,
    agent: Option<String>,
    status: u16,
    err: &GatewayError,
) {
    let event = log.event(
        agent,
        status,
        Decision::for_code(err.code),
        Some(err.code.as_str().to_string()),
        Vec::new(),
    );
    emit(shared, event).await;
}

/// Records a refusal and returns the error response for it.
pub(crate) async fn refuse(
    shared: &Shared,
    log: RequestLog,
    agent: Option<String>,
    err: &GatewayError,
) -> Response<Body> {
    tracing::info!(code = %err.code, host = %log.host, "request refused: {}", err.message);
    record(shared, log, agent, err.code.status(), err).await;
    err.to_response()
}

/// Headers that never cross the proxy, in either direction: hop-by-hop
/// headers and proxy credentials. Lower case, as `HeaderName::as_str` and
/// HTTP/2 spell them; the HTTP/1.1 fast path compares case-insensitively.
pub(crate) const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The `Upgrade` value of an HTTP/1.1 request that asks to switch protocols
/// (`Connection: upgrade` plus `Upgrade: websocket`, say).
fn upgrade_wanted<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    req.headers().get(header::UPGRADE).cloned()
}

/// A CONNECT inside a tunnel is only accepted as an HTTP/2 extended CONNECT
/// for WebSocket (RFC 8441); returns the protocol as an `Upgrade` value.
fn extended_connect_websocket<B>(req: &Request<B>) -> Result<HeaderValue, GatewayError> {
    let protocol = req
        .extensions()
        .get::<hyper::ext::Protocol>()
        .map(|p| p.as_str());
    match protocol {
        Some(p) if p.eq_ignore_ascii_case("websocket") => Ok(HeaderValue::from_static("websocket")),
        Some(p) => Err(GatewayError::new(
            ErrorCode::BadRequest,
            format!("extended CONNECT for {p:?} is not supported (only websocket)"),
        )),
        None => Err(GatewayError::new(
            ErrorCode::BadRequest,
            "CONNECT inside a tunnel is not supported (HTTP/2 extended CONNECT for websocket is)",
        )),
    }
}

/// `te: trailers` is the one TE value that crosses a proxy (gRPC needs it).
fn keeps_te_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there is none: one pass over the names (cheap comparisons)
    // instead of a hashed removal per hop-by-hop name.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Checks that the request's Host and URI authority (if any) name the
/// destination.
fn check_host<B>(req: &Request<B>, dest: &Destination) -> Result<(), GatewayError> {
    let authority = req.uri().authority().map(|a| a.as_str().as_bytes());
    let hosts = req
        .headers()
        .get_all(header::HOST)
        .iter()
        .map(|v| v.as_bytes());
    for named in authority.into_iter().chain(hosts) {
        // Clients write the authority as the CONNECT named it: then it is
        // ours without a parse. Otherwise: a Host without a port means 443
        // inside TLS; a Host that is not UTF-8 names no host of ours.
        let ok = is_canonical_authority(named, &dest.host, dest.port, 443)
            || std::str::from_utf8(named)
                .ok()
                .and_then(|n| parse_authority(n, 443).ok())
                .is_some_and(|(h, p)| h == dest.host && p == dest.port);
        if !ok {
            return Err(GatewayError::new(
                ErrorCode::HostMismatch,
                format!(
                    "request names host {:?} but the tunnel goes to {}",
                    String::from_utf8_lossy(named),
                    dest.authority()
                ),
            ));
        }
    }
    Ok(())
}

/// Maps a pooled-client error to the gateway error that names its cause.
fn upstream_error(e: &hyper_util::client::legacy::Error, dest: &Destination) -> GatewayError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(g) = s.downcast_ref::<GatewayError>() {
            return g.clone();
        }
        source = s.source();
    }
    let detail = std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_else(|| e.to_string());
    GatewayError::new(
        ErrorCode::UpstreamUnreachable,
        format!("upstream {} failed: {detail}", dest.authority()),
    )
}

/// Sends a prepared request upstream and turns the outcome into the agent's
/// response plus one audit event.
async fn send(
    shared: &Shared,
    dest: &Destination,
    mut req: Request<Incoming>,
    log: RequestLog,
    agent: Option<String>,
    injected: Vec<String>,
) -> Response<Body> {
    let agent_version = req.version();
    *req.version_mut() = Version::HTTP_11;
    let total_deadline = shared
        .config
        .total_timeout
        .map(|t| tokio::time::Instant::from_std(log.started()) + t);
    let head_deadline = {
        let head = tokio::time::Instant::now() + shared.config.response_timeout;
        total_deadline.map_or(head, |t| t.min(head))
    };
    let upstream = async {
        // https destinations go over the destination's HTTP/2 connection
        // when the upstream speaks HTTP/2, else through the pooled client.
        let req = if req.uri().scheme() == Some(&http::uri::Scheme::HTTPS) {
            match crate::h2_upstream::send(shared, dest, req).await? {
                crate::h2_upstream::Routed::Sent(resp) => {
                    return Ok(resp.map(|b| b.boxed()));
                }
                crate::h2_upstream::Routed::Pooled(req) => req,
            }
        } else {
            req
        };
        match shared.client.request(req).await {
            Ok(resp) => Ok(resp.map(|b| b.map_err(BodyError::from).boxed())),
            Err(e) => Err(upstream_error(&e, dest)),
        }
    };
    let result = tokio::time::timeout_at(head_deadline, upstream).await;
    let resp = match result {
        Ok(Ok(resp)) => resp,
        Ok(Err(err)) => {
            return refuse(shared, log, agent, &err).await;
        }
        Err(_) => {
            let err = GatewayError::new(
                ErrorCode::UpstreamTimeout,
                format!("upstream {} did not answer in time", dest.authority()),
            );
            return refuse(shared, log, agent, &err).await;
        }
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = agent_version;
    let decision = if injected.is_empty() {
        Decision::Passthrough
    } else {
        Decision::Injected
    };
    let event = log.event(agent, parts.status.as_u16(), decision, None, injected);
    emit(shared, event).await;
    let body = match total_deadline {
        Some(at) => crate::deadline::Deadline::new(body, at).boxed(),
        None => body,
    };
    Response::from_parts(parts, body)
}

/// Injects the selected secrets into the request headers, replacing whatever
/// the agent sent in those headers (its placeholder).
fn inject(
    shared: &Shared,
    headers: &mut HeaderMap,
    secrets: &[&SecretEntry],
) -> Result<Vec<String>, GatewayError> {
    let mut names = Vec::with_capacity(secrets.len());
    for secret in secrets {
        let plaintext = shared
            .vault
            .open(&secret.id, secret.version, &secret.sealed)
            .map_err(|_| {
                GatewayError::new(
                    ErrorCode::Internal,
                    format!("secret {:?} cannot be decrypted", secret.name),
                )
            })?;
        let rendered = secret.format.render(&plaintext);
        let mut value = HeaderValue::from_bytes(&rendered).map_err(|_| {
            GatewayError::new(
                ErrorCode::Internal,
                format!("secret {:?} is not a valid header value", secret.name),
            )
        })?;
        value.set_sensitive(true);
        let name = HeaderName::from_bytes(secret.header.as_bytes())
            .map_err(|_| GatewayError::new(ErrorCode::Internal, "invalid header name in secret"))?;
        headers.insert(name, value);
        names.push(secret.name.clone());
    }
    Ok(names)
}

/// What [`admit`] found: who the agent is and the path credentials are
/// matched against.
pub(crate) struct Admitted {
    pub agent: Arc<AgentEntry>,
    /// The normalised path, or the raw one when it cannot be normalised and
    /// no credential could apply (then nothing is selected).
    pub path: String,
    pub matchable: bool,
}

/// The checks every credentialed request passes before its head is
/// rewritten: re-authentication (revocation takes effect on the next
/// request, even inside a tunnel), Host check, path normalisation. On
/// refusal: the agent's name (when known) and the error.
pub(crate) fn admit<B>(
    shared: &Shared,
    dest: &Destination,
    token_hash: Option<&TokenHash>,
    req: &Request<B>,
) -> Result<Admitted, (Option<String>, GatewayError)> {
    let agent: Arc<AgentEntry> =
        auth::authenticate(&shared.snapshot.load(), token_hash).map_err(|err| (None, err))?;
    if let Err(err) = check_host(req, dest) {
        return Err((Some(agent.name.clone()), err));
    }
    let raw_path = req.uri().path();
    match normalize_path(raw_path) {
        Ok(path) => Ok(Admitted {
            agent,
            path,
            matchable: true,
        }),
        Err(e) => {
            let rules = agent.grants.iter().map(|s| s.as_ref());
            if any_host_match(rules, &dest.host, dest.port, false) {
                let code = match e {
                    keygate_core::PathError::Ambiguous(_) => ErrorCode::PathAmbiguous,
                    keygate_core::PathError::Invalid(_) => ErrorCode::BadRequest,
                };
                let err = GatewayError::new(code, format!("request path refused: {e}"));
                return Err((Some(agent.name.clone()), err));
            }
            // No credential could apply: forward exactly what was sent.
            Ok(Admitted {
                path: raw_path.to_string(),
                agent,
                matchable: false,
            })
        }
    }
}

/// Rewrites an admitted request head for the upstream: absolute URI with
/// the checked destination and path, hop-by-hop headers and Host removed
/// (`te: trailers` kept), the selected credentials injected. Returns the
/// names of the injected secrets.
pub(crate) fn rewrite(
    shared: &Shared,
    dest: &Destination,
    admitted: &Admitted,
    parts: &mut http::request::Parts,
) -> Result<Vec<String>, GatewayError> {
    parts.uri = Uri::try_from(dest.https_uri(&admitted.path, parts.uri.query()))
        .map_err(|_| GatewayError::new(ErrorCode::BadRequest, "invalid request target"))?;
    rewrite_headers(shared, dest, admitted, &mut parts.headers)
}

/// [`rewrite`] without the URI: the HTTP/1.1 fast path writes the request
/// line itself, from the admitted path and the destination.
pub(crate) fn rewrite_headers(
    shared: &Shared,
    dest: &Destination,
    admitted: &Admitted,
    headers: &mut HeaderMap,
) -> Result<Vec<String>, GatewayError> {
    let te_trailers = keeps_te_trailers(headers);
    strip_hop_by_hop(headers);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // The client sets Host (HTTP/1.1) or :authority (HTTP/2) from the URI,
    // which names the destination we checked; the fast path writes it.
    headers.remove(header::HOST);
    let selected = if admitted.matchable {
        let rules = admitted.agent.grants.iter().map(|s| s.as_ref());
        select(rules, &dest.host, dest.port, &admitted.path)
    } else {
        Vec::new()
    };
    inject(shared, headers, &selected)
}

/// A request inside a tunnel (or an absolute-form `https://` request): the
/// credentialed path.
pub(crate) async fn forward_https(
    shared: &Arc<Shared>,
    dest: &Destination,
    token_hash: Option<TokenHash>,
    mut req: Request<Incoming>,
    log: RequestLog,
) -> Response<Body> {
    let admitted = match admit(shared, dest, token_hash.as_ref(), &req) {
        Ok(a) => a,
        Err((name, err)) => return refuse(shared, log, name, &err).await,
    };
    let name = Some(admitted.agent.name.clone());
    // An Upgrade (WebSocket) takes the agent's connection over once both
    // sides switch protocols; an HTTP/2 extended CONNECT takes the stream.
    let upgrade = if req.method() == Method::CONNECT {
        match extended_connect_websocket(&req) {
            Ok(p) => Some((
                AgentSide::H2ExtendedConnect,
                p,
                hyper::upgrade::on(&mut req),
            )),
            Err(err) => return refuse(shared, log, name, &err).await,
        }
    } else {
        upgrade_wanted(&req).map(|p| (AgentSide::Http1Upgrade, p, hyper::upgrade::on(&mut req)))
    };
    let (mut parts, body) = req.into_parts();
    let injected = match rewrite(shared, dest, &admitted, &mut parts) {
        Ok(n) => n,
        Err(err) => return refuse(shared, log, name, &err).await,
    };
    if let Some((side, protocol, on_upgrade)) = upgrade {
        let req = Request::from_parts(parts, body);
        // Boxed: inline, this rare path's state (~3.7 KiB) would size the
        // future of every request, which is moved into its task or the
        // connection's slot on every request.
        return Box::pin(crate::upgrade::forward(
            shared, dest, req, side, protocol, on_upgrade, log, name, injected,
        ))
        .await;
    }
    let req = Request::from_parts(parts, body);
    send(shared, dest, req, log, name, injected).await
}

/// An absolute-form `http://` request: forwarded untouched unless a
/// credential would apply, in which case it is refused (never plaintext).
pub(crate) async fn forward_plain(
    shared: &Arc<Shared>,
    dest: &Destination,
    agent: Arc<AgentEntry>,
    req: Request<Incoming>,
    log: RequestLog,
) -> Response<Body> {
    let name = Some(agent.name.clone());
    // Whatever the port, a granted secret for this host and path means the
    // agent meant the credentialed API: refuse rather than send it in clear.
    let would_apply = match normalize_path(req.uri().path()) {
        Ok(p) => agent
            .grants
            .iter()
            .any(|s| s.host.matches_host(&dest.host) && s.path.matches(&p)),
        Err(_) => any_host_match(
            agent.grants.iter().map(|s| s.as_ref()),
            &dest.host,
            dest.port,
            true,
        ),
    };
    if would_apply {
        let err = GatewayError::new(
            ErrorCode::PlaintextRefused,
            format!(
                "a credential applies to {} but the request is plaintext http://: use https://",
                dest.host
            ),
        );
        return refuse(shared, log, name, &err).await;
    }
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let req = Request::from_parts(parts, body);
    send(shared, dest, req, log, name, Vec::new()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audit_event(path: &str) -> AuditEvent {
        let mut log = RequestLog::bare("GET", "https", "api.test", 443, Instant::now());
        log.path = path.to_string();
        log.event(None, 200, Decision::Passthrough, None, Vec::new())
    }

    #[tokio::test]
    async fn a_full_audit_channel_makes_the_request_wait_and_loses_nothing() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        send_event(&tx, audit_event("/first")).await;
        // The channel is full: the second event waits for room.
        let mut second = tokio::spawn({
            let tx = tx.clone();
            async move { send_event(&tx, audit_event("/second")).await }
        });
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), &mut second).await;
        assert!(
            waited.is_err(),
            "the event must wait while the channel is full"
        );
        assert_eq!(rx.recv().await.map(|e| e.path), Some("/first".to_string()));
        tokio::time::timeout(std::time::Duration::from_secs(5), second)
            .await
            .expect("room made: the waiting event is sent")
            .unwrap();
        assert_eq!(rx.recv().await.map(|e| e.path), Some("/second".to_string()));
        // A closed channel (the writer gone) neither blocks nor panics.
        drop(rx);
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            send_event(&tx, audit_event("/third")),
        )
        .await
        .expect("a closed channel returns at once");
    }

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/ws");
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn upstream_uri_names_the_checked_destination() {
        let v4 = Destination {
            host: "api.test".into(),
            port: 8443,
        };
        let uri = Uri::try_from(v4.https_uri("/v1/x", Some("a=1&b"))).unwrap();
        assert_eq!(uri.to_string(), "https://api.test:8443/v1/x?a=1&b");
        let v6 = Destination {
            host: "::1".into(),
            port: 443,
        };
        let uri = Uri::try_from(v6.https_uri("/", None)).unwrap();
        assert_eq!(uri.host(), Some("[::1]"));
        assert_eq!(uri.port_u16(), Some(443));
        assert_eq!(uri.path_and_query().unwrap().as_str(), "/");
    }

    #[test]
    fn upgrade_needs_connection_upgrade_and_an_upgrade_header() {
        let r = req(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(upgrade_wanted(&r).unwrap(), "websocket");
        assert!(upgrade_wanted(&req(&[("upgrade", "websocket")])).is_none());
        assert!(upgrade_wanted(&req(&[("connection", "upgrade")])).is_none());
        let mut h2 = req(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        *h2.version_mut() = Version::HTTP_2;
        assert!(upgrade_wanted(&h2).is_none());
    }

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_is_recognised() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-hop, close"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert("x-keep", HeaderValue::from_static("1"));
        assert!(keeps_te_trailers(&h));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
        let mut g = HeaderMap::new();
        g.insert(header::TE, HeaderValue::from_static("gzip"));
        assert!(!keeps_te_trailers(&g));
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_stripped_and_others_are_kept() {
        for name in [
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
            "upgrade",
            "te",
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static("x"));
            h.insert("authorization", HeaderValue::from_static("Bearer k"));
            strip_hop_by_hop(&mut h);
            assert!(!h.contains_key(name), "{name} kept");
            assert_eq!(h.len(), 1, "{name}: {h:?}");
        }
        let mut plain = HeaderMap::new();
        plain.insert("x-keep-alive-ish", HeaderValue::from_static("1"));
        plain.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 2);
    }
}
