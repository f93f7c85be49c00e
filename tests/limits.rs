//! The bounds that keep a flood or a stalled client from taking the relay down: connections and
//! write stalls. (Per-target delivery concurrency is in outbox.rs.)

mod common;

use std::time::Duration;

use common::*;

/// A plaintext account routing everything to `target`, with `server_keys` in place of the kit's
/// `shutdown_grace_ms` line.
fn plaintext_config(server_keys: &str, target: &FakeTarget, target_extra: &str) -> String {
    let mut toml = server_section(2000, 300).replace("shutdown_grace_ms = 2000\n", server_keys);
    toml.push_str(&account_section("main", "/wechat", "plaintext"));
    toml.push_str(&target_section(
        "t",
        &target.url("/"),
        "plain",
        target_extra,
    ));
    toml.push_str("[[route]]\nto = [\"t\"]\n");
    toml
}

/// A relay that serves one client connection at a time.
async fn one_connection_relay() -> (TestRelay, FakeTarget) {
    let target = FakeTarget::start().await;
    let relay = TestRelay::start(&plaintext_config(
        "shutdown_grace_ms = 2000\nmax_connections = 1\n",
        &target,
        "",
    ))
    .await;
    (relay, target)
}

#[tokio::test]
async fn at_max_connections_new_clients_wait_for_a_free_one() {
    let (relay, mut target) = one_connection_relay().await;

    // An idle client holds the only connection.
    let idle = tokio::net::TcpStream::connect(relay.addr)
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (query, body) = PushBuilder::new(text_xml("waiting", 1)).plaintext();
    let url = relay.url(&format!("/wechat?{query}"));
    let pending = tokio::spawn(async move { post(&url, body).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !pending.is_finished(),
        "a second connection was served past max_connections = 1"
    );
    target.expect_none(Duration::from_millis(10)).await;

    // The idle client leaves: the waiting push is served.
    drop(idle);
    let answer = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("served once a connection is free")
        .expect("task");
    assert_eq!(answer.status, 200);
    target.next().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_its_connection() {
    let (relay, mut target) = one_connection_relay().await;

    // Pipeline requests and never read the answers: once the socket buffers are full the
    // relay's writes make no progress.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut stalled = socket.connect(relay.addr).await.expect("connect");
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let request = b"GET /nope HTTP/1.1\r\nhost: relay\r\n\r\n".repeat(1000);
        for _ in 0..500 {
            if stalled.write_all(&request).await.is_err() {
                break;
            }
        }
        stalled
    });
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The only connection slot is taken; the stall timeout frees it.
    let (query, body) = PushBuilder::new(text_xml("after the stall", 1)).plaintext();
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        post(&relay.url(&format!("/wechat?{query}")), body),
    )
    .await
    .expect("the stalled client's connection was closed, freeing the slot");
    assert_eq!(answer.status, 200);
    target.next().await;
    writer.abort();
    relay.stop().await;
}
