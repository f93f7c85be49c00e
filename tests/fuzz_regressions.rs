//! The fuzzers' kept corpus (fuzz/corpus/<target>/) and every crash input they left
//! (fuzz/artifacts/<target>/) replayed on stable, through the same functions as the
//! `cargo fuzz` targets (fuzz/src/lib.rs, included here): none may panic.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// The files in `fuzz/<kind>/<target>/`, none when the folder does not exist.
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&folder) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("a readable fuzz folder").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every kept and crash input of `target` and names each one that panics.
fn replay(target: &str) {
    let corpus = inputs("corpus", target);
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ is empty: seed it with fuzz/seed.py"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut panicked = Vec::new();
    for path in corpus.iter().chain(&inputs("artifacts", target)) {
        let data = match std::fs::read(path) {
            Ok(data) => data,
            // A fuzzer running on this corpus replaced it meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        if catch_unwind(AssertUnwindSafe(|| harness::run(target, dir.path(), &data))).is_err() {
            panicked.push(path.display().to_string());
        }
    }
    assert!(panicked.is_empty(), "{target} panics on {panicked:#?}");
}

/// The names in `fuzz/<folder>/`, without extensions, sorted.
fn names(folder: &str) -> Vec<String> {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(folder);
    let mut names: Vec<String> = std::fs::read_dir(&folder)
        .unwrap_or_else(|e| panic!("{}: {e}", folder.display()))
        .map(|entry| {
            let path = entry.expect("a readable fuzz folder").path();
            let stem = path.file_stem().expect("a file name");
            stem.to_string_lossy().into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Every target in fuzz/fuzz_targets/ is replayed here and has a kept corpus.
#[test]
fn every_fuzz_target_is_replayed() {
    let mut targets = harness::TARGETS.map(str::to_owned).to_vec();
    targets.sort();
    assert_eq!(names("fuzz_targets"), targets);
    assert_eq!(names("corpus"), targets);
}

#[test]
fn kept_corpus_and_crash_inputs_do_not_panic() {
    for target in harness::TARGETS {
        replay(target);
    }
}
