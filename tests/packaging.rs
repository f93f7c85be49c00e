//! The packaging: the systemd unit (`systemd/wechat-relay.service`) and the .deb that `cargo
//! deb` builds from the `[package.metadata.deb]` of Cargo.toml.
//!
//! - The unit declares what the relay does under systemd (notify, watchdog, validated reload,
//!   the store in its StateDirectory): always checked, from its text.
//! - `systemd-analyze verify` is clean on the unit, alone and with the credentials drop-in the
//!   unit and docs/operations.md document, and `systemd-analyze security` rates it 2.0 or
//!   lower: where `systemd-analyze` is installed.
//! - The postinst of a first install prints what to edit, the unit's check command and how to
//!   start the unit; build.rs writes the packaged relay.toml (the repository's but for its
//!   `[store] path`), the man pages and the completion scripts `wechat-relay completions`
//!   prints, which name every subcommand: always checked.
//! - The newest `target/debian/wechat-relay_*.deb` holds the binary, the unit (byte for byte
//!   this repository's), relay.toml as a conffile with the unit's store, the README and the
//!   docs/ pages (byte for byte), the alert rules and the dashboard (contrib/), the man page,
//!   the completion scripts and the maintainer scripts: where a .deb and `dpkg-deb` exist. A
//!   .deb built before the unit, a docs/ page or the command line changed fails the test: run
//!   `cargo deb` again.
//!
//! A check whose tool or .deb is missing says so on stderr and passes, except in CI (`CI` set,
//! as `.ci/run` is run), where it fails: `.ci/run` installs the tools and runs `cargo deb`
//! first, so that there every check runs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_wechat-relay");
/// Where the unit and the .deb put the binary.
const INSTALLED_BIN: &str = "/usr/bin/wechat-relay";
/// The highest `systemd-analyze security` exposure the unit may have ("OK" and better).
const MAX_EXPOSURE: f64 = 2.0;
/// The operator's guide: the unit, secrets as credentials (the drop-in), upgrades.
const OPERATIONS_DOC: &str = "docs/operations.md";
/// The pages of docs/ that README.md links to: the .deb ships each beside it.
const DOC_PAGES: [&str; 6] = [
    "backend.md",
    "benchmarks.md",
    "configuration.md",
    "development.md",
    "operations.md",
    "security.md",
];

// ---- kit ---------------------------------------------------------------------------------

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

fn read(name: &str) -> String {
    fs::read_to_string(repo_file(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
}

fn unit() -> String {
    read("systemd/wechat-relay.service")
}

/// Whether `tool` can be run at all (`tool --version`).
fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"))
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The values of `key=` in the unit's uncommented lines, in order.
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}=");
    unit.lines()
        .filter_map(|line| line.trim().strip_prefix(&prefix))
        .collect()
}

/// The credentials drop-in as the unit's comments show it: its commented `LoadCredential=`
/// lines and the `Environment=` lines pointing at `%d`, uncommented, under `[Service]`.
fn dropin_from_unit_comments() -> String {
    let unit = unit();
    let lines: Vec<&str> = unit
        .lines()
        .filter_map(|line| line.strip_prefix("# "))
        .filter(|line| {
            line.starts_with("LoadCredential=")
                || (line.starts_with("Environment=") && line.contains("=%d/"))
        })
        .collect();
    assert!(
        lines.len() >= 2,
        "the unit documents LoadCredential= with an Environment= line in comments"
    );
    format!("[Service]\n{}\n", lines.join("\n"))
}

/// The credentials drop-in as the operations guide shows it (its "Secrets" section): the first
/// fenced block that starts with `[Service]` and has a `LoadCredential=` line.
fn dropin_from_docs() -> String {
    let operations = read(OPERATIONS_DOC);
    operations
        .split("```")
        .skip(1)
        .step_by(2)
        .map(|block| block.split_once('\n').map_or("", |(_, body)| body))
        .find(|body| body.starts_with("[Service]\n") && body.contains("\nLoadCredential="))
        .unwrap_or_else(|| {
            panic!("{OPERATIONS_DOC} shows the credentials drop-in in a fenced block starting [Service]")
        })
        .to_owned()
}

