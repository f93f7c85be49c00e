//! The command line: `wechat-relay [--config PATH] <serve|check>`.

use std::path::PathBuf;

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
}
