//! `wechat-relay`: parse the command line, start logging, load the config, hand over to the
//! library. Exit codes: 0 done, 1 could not run (or `simulate` found the relay failing), 2
//! invalid config or command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use wechat_relay::cli::{Cli, Command, OutboxCommand, SimulateArgs};
use wechat_relay::config::Config;
use wechat_relay::server::descriptors;
use wechat_relay::{service, telemetry};

/// mimalloc rather than the system allocator: on the store-off push path it cut the relay's
/// CPU time per push by about a quarter (README, "Benchmarks"), at the cost of a higher peak RSS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXIT_FAILURE: u8 = 1;
const EXIT_INVALID_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Needs no config: it describes the command line itself.
    if let Command::Completions { shell } = cli.command {
        return completions(shell);
    }
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{}: invalid config:", cli.config.display());
            for problem in &errors.0 {
                eprintln!("  {problem}");
            }
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    match cli.command {
        Command::Check => {
            for warning in &config.warnings {
                eprintln!("warning: {warning}");
            }
            // `serve` raises the soft limit to the hard one: check against that.
            if let Ok((_, hard)) = descriptors::limits() {
                let budget = descriptors::Budget::new(&config, hard);
                if let Some(warning) = budget.warning(&config) {
                    eprintln!("warning: {warning}");
                }
            }
            stdout(&format!("{}: OK\n{config}", cli.config.display()));
            ExitCode::SUCCESS
        }
        Command::Serve => serve(config, cli.config),
        Command::Outbox { command } => {
            let _flush = telemetry::init();
            outbox(&config, &command)
        }
        Command::Simulate(args) => simulate(&config, &args),
        Command::Completions { shell } => completions(shell),
    }
}

/// Writes to stdout; a closed pipe (`wechat-relay outbox list | head`) is not an error.
fn stdout(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// `wechat-relay completions SHELL`: the script on stdout.
fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut script = Vec::new();
    wechat_relay::cli::write_completions(shell, &mut script);
    stdout(&String::from_utf8_lossy(&script));
    ExitCode::SUCCESS
}

/// The tokio runtime: all cores for `serve`, one thread for a command.
fn runtime(multi_thread: bool) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all().build().map_err(|e| {
        eprintln!("cannot start the runtime: {e}");
        ExitCode::from(EXIT_FAILURE)
    })
}

/// Runs a command's future on a one-thread runtime.
fn block_on<F: std::future::Future>(future: F) -> Result<F::Output, ExitCode> {
    runtime(false).map(|runtime| runtime.block_on(future))
}

fn outbox(config: &Config, command: &OutboxCommand) -> ExitCode {
    use wechat_relay::outbox::command::CommandError;
    let result = match block_on(wechat_relay::outbox::command::run(config, command)) {
        Ok(result) => result,
        Err(code) => return code,
    };
    match result {
        Ok(printed) => {
            stdout(&printed.out);
            if let Some(note) = printed.note {
                eprintln!("{note}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outbox: {e}");
            ExitCode::from(match e {
                CommandError::Usage(_) => EXIT_INVALID_CONFIG,
                _ => EXIT_FAILURE,
            })
        }
    }
}

fn simulate(config: &Config, args: &SimulateArgs) -> ExitCode {
    let result = match block_on(wechat_relay::simulate::run(config, args)) {
        Ok(result) => result,
        Err(code) => return code,
    };
    match result {
        Ok(report) => {
            stdout(&report.output);
            match report.failure {
                None => ExitCode::SUCCESS,
                Some(why) => {
                    eprintln!("simulate: {why}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Err(e) => {
            eprintln!("simulate: {e}");
            ExitCode::from(if e.is_usage() {
                EXIT_INVALID_CONFIG
            } else {
                EXIT_FAILURE
            })
        }
    }
}

fn serve(config: Config, path: PathBuf) -> ExitCode {
    // Declared before the runtime, dropped after it: the lines of its shutdown and of the
    // error below are written before the process exits.
    let (log, _flush) = telemetry::init_with(&config.log);
    let runtime = match runtime(true) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(service::run(config, path, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
