//! HTTP/2 upstream connections driven with the `h2` crate directly: one
//! connection per destination, shared by every tunnel. A request goes from
//! its agent-side task straight onto an upstream stream, with no pool
//! checkout, dispatch channel or per-request task in between (hyper-util's
//! pooled client has all three: with them gone an HTTP/2 request runs
//! 10 % fewer instructions, bench/README.md). A destination whose upstream chooses HTTP/1.1 is
//! remembered and left to the pooled client, which takes over the
//! connection that found out (no second dial).
//!
//! A connection unused for the pool idle time (90 s) is dropped by the
//! sweep; one the upstream ended (GOAWAY, reset) is replaced at the next
//! request.

use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame};
use hyper::body::Incoming;
use keygate_core::ErrorCode;

use crate::forward::{DestMap, Destination};
use crate::{BodyError, GatewayError, Shared};

/// What is known of a destination's upstream.
#[derive(Clone)]
enum Known {
    H2(SendRequest<Bytes>),
    /// It chose HTTP/1.1 when offered both.
    Http1,
}

struct Entry {
    known: Known,
    used: Instant,
}

/// The HTTP/2 upstream connections, by destination.
#[derive(Default)]
pub(crate) struct H2Upstreams {
    conns: Mutex<DestMap<Entry>>,
}

/// Where a request went.
pub(crate) enum Routed {
    /// Sent over HTTP/2; the upstream's response.
    Sent(Response<H2Body>),
    /// The upstream speaks HTTP/1.1: the request, untouched, for the pooled
    /// client.
    Pooled(Request<Incoming>),
}

impl H2Upstreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, DestMap<Entry>> {
        // A panic elsewhere while holding the lock leaves plain data behind.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What is known of `dest`, marking it used.
    fn get(&self, dest: &Destination) -> Option<Known> {
        let mut conns = self.lock();
        let entry = conns.get_mut(dest)?;
        entry.used = Instant::now();
        Some(entry.known.clone())
    }

    fn set(&self, dest: &Destination, known: Known) {
        let entry = Entry {
            known,
            used: Instant::now(),
        };
        // Dropped outside the lock (a replaced connection may close).
        let old = self.lock().insert(dest.clone(), entry);
        drop(old);
    }

    fn forget(&self, dest: &Destination) {
        let old = self.lock().remove(dest);
        drop(old);
    }

    /// Drops what was not used for `max_idle`: an HTTP/2 connection closes
    /// once the streams still open on it end; an upstream remembered as
    /// HTTP/1.1 is asked again next time.
    pub fn sweep(&self, max_idle: Duration) {
        let now = Instant::now();
        self.lock()
            .retain(|_, e| now.duration_since(e.used) < max_idle);
    }

    /// Drops every connection (the gateway is stopping); streams still
    /// open finish first.
    pub fn clear(&self) {
        let all = std::mem::take(&mut *self.lock());
        drop(all);
    }
}

/// Sends `req` (an `https://` URI naming `dest`, hop-by-hop headers
/// removed) over the destination's HTTP/2 connection, dialling one when
/// there is none or the pooled one has ended.
pub(crate) async fn send(
    shared: &Shared,
    dest: &Destination,
    req: Request<Incoming>,
) -> Result<Routed, GatewayError> {
    let Some(mut sender) = ready(shared, dest).await? else {
        return Ok(Routed::Pooled(req));
    };
    let (mut parts, body) = req.into_parts();
    parts.version = http::Version::HTTP_2;
    let end = body.is_end_stream();
    let (response, stream) = sender
        .send_request(Request::from_parts(parts, ()), end)
        .map_err(|e| h2_error(&e, dest))?;
    // The exchange is alive while this future, then the response body,
    // holds `alive`: once both are gone (the agent left, a timeout), a
    // body still being sent is cut off.
    let alive = (!end).then(|| {
        let (alive, gone) = tokio::sync::oneshot::channel();
        tokio::spawn(pump(body, stream, gone));
        alive
    });
    match response.await {
        Ok(r) => Ok(Routed::Sent(r.map(|body| H2Body {
            body,
            _alive: alive,
        }))),
        Err(e) => Err(h2_error(&e, dest)),
    }
}

