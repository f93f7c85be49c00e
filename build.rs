//! Build-time files for the .deb (`cargo deb`, `[package.metadata.deb]` in Cargo.toml), written
//! to `<target>/<profile>/packaging/`, which cargo-deb names `target/release/packaging/`:
//!
//! - `relay.toml`: the repository's relay.toml with one line changed, its `[store] path`, from
//!   the quick start's `./data` to `/var/lib/wechat-relay` (the unit's StateDirectory), so that
//!   the service, `check` and `outbox` run by hand on the installed file see the same store.
//!
//! Cargo gives a build script only `OUT_DIR` to write to, and that folder's name has a hash in
//! it that cargo-deb cannot know; the profile folder is three levels above it
//! (`<target>/<profile>/build/<package>-<hash>/out`).

use std::fs;
use std::path::{Path, PathBuf};

/// The quick start's store, in the repository's relay.toml.
const REPOSITORY_STORE: &str = r#"path = "./data""#;
/// The installed relay.toml's store: the unit's StateDirectory.
const INSTALLED_STORE: &str = r#"path = "/var/lib/wechat-relay""#;

fn main() {
    println!("cargo::rerun-if-changed=relay.toml");
    println!("cargo::rerun-if-changed=build.rs");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let packaging = profile_dir(&out_dir).join("packaging");
    fs::create_dir_all(&packaging)
        .unwrap_or_else(|e| panic!("create {}: {e}", packaging.display()));

    let repository = fs::read_to_string("relay.toml").expect("read relay.toml");
    write(
        &packaging.join("relay.toml"),
        installed_config(&repository).as_bytes(),
    );
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

fn write(path: &Path, contents: &[u8]) {
    // Unchanged files keep their time stamp.
    if fs::read(path).is_ok_and(|old| old == contents) {
        return;
    }
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
