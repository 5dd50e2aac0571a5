//! The replay buffer: a request body kept so that a retry can send it again.
//!
//! Before the first attempt of a request that may be retried, its body is read into memory up to
//! the service's `replay_buffer_bytes` (default 64 KiB). A body that ends within the limit is
//! sent from the buffer, and again from it on a retry. A larger one is sent as it comes (the
//! part already read, then the rest, unchanged) and is not retried: the retry is refused as
//! `body_too_large`. A body whose length is declared larger than the limit is not read ahead at
//! all. Only requests that may be retried pay for this; others are sent as they stream.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either};

use crate::compress::BoxError;
use crate::forward::UpstreamBody;

/// A request body read to its end, to be sent as often as needed.
#[derive(Debug, Default)]
pub struct Buffered {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Buffered {
    /// A body that sends these bytes and trailers again.
    pub fn body(&self) -> UpstreamBody {
        Either::Right(
            Replayed {
                chunks: self.chunks.iter().cloned().collect(),
                trailers: self.trailers.clone(),
                rest: None,
            }
            .boxed_unsync(),
        )
    }

    pub fn len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What reading a body ahead gave.
pub enum ReadAhead {
    /// The whole body, within the limit: send [`Buffered::body`], as often as needed.
    Complete(Arc<Buffered>),
    /// Longer than the limit (or failing): send this body once; it cannot be replayed.
    TooLarge(UpstreamBody),
}

/// Reads `body` into memory up to `limit` bytes.
pub async fn read_ahead(mut body: UpstreamBody, limit: usize) -> ReadAhead {
    if body.size_hint().lower() > limit as u64 {
        return ReadAhead::TooLarge(body);
    }
    let mut buffered = Buffered::default();
    let mut size = 0usize;
    loop {
        match body.frame().await {
            None => return ReadAhead::Complete(Arc::new(buffered)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    size += data.len();
                    buffered.chunks.push(data);
                    if size > limit {
                        return ReadAhead::TooLarge(resume(buffered, Ok(body)));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        buffered.trailers = Some(trailers);
                    }
                }
            },
            // The client's body failed: pass what came, then the failure, to the upstream.
            Some(Err(e)) => return ReadAhead::TooLarge(resume(buffered, Err(e))),
        }
    }
}

/// The bytes read so far followed by the rest of the body (or its error).
fn resume(read: Buffered, rest: Result<UpstreamBody, BoxError>) -> UpstreamBody {
    Either::Right(
        Replayed {
            chunks: read.chunks.into(),
            trailers: None,
            rest: Some(rest.map_err(Some)),
        }
        .boxed_unsync(),
    )
}

/// Sends `chunks`, then the `rest` of the body if any, else the `trailers`.
struct Replayed {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    /// `Err(Some(e))`: fail with `e` once the chunks are sent.
    rest: Option<Result<UpstreamBody, Option<BoxError>>>,
}

impl Body for Replayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(chunk) = this.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match &mut this.rest {
            Some(Ok(rest)) => Pin::new(rest).poll_frame(cx),
            Some(Err(e)) => Poll::Ready(e.take().map(Err)),
            None => Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
            && match &self.rest {
                Some(Ok(rest)) => rest.is_end_stream(),
                Some(Err(e)) => e.is_none(),
                None => self.trailers.is_none(),
            }
    }

    fn size_hint(&self) -> SizeHint {
        let queued: u64 = self.chunks.iter().map(|c| c.len() as u64).sum();
        match &self.rest {
            Some(Ok(rest)) => {
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(queued + rest.lower());
                if let Some(upper) = rest.upper() {
                    hint.set_upper(queued + upper);
                }
                hint
            }
            _ => SizeHint::with_exact(queued),
        }
    }
}

/// A boxed body of `bytes`, for tests.
#[cfg(test)]
fn chunked(parts: &[&'static str]) -> UpstreamBody {
    use crate::compress::CodedBody;
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
        .iter()
        .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
        .collect();
    let body: CodedBody = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
    Either::Right(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::CodedBody;

    async fn collect(body: UpstreamBody) -> Vec<u8> {
        body.collect().await.expect("body").to_bytes().to_vec()
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_sent_again_whole() {
        let ReadAhead::Complete(buffered) = read_ahead(chunked(&["hello ", "world"]), 11).await else {
            panic!("11 bytes fit a limit of 11");
        };
        assert_eq!(buffered.len(), 11);
        assert_eq!(buffered.body().size_hint().exact(), Some(11));
        assert_eq!(collect(buffered.body()).await, b"hello world");
        assert_eq!(collect(buffered.body()).await, b"hello world");
    }

    #[tokio::test]
    async fn a_longer_body_is_sent_once_unchanged() {
        let ReadAhead::TooLarge(body) = read_ahead(chunked(&["hello ", "world", "!"]), 8).await else {
            panic!("12 bytes exceed a limit of 8");
        };
        assert_eq!(collect(body).await, b"hello world!");
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_not_read_ahead() {
        let body: CodedBody = http_body_util::Full::new(Bytes::from_static(b"0123456789"))
            .map_err(|never| match never {})
            .boxed_unsync();
        let ReadAhead::TooLarge(body) = read_ahead(Either::Right(body), 4).await else {
            panic!("10 declared bytes exceed 4");
        };
        assert_eq!(body.size_hint().exact(), Some(10), "untouched");
        assert_eq!(collect(body).await, b"0123456789");
    }
}
