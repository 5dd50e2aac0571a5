//! Hot reload of proxy.yaml: a good edit re-routes traffic without dropping a keep-alive
//! connection; a bad edit is refused with file, field and reason (in `/config` and the
//! `config_reload_total` metric) while the last good configuration keeps serving; SIGHUP reloads.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use cogmesh_e2e::{eventually, free_addr, http_get, metric_value, start_workload, Proc, Proxy};

const CONFIG: &str = r#"
admin: "{admin}"
listeners:
  - { name: outbound, address: "{listen}", default_service: a }
services:
  - { name: a, endpoints: ["{w1}"], balancer: round_robin }
  - { name: b, endpoints: ["{w2}"], balancer: round_robin }
routes:
  - { match: { headers: { x-pick: b } }, service: b }
"#;

/// One request for `/` with `x-pick: b` on an open keep-alive connection; returns
/// `x-served-by`.
fn served_by(conn: &mut TcpStream) -> String {
    write!(conn, "GET / HTTP/1.1\r\nHost: test\r\nx-pick: b\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf).expect("the connection stays open");
        assert!(n > 0, "the proxy closed a keep-alive connection");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                return head
                    .lines()
                    .find_map(|l| l.strip_prefix("x-served-by: "))
                    .unwrap()
                    .to_string();
            }
        }
    }
}

#[test]
fn edits_apply_bad_edits_are_refused_and_connections_stay() {
    let w1 = start_workload("w1");
    let w2 = start_workload("w2");
    let listen = free_addr();
    let admin = free_addr();
    let dir = std::env::temp_dir().join(format!("cogmesh-reload-{}-{}", std::process::id(), listen.port()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.yaml");
    let render = |text: &str| {
        text.replace("{admin}", &admin.to_string())
            .replace("{listen}", &listen.to_string())
            .replace("{w1}", &w1.addr.to_string())
            .replace("{w2}", &w2.addr.to_string())
    };
    std::fs::write(&path, render(CONFIG)).unwrap();
    let mut proc = Proc::spawn(
        "cogmesh-proxy",
        std::process::Command::new(cogmesh_e2e::bin("cogmesh-proxy"))
            .arg("--config")
            .arg(&path)
            .env("COGMESH_LOG", "warn"),
    );
    eventually("the proxy to be ready", Duration::from_secs(20), || {
        assert!(proc.is_running());
        matches!(http_get(admin, "/ready"), Ok((200, _))).then_some(())
    });
    let proxy = Proxy { listen, admin, proc };

    let mut conn = TcpStream::connect(proxy.listen).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(served_by(&mut conn), "w2");

    // A good edit: requests with `x-pick: b` now go to service a.
    std::fs::write(&path, render(&CONFIG.replace("service: b }", "service: a }"))).unwrap();
    eventually("the edit to apply", Duration::from_secs(10), || {
        let m = proxy.metrics();
        (metric_value(&m, r#"config_reload_total{result="applied"}"#) == Some(1.0)).then_some(())
    });
    assert_eq!(
        served_by(&mut conn),
        "w1",
        "the same connection follows the new routes"
    );

    // A bad edit is refused; the last good configuration stays.
    std::fs::write(
        &path,
        render(&CONFIG.replace("balancer: round_robin }", "balancer: fastest }")),
    )
    .unwrap();
    let last = eventually("the refusal", Duration::from_secs(10), || {
        let (_, body) = http_get(proxy.admin, "/config").unwrap();
        let c: serde_json::Value = serde_json::from_str(&body).unwrap();
        (c["last_reload"]["applied"] == false).then(|| c["last_reload"]["error"].to_string())
    });
    assert!(
        last.contains("proxy.yaml: services[0].balancer: unknown variant `fastest`"),
        "{last}"
    );
    let m = proxy.metrics();
    assert_eq!(
        metric_value(&m, r#"config_reload_total{result="refused"}"#),
        Some(1.0),
        "{m}"
    );
    assert_eq!(served_by(&mut conn), "w1");

    // Changing a listener needs a restart: refused with that reason.
    std::fs::write(&path, render(&CONFIG.replace("name: outbound", "name: renamed"))).unwrap();
    let last = eventually("the second refusal", Duration::from_secs(10), || {
        let (_, body) = http_get(proxy.admin, "/config").unwrap();
        let c: serde_json::Value = serde_json::from_str(&body).unwrap();
        let e = c["last_reload"]["error"].as_str().unwrap_or_default().to_string();
        e.contains("listeners[0]").then_some(e)
    });
    assert!(last.contains("needs a restart"), "{last}");

    // Restore the original file quietly, then SIGHUP: back to the first routes.
    std::fs::write(&path, render(CONFIG)).unwrap();
    proxy.proc.signal("HUP");
    eventually("the restore to apply", Duration::from_secs(10), || {
        (served_by(&mut conn) == "w2").then_some(())
    });
    assert!(proxy.proc.child.id() > 0);
    let _ = std::fs::remove_dir_all(&dir);
}
