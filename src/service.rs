//! `serve` as a service: the order of startup (store, listener, admin listener, readiness),
//! the signals (SIGTERM stops, SIGHUP reloads), and systemd's notifications and watchdog.
//!
//! systemd (`Type=notify`): `READY=1` once the listener is bound; `RELOADING=1` (with
//! `MONOTONIC_USEC`) then `READY=1` around a reload; `STOPPING=1` on SIGTERM; `WATCHDOG=1`
//! every half `WatchdogSec` while the runtime runs. Without `NOTIFY_SOCKET` these do nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::{self, Admin};
use crate::config::Config;
use crate::forward::Forwarder;
use crate::outbox::Outbox;
use crate::server::{Handle, Server, descriptors};
use crate::telemetry::LogHandle;

/// How often histogram samples are folded into the metrics when nobody scrapes.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// Why `serve` could not run (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the store: {0}")]
    Store(#[from] crate::outbox::store::StoreError),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
}

/// Runs the relay on `config` (loaded from `path`, re-read on SIGHUP) until SIGTERM or Ctrl-C.
pub async fn run(config: Config, path: PathBuf, log: Option<LogHandle>) -> Result<(), ServeError> {
    // Handlers first: a SIGHUP or SIGTERM that arrives while starting must not kill the
    // process (their default action).
    let signals = Signals::install();
    for warning in &config.warnings {
        warn!(warning = %warning, "config warning");
    }
    let descriptor_limit = raise_descriptor_limit();
    // The store first: the first push the relay accepts is already durable.
    // One pooled HTTP client for the reply target's attempts and the outbox's deliveries.
    let forwarder = Forwarder::new();
    let outbox = Outbox::start(&config, forwarder.clone()).await?;
    if !config.store.durable() {
        warn!("no [store] path: deliveries are kept in memory and lost on restart");
    }
    if let Some(tls) = &config.server.tls {
        // Fails here, before READY, rather than after the bind.
        let resolver = crate::tls::CertResolver::new(Arc::clone(&tls.certified));
        crate::tls::acceptor(Arc::new(resolver)).map_err(ServeError::Tls)?;
    }
    let listen = config.server.listen;
    let listener = bind(listen).await?;
    let admin_listener = match &config.admin {
        Some(admin) => Some(bind(admin.listen).await?),
        None => None,
    };
    let bound = listener.local_addr().map_or(listen, |a| a);
    info!(listen = %bound, tls = config.server.tls.is_some(), accounts = config.accounts.len(),
        targets = config.targets.len(), routes = config.routes.len(), "wechat-relay listening");

    let mut server = Server::new(config, outbox, forwarder);
    if let Some(max) = descriptor_limit
        .and_then(|limit| connection_budget(server.handle().relay().config(), limit))
    {
        server.limit_connections(max);
    }
    let handle = server.handle();
    let stop_admin = CancellationToken::new();
    let mut admin_state = None;
    if let Some(listener) = admin_listener {
        let metrics = crate::metrics::install();
        crate::metrics::configured(handle.relay().config());
        if let Some(metrics) = metrics.clone() {
            // Histogram samples are folded in at each scrape; without scrapes this keeps them
            // from piling up.
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(METRICS_UPKEEP);
                loop {
                    ticks.tick().await;
                    metrics.run_upkeep();
                }
            });
        }
        let admin = Admin::new(handle.clone(), metrics);
        admin.set_listening();
        admin_state = Some(Arc::clone(&admin));
        if let Ok(addr) = listener.local_addr() {
            info!(admin = %addr, "admin listening (/healthz, /readyz, /metrics)");
        }
        let stop = stop_admin.clone();
        tokio::spawn(admin::serve(admin, listener, async move {
            stop.cancelled().await;
        }));
    }
    notify(&[NotifyState::Ready]);
    tokio::spawn(watchdog());
    let Signals { hangup, terminate } = signals;
    tokio::spawn(reload_on_sighup(hangup, handle, path, log));
    server
        .run(listener, async {
            shutdown_signal(terminate).await;
            notify(&[NotifyState::Stopping]);
            if let Some(admin) = &admin_state {
                admin.set_draining();
            }
        })
        .await;
    stop_admin.cancel();
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, before the store and the listeners
/// take any; returns the limit now in force.
fn raise_descriptor_limit() -> Option<u64> {
    match descriptors::raise() {
        Ok((before, after)) => {
            if after > before {
                info!(from = before, to = after, "file descriptor limit raised");
            }
            Some(after)
        }
        Err(e) => {
            warn!(error = %e, "cannot read or raise the file descriptor limit");
            None
        }
    }
}

/// The connections the descriptors under `limit` allow, when that is fewer than
/// `max_connections` (said in one warn line).
fn connection_budget(config: &Config, limit: u64) -> Option<usize> {
    let budget = descriptors::Budget::new(config, limit);
    let warning = budget.warning(config)?;
    warn!(
        limit = budget.limit,
        needed = budget.needed,
        max_connections = budget.max_connections,
        "{warning}"
    );
    Some(budget.max_connections)
}

async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|error| ServeError::Listen { addr, error })
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// `WATCHDOG=1` every half `WatchdogSec`, for as long as the runtime schedules this task.
async fn watchdog() {
    let Some(period) = sd_notify::watchdog_enabled().filter(|p| !p.is_zero()) else {
        return;
    };
    let mut ticks = tokio::time::interval(period / 2);
    loop {
        ticks.tick().await;
        notify(&[NotifyState::Watchdog]);
    }
}

