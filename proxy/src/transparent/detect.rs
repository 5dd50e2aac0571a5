//! Protocol detection on a captured connection: the first bytes the client sends say whether it
//! speaks HTTP/1, HTTP/2 (the connection preface), TLS (a ClientHello record) or something else.
//!
//! [`classify`] is the pure decision over the bytes seen so far; [`detect`] peeks at the socket
//! (the bytes stay in the kernel buffer for whoever serves the connection next) until
//! [`classify`] decides, the client closes, or the timeout runs out.

use std::time::Duration;

use tokio::net::TcpStream;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest HTTP/1 method we wait for before giving up on HTTP/1 (`OPTIONS`, `CONNECT`
/// and friends are shorter; extension methods longer than this are proxied as opaque TCP).
const MAX_METHOD_BYTES: usize = 16;

/// Bytes peeked at most: enough for the HTTP/2 preface and an HTTP/1 method.
pub const PEEK_BYTES: usize = 32;

/// How often the peek is repeated while the bytes seen so far are not enough to decide.
const REPEEK_EVERY_MS: u64 = 2;

/// What a captured connection speaks, and how we found out: the `result` label of
/// `protocol_detect_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Detected {
    Http1,
    Http2,
    Tls,
    /// The client sent bytes that are none of the above.
    Opaque,
    /// The destination port is configured as opaque: nothing was read.
    OpaquePort,
    /// The client sent nothing (or not enough to decide) within the detection timeout.
    Timeout,
    /// The client closed (or the read failed) before anything could be decided.
    Closed,
}

impl Detected {
    pub const ALL: [Detected; 7] = [
        Detected::Http1,
        Detected::Http2,
        Detected::Tls,
        Detected::Opaque,
        Detected::OpaquePort,
        Detected::Timeout,
        Detected::Closed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Detected::Http1 => "http1",
            Detected::Http2 => "http2",
            Detected::Tls => "tls",
            Detected::Opaque => "opaque",
            Detected::OpaquePort => "opaque_port",
            Detected::Timeout => "timeout",
            Detected::Closed => "closed",
        }
    }

    /// Whether the connection is served as HTTP (else it is proxied as opaque TCP).
    pub fn is_http(self) -> bool {
        matches!(self, Detected::Http1 | Detected::Http2)
    }
}

/// Decides from the first bytes of a connection; `None` while more bytes are needed.
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    if bytes.is_empty() {
        return None;
    }
    // TLS: a handshake record (22) of a 3.x version.
    if bytes[0] == 0x16 {
        return match bytes.get(1) {
            None => None,
            Some(3) => Some(Detected::Tls),
            Some(_) => Some(Detected::Opaque),
        };
    }
    let n = bytes.len().min(HTTP2_PREFACE.len());
    if bytes[..n] == HTTP2_PREFACE[..n] {
        return (n == HTTP2_PREFACE.len()).then_some(Detected::Http2);
    }
    // HTTP/1: a method token (RFC 9110 tchar, in practice upper-case letters) then a space.
    for (i, &b) in bytes.iter().enumerate().take(MAX_METHOD_BYTES + 1) {
        match b {
            b' ' if i > 0 => return Some(Detected::Http1),
            b'A'..=b'Z' | b'-' | b'_' if i < MAX_METHOD_BYTES => {}
            _ => return Some(Detected::Opaque),
        }
    }
    None
}

/// Peeks at `stream` until its protocol is known, waiting at most `timeout` for the client.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Detected {
    let peek = async {
        let mut buf = [0u8; PEEK_BYTES];
        let mut seen = 0;
        loop {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return Detected::Closed,
                Ok(n) => n,
            };
            if let Some(d) = classify(&buf[..n]) {
                return d;
            }
            if n == buf.len() {
                return Detected::Opaque;
            }
            if n == seen {
                // The kernel holds a partial prefix: `peek` would return it again at once, so
                // wait a little for the rest instead of spinning.
                tokio::time::sleep(Duration::from_millis(REPEEK_EVERY_MS)).await;
            }
            seen = n;
        }
    };
    tokio::time::timeout(timeout, peek)
        .await
        .unwrap_or(Detected::Timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_methods() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None);
    }

    #[test]
    fn http2_preface_needs_all_of_it() {
        assert_eq!(classify(HTTP2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(&HTTP2_PREFACE[..10]), None);
        // "PRI " alone could be an HTTP/1 method: the preface wins once complete.
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Detected::Http1));
    }

    #[test]
    fn tls_client_hello() {
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02, 0x00]), Some(Detected::Tls));
        assert_eq!(classify(&[0x16]), None);
        assert_eq!(classify(&[0x16, 0x09]), Some(Detected::Opaque));
    }

    #[test]
    fn anything_else_is_opaque() {
        assert_eq!(classify(b"hello"), Some(Detected::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Detected::Opaque));
        assert_eq!(classify(b" GET"), Some(Detected::Opaque));
        assert_eq!(classify(&[0, 0, 0, 8, 4, 210, 22, 47]), Some(Detected::Opaque));
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRSTUV"), Some(Detected::Opaque));
    }

    #[tokio::test]
    async fn silent_client_times_out_and_partial_prefix_waits() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(
            detect(&server, Duration::from_millis(50)).await,
            Detected::Timeout
        );

        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        use tokio::io::AsyncWriteExt;
        client.write_all(b"GE").await.unwrap();
        let detecting = tokio::spawn(async move { detect(&server, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(detecting.await.unwrap(), Detected::Http1);

        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        drop(client);
        assert_eq!(detect(&server, Duration::from_secs(5)).await, Detected::Closed);
    }
}