/// A copy of the unit that `systemd-analyze` can check here: `verify` wants every command of
/// the unit to exist, and the relay is not installed in /usr/bin on a build machine. So the
/// copy (in a temporary folder, under the unit's own name) runs `<tmp>/bin/wechat-relay`, a
/// symlink to the binary Cargo built for this test, in place of /usr/bin/wechat-relay; nothing
/// else changes. `--root=` is no alternative: it would need a whole system's units under the
/// root. A drop-in, when given, goes to `<tmp>/wechat-relay.service.d/credentials.conf`, where
/// `verify` and `security` find it beside the unit file.
fn checkable_unit(dropin: Option<&str>) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).expect("create bin/");
    let relay = bin.join("wechat-relay");
    std::os::unix::fs::symlink(BIN, &relay).expect("symlink the test binary");
    let relay = relay.to_str().expect("a UTF-8 temporary path");
    assert!(
        !relay.contains(char::is_whitespace),
        "the temporary path {relay:?} has whitespace, which a unit's command line would split"
    );

    let text = unit();
    let commands = text
        .lines()
        .filter(|line| line.starts_with("Exec") && line.contains(INSTALLED_BIN))
        .count();
    assert_eq!(
        text.matches(INSTALLED_BIN).count(),
        commands,
        "{INSTALLED_BIN} appears in the unit only in Exec*= lines"
    );
    assert!(
        commands >= 3,
        "ExecStartPre, ExecStart and ExecReload run the relay"
    );
    let path = dir.path().join("wechat-relay.service");
    fs::write(&path, text.replace(INSTALLED_BIN, relay)).expect("write the unit copy");

    if let Some(dropin) = dropin {
        let dropins = dir.path().join("wechat-relay.service.d");
        fs::create_dir(&dropins).expect("create the drop-in folder");
        fs::write(dropins.join("credentials.conf"), dropin).expect("write the drop-in");
    }
    (dir, path)
}

/// `systemd-analyze verify` on the unit copy: no line about the unit (an unknown key, a bad
/// specifier, a missing command, a drop-in problem all name it; so does a bad exit status).
/// Lines about other units of this machine are shown, not counted.
fn assert_verify_clean(dropin: Option<&str>) {
    let (_dir, path) = checkable_unit(dropin);
    let output = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .env("SYSTEMD_LOG_COLOR", "0"));
    let all = format!("{}{}", stdout(&output), stderr(&output));
    let (ours, others): (Vec<&str>, Vec<&str>) =
        all.lines().partition(|line| line.contains("wechat-relay"));
    if !others.is_empty() {
        eprintln!(
            "systemd-analyze verify, about other units:\n{}",
            others.join("\n")
        );
    }
    assert!(
        output.status.success() && ours.is_empty(),
        "systemd-analyze verify on the unit{}: {}\n{all}",
        if dropin.is_some() {
            " with the drop-in"
        } else {
            ""
        },
        output.status,
    );
}

/// The overall exposure `systemd-analyze security --offline=true` gives the unit copy, or
/// `None` when this systemd has no offline mode (before 250).
fn exposure(dropin: Option<&str>) -> Option<f64> {
    let (_dir, path) = checkable_unit(dropin);
    let output = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .env("SYSTEMD_LOG_COLOR", "0"));
    let (out, err) = (stdout(&output), stderr(&output));
    if err.contains("unrecognized option") {
        skip(&format!(
            "this systemd-analyze has no security --offline: {err}"
        ));
        return None;
    }
    // → Overall exposure level for wechat-relay.service: 1.1 OK 🙂
    let level = out
        .lines()
        .find_map(|line| line.split("Overall exposure level for ").nth(1))
        .and_then(|rest| rest.split(": ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{out}{err}"));
    let level = level
        .parse()
        .unwrap_or_else(|e| panic!("exposure level {level:?}: {e}"));
    eprintln!("systemd-analyze security: {level:.1}");
    Some(level)
}

