//! Body helpers shared by the policies: a bounded buffer for replaying request bodies, and a body that holds
//! a guard (a concurrency permit, an in-flight count) until the response is fully sent or dropped.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use super::{full_body, Body, BoxError};

/// A request body read completely into memory, so it can be sent again.
#[derive(Debug, Clone, Default)]
pub struct Replayable {
    /// The data.
    pub data: Bytes,
    /// Trailers, if the body had any.
    pub trailers: Option<HeaderMap>,
}

impl Replayable {
    /// A fresh body with the same content.
    pub fn body(&self) -> Body {
        match &self.trailers {
            None => full_body(self.data.clone()),
            Some(trailers) => {
                let frames = vec![
                    Frame::data(self.data.clone()),
                    Frame::trailers(trailers.clone()),
                ];
                Prefixed {
                    prefix: frames.into(),
                    rest: None,
                }
                .boxed()
            }
        }
    }
}

/// The outcome of [`buffer_up_to`].
pub enum Buffered {
    /// The whole body fit.
    Complete(Replayable),
    /// The body is larger than the limit; this body streams the part already read, then the rest.
    TooLarge(Body),
}

/// Reads `body` into memory unless it is longer than `limit` bytes. A body that declares a larger size is
/// not read at all; one that turns out larger is handed back intact (read part first), so nothing is lost.
pub async fn buffer_up_to(mut body: Body, limit: usize) -> Result<Buffered, BoxError> {
    if body.size_hint().lower() > limit as u64 {
        return Ok(Buffered::TooLarge(body));
    }
    if body.is_end_stream() {
        return Ok(Buffered::Complete(Replayable::default()));
    }
    let mut data = BytesMut::new();
    let mut read: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(chunk) => {
                data.extend_from_slice(&chunk);
                read.push_back(Frame::data(chunk));
                if data.len() > limit {
                    return Ok(Buffered::TooLarge(
                        Prefixed {
                            prefix: read,
                            rest: Some(body),
                        }
                        .boxed(),
                    ));
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    Ok(Buffered::Complete(Replayable {
        data: data.freeze(),
        trailers,
    }))
}

/// Frames already read, then the rest of the original body.
struct Prefixed {
    prefix: VecDeque<Frame<Bytes>>,
    rest: Option<Body>,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

/// Wraps `body` so that `guard` lives until the body is finished with (sent, or dropped by the peer going
/// away).
pub fn with_guard<G: Send + Sync + 'static>(body: Body, guard: G) -> Body {
    Guarded {
        inner: body,
        _guard: guard,
    }
    .boxed()
}

struct Guarded<G> {
    inner: Body,
    _guard: G,
}

impl<G> HttpBody for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // `Guarded` is Unpin: `Body` is a Box and the guard is never pinned.
        let this = self.get_mut();
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<G> Unpin for Guarded<G> {}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    fn chunked(chunks: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    #[tokio::test]
    async fn small_bodies_are_buffered_and_replayed() {
        let Buffered::Complete(r) = buffer_up_to(chunked(&["ab", "cd"]), 4).await.unwrap() else {
            panic!("4 bytes fit in 4")
        };
        for _ in 0..2 {
            assert_eq!(r.body().collect().await.unwrap().to_bytes(), "abcd");
        }
    }

    #[tokio::test]
    async fn large_bodies_come_back_whole() {
        let Buffered::TooLarge(body) = buffer_up_to(chunked(&["ab", "cd", "ef"]), 3).await.unwrap()
        else {
            panic!("6 bytes do not fit in 3")
        };
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcdef");
    }
}
