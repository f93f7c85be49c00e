//! A real PostgreSQL server for the tests: `initdb` in a temporary folder, `postgres` on
//! 127.0.0.1 and a free port, password authentication over TCP (scram-sha-256, so that the
//! relay's `password_file` is what lets it in), stopped when dropped. Run as root (CI), the
//! server runs as the `postgres` user, since PostgreSQL refuses root.
//!
//! Without PostgreSQL installed a test skips, saying so; with `CI` set it fails instead
//! (`.ci/run` installs Debian's `postgresql`).

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The superuser the tests connect as, and its password.
pub const USER: &str = "relay";
pub const PASSWORD: &str = "test-password-0123";

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    child: Option<Child>,
    /// The uid and gid the server runs as (root's tests: `postgres`'s).
    owner: Option<(u32, u32)>,
    /// TLS on, with the certificate [`Postgres::enable_tls`] made.
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

impl Postgres {
    /// A fresh server, or `None` (the test skips) when PostgreSQL is not installed and `CI`
    /// is not set.
    pub fn start() -> Option<Postgres> {
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
        let dir = tempfile::tempdir().expect("tempdir");
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
        let mut server = Postgres {
            dir,
            bin,
            port: free_port(),
            child: None,
            owner,
            tls: false,
        };
        let status = server
            .command("initdb")
            .args([
                "-U",
                USER,
                "--auth-local=trust",
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
        server.run();
        Some(server)
    }

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

    /// Starts the server (again, after [`Postgres::stop`]) and waits until it takes
    /// connections.
    pub fn run(&mut self) {
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
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
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "postgres did not start in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Restarts the server with TLS, on a self-signed certificate for 127.0.0.1; returns the
    /// path of that certificate (PEM), which a client trusts to verify the server.
    pub fn enable_tls(&mut self) -> PathBuf {
        let certified =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("certificate");
        let data = self.dir.path().join("data");
        let cert = certified.cert.pem();
        for (name, text, mode) in [
            ("server.crt", cert.as_str(), 0o644),
            ("server.key", &certified.signing_key.serialize_pem(), 0o600),
        ] {
            let path = data.join(name);
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            if let Some((uid, gid)) = self.owner {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown");
            }
        }
        let ca = self.dir.path().join("ca.pem");
        std::fs::write(&ca, cert).expect("write");
        self.kill();
        self.tls = true;
        self.run();
        ca
    }

    /// Stops the server at once, as a crash does: SIGQUIT is PostgreSQL's immediate shutdown
    /// (every backend quits, nothing is flushed but the WAL already written); the data
    /// folder stays for [`Postgres::run`].
    pub fn kill(&mut self) {
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

    /// Freezes the server and every backend (SIGSTOP to the postmaster and its children, each
    /// of which is a session of its own): connections stay open and queries get no answer, as
    /// when the database host hangs.
    pub fn pause(&self) {
        self.signal_group(libc::SIGSTOP);
    }

    /// Lets a paused server go on.
    pub fn resume(&self) {
        self.signal_group(libc::SIGCONT);
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

    /// Runs `sql` as the superuser over the local socket; panics on an error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self
            .command("psql")
            .arg("-h")
            .arg(self.sockets())
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", db])
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A new, empty database.
    pub fn create_db(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
    }

    /// The URL of database `db` over TCP, without its password (that is in the file
    /// [`Postgres::password_file`] writes).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Writes the password into `dir/db.password` (0600) and returns its path.
    pub fn password_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("db.password");
        std::fs::write(&path, format!("{PASSWORD}\n")).expect("write the password file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
    }
}
