//! A real PostgreSQL server for the tests, one of two:
//!
//! - **An existing server**: `WECHAT_RELAY_TEST_POSTGRES` holds its URL, with a user that may
//!   create databases and its password (`postgres://relay:secret@127.0.0.1:5432/postgres`).
//!   [`Postgres::start`] then uses that server. The tests keep their short database names
//!   (`create_db("relay")`, `url("relay")`); on the server each is `wrt_<pid>_<random>_relay`,
//!   so that tests in parallel and reruns never meet, and every database made is dropped when
//!   the `Postgres` is.
//! - **A throwaway cluster**, when the variable is not set, and always for
//!   [`Postgres::start_own`] (the tests that stop, freeze, restart or re-TLS the server, which
//!   they cannot do to someone else's): `initdb` into a temporary folder, `postgres` listening
//!   only on a Unix socket in that folder (TCP on 127.0.0.1 only once [`Postgres::enable_tls`]
//!   asks for it), password authentication on the socket too (scram-sha-256, so that the
//!   relay's `password_file` is what lets it in), stopped and removed when dropped. Run as
//!   root (CI), the server runs as the `postgres` user, since PostgreSQL refuses root.
//!
//! Either way the relay gets the password through `password_file`, never in its URL. Without
//! the variable and without PostgreSQL installed a test skips, saying so; with `CI` set it
//! fails instead (`.ci/run` installs Debian's `postgresql`).

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use rand::RngExt;
use tokio_postgres::config::Host;

/// The URL of an existing server to run the tests on instead of a cluster of their own.
pub const SERVER_VARIABLE: &str = "WECHAT_RELAY_TEST_POSTGRES";

/// The superuser of a cluster of the tests' own, and its password.
pub const USER: &str = "relay";
pub const PASSWORD: &str = "test-password-0123";

/// The longest path of a Unix socket (`sun_path` less its NUL), which PostgreSQL refuses past.
const MAX_SOCKET_PATH: usize = 107;

/// What a user name or a socket folder must escape inside a URL (a `/` may stay).
const URL_PART: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b':')
    .add(b'=')
    .add(b'?')
    .add(b'@');

pub struct Postgres {
    /// Where the server takes connections: its socket folder, or a TCP host.
    host: Host,
    port: u16,
    user: String,
    password: String,
    /// The database `psql` connects to for `CREATE DATABASE` and `DROP DATABASE`.
    admin_db: String,
    /// Before each short name, on an existing server (`wrt_<pid>_<random>_`); empty on a
    /// cluster of our own.
    prefix: String,
    /// The databases [`Postgres::create_db`] made, by their names on the server.
    created: Mutex<Vec<String>>,
    psql: PathBuf,
    /// The cluster started for these tests; `None` on the server of [`SERVER_VARIABLE`].
    own: Option<Cluster>,
}

/// A throwaway cluster: its folder (data, socket), binaries and process.
struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    child: Option<Child>,
    /// The uid and gid the server runs as (root's tests: `postgres`'s).
    owner: Option<(u32, u32)>,
    /// TLS on, with the certificate [`Postgres::enable_tls`] made, and TCP on 127.0.0.1 for it.
    tls: bool,
}

/// The newest `/usr/lib/postgresql/N/bin`.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The uid and gid of `name` in /etc/passwd.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&name))
            .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))?
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// What a test that stops or restarts the server gets on the server of [`SERVER_VARIABLE`].
fn not_own(what: &str) -> ! {
    panic!("{what} needs a server of the test's own: Postgres::start_own()")
}

/// `name` as an SQL identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A cluster's temporary folder, in $TMPDIR unless its socket path would then be too long
/// for a Unix socket; in /tmp then.
fn cluster_dir() -> tempfile::TempDir {
    const PREFIX: &str = "wechat-relay-pg.";
    const RANDOM: usize = 6;
    // `<folder>/sockets/.s.PGSQL.<port>`, the longest port.
    let socket_in = |base: &Path| {
        base.as_os_str().len() + 1 + PREFIX.len() + RANDOM + "/sockets/.s.PGSQL.65535".len()
    };
    let usual = std::env::temp_dir();
    let base = if socket_in(&usual) <= MAX_SOCKET_PATH {
        usual
    } else {
        PathBuf::from("/tmp")
    };
    let dir = tempfile::Builder::new()
        .prefix(PREFIX)
        .rand_bytes(RANDOM)
        .tempdir_in(&base)
        .expect("tempdir");
    let socket = dir.path().join("sockets/.s.PGSQL.65535");
    assert!(
        socket.as_os_str().len() <= MAX_SOCKET_PATH,
        "{} is too long for a Unix socket ({MAX_SOCKET_PATH} bytes at most)",
        socket.display()
    );
    dir
}