/// Says why a check does not run; in CI, where every check must run, fails instead.
fn skip(why: &str) {
    if std::env::var_os("CI").is_some_and(|ci| !ci.is_empty()) {
        panic!("{why}: in CI (CI is set) every packaging check must run; see .ci/run");
    }
    eprintln!("skipped: {why}");
}

fn skip_without_systemd_analyze() -> bool {
    if have("systemd-analyze") {
        return false;
    }
    skip("systemd-analyze is not installed (Debian: apt-get install systemd)");
    true
}

/// The newest `wechat-relay_*.deb` that `cargo deb` left in a `debian/` folder of the target
/// folder: `$CARGO_TARGET_DIR`, the one the test binary was built in, or `./target`.
fn newest_deb() -> Option<PathBuf> {
    let mut targets = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        targets.push(repo_file("").join(dir));
    }
    // <target>/debug/wechat-relay, or <target>/<triple>/debug/wechat-relay.
    let built = Path::new(BIN).ancestors().skip(2);
    targets.extend(built.take(2).map(Path::to_path_buf));
    targets.push(repo_file("target"));

    targets
        .iter()
        .filter_map(|target| fs::read_dir(target.join("debian")).ok())
        .flatten()
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with("wechat-relay_") && name.ends_with(".deb")
        })
        .filter_map(|entry| Some((entry.metadata().ok()?.modified().ok()?, entry.path())))
        .max()
        .map(|(_, path)| path)
}

/// The .deb to check, or `None` (said on stderr) when there is none or no `dpkg-deb`.
fn deb() -> Option<PathBuf> {
    if !have("dpkg-deb") {
        skip("dpkg-deb is not installed (Debian: apt-get install dpkg)");
        return None;
    }
    let deb = newest_deb();
    match &deb {
        Some(path) => eprintln!("checking {}", path.display()),
        None => skip("no target/debian/wechat-relay_*.deb (build one: cargo deb)"),
    }
    deb
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let output = run(Command::new("dpkg-deb").args(args).arg(deb));
    assert!(
        output.status.success(),
        "dpkg-deb {args:?} {}: {}\n{}",
        deb.display(),
        output.status,
        stderr(&output)
    );
    stdout(&output)
}

/// `dpkg-deb -I <deb> <control file>`.
fn control_file(deb: &Path, name: &str) -> String {
    let output = run(Command::new("dpkg-deb").arg("-I").arg(deb).arg(name));
    assert!(
        output.status.success(),
        "the .deb has a {name} control file: {}",
        stderr(&output)
    );
    stdout(&output)
}

/// The installed relay.toml's store: the unit's StateDirectory.
const INSTALLED_STORE: &str = "/var/lib/wechat-relay";

