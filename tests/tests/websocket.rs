//! HTTP/1.1 Upgrade through the proxy: a WebSocket client (tokio-tungstenite) talks to the
//! workload's echo endpoint; the proxy splices the two upgraded connections.

use cogmesh_e2e::{start_workload, Proxy};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_proxy() {
    let upstream = start_workload("ws");
    let proxy = Proxy::quick(&[upstream.addr], &[]);
    let (mut ws, response) = tokio_tungstenite::connect_async(format!("ws://{}/ws", proxy.listen))
        .await
        .expect("websocket handshake through the proxy");
    assert_eq!(response.status(), 101);
    for i in 0..10 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let got = ws.next().await.expect("a reply").unwrap();
        assert_eq!(got, Message::text(format!("hello {i}")));
    }
    let blob: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    let got = ws.next().await.expect("a reply").unwrap();
    assert_eq!(got.into_data().as_ref(), &blob[..]);
    ws.close(None).await.unwrap();
}
