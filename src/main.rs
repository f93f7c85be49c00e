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
/// CPU time per push by about a quarter (docs/benchmarks.md), at the cost of a higher peak RSS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXIT_FAILURE: u8 = 1;
const EXIT_INVALID_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The commands that need no config.
    match &cli.command {
        Command::Completions { shell } => return completions(*shell),
        Command::Init(args) => return init(&cli.config, args),
        Command::Sink { listen, reply } => {
            return match block_on(wechat_relay::sink::run(*listen, reply.clone())) {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(e)) => {
                    eprintln!("sink: cannot listen on {listen}: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
                Err(code) => code,
            };
        }
        _ => {}
    }
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(errors) => {
            let paint = Paint::stderr();
            eprintln!(
                "{}",
                paint.red(&format!("{}: invalid config:", cli.config.display()))
            );
            for problem in &errors.0 {
                eprintln!("  {}", paint.red(problem));
            }
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    match cli.command {
        Command::Check => {
            let paint = Paint::stderr();
            for warning in &config.warnings {
                eprintln!("{} {warning}", paint.yellow("warning:"));
            }
            // `serve` raises the soft limit to the hard one: check against that.
            if let Ok((_, hard)) = descriptors::limits() {
                let budget = descriptors::Budget::new(&config, hard);
                if let Some(warning) = budget.warning(&config) {
                    eprintln!("{} {warning}", paint.yellow("warning:"));
                }
            }
            stdout(&format!("{}: OK\n{config}", cli.config.display()));
            match &config.store.database {
                Some(database) => check_database(database),
                None => ExitCode::SUCCESS,
            }
        }
        Command::Serve => serve(config, cli.config),
        Command::Outbox { command } => {
            let _flush = telemetry::init();
            outbox(&config, &command)
        }
        Command::Simulate(args) => simulate(&config, &args),
        // Run above, before the config is loaded.
        Command::Init(_) | Command::Sink { .. } | Command::Completions { .. } => ExitCode::SUCCESS,
    }
}

fn init(path: &std::path::Path, args: &wechat_relay::cli::InitArgs) -> ExitCode {
    match wechat_relay::init::run(path, args) {
        Ok(out) => {
            stdout(&out);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("init: {}", e.message);
            ExitCode::from(if e.usage {
                EXIT_INVALID_CONFIG
            } else {
                EXIT_FAILURE
            })
        }
    }
}

/// Colours for check's problems and warnings: on when stderr is a terminal (or
/// `CLICOLOR_FORCE` is set), off with `NO_COLOR` (<https://no-color.org>).
struct Paint(bool);

impl Paint {
    fn stderr() -> Paint {
        use std::io::IsTerminal;
        let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0");
        Paint(!set("NO_COLOR") && (std::io::stderr().is_terminal() || set("CLICOLOR_FORCE")))
    }

    fn red(&self, text: &str) -> String {
        self.paint("31", text)
    }

    fn yellow(&self, text: &str) -> String {
        self.paint("33", text)
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
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

/// `check` with `[store] url`: connects and reads the schema's version, changing nothing.
fn check_database(database: &wechat_relay::config::Database) -> ExitCode {
    use wechat_relay::outbox::postgres::{SCHEMA_VERSION, schema_version};
    let version = match block_on(schema_version(database)) {
        Ok(result) => result,
        Err(code) => return code,
    };
    match version {
        Ok(Some(version)) if version == SCHEMA_VERSION => {
            stdout(&format!("database: schema version {version}\n"));
            ExitCode::SUCCESS
        }
        Ok(Some(version)) => {
            stdout(&format!("database: schema version {version}\n"));
            eprintln!(
                "check: this relay writes schema version {SCHEMA_VERSION}: {}",
                if version > SCHEMA_VERSION {
                    "the database is newer, and this relay refuses to start on it"
                } else {
                    "a relay migrates it at start"
                }
            );
            ExitCode::from(EXIT_FAILURE)
        }
        Ok(None) => {
            stdout("database: empty: a relay sets up the schema at its first start\n");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("check: {}: {e}", database.shown);
            ExitCode::from(EXIT_FAILURE)
        }
    }
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
