//! The command line: `wechat-relay [--config PATH] <serve|check|outbox ...>`. `--config` is
//! accepted anywhere on the line, by every subcommand.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

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
    /// See and repair the outbox: pending deliveries and dead letters. Works while the relay
    /// runs; run it as the user the relay runs as.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum OutboxCommand {
    /// Per target: pending deliveries, the oldest one's age, dead letters.
    Stats,
    /// One line per delivery: id, target, event id, attempts, last error.
    List {
        /// Dead letters instead of pending deliveries.
        #[arg(long)]
        dead: bool,
        /// Only this target's.
        #[arg(long)]
        target: Option<String>,
    },
    /// Put deliveries back in line, due now, with a fresh attempt count and age: one by id
    /// (dead or pending), or every dead letter (of one target with --target).
    Replay {
        /// A delivery id from `outbox list`.
        #[arg(required_unless_present = "dead", conflicts_with = "dead")]
        id: Option<i64>,
        /// Every dead letter.
        #[arg(long)]
        dead: bool,
        /// With --dead: only this target's.
        #[arg(long, requires = "dead")]
        target: Option<String>,
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
    },
}
