//! Build-time files for the .deb (`cargo deb`, `[package.metadata.deb]` in Cargo.toml), written
//! to `<target>/<profile>/packaging/`, which cargo-deb names `target/release/packaging/`:
//!
//! - `relay.toml`: the repository's relay.toml with one line changed, its `[store] path`, from
//!   the quick start's `./data` to `/var/lib/wechat-relay` (the unit's StateDirectory), so that
//!   the service, `check` and `outbox` run by hand on the installed file see the same store;
//! - `man/*.1.gz`: the man pages of the command line (clap_mangen), `wechat-relay.1.gz` and one
//!   per subcommand (`wechat-relay-outbox-list.1.gz`), gzipped as Debian wants them;
//! - `completions/`: the bash, zsh and fish completion scripts, the same bytes
//!   `wechat-relay completions SHELL` prints (one function in src/cli.rs writes both).
//!
//! Cargo gives a build script only `OUT_DIR` to write to, and that folder's name has a hash in
//! it that cargo-deb cannot know; the profile folder is three levels above it
//! (`<target>/<profile>/build/<package>-<hash>/out`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

/// The command line, compiled here on its own (src/cli.rs uses nothing of the crate).
#[path = "src/cli.rs"]
#[allow(
    dead_code,
    reason = "build.rs only describes the command line, it runs none of it"
)]
mod cli;

/// The quick start's store, in the repository's relay.toml.
const REPOSITORY_STORE: &str = r#"path = "./data""#;
/// The installed relay.toml's store: the unit's StateDirectory.
const INSTALLED_STORE: &str = r#"path = "/var/lib/wechat-relay""#;

fn main() {
    println!("cargo::rerun-if-changed=relay.toml");
    println!("cargo::rerun-if-changed=src/cli.rs");
    println!("cargo::rerun-if-changed=build.rs");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let packaging = profile_dir(&out_dir).join("packaging");
    create_dir(&packaging);

    let repository = fs::read_to_string("relay.toml").expect("read relay.toml");
    write(
        &packaging.join("relay.toml"),
        installed_config(&repository).as_bytes(),
    );
    man_pages(&out_dir.join("man"), &packaging.join("man"));
    completions(&packaging.join("completions"));
}

/// `<target>/<profile>` from `<target>/<profile>/build/<package>-<hash>/out`.
fn profile_dir(out_dir: &Path) -> &Path {
    out_dir.ancestors().nth(3).unwrap_or_else(|| {
        panic!(
            "OUT_DIR {} is not <profile>/build/<package>/out",
            out_dir.display()
        )
    })
}

/// The repository's relay.toml with its one `[store]` `path = "./data"` line replaced.
fn installed_config(repository: &str) -> String {
    let mut section = "";
    let mut replaced = 0_usize;
    let mut installed = String::with_capacity(repository.len());
    for line in repository.split_inclusive('\n') {
        let text = line.trim_end_matches(['\n', '\r']);
        if text.starts_with('[') {
            section = text;
        }
        if section == "[store]" && text == REPOSITORY_STORE {
            installed.push_str(INSTALLED_STORE);
            installed.push_str(&line[text.len()..]);
            replaced += 1;
        } else {
            installed.push_str(line);
        }
    }
    assert_eq!(
        replaced, 1,
        "relay.toml has exactly one `{REPOSITORY_STORE}` line under [store], which the .deb's copy replaces"
    );
    installed
}

/// The man pages, rendered into `rendered` then gzipped into `packaged` (emptied first, so
/// that a removed subcommand leaves no page behind).
fn man_pages(rendered: &Path, packaged: &Path) {
    for dir in [rendered, packaged] {
        if dir.exists() {
            fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("empty {}: {e}", dir.display()));
        }
        create_dir(dir);
    }
    clap_mangen::generate_to(cli::Cli::command(), rendered).expect("render the man pages");
    for entry in fs::read_dir(rendered).expect("list the man pages") {
        let page = entry.expect("a man page").path();
        let name = page
            .file_name()
            .and_then(|name| name.to_str())
            .expect("a UTF-8 name");
        let text = fs::read(&page).unwrap_or_else(|e| panic!("read {}: {e}", page.display()));
        // No file name or time stamp in the header: the same page gives the same bytes.
        let mut gzip = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::best());
        gzip.write_all(&text).expect("gzip a man page");
        let gzipped = gzip.finish().expect("gzip a man page");
        write(&packaged.join(format!("{name}.gz")), &gzipped);
    }
}

/// The completion scripts, under the names their shells look for.
fn completions(dir: &Path) {
    create_dir(dir);
    for (shell, name) in [
        (Shell::Bash, format!("{}.bash", cli::BIN_NAME)),
        (Shell::Zsh, format!("_{}", cli::BIN_NAME)),
        (Shell::Fish, format!("{}.fish", cli::BIN_NAME)),
    ] {
        let mut script = Vec::new();
        cli::write_completions(shell, &mut script);
        write(&dir.join(name), &script);
    }
}

fn create_dir(dir: &Path) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
}

fn write(path: &Path, contents: &[u8]) {
    // Unchanged files keep their time stamp.
    if fs::read(path).is_ok_and(|old| old == contents) {
        return;
    }
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
