//! `--total-timeout`: a response body that fails once the whole exchange
//! has taken too long, so that the agent sees an error (HTTP/1.1: the
//! connection closes before the body is complete; HTTP/2: the stream is
//! reset), never a silently truncated body.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::BodyError;

pub(crate) struct Deadline<B> {
    body: B,
    expires: Pin<Box<Sleep>>,
}

impl<B> Deadline<B> {
    pub fn new(body: B, at: Instant) -> Deadline<B> {
        Deadline {
            body,
            expires: Box::pin(tokio::time::sleep_until(at)),
        }
    }
}

impl<B> HttpBody for Deadline<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        // What has already arrived is passed on first.
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        if this.expires.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(
                Err("total timeout: the response took too long".into()),
            ));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    #[tokio::test]
    async fn data_passes_until_the_deadline_then_the_body_fails() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BodyError>>(4);
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
            );
        let body = StreamBody::new(Box::pin(stream));
        let at = Instant::now() + Duration::from_millis(200);
        let mut body = Deadline::new(body, at);
        tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "first");
        // Nothing more arrives: the deadline ends the body with an error.
        let started = std::time::Instant::now();
        let end = body.frame().await.expect("a frame");
        assert!(end.is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(tx);
    }

    #[tokio::test]
    async fn a_body_that_ends_in_time_ends_cleanly() {
        let body = http_body_util::Full::new(Bytes::from_static(b"all"))
            .map_err(|never| -> BodyError { match never {} });
        let mut body = Deadline::new(body, Instant::now() + Duration::from_secs(5));
        let all = body.frame().await.unwrap().unwrap();
        assert_eq!(all.into_data().unwrap(), "all");
        assert!(body.frame().await.is_none());
    }
}