#[cfg(unix)]
type SignalStream = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type SignalStream = Option<()>;

/// SIGHUP and SIGTERM, listened for from the start.
struct Signals {
    hangup: SignalStream,
    terminate: SignalStream,
}

impl Signals {
    fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(stream) => Some(stream),
                Err(e) => {
                    warn!(error = %e, "cannot listen for {name}");
                    None
                }
            };
            Signals {
                hangup: listen(SignalKind::hangup(), "SIGHUP"),
                terminate: listen(SignalKind::terminate(), "SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        Signals {
            hangup: None,
            terminate: None,
        }
    }
}

/// SIGHUP: re-read the config; apply it if it is valid and needs no restart, else log every
/// reason and keep serving the old one.
async fn reload_on_sighup(
    hangup: SignalStream,
    handle: Handle,
    path: PathBuf,
    log: Option<LogHandle>,
) {
    let log = log.map(Arc::new);
    #[cfg(unix)]
    {
        let Some(mut hangups) = hangup else {
            return;
        };
        while hangups.recv().await.is_some() {
            let mut states = vec![NotifyState::Reloading];
            if let Ok(now) = NotifyState::monotonic_usec_now() {
                states.push(now);
            }
            notify(&states);
            // Reading files (the config, secrets, certificates) off the async threads.
            let (handle, path, log) = (handle.clone(), path.clone(), log.clone());
            let _ =
                tokio::task::spawn_blocking(move || reload(&handle, &path, log.as_deref())).await;
            notify(&[NotifyState::Ready]);
        }
    }
    #[cfg(not(unix))]
    let _ = (hangup, handle, path, log);
}

/// One reload, with its log lines and its count.
pub fn reload(handle: &Handle, path: &Path, log: Option<&LogHandle>) -> bool {
    info!(config = %path.display(), "reloading");
    let applied = match Config::load(path) {
        Err(errors) => {
            for problem in &errors.0 {
                error!(problem = %problem, "invalid config");
            }
            Err(())
        }
        Ok(config) => {
            for warning in &config.warnings {
                warn!(warning = %warning, "config warning");
            }
            let level = config.log.level.clone();
            let changes = Changes::between(handle.relay().config(), &config);
            match handle.reload(config) {
                Ok(()) => {
                    crate::metrics::configured(handle.relay().config());
                    if let Some(Err(e)) = log.map(|log| log.set_level(&level)) {
                        warn!(error = %e, "cannot apply log.level");
                    }
                    Ok(changes)
                }
                Err(needs_restart) => {
                    for problem in &needs_restart {
                        error!(problem = %problem, "change needs a restart");
                    }
                    Err(())
                }
            }
        }
    };
    let applied_ok = applied.is_ok();
    crate::metrics::reload(applied_ok);
    match applied {
        Ok(changes) => {
            let unchanged = changes.is_empty();
            let [accounts, targets, routes] = changes.by_kind.map(|kind| {
                kind.map(|names| {
                    (!names.is_empty()).then(|| tracing::field::display(names.join(",")))
                })
            });
            info!(
                accounts_added = accounts[0],
                accounts_removed = accounts[1],
                accounts_changed = accounts[2],
                targets_added = targets[0],
                targets_removed = targets[1],
                targets_changed = targets[2],
                routes_added = routes[0],
                routes_removed = routes[1],
                routes_changed = routes[2],
                unchanged,
                "config reloaded: new requests use it"
            );
        }
        Err(()) => error!("reload refused: the running config is unchanged"),
    }
    applied_ok
}

/// What a reload changes in the accounts, targets and routes, by name: for each kind, the
/// names added, removed and changed (in the new file's order, removed ones in the old's).
struct Changes {
    by_kind: [[Vec<String>; 3]; 3],
}

impl Changes {
    fn between(running: &Config, new: &Config) -> Changes {
        Changes {
            by_kind: [
                named(&running.accounts, &new.accounts, |a| &a.name),
                named(&running.targets, &new.targets, |t| &t.name),
                named(&running.routes, &new.routes, |r| &r.name),
            ],
        }
    }

    fn is_empty(&self) -> bool {
        self.by_kind.iter().flatten().all(Vec::is_empty)
    }
}

/// The names in `new` and not in `running`, in `running` and not in `new`, and in both but
/// different.
fn named<T: PartialEq>(running: &[T], new: &[T], name: fn(&T) -> &String) -> [Vec<String>; 3] {
    fn find<'a, T>(list: &'a [T], wanted: &str, name: fn(&T) -> &String) -> Option<&'a T> {
        list.iter().find(|item| name(item) == wanted)
    }
    let mut added = Vec::new();
    let mut changed = Vec::new();
    for item in new {
        match find(running, name(item), name) {
            None => added.push(name(item).clone()),
            Some(before) if before != item => changed.push(name(item).clone()),
            Some(_) => {}
        }
    }
    let removed = running
        .iter()
        .filter(|item| find(new, name(item), name).is_none())
        .map(|item| name(item).clone())
        .collect();
    [added, removed, changed]
}

/// SIGTERM (systemd stop) or Ctrl-C.
async fn shutdown_signal(terminate: SignalStream) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match terminate {
            Some(mut signal) => {
                signal.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = {
        let _ = terminate;
        std::future::pending::<()>()
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
