//! Logging: tracing-subscriber to stderr (journald takes it from there), as text (colours only
//! on a terminal) or one JSON object per line (`[log] format = "json"`). The level comes from
//! `RUST_LOG` when it is set, else from `[log] level`, and follows a reload. Lines a flood
//! could repeat are rate limited ([`limit`]). Lines reach stderr through a bounded buffer and
//! a writer thread, in batches ([`output`]); the [`Flush`] guard that [`init_with`] returns
//! writes what is left when `main` drops it.

pub mod limit;
pub mod output;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::field::DisplayValue;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{Log, LogFormat};
pub use output::Flush;
use output::LogOutput;

/// The logger writes JSON: a field without a value is left out, so that each field keeps one
/// type (a number, or a string) in every line.
static JSON: AtomicBool = AtomicBool::new(false);

/// A log field that may have no value: as it is when it has one; when it has none, `-` in
/// text (`route=-`) and absent in JSON (not `"route":"-"` beside `"route":"qr-login"`, nor
/// `"status":"-"` beside `"status":502`). Give it as `field = telemetry::or_dash(value)`.
/// (Displayed, as `field = %value` is: a `&str` value would print quoted in text.)
pub fn or_dash(value: Option<&str>) -> Option<DisplayValue<&str>> {
    value
        .or(if JSON.load(Ordering::Relaxed) {
            None
        } else {
            Some("-")
        })
        .map(tracing::field::display)
}

/// Changes the level of the running logger.
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set: it wins over `[log] level`, also on reload.
    from_env: bool,
}

impl LogHandle {
    /// Applies `[log] level` from a reloaded config (unless `RUST_LOG` is set).
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        if self.from_env {
            return Ok(());
        }
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        self.filter.reload(filter).map_err(|e| e.to_string())
    }
}

/// Text at `info` (or `RUST_LOG`): for the commands and the benchmark. Keep the guard until
/// the end.
pub fn init() -> Flush {
    init_with(&Log {
        format: LogFormat::Text,
        level: "info".into(),
        content: false,
    })
    .1
}

/// The logger `[log]` asks for, and the guard that flushes it: keep it until the process ends.
/// The handle is `None` if a logger was installed already (tests).
pub fn init_with(log: &Log) -> (Option<LogHandle>, Flush) {
    // A RUST_LOG that is set and valid wins; otherwise [log] level rules, also on reload.
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|_| EnvFilter::try_from_default_env().ok());
    let filter_of_config =
        || EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let from_env_set = from_env.is_some();
    let filter = from_env.unwrap_or_else(filter_of_config);
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let (output, flush) = LogOutput::stderr();
    let installed = match log.format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(output)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_target(false),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(output)
                    .with_target(false),
            )
            .try_init(),
    };
    if installed.is_ok() {
        JSON.store(matches!(log.format, LogFormat::Json), Ordering::Relaxed);
    }
    let handle = installed.ok().map(|()| LogHandle {
        filter: handle,
        from_env: from_env_set,
    });
    (handle, flush)
}