impl Postgres {
    /// The server of [`SERVER_VARIABLE`] when it is set; otherwise a cluster of the tests' own
    /// ([`Postgres::start_own`]), or `None` (the test skips) when PostgreSQL is not installed
    /// and `CI` is not set.
    pub fn start() -> Option<Postgres> {
        match std::env::var(SERVER_VARIABLE) {
            Ok(url) if !url.is_empty() => Some(Postgres::existing(&url)),
            _ => Postgres::start_own(),
        }
    }

    /// The existing server at `url`; panics (without the URL, which holds a password) when it
    /// cannot be used.
    fn existing(url: &str) -> Postgres {
        let config: tokio_postgres::Config = url
            .parse()
            .unwrap_or_else(|e| panic!("{SERVER_VARIABLE} is not a PostgreSQL URL: {e}"));
        let [host] = config.get_hosts() else {
            panic!("{SERVER_VARIABLE} must name one host");
        };
        let user = config
            .get_user()
            .unwrap_or_else(|| panic!("{SERVER_VARIABLE} must name a user"));
        let password = config
            .get_password()
            .map(|p| String::from_utf8(p.to_vec()).expect("a UTF-8 password"))
            .unwrap_or_else(|| {
                panic!("{SERVER_VARIABLE} must hold the password (the relay gets it in a file)")
            });
        let psql = bin_dir()
            .map(|bin| bin.join("psql"))
            .filter(|psql| psql.exists())
            .unwrap_or_else(|| PathBuf::from("psql"));
        let prefix = format!(
            "wrt_{}_{:08x}_",
            std::process::id(),
            rand::rng().random::<u32>()
        );
        let server = Postgres {
            host: host.clone(),
            port: config.get_ports().first().copied().unwrap_or(5432),
            user: user.to_owned(),
            password,
            admin_db: config.get_dbname().unwrap_or("postgres").to_owned(),
            prefix,
            created: Mutex::new(Vec::new()),
            psql,
            own: None,
        };
        if let Err(why) = server.try_psql(&server.admin_db, "SELECT 1") {
            panic!("{SERVER_VARIABLE}: the server does not answer: {why}");
        }
        server
    }