/// The .deb's relay.toml that build.rs wrote for the build of this test binary
/// (`<target>/<profile>/packaging/relay.toml`).
fn built_installed_config() -> String {
    let profile = Path::new(BIN).parent().expect("the binary's folder");
    let path = profile.join("packaging/relay.toml");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The installed relay.toml is the repository's, line for line, but for the one `[store]`
/// `path`: `./data` there, [`INSTALLED_STORE`] here.
fn assert_differs_only_in_the_store(installed: &str) {
    let repository = read("relay.toml");
    assert_eq!(
        repository.lines().count(),
        installed.lines().count(),
        "the installed relay.toml has the repository's lines"
    );
    let differences: Vec<(&str, &str)> = repository
        .lines()
        .zip(installed.lines())
        .filter(|(ours, theirs)| ours != theirs)
        .collect();
    assert_eq!(
        differences,
        [(r#"path = "./data""#, r#"path = "/var/lib/wechat-relay""#)],
        "the installed relay.toml differs from the repository's only in [store] path"
    );
    assert_eq!(
        INSTALLED_STORE,
        format!("/var/lib/{}", values(&unit(), "StateDirectory")[0])
    );
}

/// The files of the .deb, unpacked (`dpkg-deb -x`) into a temporary folder.
fn unpack(deb: &Path) -> TempDir {
    let root = tempfile::tempdir().expect("temporary folder");
    let output = run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path()));
    assert!(output.status.success(), "dpkg-deb -x: {}", stderr(&output));
    root
}

/// The `next_steps` function of a postinst's text, run by `sh`: what a first install prints.
fn next_steps(postinst: &str) -> String {
    let start = postinst
        .find("\nnext_steps() {\n")
        .unwrap_or_else(|| panic!("the postinst defines next_steps():\n{postinst}"));
    let body = &postinst[start..];
    let end = body
        .find("\n}\n")
        .unwrap_or_else(|| panic!("next_steps() ends with a `}}` line:\n{body}"));
    let script = format!("set -e{}\n}}\nnext_steps\n", &body[..end]);
    let output = run(Command::new("sh").arg("-c").arg(&script));
    assert!(
        output.status.success(),
        "sh -c next_steps: {}",
        stderr(&output)
    );
    stdout(&output)
}

/// What the postinst prints names the file to edit, the secrets folder it makes, the unit's
/// own check command and how to start the unit.
fn assert_next_steps(postinst: &str) {
    let printed = next_steps(postinst);
    let unit = unit();
    let check = values(&unit, "ExecStartPre")[0]
        .strip_prefix("/usr/bin/")
        .expect("the unit runs /usr/bin/wechat-relay");
    let secrets = "/etc/wechat-relay/secrets";
    for needed in [
        "/etc/wechat-relay/relay.toml",
        &format!("{secrets}/"),
        check,
        "systemctl enable --now wechat-relay",
    ] {
        assert!(
            printed.lines().any(|line| line.contains(needed)),
            "the postinst prints {needed:?}:\n{printed}"
        );
    }
    assert!(
        postinst.contains(&format!(
            "install -d -m 0750 -o root -g wechat-relay {secrets}\n"
        )),
        "the postinst makes the secrets folder it names"
    );
    // Printed once, after the first install (configure with no previous version).
    assert!(
        postinst.contains("if [ -z \"$2\" ]; then\n        next_steps\n"),
        "the postinst prints the next steps on a first install:\n{postinst}"
    );
}

// ---- the unit ----------------------------------------------------------------------------

#[test]
fn unit_declares_what_the_relay_does_under_systemd() {
    let unit = unit();
    for (key, value) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("User", "wechat-relay"),
        ("Group", "wechat-relay"),
        ("StateDirectory", "wechat-relay"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(values(&unit, key), [value], "{key}=");
    }
    assert_eq!(
        values(&unit, "Environment"),
        ["MIMALLOC_ARENA_EAGER_COMMIT=0 MIMALLOC_PURGE_DELAY=0"],
        "Environment="
    );
    let watchdog = values(&unit, "WatchdogSec");
    assert!(
        matches!(watchdog.as_slice(), [s] if s.parse::<u32>().is_ok_and(|s| s > 0)),
        "WatchdogSec= is set: {watchdog:?}"
    );

    let check = "/usr/bin/wechat-relay check --config /etc/wechat-relay/relay.toml";
    assert_eq!(values(&unit, "ExecStartPre"), [check]);
    assert_eq!(
        values(&unit, "ExecStart"),
        ["/usr/bin/wechat-relay serve --config /etc/wechat-relay/relay.toml"]
    );
    // systemd runs the ExecReload= lines in order and stops at the first that fails: the
    // relay gets SIGHUP only for a config that passed `check`.
    assert_eq!(
        values(&unit, "ExecReload"),
        [check, "/bin/kill -HUP $MAINPID"]
    );
}

/// The unit leaves the store to relay.toml: the installed one names the unit's StateDirectory,
/// so the service and `check`/`outbox` run by hand on the same file see one store.
#[test]
fn unit_does_not_override_the_store_of_the_installed_config() {
    let unit = unit();
    assert!(
        !unit.contains("WECHAT_RELAY_STORE__PATH"),
        "the unit leaves [store] path to relay.toml"
    );
    assert_differs_only_in_the_store(&built_installed_config());
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    if skip_without_systemd_analyze() {
        return;
    }
    assert_verify_clean(None);
}

#[test]
fn unit_with_the_credentials_dropin_passes_systemd_analyze_verify() {
    if skip_without_systemd_analyze() {
        return;
    }
    let from_unit = dropin_from_unit_comments();
    let from_docs = dropin_from_docs();
    assert!(
        from_docs.contains("=%d/"),
        "the drop-in of {OPERATIONS_DOC} points the relay at %d"
    );
    assert_verify_clean(Some(&from_unit));
    assert_verify_clean(Some(&from_docs));
}

#[test]
fn unit_is_rated_ok_by_systemd_analyze_security() {
    if skip_without_systemd_analyze() {
        return;
    }
    for dropin in [None, Some(dropin_from_docs())] {
        if let Some(level) = exposure(dropin.as_deref()) {
            assert!(
                level <= MAX_EXPOSURE,
                "systemd-analyze security rates the unit {level:.1}, above {MAX_EXPOSURE:.1}"
            );
        }
    }
}

#[test]
fn postinst_prints_what_to_edit_check_and_start() {
    assert_next_steps(&read("debian/postinst"));
}

#[test]
fn maintainer_scripts_are_valid_sh() {
    for script in ["debian/postinst", "debian/postrm"] {
        let output = run(Command::new("sh").arg("-n").arg(repo_file(script)));
        assert!(
            output.status.success(),
            "sh -n {script}: {}",
            stderr(&output)
        );
        assert!(
            read(script).contains("#DEBHELPER#"),
            "{script} has #DEBHELPER# (where cargo-deb puts the systemd snippets)"
        );
    }
}

// ---- the .deb ----------------------------------------------------------------------------

#[test]
fn deb_installs_the_binary_the_unit_the_config_and_the_docs() {
    let Some(deb) = deb() else { return };
    let listing = dpkg_deb(&["-c"], &deb);
    // -rwxr-xr-x root/root   6010384 2026-11-24 12:00 ./usr/bin/wechat-relay
    let entry = |path: &str| {
        listing
            .lines()
            .find(|line| line.ends_with(&format!(" .{path}")))
            .map(|line| {
                // The owner shows as root/root or 0/0, depending on the tool that packed it.
                let mut words = line.split_whitespace();
                let mode = words.next().unwrap_or_default();
                let owner = match words.next().unwrap_or_default() {
                    "0/0" => "root/root",
                    owner => owner,
                };
                format!("{mode} {owner}")
            })
    };
    let unit_path = [
        "/usr/lib/systemd/system/wechat-relay.service",
        "/lib/systemd/system/wechat-relay.service",
    ]
    .into_iter()
    .find(|path| entry(path).is_some())
    .unwrap_or_else(|| panic!("the .deb has the unit in /usr/lib or /lib:\n{listing}"));
    for (path, mode_owner) in [
        (INSTALLED_BIN, "-rwxr-xr-x root/root"),
        (unit_path, "-rw-r--r-- root/root"),
        // Not world-readable from unpacking on; the postinst gives it to root:wechat-relay.
        ("/etc/wechat-relay/relay.toml", "-rw-r----- root/root"),
        (
            "/usr/share/doc/wechat-relay/README.md",
            "-rw-r--r-- root/root",
        ),
        (
            "/usr/share/doc/wechat-relay/SECURITY.md",
            "-rw-r--r-- root/root",
        ),
        (
            "/usr/share/wechat-relay/prometheus/alerts.yml",
            "-rw-r--r-- root/root",
        ),
        (
            "/usr/share/wechat-relay/grafana/wechat-relay.json",
            "-rw-r--r-- root/root",
        ),
    ] {
        assert_eq!(
            entry(path).as_deref(),
            Some(mode_owner),
            "dpkg-deb -c lists .{path}:\n{listing}"
        );
    }

    // The unit is this repository's, byte for byte.
    let root = unpack(&deb);
    let packaged = fs::read(root.path().join(&unit_path[1..])).expect("read the packaged unit");
    assert!(
        packaged == unit().into_bytes(),
        "{unit_path} in {} differs from systemd/wechat-relay.service: rebuild the .deb (cargo deb)",
        deb.display()
    );

    // Every page of docs/ beside the README, at the path its links name (docs/x.md).
    let mut pages: Vec<String> = fs::read_dir(repo_file("docs"))
        .expect("read docs/")
        .map(|entry| {
            entry
                .expect("a docs/ entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".md"))
        .collect();
    pages.sort();
    assert_eq!(pages, DOC_PAGES, "DOC_PAGES lists every docs/*.md");
    // The page a first install's next steps send the reader to is in the package, with the
    // section they name ("Secrets").
    let printed = next_steps(&read("debian/postinst"));
    let named: Vec<&str> = printed
        .split_whitespace()
        .filter(|word| word.starts_with("/usr/share/doc/"))
        .map(|word| word.trim_end_matches(['.', ',', ')']))
        .collect();
    assert!(!named.is_empty(), "the next steps name a page:\n{printed}");
    let sections: Vec<&str> = printed.split('"').skip(1).step_by(2).collect();
    for path in named {
        assert!(
            entry(path).is_some(),
            "the .deb holds .{path}, which the postinst names:\n{listing}"
        );
        let page = path
            .strip_prefix("/usr/share/doc/wechat-relay/")
            .map(read)
            .unwrap_or_default();
        for section in &sections {
            let heading = |line: &str| {
                line.starts_with('#') && line.trim_start_matches('#').trim() == *section
            };
            assert!(
                page.lines().any(heading),
                "{path} has the section {section:?} the postinst names"
            );
        }
    }
    for page in DOC_PAGES {
        let path = format!("/usr/share/doc/wechat-relay/docs/{page}");
        assert_eq!(
            entry(&path).as_deref(),
            Some("-rw-r--r-- root/root"),
            "dpkg-deb -c lists .{path}:\n{listing}"
        );
        let packaged = fs::read(root.path().join(&path[1..])).expect("read a packaged page");
        assert!(
            packaged == read(&format!("docs/{page}")).into_bytes(),
            "{path} in {} differs from docs/{page}: rebuild the .deb (cargo deb)",
            deb.display()
        );
    }
}

#[test]
fn deb_control_names_the_package_its_conffile_and_scripts() {
    let Some(deb) = deb() else { return };
    let info = dpkg_deb(&["-I"], &deb);
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(&format!(" {name}: ")))
            .unwrap_or_else(|| panic!("dpkg-deb -I shows {name}:\n{info}"))
    };
    assert_eq!(field("Package"), "wechat-relay");
    let depends = field("Depends");
    for needed in ["adduser", "procps"] {
        assert!(depends.contains(needed), "Depends: {depends} has {needed}");
    }
    //     2596 bytes,    59 lines   *  postinst             #!/bin/sh
    let control_files: Vec<&str> = info
        .lines()
        .filter_map(|line| {
            line.split_once(" lines ")?
                .1
                .split_whitespace()
                .find(|w| *w != "*")
        })
        .collect();
    for name in ["control", "conffiles", "postinst", "prerm", "postrm"] {
        assert!(
            control_files.contains(&name),
            "dpkg-deb -I lists the {name} control file:\n{info}"
        );
    }

    let conffiles = control_file(&deb, "conffiles");
    assert!(
        conffiles
            .lines()
            .any(|l| l == "/etc/wechat-relay/relay.toml"),
        "relay.toml is a conffile: {conffiles}"
    );

    let postinst = control_file(&deb, "postinst");
    assert!(
        postinst.contains("adduser --system --group --no-create-home --home /var/lib/wechat-relay"),
        "the postinst creates the system user:\n{postinst}"
    );
    // cargo-deb's systemd snippets replace #DEBHELPER#. Installing neither enables the service
    // (it keeps the enablement the administrator chose: the "dont-enable" snippet, which asks
    // `debian-installed`) nor starts it (relay.toml needs real values first); an upgrade
    // restarts it only if it runs (try-restart).
    assert!(
        !postinst.contains("#DEBHELPER#"),
        "cargo-deb filled in #DEBHELPER#:\n{postinst}"
    );
    assert!(
        postinst.contains("deb-systemd-helper debian-installed"),
        "the postinst does not enable the service:\n{postinst}"
    );
    assert!(
        !postinst.contains("deb-systemd-invoke start"),
        "the postinst does not start the service:\n{postinst}"
    );
    assert!(
        postinst.contains("deb-systemd-invoke try-restart"),
        "an upgrade restarts a running service:\n{postinst}"
    );
    assert_next_steps(&postinst);
}

/// The .deb's /etc/wechat-relay/relay.toml is the repository's with the store in
/// /var/lib/wechat-relay, and `check` run by hand on it says so.
#[test]
fn deb_config_keeps_the_store_in_the_state_directory() {
    let Some(deb) = deb() else { return };
    let root = unpack(&deb);
    let config = root.path().join("etc/wechat-relay/relay.toml");
    let installed = fs::read_to_string(&config).expect("read the packaged relay.toml");
    assert_differs_only_in_the_store(&installed);

    let output = run(Command::new(BIN).arg("check").arg("--config").arg(&config));
    assert!(
        output.status.success(),
        "check on the packaged relay.toml: {}",
        stderr(&output)
    );
    let summary = stdout(&output);
    assert!(
        summary
            .lines()
            .any(|line| line.starts_with(&format!("store: {INSTALLED_STORE} "))),
        "check on the packaged relay.toml names the unit's store:\n{summary}"
    );
}

// ---- the man page and the completion scripts ---------------------------------------------

/// The subcommands `wechat-relay <args>` lists (`help` left out): `["help"]` for the top
/// level, `["outbox", "help"]` for outbox's.
fn listed_subcommands(args: &[&str]) -> Vec<String> {
    let output = run(Command::new(BIN).args(args));
    assert!(
        output.status.success(),
        "wechat-relay {args:?}: {}",
        stderr(&output)
    );
    let help = stdout(&output);
    let names: Vec<String> = help
        .lines()
        .skip_while(|line| *line != "Commands:")
        .skip(1)
        .take_while(|line| !line.is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect();
    assert!(
        names.len() >= 2,
        "wechat-relay {args:?} lists subcommands:\n{help}"
    );
    names
}

/// Whether `text` has `word` as a whole word (between characters that are not letters, digits,
/// `-` or `_`).
fn has_word(text: &str, word: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .any(|token| token == word)
}

/// `wechat-relay completions SHELL`, run where there is no relay.toml: it needs none.
fn completion_script(shell: &str) -> String {
    let empty = tempfile::tempdir().expect("temporary folder");
    let output = run(Command::new(BIN)
        .args(["completions", shell])
        .current_dir(empty.path())
        .env_remove("WECHAT_RELAY_CONFIG"));
    assert!(
        output.status.success(),
        "wechat-relay completions {shell} without a config: {}",
        stderr(&output)
    );
    stdout(&output)
}

/// Where the .deb installs each shell's script, and the file build.rs writes it to.
const COMPLETIONS: [(&str, &str, &str); 3] = [
    (
        "bash",
        "/usr/share/bash-completion/completions/wechat-relay",
        "wechat-relay.bash",
    ),
    (
        "zsh",
        "/usr/share/zsh/vendor-completions/_wechat-relay",
        "_wechat-relay",
    ),
    (
        "fish",
        "/usr/share/fish/vendor_completions.d/wechat-relay.fish",
        "wechat-relay.fish",
    ),
];
const MAN_PAGE: &str = "/usr/share/man/man1/wechat-relay.1.gz";

#[test]
fn completions_name_every_subcommand() {
    let mut names = listed_subcommands(&["help"]);
    assert!(names.iter().any(|name| name == "completions"), "{names:?}");
    names.extend(listed_subcommands(&["outbox", "help"]));
    for (shell, _, _) in COMPLETIONS {
        let script = completion_script(shell);
        for name in &names {
            assert!(
                has_word(&script, name),
                "the {shell} completions name {name}:\n{script}"
            );
        }
    }
    let output = run(Command::new("bash")
        .arg("-n")
        .arg("-c")
        .arg(completion_script("bash")));
    assert!(
        output.status.success(),
        "bash -n on the bash completions: {}",
        stderr(&output)
    );
}

/// The stdout of `command`, which must succeed.
fn run_ok(command: &mut Command) -> String {
    let output = run(command);
    assert!(
        output.status.success(),
        "{command:?}: {}: {}",
        output.status,
        stderr(&output)
    );
    stdout(&output)
}

/// The roff text of a gzipped man page (`gzip -dc`).
fn gunzip(path: &Path) -> String {
    run_ok(Command::new("gzip").arg("-dc").arg(path))
}

/// The man page `page` (wechat-relay.1.gz) names every subcommand, in its roff text and,
/// where `man` is installed, as `man -l` shows it.
fn assert_man_page_names_every_subcommand(page: &Path) {
    let roff = gunzip(page);
    assert!(
        roff.contains(".TH wechat-relay 1"),
        "a section 1 page:\n{roff}"
    );
    let shown = if have("man") {
        run_ok(
            Command::new("man")
                .arg("-l")
                .arg(page)
                .env("MANPAGER", "cat")
                .env("MANWIDTH", "100"),
        )
    } else {
        eprintln!("man is not installed: the roff text only");
        roff.clone()
    };
    // The top page lists the subcommands (each has a page of its own, outbox's too).
    for name in listed_subcommands(&["help"]) {
        assert!(
            has_word(&shown, &format!("wechat-relay-{name}")),
            "the man page names {name}:\n{shown}"
        );
    }
}

/// build.rs wrote the completion scripts `completions` prints and the man pages, for every
/// build (the .deb's come from the release build's).
#[test]
fn build_writes_the_man_pages_and_the_completions_the_binary_prints() {
    let packaging = Path::new(BIN)
        .parent()
        .expect("the binary's folder")
        .join("packaging");
    for (shell, _, file) in COMPLETIONS {
        let built = fs::read_to_string(packaging.join("completions").join(file))
            .unwrap_or_else(|e| panic!("read packaging/completions/{file}: {e}"));
        assert!(
            built == completion_script(shell),
            "packaging/completions/{file} is what `completions {shell}` prints"
        );
    }
    assert_man_page_names_every_subcommand(&packaging.join("man/wechat-relay.1.gz"));
    let outbox = listed_subcommands(&["outbox", "help"]);
    let pages = listed_subcommands(&["help"])
        .into_iter()
        .chain(outbox.iter().map(|name| format!("outbox-{name}")));
    for name in pages {
        let page = packaging.join(format!("man/wechat-relay-{name}.1.gz"));
        assert!(page.exists(), "a man page for {name}: {}", page.display());
    }
}

#[test]
fn deb_installs_the_man_page_and_the_completions() {
    let Some(deb) = deb() else { return };
    let listing = dpkg_deb(&["-c"], &deb);
    let paths = COMPLETIONS.map(|(_, path, _)| path);
    for path in paths.iter().chain([&MAN_PAGE]) {
        assert!(
            listing.lines().any(|line| line.starts_with("-rw-r--r-- ") && line.ends_with(&format!(" .{path}"))),
            "dpkg-deb -c lists .{path}, mode 0644:\n{listing}"
        );
    }
    let root = unpack(&deb);
    for (shell, path, _) in COMPLETIONS {
        let packaged = fs::read_to_string(root.path().join(&path[1..]))
            .expect("read the packaged completions");
        assert!(
            packaged == completion_script(shell),
            "{path} in {} is what `wechat-relay completions {shell}` prints: rebuild the .deb (cargo deb)",
            deb.display()
        );
    }
    assert_man_page_names_every_subcommand(&root.path().join(&MAN_PAGE[1..]));
}
