//! File descriptors: the soft `RLIMIT_NOFILE` is raised to the hard limit at start, and
//! `max_connections` is lowered to what the descriptors left after everything else allow, so
//! that the relay never runs out of them under a flood of connections (and says so when it has
//! to lower it).

use crate::config::{Config, Reply};

/// Descriptors the process needs whatever the load: stdio, the listeners, the runtime's epoll
/// and wake-ups, the signal pipe, the store (SQLite: the database, its WAL and shared memory
/// per connection, the lock file), the TLS and secret files read at a reload.
pub const FIXED: u64 = 64;

/// Connections the admin listener serves at once; past it the idlest admin connection is
/// closed. Its descriptors are budgeted here, so it can never take the WeChat listener's.
pub const ADMIN_MAX_CONNECTIONS: usize = 16;

/// What the descriptors allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The soft limit the relay runs with.
    pub limit: u64,
    /// What `max_connections` needs with everything else.
    pub needed: u64,
    /// The connections served at once: `max_connections`, or fewer when `limit < needed`.
    pub max_connections: usize,
}

impl Budget {
    /// Works out the budget of `config` under a soft limit of `limit` descriptors. Each client
    /// connection is one descriptor, and one more when a route has a reply target (a push in
    /// flight may hold a connection to it); each target's workers hold up to `concurrency`.
    pub fn new(config: &Config, limit: u64) -> Budget {
        let per_connection: u64 = if config
            .routes
            .iter()
            .any(|r| matches!(r.reply, Reply::Target(_)))
        {
            2
        } else {
            1
        };
        let admin = if config.admin.is_some() {
            ADMIN_MAX_CONNECTIONS as u64
        } else {
            0
        };
        let workers: u64 = config
            .targets
            .iter()
            .map(|t| t.concurrency as u64)
            .fold(0, u64::saturating_add);
        let fixed = FIXED.saturating_add(admin).saturating_add(workers);
        let wanted = config.server.max_connections as u64;
        let needed = fixed.saturating_add(wanted.saturating_mul(per_connection));
        let max_connections = if needed <= limit {
            config.server.max_connections
        } else {
            let fits = limit.saturating_sub(fixed) / per_connection;
            usize::try_from(fits.max(1)).unwrap_or(1)
        };
        Budget {
            limit,
            needed,
            max_connections,
        }
    }

    /// The warning when `max_connections` had to be lowered.
    pub fn warning(&self, config: &Config) -> Option<String> {
        (self.max_connections < config.server.max_connections).then(|| {
            format!(
                "server.max_connections: {} needs about {} file descriptors but the limit is {}: serving at most {} connections (raise LimitNOFILE= or `ulimit -n`)",
                config.server.max_connections, self.needed, self.limit, self.max_connections
            )
        })
    }
}

/// The soft and hard `RLIMIT_NOFILE`.
pub fn limits() -> std::io::Result<(u64, u64)> {
    rlimit::Resource::NOFILE.get()
}

/// Raises the soft limit to the hard one; returns the soft limit before and after.
pub fn raise() -> std::io::Result<(u64, u64)> {
    let (soft, _) = limits()?;
    Ok((soft, rlimit::increase_nofile_limit(u64::MAX)?))
}

/// Whether an accept failed because the process or the system is out of descriptors.
pub fn is_exhaustion(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}