/// A sender ready for a new stream to `dest`: the pooled connection, or a
/// new one when there is none or it has ended (after a GOAWAY no new
/// stream is sent on it, so nothing is lost). `None`: the upstream speaks
/// HTTP/1.1.
async fn ready(
    shared: &Shared,
    dest: &Destination,
) -> Result<Option<SendRequest<Bytes>>, GatewayError> {
    match shared.h2.get(dest) {
        Some(Known::Http1) => return Ok(None),
        Some(Known::H2(sender)) => match sender.ready().await {
            Ok(ready) => return Ok(Some(ready)),
            Err(e) => {
                tracing::debug!(upstream = %dest.authority(), error = %e, "upstream HTTP/2 connection ended; dialling a new one");
                shared.h2.forget(dest);
            }
        },
        None => {}
    }
    // Boxed: inline, the dial's state (TLS connector, handshake) would size
    // every request's future, which hyper moves into each stream's task.
    Box::pin(dial(shared, dest)).await
}

/// Dials the destination offering h2 and HTTP/1.1. `None`: it chose
/// HTTP/1.1 (remembered; the pooled client takes the connection).
async fn dial(
    shared: &Shared,
    dest: &Destination,
) -> Result<Option<SendRequest<Bytes>>, GatewayError> {
    let tls = shared.connector.connect_tls(dest).await?;
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        shared.h2.set(dest, Known::Http1);
        shared.connector.keep_spare(dest, tls);
        return Ok(None);
    }
    // hyper's client defaults, and our header limit for responses.
    let max_header =
        u32::try_from(shared.config.max_header_bytes.max(16 * 1024)).unwrap_or(u32::MAX);
    let (sender, conn) = h2::client::Builder::new()
        .initial_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(5 * 1024 * 1024)
        .max_frame_size(16 * 1024)
        .max_header_list_size(max_header)
        .max_send_buffer_size(1024 * 1024)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| h2_error(&e, dest))?;
    let authority = dest.authority();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(upstream = %authority, error = %e, "upstream HTTP/2 connection ended");
        }
    });
    shared.h2.set(dest, Known::H2(sender.clone()));
    sender
        .ready()
        .await
        .map(Some)
        .map_err(|e| h2_error(&e, dest))
}

fn h2_error(e: &h2::Error, dest: &Destination) -> GatewayError {
    GatewayError::new(
        ErrorCode::UpstreamUnreachable,
        format!("upstream {} failed: {e}", dest.authority()),
    )
}

/// Sends the agent's request body upstream as the upstream's flow control
/// allows, then its trailers if any. The stream is reset when the agent's
/// body fails (the upstream never takes a cut body for a whole one) or when
/// the exchange is abandoned (`gone`), and the task ends when the upstream
/// resets the stream: it never waits on a stream nobody wants.
async fn pump<B>(
    mut body: B,
    mut stream: SendStream<Bytes>,
    mut gone: tokio::sync::oneshot::Receiver<()>,
) where
    B: HttpBody<Data = Bytes> + Unpin,
{
    use http_body_util::BodyExt;
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = &mut gone => {
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
        };
        let frame = match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Ok(frame)) => frame,
            Some(Err(_)) => {
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                    return;
                }
                continue;
            }
        };
        while !data.is_empty() {
            stream.reserve_capacity(data.len());
            let granted = tokio::select! {
                c = std::future::poll_fn(|cx| stream.poll_capacity(cx)) => c,
                _ = &mut gone => {
                    stream.send_reset(h2::Reason::CANCEL);
                    return;
                }
            };
            let granted = match granted {
                Some(Ok(n)) if n > 0 => n,
                Some(Ok(_)) => continue,
                // The stream was reset or the connection ended.
                _ => return,
            };
            let chunk = data.split_to(granted.min(data.len()));
            let last = data.is_empty() && body.is_end_stream();
            if stream.send_data(chunk, last).is_err() || last {
                return;
            }
        }
    }
}

