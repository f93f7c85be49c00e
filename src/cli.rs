//! The command line: `wechat-relay [--config PATH] <serve|check|simulate|outbox|completions
//! ...>`. `--config` is accepted anywhere on the line, by every subcommand.
//!
//! build.rs compiles this file on its own too (for the man page and the completion scripts
//! of the .deb): it may use std, clap, clap_complete, http and humantime, nothing of the
//! crate.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, CommandFactory, Parser, Subcommand};
use clap_complete::Shell;
use http::Uri;

/// The name the binary is installed and completed under.
pub const BIN_NAME: &str = "wechat-relay";

#[derive(Debug, Parser)]
#[command(
    name = "wechat-relay",
    version,
    about = "Verifies, decrypts and routes WeChat official-account pushes"
)]
pub struct Cli {
    /// The config file.
    #[arg(
        long,
        short,
        global = true,
        env = "WECHAT_RELAY_CONFIG",
        default_value = "relay.toml"
    )]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay.
    Serve,
    /// Validate the config and print what it does, secrets redacted.
    Check,
    /// Act as WeChat: send a signed push or the URL check to the running relay, print its answer.
    ///
    /// Sends one push exactly as WeChat would for the account (signed; encrypted when the
    /// account is in safe or compatible mode), or the URL check, to the running relay, and
    /// prints the HTTP status and the reply, decrypted after checking its MsgSignature. Proves a
    /// deployment before WeChat is pointed at it.
    ///
    /// Exit 0 when the relay answered 2xx with a reply WeChat would take (for --verify-url: and
    /// echoed echostr), 1 when it did not or could not be reached (the reason on stderr), 2 for
    /// a bad config or command line.
    #[command(after_help = SIMULATE_EXAMPLES)]
    Simulate(SimulateArgs),
    /// See and repair the outbox: pending deliveries and dead letters. Works while the relay
    /// runs; run it as the user the relay runs as.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Write a Mode 2 relay.toml at --config (default ./relay.toml) for one account: QR logins
    /// to the identity provider, everything else to your servers.
    ///
    /// Writes the account, an identity-provider target (`raw`), a business target (`plain`,
    /// signed with a generated whsec_ secret in business.secret beside the config, mode 0600),
    /// the `qr-login` route (subscribe with a scene, SCAN) and the catch-all, and the store
    /// path. Checks what it wrote as `check` does. Never overwrites a file (exit 2).
    #[command(after_help = INIT_EXAMPLE)]
    Init(InitArgs),
    /// A small HTTP target for trying the relay out: prints every request it receives and
    /// answers `success`, or with --reply a passive text reply to the message's sender.
    Sink {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
        /// Answer each message with this text (a passive reply), instead of `success`.
        #[arg(long, value_name = "TEXT")]
        reply: Option<String>,
    },
    /// Print a shell completion script: `wechat-relay completions bash >
    /// /etc/bash_completion.d/wechat-relay` (the .deb installs them for bash, zsh and fish).
    Completions {
        /// The shell to complete in.
        shell: Shell,
    },
}

const INIT_EXAMPLE: &str = "Example:
  wechat-relay init --app-id wx0123456789abcdef --token Tok3nFromMpAdmin \\
    --encoding-aes-key abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG \\
    --identity-url https://core.authing.cn/connections/social/YOUR-ID/events \\
    --business-url http://127.0.0.1:9000/wechat";

/// `wechat-relay init`: the account's values and the two targets' URLs.
#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// The official account's AppID (wx...).
    #[arg(long)]
    pub app_id: String,
    /// The Token set in the official account's admin (3-32 letters or digits).
    #[arg(long)]
    pub token: String,
    /// The EncodingAESKey (43 characters); not needed in plaintext mode.
    #[arg(long)]
    pub encoding_aes_key: Option<String>,
    /// The message encryption mode set in the official account's admin.
    #[arg(long, value_enum, default_value_t = InitMode::Safe)]
    pub mode: InitMode,
    /// The identity provider's event URL for this account (QR logins go there).
    #[arg(long)]
    pub identity_url: String,
    /// Your servers' URL (every other push goes there).
    #[arg(long)]
    pub business_url: String,
}

/// The account's message encryption mode, as the admin names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InitMode {
    Safe,
    Compatible,
    Plaintext,
}

/// Writes the completion script of the whole command line for `shell`.
pub fn write_completions(shell: Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut Cli::command(), BIN_NAME, out);
}

