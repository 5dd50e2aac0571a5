//! The idle stream timeout: a response that stops flowing for `stream_idle_timeout_ms` is cut
//! (the client sees a truncated body and the proxy counts it), while a slow stream that keeps
//! sending is left alone however long it lasts.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use cogmesh_e2e::{free_addr, metric_value, Proxy};

/// An HTTP/1.1 upstream whose response to `/stall` is its headers (100 bytes announced) and 10
/// bytes, then nothing for 10 s; to `/trickle`, 10 bytes every 150 ms for 1.5 s.
fn start_slow_upstream() -> SocketAddr {
    // A port free a moment ago can be taken meanwhile: try a few.
    let listener = (0..5)
        .find_map(|_| TcpListener::bind(free_addr()).ok())
        .expect("a loopback port");
    let addr = listener.local_addr().expect("local addr");
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut conn = conn;
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                    return;
                }
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                    line.clear();
                }
                let chunk = [b'x'; 10];
                let _ =
                    conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\nconnection: close\r\n\r\n");
                if request_line.contains("/stall") {
                    let _ = conn.write_all(&chunk);
                    std::thread::sleep(Duration::from_secs(10));
                } else {
                    for _ in 0..10 {
                        if conn.write_all(&chunk).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(150));
                    }
                }
            });
        }
    });
    addr
}

/// curl's exit code and the number of body bytes it received.
fn fetch(proxy: &Proxy, path: &str) -> (Option<i32>, usize) {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "20", "-o", "-"])
        .arg(proxy.url(path))
        .output()
        .expect("curl runs");
    (out.status.code(), out.stdout.len())
}

#[test]
fn a_stalled_stream_is_cut_and_a_trickling_one_is_not() {
    let upstream = start_slow_upstream();
    let proxy = Proxy::with_service(&[upstream], &["stream_idle_timeout_ms: 500"]);
    let metric = r#"stream_idle_timeout_total{direction="outbound",service="web"}"#;

    // 1.5 s in all, but never 500 ms without a byte: delivered whole.
    assert_eq!(fetch(&proxy, "/trickle"), (Some(0), 100));
    assert_eq!(metric_value(&proxy.metrics(), metric), Some(0.0));

    // 10 bytes, then silence: cut after the idle timeout, long before the upstream's 10 s.
    let (code, received) = fetch(&proxy, "/stall");
    assert_eq!(received, 10);
    assert_eq!(code, Some(18), "curl reports a partial transfer");
    assert_eq!(metric_value(&proxy.metrics(), metric), Some(1.0));
}
