//! A hand-driven CONNECT tunnel: exact control over the CONNECT line, the
//! SNI, the request target and the Host header, and several requests over
//! one tunnel (to test revocation inside an open tunnel).

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the proxy answered to the CONNECT.
#[derive(Debug)]
pub struct ConnectRefused {
    pub status: u16,
    pub head: String,
}

/// An open tunnel speaking HTTP/1.1 over TLS.
pub struct Tunnel {
    sender: SendRequest<Empty<Bytes>>,
}

/// A response read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn error_code(&self) -> Option<String> {
        self.headers
            .get("keygate-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

/// Sends `CONNECT authority` with an optional `Proxy-Authorization` value
/// and returns the raw stream on 200.
pub async fn connect_raw(
    proxy: std::net::SocketAddr,
    authority: &str,
    proxy_auth: Option<&str>,
) -> Result<TcpStream, ConnectRefused> {
    let mut tcp = TcpStream::connect(proxy)
        .await
        .map_err(|e| ConnectRefused {
            status: 0,
            head: e.to_string(),
        })?;
    let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(a) = proxy_auth {
        head.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes())
        .await
        .map_err(|e| ConnectRefused {
            status: 0,
            head: e.to_string(),
        })?;
    // Read the response head byte by byte (it is short) so no tunnel bytes
    // are consumed.
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut byte).await {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
        if buf.len() > 16 * 1024 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status == 200 {
        Ok(tcp)
    } else {
        // Read the error body too, for assertions.
        let mut rest = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(2), tcp.read(&mut rest))
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or(0);
        Err(ConnectRefused {
            status,
            head: format!("{text}{}", String::from_utf8_lossy(&rest[..n])),
        })
    }
}

/// `Basic base64(agent:TOKEN)`.
pub fn basic_auth(token: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("agent:{token}"))
    )
}

impl Tunnel {
    /// CONNECT to `authority`, then TLS with `sni` trusting `ca_pem`.
    pub async fn open(
        proxy: std::net::SocketAddr,
        authority: &str,
        token: &str,
        sni: &str,
        ca_pem: &str,
    ) -> Result<Tunnel, String> {
        let tls = crate::agent_tls(proxy, authority, token, sni, ca_pem, &[b"http/1.1"]).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(Tunnel { sender })
    }

    /// Sends `GET target` with the given headers (Host is not added unless
    /// given) and reads the whole answer.
    pub async fn get(&mut self, target: &str, headers: &[(&str, &str)]) -> Result<Answer, String> {
        let mut req = Request::get(target);
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let resp: Response<_> = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}
