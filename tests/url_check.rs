//! WeChat's URL check: `GET` with signature, timestamp, nonce and echostr.

mod common;

use common::*;

async fn relay(token: &str, mode: &str) -> TestRelay {
    let target = FakeTarget::start().await;
    let key = if mode == "plaintext" {
        String::new()
    } else {
        format!("encoding_aes_key = \"{KEY}\"\n")
    };
    let toml = format!(
        "{}[[account]]\nname = \"main\"\npath = \"/wx/callback\"\napp_id = \"{APP_ID}\"\ntoken = \"{token}\"\n{key}mode = \"{mode}\"\n{}",
        server_section(2000, 300),
        target_section("t", &target.url("/"), "raw", ""),
    );
    TestRelay::start(&toml).await
}

#[tokio::test]
async fn generated_vector_echoes_echostr_in_safe_mode() {
    let v = &vectors("generated_vectors.json")["url_verification"];
    let relay = relay(v["token"].as_str().expect("token"), "safe").await;
    let answer = get(&relay.url(&format!(
        "/wx/callback?{}",
        v["query_string"].as_str().expect("query")
    )))
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.text(),
        v["expected_response_body"].as_str().expect("body")
    );
    relay.stop().await;
}

#[tokio::test]
async fn docs_example_aaaaa() {
    let relay = relay("AAAAA", "plaintext").await;
    let answer = get(&relay.url(
        "/wx/callback?signature=f464b24fc39322e44b38aa78f5edd27bd1441696&echostr=4375120948345356249&timestamp=1714036504&nonce=1514711492",
    ))
    .await;
    assert_eq!(
        (answer.status.as_u16(), answer.text().as_str()),
        (200, "4375120948345356249")
    );
    relay.stop().await;
}

#[tokio::test]
async fn bad_or_missing_signature_is_403_and_echoes_nothing() {
    let relay = relay("AAAAA", "plaintext").await;
    let bad = get(&relay.url(
        "/wx/callback?signature=f464b24fc39322e44b38aa78f5edd27bd1441697&echostr=4375120948345356249&timestamp=1714036504&nonce=1514711492",
    ))
    .await;
    assert_eq!(bad.status, 403);
    assert!(!bad.text().contains("4375120948345356249"));
    let missing = get(&relay
        .url("/wx/callback?echostr=4375120948345356249&timestamp=1714036504&nonce=1514711492"))
    .await;
    assert_eq!(
        missing.status, 403,
        "an unsigned check is refused like a wrongly signed one"
    );
    let no_echostr = get(&relay.url(
        "/wx/callback?signature=f464b24fc39322e44b38aa78f5edd27bd1441696&timestamp=1714036504&nonce=1514711492",
    ))
    .await;
    assert_eq!(no_echostr.status, 400);
    let wrong_path = get(&relay.url(
        "/wechat?signature=f464b24fc39322e44b38aa78f5edd27bd1441696&echostr=1&timestamp=1714036504&nonce=1514711492",
    ))
    .await;
    assert_eq!(wrong_path.status, 404);
    relay.stop().await;
}