#[derive(Debug, Clone, Subcommand)]
pub enum OutboxCommand {
    /// Per target: pending deliveries, the oldest one's age, dead letters.
    Stats {
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// One line per delivery: id, target, message type, event, route, age, attempts, last
    /// error.
    List {
        /// Dead letters instead of pending deliveries.
        #[arg(long)]
        dead: bool,
        /// Only this target's.
        #[arg(long)]
        target: Option<String>,
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// One delivery (pending or dead) in full: its metadata and the request that will be
    /// sent; the decrypted message only with --content. Never a token, key or secret.
    Show {
        /// A delivery id from `outbox list`.
        id: i64,
        /// Also print the decrypted message.
        #[arg(long)]
        content: bool,
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Put deliveries back in line, due now, with a fresh attempt count and age: one by id
    /// (dead or pending), a target's pending deliveries (--target), or every dead letter
    /// (--dead, of one target with --target).
    #[command(group(
        ArgGroup::new("which")
            .required(true)
            .multiple(true)
            .args(["id", "dead", "target"])
    ))]
    Replay {
        /// A delivery id from `outbox list`.
        #[arg(conflicts_with_all = ["dead", "target"])]
        id: Option<i64>,
        /// Dead letters: every one, or the target's with --target.
        #[arg(long)]
        dead: bool,
        /// This target's pending deliveries (with --dead: its dead letters).
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Delete pending deliveries for good (test pushes, a target gone): one by id, or a
    /// target's (--target). Refuses without --yes, saying how many it would delete.
    #[command(group(
        ArgGroup::new("which")
            .required(true)
            .args(["id", "target"])
    ))]
    Drop {
        /// A pending delivery's id from `outbox list`.
        id: Option<i64>,
        /// Every pending delivery of this target.
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        /// Delete them (without it, nothing is deleted).
        #[arg(long)]
        yes: bool,
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters for good.
    Purge {
        /// What to purge: dead letters (pending deliveries are never purged).
        #[arg(long, required = true)]
        dead: bool,
        /// Only those dead for longer than this (`7d`, `12h`, `30m`).
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
        /// Only this target's.
        #[arg(long)]
        target: Option<String>,
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
}

const SIMULATE_EXAMPLES: &str = "Examples:
  wechat-relay simulate --config relay.toml --text hello
  wechat-relay simulate --account main --event subscribe --event-key qrscene_42
  wechat-relay simulate --event CLICK --event-key MENU_1 --url https://wechat.example.com/wechat
  wechat-relay simulate --verify-url

The token and key come from the account in the config and are never printed.";

/// `wechat-relay simulate`: one push (`--text` or `--event`) or the URL check (`--verify-url`).
#[derive(Debug, Clone, Args)]
#[command(group(
    ArgGroup::new("what")
        .required(true)
        .args(["text", "event", "verify_url"])
))]
pub struct SimulateArgs {
    /// The [[account]] to act for, by name [default: the first in the config].
    #[arg(long, value_name = "NAME")]
    pub account: Option<String>,

    /// Where to send it: a full URL with the path, http or https (e.g. the public
    /// https://wechat.example.com/wechat behind nginx) [default:
    /// http://<server.listen><account path>, with 127.0.0.1 or [::1] when listen is 0.0.0.0 or
    /// [::]].
    #[arg(long, value_name = "URL", value_parser = parse_url)]
    pub url: Option<Uri>,

    /// Send a text message with this content (a random MsgId, CreateTime now).
    #[arg(long, value_name = "CONTENT")]
    pub text: Option<String>,

    /// Send an event: subscribe, SCAN, CLICK, VIEW, unsubscribe, ... (as WeChat spells it).
    #[arg(long, value_name = "EVENT")]
    pub event: Option<String>,

    /// The event's EventKey: qrscene_<scene> for a subscribe from a QR code with parameters,
    /// the bare scene for a SCAN, the menu key for a CLICK.
    #[arg(long, value_name = "KEY", requires = "event")]
    pub event_key: Option<String>,

    /// The event's Ticket, what an identity provider matches a QR-code login on. A subscribe or
    /// SCAN with --event-key gets a random ticket unless this is given.
    #[arg(long, value_name = "TICKET", requires = "event")]
    pub ticket: Option<String>,

    /// FromUserName: the user's openid (also the openid in the query): letters, digits, - and _.
    #[arg(
        long,
        value_name = "OPENID",
        default_value = "o_simulate_0000000000000000",
        value_parser = parse_openid
    )]
    pub from: String,

    /// ToUserName: the account's original id.
    #[arg(long, value_name = "GH_ID", default_value = "gh_simulate")]
    pub to: String,

    /// Then send the same push N more times, as WeChat's retries do (the same MsgId,
    /// CreateTime, nonce and signature), and check that each gets the first answer's bytes
    /// (the relay's cached answer). WeChat itself retries at most 3 times.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        conflicts_with = "verify_url",
        value_parser = clap::value_parser!(u32).range(0..=10)
    )]
    pub repeat: u32,

    /// Do WeChat's URL check instead (GET with signature, timestamp, nonce and a random
    /// echostr) and report whether the relay echoed echostr.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pub verify_url: bool,
}

/// An absolute http or https URL.
fn parse_url(text: &str) -> Result<Uri, String> {
    let url: Uri = text.parse().map_err(|e| format!("not a URL: {e}"))?;
    match url.scheme_str() {
        Some("http" | "https") if url.authority().is_some() => Ok(url),
        _ => Err("must be an absolute http:// or https:// URL".into()),
    }
}

/// An openid as WeChat makes them: 1 to 64 of `A-Z a-z 0-9 - _` (it goes into the query as is).
fn parse_openid(text: &str) -> Result<String, String> {
    let valid = (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(text.to_owned())
    } else {
        Err("must be 1 to 64 of A-Z a-z 0-9 - _".into())
    }
}
