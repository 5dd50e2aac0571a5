use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::framing::plain_head_len;
use super::*;

fn run(framing: &mut Framing, input: &[u8]) -> (Vec<u8>, Verdict) {
    let mut out = Vec::new();
    let v = framing.feed(input, &mut out);
    (out, v)
}

#[test]
fn plain_requests_pass_byte_for_byte_even_pipelined_and_split() {
    let input: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloPOST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\nGET /d HTTP/1.1\r\n\r\n";
    for split in 1..input.len() {
        let mut f = Framing::new(1024);
        let (mut out, v1) = run(&mut f, &input[..split]);
        let (rest, v2) = run(&mut f, &input[split..]);
        out.extend_from_slice(&rest);
        assert_eq!((v1, v2), (Verdict::Pass, Verdict::Pass), "split at {split}");
        assert_eq!(out, input, "split at {split}");
        assert_eq!(f.heads_seen(), 4, "split at {split}");
        assert!(!f.is_opaque());
    }
}

#[test]
fn content_length_with_transfer_encoding_is_refused() {
    for head in [
        &b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 4\nTransfer-Encoding: gzip, chunked\n\n",
    ] {
        let mut f = Framing::new(1024);
        let (out, v) = run(&mut f, head);
        assert_eq!(v, Verdict::Refused, "{}", String::from_utf8_lossy(head));
        assert!(out.is_empty());
        // Everything after a refused head is dropped.
        assert_eq!(
            run(&mut f, b"GET / HTTP/1.1\r\n\r\n"),
            (Vec::new(), Verdict::Refused)
        );
    }
}

#[test]
fn conflicting_content_lengths_are_refused_and_equal_ones_pass() {
    let mut f = Framing::new(1024);
    let (_, v) = run(
        &mut f,
        b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
    );
    assert_eq!(v, Verdict::Refused);
    let mut f = Framing::new(1024);
    let (_, v) = run(&mut f, b"POST / HTTP/1.1\r\nContent-Length: 4, 5\r\n\r\n");
    assert_eq!(v, Verdict::Refused);
    let mut f = Framing::new(1024);
    let input = b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd";
    assert_eq!(run(&mut f, input), (input.to_vec(), Verdict::Pass));
}

#[test]
fn what_it_does_not_understand_goes_to_hyper_unchecked() {
    // The HTTP/2 preface, a malformed head, an upgrade: passed on, no longer checked.
    for input in [
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        b"G@T / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
    ] {
        let mut f = Framing::new(1024);
        assert_eq!(run(&mut f, input), (input.to_vec(), Verdict::Pass));
        assert!(f.is_opaque(), "{}", String::from_utf8_lossy(input));
    }
}

#[test]
fn heads_without_a_body_are_told_apart_without_a_full_parse_and_the_rest_are_parsed() {
    // No body: the quick scan gives the head's length (lines ending in LF, with or without CR).
    let get = b"GET /a HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\n\r\n";
    assert_eq!(plain_head_len(get), Some(get.len()));
    assert_eq!(plain_head_len(b"GET / HTTP/1.0\nHost: x\n\nrest"), Some(24));
    // Whatever may frame a body, or is not plain HTTP/1, goes to the full parse.
    for head in [
        &b"POST / HTTP/1.1\r\ncontent-LENGTH: 3\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nUPGRADE: websocket\r\n\r\n",
        b"CONNECT x:443 HTTP/1.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\n",
        b"get / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n",
    ] {
        assert_eq!(plain_head_len(head), None, "{}", String::from_utf8_lossy(head));
    }
    // A smuggling attempt is still refused, whatever its case.
    let mut f = Framing::new(1024);
    let smuggle = b"GET / HTTP/1.1\r\ncontent-length: 4\r\nTRANSFER-ENCODING: chunked\r\n\r\n";
    assert_eq!(run(&mut f, smuggle).1, Verdict::Refused);
}

