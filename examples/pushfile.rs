//! Pushes for `bench/load.sh`, built once before the runs, and the check of a sealed reply.
//!
//!     pushfile write --config relay.toml --kind text|scan --count N [--first I] [--lines] --out FILE
//!     pushfile open --config relay.toml < reply.xml
//!
//! `write` builds `--count` distinct pushes to the first account of `--config`, as WeChat
//! builds them (`wechat_relay::wechat::sender`: signed, and encrypted with a fresh random prefix
//! unless the account is in plaintext mode). Push `i` (from `--first`, default 0) has `MsgId`
//! (text) or `EventKey` and `Ticket` (SCAN) of its own, `CreateTime` now minus `i` seconds and
//! nonce `i`, so no two are the same push to the relay's dedupe; the query's `timestamp` is now
//! for every push. Each push is written as the whole HTTP/1.1 request to the account's path,
//! after a line with its length in bytes (`bench/pushes.lua` hands them to wrk as they are),
//! or with `--lines` as one line: the query, a tab, the body (for curl).
//!
//! `open` reads an answer of the relay on stdin, checks its `MsgSignature` and decrypts it
//! with the account's key (`Sender::open_reply`), and prints the message inside. It exits 1
//! when the answer does not open.

use std::io::{BufWriter, Read, Write};
use std::path::Path;

use wechat_relay::config::{Config, Mode};
use wechat_relay::wechat::crypto::random_prefix;
use wechat_relay::wechat::sender::{PushContent, Sender, Stamp, message_xml};

/// The account's `gh_` id, as WeChat writes it into `ToUserName`.
const ACCOUNT_ID: &str = "gh_0123456789ab";
/// Followers the pushes come from, in turn (an openid is 28 characters).
const USERS: usize = 5_000;

struct Options {
    config: String,
    kind: String,
    count: usize,
    first: usize,
    lines: bool,
    out: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: pushfile write --config PATH --kind text|scan --count N [--first I] [--lines] --out FILE\n       \
         pushfile open --config PATH < reply"
    );
    std::process::exit(2)
}

fn sender(config: &str) -> (Sender, Mode, String) {
    let config = Config::load(Path::new(config)).unwrap_or_else(|e| {
        eprintln!("{config}: {e}");
        std::process::exit(2)
    });
    let Some(account) = config.accounts.first() else {
        eprintln!("the config has no [[account]]");
        std::process::exit(2)
    };
    let sender = Sender {
        token: account.token.clone(),
        app_id: account.app_id.clone(),
        key: account.keys.first().cloned(),
    };
    (sender, account.mode, account.path.clone())
}

fn write(options: &Options) -> std::io::Result<()> {
    let (sender, mode, path) = sender(&options.config);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(std::io::Error::other)?
        .as_secs();
    let timestamp = now.to_string();
    let mut out = BufWriter::new(std::fs::File::create(&options.out)?);
    for i in options.first..options.first.saturating_add(options.count) {
        let from = format!("oBench{:022}", i % USERS);
        let (event_key, ticket) = (
            format!("qrscene_{i}"),
            format!("gQH47joAAAAAAAAAASxodHRwOi8vd2VpeGluLnFxLmNvbS9xL{i:020}"),
        );
        let content = match options.kind.as_str() {
            "text" => PushContent::Text {
                content: "I would like to know when my order ships, please.",
                msg_id: 24_000_000_000_000_000u64.saturating_add(i as u64),
            },
            "scan" => PushContent::Event {
                event: "SCAN",
                event_key: Some(&event_key),
                ticket: Some(&ticket),
            },
            other => {
                eprintln!("--kind text|scan, not {other}");
                std::process::exit(2)
            }
        };
        let xml = message_xml(ACCOUNT_ID, &from, now.saturating_sub(i as u64), &content);
        let nonce = i.to_string();
        let stamp = Stamp {
            timestamp: &timestamp,
            nonce: &nonce,
            openid: &from,
        };
        let push = if mode == Mode::Plaintext {
            sender.plaintext(&xml, &stamp)
        } else {
            let Some(push) = sender.encrypted(&xml, ACCOUNT_ID, None, &stamp, &random_prefix())
            else {
                eprintln!("the account has no key");
                std::process::exit(2)
            };
            push
        };
        if options.lines {
            // Neither a query nor WeChat's XML holds a tab or a newline.
            writeln!(out, "{}\t{}", push.query, push.body)?;
        } else {
            let request = format!(
                "POST {path}?{} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n\
                 Content-Length: {}\r\n\r\n{}",
                push.query,
                push.body.len(),
                push.body
            );
            write!(out, "{}\n{request}", request.len())?;
        }
    }
    out.flush()
}

fn open(config: &str) -> std::io::Result<()> {
    let (sender, _, _) = sender(config);
    let mut answer = Vec::new();
    std::io::stdin().read_to_end(&mut answer)?;
    match sender.open_reply(&answer) {
        Ok(message) => std::io::stdout().write_all(&message),
        Err(e) => {
            eprintln!("the answer does not open: {e}");
            std::process::exit(1)
        }
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_else(|| usage());
    let mut options = Options {
        config: "relay.toml".into(),
        kind: "text".into(),
        count: 1,
        first: 0,
        lines: false,
        out: String::new(),
    };
    while let Some(arg) = args.next() {
        if arg == "--lines" {
            options.lines = true;
            continue;
        }
        let value = args.next().unwrap_or_else(|| usage());
        let number = || value.parse().unwrap_or_else(|_| usage());
        match arg.as_str() {
            "--config" => options.config = value,
            "--kind" => options.kind = value,
            "--count" => options.count = number(),
            "--first" => options.first = number(),
            "--out" => options.out = value,
            _ => usage(),
        }
    }
    match command.as_str() {
        "write" if !options.out.is_empty() => write(&options),
        "open" => open(&options.config),
        _ => usage(),
    }
}
