//! The bounds that keep a stalled client from taking the relay down: write stalls. (Connection
//! slots are in connections.rs, per-target delivery concurrency in outbox.rs.)

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
        // The keep-alive timer must not be what closes the stalled connection.
        "shutdown_grace_ms = 2000\nmax_connections = 1\nkeepalive_timeout_ms = 300000\n",
        &target,
        "",
    ))
    .await;
    (relay, target)
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_its_connection() {
    let (relay, _target) = one_connection_relay().await;

    // Pipeline URL checks with a large echostr and never read the answers: once the socket
    // buffers are full the relay's writes make no progress.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut stalled = socket.connect(relay.addr).await.expect("connect");
    let echo = "e".repeat(16 * 1024);
    let query = plain_query(&now(), "7");
    let request = format!("GET /wechat?{query}&echostr={echo} HTTP/1.1\r\nhost: relay\r\n\r\n");
    // Keep writing until the relay closes the connection: its receive buffer (autotuned, up
    // to tens of MiB) fills first, then the client's send buffer.
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while stalled.write_all(request.as_bytes()).await.is_ok() {}
        // The relay closed the connection.
    });

    // The write stall timeout (10 s) closes it, without another client asking for the slot.
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the stalled client's connection was closed")
        .expect("task");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "closed after {:?}: not by the write stall timeout",
        started.elapsed()
    );
    relay.stop().await;
}