    /// A fresh cluster of the tests' own, whatever [`SERVER_VARIABLE`] says (for the tests that
    /// stop, freeze or restart it), or `None` (the test skips) when PostgreSQL is not installed
    /// and `CI` is not set.
    pub fn start_own() -> Option<Postgres> {
        let Some(bin) = bin_dir() else {
            let why = "PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb)";
            if std::env::var_os("CI").is_some_and(|ci| !ci.is_empty()) {
                panic!("{why}: in CI (CI is set) the PostgreSQL tests must run; see .ci/run");
            }
            eprintln!("skipped: {why}");
            return None;
        };
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let owner = if root {
            Some(user_ids("postgres").expect("a postgres user to run the server as"))
        } else {
            None
        };
        let dir = cluster_dir();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let data = dir.path().join("data");
        let sockets = dir.path().join("sockets");
        for sub in [&data, &sockets] {
            std::fs::create_dir(sub).expect("mkdir");
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(sub, Some(uid), Some(gid)).expect("chown");
            }
        }
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, PASSWORD).expect("pwfile");
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let cluster = Cluster {
            dir,
            bin,
            child: None,
            owner,
            tls: false,
        };
        // The password on the socket as over TCP: `local all all scram-sha-256`.
        let status = cluster
            .command("initdb")
            .args([
                "-U",
                USER,
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("-D")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run initdb");
        assert!(
            status.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        let mut server = Postgres {
            host: Host::Unix(sockets),
            // libpq's default: the socket is `.s.PGSQL.5432` in a folder of our own.
            port: 5432,
            user: USER.to_owned(),
            password: PASSWORD.to_owned(),
            admin_db: "postgres".to_owned(),
            prefix: String::new(),
            created: Mutex::new(Vec::new()),
            psql: cluster.bin.join("psql"),
            own: Some(cluster),
        };
        server.run();
        Some(server)
    }

    /// The cluster of [`Postgres::start_own`]; panics on the server of [`SERVER_VARIABLE`],
    /// which is not the tests' to stop.
    fn cluster(&self, what: &str) -> &Cluster {
        self.own.as_ref().unwrap_or_else(|| not_own(what))
    }

    fn cluster_mut(&mut self, what: &str) -> &mut Cluster {
        self.own.as_mut().unwrap_or_else(|| not_own(what))
    }

    /// Starts the server (again, after [`Postgres::kill`]) and waits until it takes
    /// connections.
    pub fn run(&mut self) {
        let port = self.port;
        self.cluster_mut("run").run(port);
    }

    /// Restarts the server with TLS, on a self-signed certificate for 127.0.0.1, listening on
    /// 127.0.0.1 and a free port too (TLS needs TCP; [`Postgres::tcp_url`]); returns the path
    /// of that certificate (PEM), which a client trusts to verify the server.
    pub fn enable_tls(&mut self) -> PathBuf {
        let cluster = self.cluster_mut("enable_tls");
        let certified =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("certificate");
        let data = cluster.dir.path().join("data");
        let cert = certified.cert.pem();
        for (name, text, mode) in [
            ("server.crt", cert.as_str(), 0o644),
            ("server.key", &certified.signing_key.serialize_pem(), 0o600),
        ] {
            let path = data.join(name);
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            if let Some((uid, gid)) = cluster.owner {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown");
            }
        }
        let ca = cluster.dir.path().join("ca.pem");
        std::fs::write(&ca, cert).expect("write");
        cluster.kill();
        cluster.tls = true;
        // One port for the socket and TCP, free now that TCP needs it.
        self.port = free_port();
        self.run();
        ca
    }

    /// Stops the server at once, as a crash does: SIGQUIT is PostgreSQL's immediate shutdown
    /// (every backend quits, nothing is flushed but the WAL already written); the data
    /// folder stays for [`Postgres::run`].
    pub fn kill(&mut self) {
        self.cluster_mut("kill").kill();
    }

    /// Freezes the server and every backend (SIGSTOP to the postmaster and its children, each
    /// of which is a session of its own): connections stay open and queries get no answer, as
    /// when the database host hangs.
    pub fn pause(&self) {
        self.cluster("pause").signal_group(libc::SIGSTOP);
    }

    /// Lets a paused server go on.
    pub fn resume(&self) {
        self.cluster("resume").signal_group(libc::SIGCONT);
    }

    /// Runs `sql` on database `db` (a short name) as the tests' user; panics on an error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(&self.name(db), sql)
            .unwrap_or_else(|why| panic!("psql {sql:?}: {why}"))
    }

    /// Runs `sql` on the database named `db` on the server: its output, or psql's stderr.
    fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let host = match &self.host {
            Host::Tcp(name) => name.into(),
            Host::Unix(dir) => dir.clone().into_os_string(),
        };
        let out = Command::new(&self.psql)
            .arg("-h")
            .arg(host)
            .args(["-p", &self.port.to_string(), "-U", &self.user, "-d", db])
            // Never a password prompt: the password is in the environment.
            .args([
                "-w",
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", &self.password)
            .env("LC_ALL", "C")
            .output()
            .map_err(|e| format!("run {}: {e}", self.psql.display()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    /// The name on the server of the tests' database `db`.
    fn name(&self, db: &str) -> String {
        format!("{}{db}", self.prefix)
    }

    /// A new, empty database, which the tests call `name` (on an existing server, its name
    /// there is unique to this `Postgres`, and it is dropped with it).
    pub fn create_db(&self, name: &str) {
        let name = self.name(name);
        let sql = format!("CREATE DATABASE {}", quoted(&name));
        if let Err(why) = self.try_psql(&self.admin_db, &sql) {
            panic!("psql {sql:?}: {why}");
        }
        self.created.lock().expect("lock").push(name);
    }

    /// The URL of database `db`, without its password (that is in the file
    /// [`Postgres::password_file`] writes): libpq's socket form on a cluster of our own
    /// (`postgres:///db?host=/tmp/...&port=5432&user=relay`).
    pub fn url(&self, db: &str) -> String {
        let db = self.name(db);
        let user = utf8_percent_encode(&self.user, URL_PART);
        match &self.host {
            Host::Unix(dir) => {
                let dir = dir.to_str().expect("a UTF-8 socket folder");
                format!(
                    "postgres:///{db}?host={}&port={}&user={user}",
                    utf8_percent_encode(dir, URL_PART),
                    self.port
                )
            }
            Host::Tcp(name) if name.contains(':') => {
                format!("postgres://{user}@[{name}]:{}/{db}", self.port)
            }
            Host::Tcp(name) => format!("postgres://{user}@{name}:{}/{db}", self.port),
        }
    }

    /// The URL of database `db` over TCP to 127.0.0.1, on which a cluster of our own listens
    /// only once [`Postgres::enable_tls`] made it.
    pub fn tcp_url(&self, db: &str) -> String {
        assert!(
            self.cluster("tcp_url").tls,
            "the server listens on TCP only after enable_tls"
        );
        format!(
            "postgres://{}@127.0.0.1:{}/{}",
            self.user,
            self.port,
            self.name(db)
        )
    }

    /// How `check` and the log name [`Postgres::url`]'s database: `postgres://user@host:port/db`,
    /// the host being the socket folder on a cluster of our own.
    pub fn shown(&self, db: &str) -> String {
        let host = match &self.host {
            Host::Tcp(name) => name.clone(),
            Host::Unix(dir) => dir.display().to_string(),
        };
        format!(
            "postgres://{}@{host}:{}/{}",
            self.user,
            self.port,
            self.name(db)
        )
    }

    /// The password of the tests' user, which no output may hold.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Writes the password into `dir/db.password` (0600) and returns its path.
    pub fn password_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("db.password");
        std::fs::write(&path, format!("{}\n", self.password)).expect("write the password file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    }
}

impl Drop for Postgres {
    /// On an existing server, drops every database made (a cluster of our own goes whole).
    fn drop(&mut self) {
        if self.own.is_some() {
            return;
        }
        let created = std::mem::take(&mut *self.created.lock().unwrap_or_else(|e| e.into_inner()));
        for name in created {
            // FORCE: a relay of the test may still be connected.
            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quoted(&name));
            if let Err(why) = self.try_psql(&self.admin_db, &sql) {
                eprintln!("test database {name} left on the server: {why}");
            }
        }
    }
}

impl Cluster {
    /// `tool` of the cluster's binaries, run as the server's owner.
    fn command(&self, tool: &str) -> Command {
        let mut command = Command::new(self.bin.join(tool));
        command.env_remove("PGPASSWORD").env("LC_ALL", "C");
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        command
    }

    fn sockets(&self) -> PathBuf {
        self.dir.path().join("sockets")
    }

    fn run(&mut self, port: u16) {
        // The socket only; 127.0.0.1 too with TLS, which needs TCP.
        let listen = if self.tls { "127.0.0.1" } else { "" };
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &port.to_string()])
            .arg("-c")
            .arg(format!("listen_addresses={listen}"))
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.sockets().display()
            ))
            .args(["-c", "max_connections=100", "-c", "fsync=on"])
            .args(if self.tls {
                &[
                    "-c",
                    "ssl=on",
                    "-c",
                    "ssl_cert_file=server.crt",
                    "-c",
                    "ssl_key_file=server.key",
                ][..]
            } else {
                &[]
            })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self
                .command("pg_isready")
                .arg("-h")
                .arg(self.sockets())
                .args(["-p", &port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "postgres did not start in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill has no memory preconditions; pid is our child's.
                unsafe { libc::kill(pid, libc::SIGQUIT) };
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal_group(&self, signal: i32) {
        let postmaster = self.child.as_ref().map(Child::id).expect("the server runs");
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            // `pid (comm) state ppid ...`: the comm may hold spaces, so read after its ')'.
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        for pid in pids {
            let pid = i32::try_from(pid).expect("a pid");
            // SAFETY: kill has no memory preconditions; pid is the server's or a child's.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill();
    }
}
