//! Request bodies on cogmesh's own HTTP/2 server connection: what the connection received for
//! a stream, on its way to whoever reads it (the upstream side, maybe on another task), and
//! the flow-control credit it gives back as it is read.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;

use crate::compress::BoxError;

/// A request body on its way from the connection to whoever reads it (the upstream side, maybe
/// on another task), and the flow-control credit it gives back as it is read.
#[derive(Default)]
pub(super) struct Incoming {
    pub(super) data: VecDeque<Bytes>,
    pub(super) trailers: Option<HeaderMap>,
    /// END_STREAM came.
    pub(super) ended: bool,
    /// The stream was reset, or broke the rules: the body fails with this.
    pub(super) failed: Option<&'static str>,
    /// Bytes read and not yet given back to the client in WINDOW_UPDATE.
    pub(super) released: u32,
    pub(super) reader: Option<Waker>,
    pub(super) connection: Option<Waker>,
}

/// The reading end of a request body (in an [`H2Body`]).
pub struct Inbound(pub(super) Arc<Mutex<Incoming>>);

pub(super) fn lock(shared: &Mutex<Incoming>) -> std::sync::MutexGuard<'_, Incoming> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inbound {
    pub(in crate::forward) fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, BoxError>>> {
        let mut incoming = lock(&self.0);
        if let Some(data) = incoming.data.pop_front() {
            incoming.released += data.len() as u32;
            if let Some(connection) = &incoming.connection {
                connection.wake_by_ref();
            }
            return Poll::Ready(Some(Ok(data)));
        }
        if let Some(why) = incoming.failed {
            return Poll::Ready(Some(Err(why.into())));
        }
        if incoming.ended {
            return Poll::Ready(None);
        }
        incoming.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    pub(in crate::forward) fn poll_trailers(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, BoxError>> {
        // Only asked once the data has ended, and trailers come with the end.
        Poll::Ready(Ok(lock(&self.0).trailers.take()))
    }

    pub(in crate::forward) fn is_end_stream(&self) -> bool {
        let incoming = lock(&self.0);
        incoming.ended && incoming.data.is_empty() && incoming.trailers.is_none() && incoming.failed.is_none()
    }
}
