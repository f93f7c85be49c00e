//! A reload's log line says what it changed: the accounts, targets and routes added, removed
//! and changed, by name. The real binary, reloaded with SIGHUP.

mod common;

use common::*;

const SERVER: &str = "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_ms = 1000\n\
                      [store]\npath = \"data\"\n";

/// The value of `key=` in a text log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(&format!("{key}=")))
}

#[test]
fn the_reload_line_names_what_was_added_removed_and_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.toml");
    let target = |name: &str, extra: &str| {
        target_section(name, &format!("http://127.0.0.1:1/{name}"), "raw", extra)
    };
    let before = [
        SERVER.to_owned(),
        account_section("main", "/main", "safe"),
        account_section("shop", "/shop", "safe"),
        target("a", ""),
        target("b", ""),
        "[[route]]\nname = \"texts\"\nmsg_type = [\"text\"]\nto = [\"a\"]\n".to_owned(),
        "[[route]]\nname = \"events\"\nmsg_type = [\"event\"]\nto = [\"b\"]\n".to_owned(),
    ]
    .concat();
    std::fs::write(&path, &before).expect("config");
    let relay = Binary::start(&path);

    let after = [
        SERVER.to_owned(),
        // main: another mode; shop gone; blog new.
        account_section("main", "/main", "compatible"),
        account_section("blog", "/blog", "safe"),
        // a: another timeout; b gone; c new.
        target("a", "timeout_ms = 2500"),
        target("c", ""),
        "[[route]]\nname = \"texts\"\nmsg_type = [\"text\"]\ncontent = [\"hi*\"]\nto = [\"a\"]\n"
            .to_owned(),
        "[[route]]\nname = \"follows\"\nevent = [\"subscribe\"]\nto = [\"c\"]\n".to_owned(),
    ]
    .concat();
    std::fs::write(&path, &after).expect("config");
    relay.signal("HUP");
    let line = relay.wait_for("config reloaded");
    for (key, names) in [
        ("accounts_added", "blog"),
        ("accounts_removed", "shop"),
        ("accounts_changed", "main"),
        ("targets_added", "c"),
        ("targets_removed", "b"),
        ("targets_changed", "a"),
        ("routes_added", "follows"),
        ("routes_removed", "events"),
        ("routes_changed", "texts"),
        ("unchanged", "false"),
    ] {
        assert_eq!(field(&line, key), Some(names), "{key} in {line}");
    }

    // The same file again: nothing changed, and the line says so.
    relay.signal("HUP");
    let line = relay.wait_for("config reloaded");
    assert_eq!(field(&line, "unchanged"), Some("true"), "{line}");
    assert!(
        !line.contains("_added") && !line.contains("_changed"),
        "{line}"
    );
}
