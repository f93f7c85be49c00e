//! Who may read or change a file that holds secrets (relay.toml, a `_file`, the TLS key): a
//! file others can read, or anyone but its owner can write, is warned about by `check` and at
//! start. Group-readable is fine: the .deb installs relay.toml `root:wechat-relay` `0640`.

use std::path::Path;

/// Read by others, written by the group or by others.
const LOOSE: u32 = 0o006 | 0o020;

/// Why the mode of `path` is too open (`/etc/x/relay.toml is mode 0644: readable by every
/// user; chmod 0640`), or `None` when it is not (or cannot be read: loading reports that).
pub fn loose_mode(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
        describe(mode).map(|why| {
            format!(
                "{} is mode {mode:04o}: {why}; chmod {:04o}",
                path.display(),
                mode & !(LOOSE | 0o001)
            )
        })
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// What `mode` lets users other than the owner do to a secret, if anything.
fn describe(mode: u32) -> Option<String> {
    let mut what = Vec::new();
    if mode & 0o004 != 0 {
        what.push("readable by every user");
    }
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (_, true) => what.push("writable by every user"),
        (true, false) => what.push("writable by its group"),
        (false, false) => {}
    }
    (!what.is_empty()).then(|| what.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_only_and_group_readable_are_fine() {
        for mode in [0o600, 0o640, 0o400, 0o440, 0o700, 0o750] {
            assert_eq!(describe(mode), None, "{mode:o}");
        }
    }

    #[test]
    fn others_reading_or_anyone_else_writing_is_named() {
        assert_eq!(describe(0o644).as_deref(), Some("readable by every user"));
        assert_eq!(describe(0o660).as_deref(), Some("writable by its group"));
        assert_eq!(describe(0o602).as_deref(), Some("writable by every user"));
        assert_eq!(
            describe(0o666).as_deref(),
            Some("readable by every user, writable by every user")
        );
    }

    #[cfg(unix)]
    #[test]
    fn the_line_names_the_file_its_mode_and_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "x").expect("write");
        for (mode, fixed) in [(0o644, "0640"), (0o664, "0640"), (0o604, "0600")] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let line = loose_mode(&path).expect("warned");
            assert!(
                line.starts_with(&format!("{} is mode {mode:04o}: ", path.display())),
                "{line}"
            );
            assert!(line.ends_with(&format!("; chmod {fixed}")), "{line}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert_eq!(loose_mode(&path), None);
        assert_eq!(loose_mode(&dir.path().join("missing")), None);
    }
}