#[test]
fn an_oversize_head_is_refused_complete_or_not() {
    let mut f = Framing::new(64);
    let head = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n", "a".repeat(100));
    assert_eq!(run(&mut f, head.as_bytes()), (Vec::new(), Verdict::TooLarge));
    let mut f = Framing::new(64);
    let head = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(40));
    assert_eq!(run(&mut f, head.as_bytes()), (Vec::new(), Verdict::TooLarge));
    let mut f = Framing::new(64);
    let head = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(30));
    assert_eq!(run(&mut f, head.as_bytes()), (head.into_bytes(), Verdict::Pass));
}

#[tokio::test(start_paused = true)]
async fn oversize_head_reaches_hyper_as_too_many_headers() {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let limits = LimitsConfig {
        max_request_header_bytes: 8192,
        max_request_headers: 3,
        ..LimitsConfig::default()
    };
    let mut io = GuardedIo::new(server, &limits, Duration::from_secs(1), Counter::default());
    let head = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(9000));
    client.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = io.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\nx:\r\nx:\r\nx:\r\nx:\r\n\r\n");
}

#[test]
fn a_partial_head_is_held_back_until_complete() {
    let mut f = Framing::new(1024);
    assert_eq!(
        run(&mut f, b"GET / HTTP/1.1\r\nHost:"),
        (Vec::new(), Verdict::Pass)
    );
    let mut out = Vec::new();
    f.finish(&mut out);
    assert_eq!(out, b"GET / HTTP/1.1\r\nHost:");
}

#[tokio::test(start_paused = true)]
async fn refused_head_reaches_hyper_as_an_invalid_request_line() {
    let (mut client, server) = tokio::io::duplex(4096);
    let refused = Counter::default();
    let mut io = GuardedIo::new(
        server,
        &LimitsConfig::default(),
        Duration::from_secs(1),
        refused.clone(),
    );
    client
        .write_all(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = io.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], REFUSED_HEAD);
    assert_eq!(refused.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn bodies_pass_through_unchanged_and_the_next_head_is_still_checked() {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let refused = Counter::default();
    let mut io = GuardedIo::new(
        server,
        &LimitsConfig::default(),
        Duration::from_secs(1),
        refused.clone(),
    );
    let body = "x".repeat(20_000);
    let input = format!(
        "POST / HTTP/1.1\r\nContent-Length: 20000\r\n\r\n{body}POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    client.write_all(input.as_bytes()).await.unwrap();
    client
        .write_all(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    drop(client);
    let mut got = Vec::new();
    io.read_to_end(&mut got).await.unwrap();
    let mut expected = input.into_bytes();
    expected.extend_from_slice(REFUSED_HEAD);
    assert_eq!(got, expected);
    assert_eq!(refused.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_times_out_before_its_first_head() {
    let (mut client, server) = tokio::io::duplex(4096);
    let mut io = GuardedIo::new(
        server,
        &LimitsConfig::default(),
        Duration::from_secs(10),
        Counter::default(),
    );
    client.write_all(b"GET / HT").await.unwrap();
    let start = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    let err = io.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    assert_eq!(start.elapsed(), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn after_the_first_head_the_timeout_is_hyper_s() {
    let (mut client, server) = tokio::io::duplex(4096);
    let mut io = GuardedIo::new(
        server,
        &LimitsConfig::default(),
        Duration::from_secs(10),
        Counter::default(),
    );
    client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = io.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
    let read = tokio::time::timeout(Duration::from_secs(60), io.read(&mut buf)).await;
    assert!(
        read.is_err(),
        "an idle keep-alive connection is not cut by the guard"
    );
}

#[test]
fn limits_are_range_checked() {
    assert_eq!(LimitsConfig::default().check(), Ok(()));
    let l = LimitsConfig {
        http2_stream_window_bytes: 1000,
        ..LimitsConfig::default()
    };
    assert_eq!(
        l.check(),
        Err((
            "http2_stream_window_bytes",
            "must be between 65535 and 2147483647, got 1000".to_string()
        ))
    );
    let l = LimitsConfig {
        max_request_headers: 0,
        ..LimitsConfig::default()
    };
    assert_eq!(l.check().unwrap_err().0, "max_request_headers");
}
