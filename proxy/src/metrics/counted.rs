//! Byte counts of accepted connections: [`CountedIo`] wraps a client connection and adds what
//! it reads and writes to `tcp_read_bytes_total` / `tcp_write_bytes_total{direction,listener}`.
//! The counts gather in the connection and reach the shared counters every
//! [`FLUSH_BYTES`] and when it closes, so the request path pays two additions per I/O call,
//! not an atomic operation.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes a connection gathers before adding them to the shared counters.
pub const FLUSH_BYTES: u64 = 64 * 1024;

/// The shared read and write counters of one listener.
#[derive(Clone, Debug, Default)]
pub struct ByteCounters {
    pub read: Counter,
    pub written: Counter,
}

/// A connection whose bytes are counted.
pub struct CountedIo<T> {
    inner: T,
    counters: ByteCounters,
    read: u64,
    written: u64,
}

impl<T> CountedIo<T> {
    pub fn new(inner: T, counters: ByteCounters) -> Self {
        CountedIo {
            inner,
            counters,
            read: 0,
            written: 0,
        }
    }

    fn flush_counts(&mut self) {
        self.counters.read.inc_by(std::mem::take(&mut self.read));
        self.counters.written.inc_by(std::mem::take(&mut self.written));
    }

    fn add(&mut self, read: u64, written: u64) {
        self.read += read;
        self.written += written;
        if self.read + self.written >= FLUSH_BYTES {
            self.flush_counts();
        }
    }
}

impl<T> Drop for CountedIo<T> {
    fn drop(&mut self) {
        self.flush_counts();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        this.add(n as u64, 0);
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            this.add(0, n as u64);
        }
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            this.add(0, n as u64);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_reach_the_counters_in_chunks_and_at_close() {
        let counters = ByteCounters::default();
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut io = CountedIo::new(a, counters.clone());
        io.write_all(b"hello").await.unwrap();
        b.write_all(&[0u8; 100]).await.unwrap();
        let mut buf = [0u8; 100];
        io.read_exact(&mut buf).await.unwrap();
        // Below the flush size nothing is shared yet.
        assert_eq!((counters.read.get(), counters.written.get()), (0, 0));
        io.write_all(&vec![0u8; FLUSH_BYTES as usize]).await.unwrap();
        assert_eq!(counters.written.get(), 5 + FLUSH_BYTES);
        drop(io);
        assert_eq!(counters.read.get(), 100);
    }
}