/// An upstream HTTP/2 response body. Received bytes are handed back to the
/// upstream's flow control as the agent takes them, so a slow agent slows
/// the upstream instead of filling keygate's memory.
pub(crate) struct H2Body {
    body: RecvStream,
    /// Keeps the request body's pump going (see [`pump`]).
    _alive: Option<tokio::sync::oneshot::Sender<()>>,
}

impl HttpBody for H2Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match this.body.poll_data(cx) {
            Poll::Ready(Some(Ok(data))) => {
                let _ = this.body.flow_control().release_capacity(data.len());
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {}
            Poll::Pending => return Poll::Pending,
        }
        match this.body.poll_trailers(cx) {
            Poll::Ready(Ok(Some(t))) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(host: &str) -> Destination {
        Destination {
            host: host.into(),
            port: 443,
        }
    }

    #[test]
    fn what_was_not_used_for_the_idle_time_is_forgotten() {
        let pool = H2Upstreams::default();
        pool.set(&dest("old.test"), Known::Http1);
        pool.set(&dest("new.test"), Known::Http1);
        pool.lock().get_mut(&dest("old.test")).expect("entry").used -= Duration::from_secs(120);
        pool.sweep(Duration::from_secs(90));
        assert!(pool.get(&dest("old.test")).is_none());
        assert!(matches!(pool.get(&dest("new.test")), Some(Known::Http1)));
        // A lookup marks the entry used: it survives the next sweep.
        pool.lock().get_mut(&dest("new.test")).expect("entry").used -= Duration::from_secs(120);
        assert!(pool.get(&dest("new.test")).is_some());
        pool.sweep(Duration::from_secs(90));
        assert!(pool.get(&dest("new.test")).is_some());
        pool.clear();
        assert!(pool.get(&dest("new.test")).is_none());
    }
    /// A request body that never ends.
    struct Endless;

    impl HttpBody for Endless {
        type Data = Bytes;
        type Error = BodyError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; 16 * 1024])))))
        }
    }

    #[tokio::test]
    async fn an_abandoned_upload_to_a_stalled_upstream_is_reset_not_left_waiting() {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        // The upstream takes the stream, then never reads: the request's
        // flow-control window (64 KiB) fills and the pump waits for room.
        let (got, mut stream_rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.expect("server");
            while let Some(Ok((req, respond))) = conn.accept().await {
                let _ = got.send((req.into_body(), respond)).await;
            }
        });
        let (sender, conn) = h2::client::handshake(client_io).await.expect("client");
        tokio::spawn(conn);
        let mut sender = sender.ready().await.expect("ready");
        let req = Request::post("https://up.test/upload")
            .body(())
            .expect("req");
        let (_response, stream) = sender.send_request(req, false).expect("sent");
        let (alive, gone) = tokio::sync::oneshot::channel::<()>();
        let pumping = tokio::spawn(pump(Endless, stream, gone));
        let (mut upload, _respond) = tokio::time::timeout(Duration::from_secs(5), stream_rx.recv())
            .await
            .expect("the upstream takes the stream")
            .expect("stream");
        // HTTP/2's initial window: 65,535 bytes.
        let fill = async {
            let mut received = 0;
            while received < 65_535 {
                let chunk = upload.data().await.expect("data").expect("no error");
                received += chunk.len();
            }
        };
        tokio::time::timeout(Duration::from_secs(5), fill)
            .await
            .expect("the window fills");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!pumping.is_finished(), "waiting for flow-control room");
        // The agent goes away: the exchange is abandoned.
        drop(alive);
        tokio::time::timeout(Duration::from_secs(5), pumping)
            .await
            .expect("the pump ends")
            .expect("no panic");
        let reset = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match upload.data().await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return e.reason(),
                    None => return None,
                }
            }
        })
        .await
        .expect("the upstream sees the end");
        assert_eq!(reset, Some(h2::Reason::CANCEL));
    }
}
