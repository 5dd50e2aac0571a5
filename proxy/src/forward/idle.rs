//! The idle stream timeout (`stream_idle_timeout_ms` of a service, off unless set): a request
//! whose stream carries nothing in either direction for that long is ended — the response body
//! fails, so the client sees the stream reset (HTTP/2) or the connection closed (HTTP/1), and
//! the upstream connection is dropped. Before the response headers, `response_timeout_ms`
//! applies instead (504).
//!
//! Activity is a timestamp shared by the request body (each frame the client sends) and the
//! response body (each frame the upstream sends). One timer per stream sleeps until the last
//! activity plus the timeout, and re-arms itself when there was activity meanwhile, so a busy
//! stream costs one clock read per frame, not one timer reset.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::time::{Instant, Sleep};

use crate::compress::BoxError;

/// When a stream last carried a frame, in either direction.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    /// Nanoseconds since `epoch`.
    last_ns: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            epoch: Instant::now(),
            last_ns: AtomicU64::new(0),
        })
    }

    pub fn touch(&self) {
        let ns = self.epoch.elapsed().as_nanos() as u64;
        self.last_ns.store(ns, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed))
    }
}

/// The timer of one stream, kept by its response body.
pub struct IdleTimer {
    activity: Arc<Activity>,
    after: Duration,
    sleep: Pin<Box<Sleep>>,
    expired: Counter,
}

impl IdleTimer {
    pub fn new(activity: Arc<Activity>, after: Duration, expired: Counter) -> Self {
        let sleep = Box::pin(tokio::time::sleep_until(activity.last() + after));
        IdleTimer {
            activity,
            after,
            sleep,
            expired,
        }
    }

    /// A response frame came.
    pub fn touch(&self) {
        self.activity.touch();
    }

    /// Ready with the error to end the stream with once it has been idle for the timeout;
    /// re-arms (and stays pending) when there was activity since the timer was set.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<BoxError> {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = self.activity.last() + self.after;
            if deadline > Instant::now() {
                self.sleep.as_mut().reset(deadline);
                continue;
            }
            self.expired.inc();
            let ms = self.after.as_millis();
            return Poll::Ready(format!("stream idle for {ms} ms (stream_idle_timeout_ms)").into());
        }
    }
}

/// A request body that marks the stream active with each frame.
pub struct ActiveBody<B> {
    inner: B,
    activity: Arc<Activity>,
}

impl<B> ActiveBody<B> {
    pub fn new(inner: B, activity: Arc<Activity>) -> Self {
        ActiveBody { inner, activity }
    }
}

impl<B> Body for ActiveBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.activity.touch();
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_timer_fires_only_after_a_whole_timeout_without_activity() {
        let activity = Activity::new();
        activity.touch();
        let expired = Counter::default();
        let mut timer = IdleTimer::new(Arc::clone(&activity), Duration::from_secs(10), expired.clone());
        let fired = |timer: &mut IdleTimer| {
            timer
                .poll_expired(&mut Context::from_waker(std::task::Waker::noop()))
                .is_ready()
        };
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!fired(&mut timer));
        // Activity at 6 s moves the deadline to 16 s.
        activity.touch();
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!fired(&mut timer), "12 s: 6 s after the last frame");
        assert_eq!(expired.get(), 0);
        tokio::time::advance(Duration::from_secs(4)).await;
        let err = poll_fn(|cx| timer.poll_expired(cx)).await;
        assert_eq!(
            err.to_string(),
            "stream idle for 10000 ms (stream_idle_timeout_ms)"
        );
        assert_eq!(expired.get(), 1);
    }
}
