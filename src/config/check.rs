//! Validation of the raw shape into a checked [`Config`]: every problem is collected, each with
//! the key path it comes from (`route[2].reply: "shop" is a target, but not in this route's
//! to`; `names` puts the element's name in place of its index once the line is found); what
//! is allowed but probably wrong becomes a warning. [`Checker::check`] runs the sections in a fixed order; the
//! checks of each section are in their own file below, on the shared reporting here.

mod account;
mod route;
mod server;
mod store;
mod target;

use std::fmt;
use std::path::{Path, PathBuf};

use figment::value::{Dict, Value};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::raw::{RawAccount, RawAdmin, RawLog, RawRoute, RawServer, RawStore, RawTarget};
use super::{CREDENTIALS_DIRECTORY, Config, ConfigError, file_mode};

/// The sections relay.toml may have.
const SECTIONS: [&str; 7] = [
    "server", "store", "log", "admin", "account", "target", "route",
];

// Limits that more than one section checks.
/// A forward that takes longer than this is not coming back.
const MAX_TIMEOUT_MS: u64 = 300_000;
/// A year: the most a delivery may be retried for.
const MAX_AGE_S: u64 = 365 * 86_400;

/// A serde error without the value that caused it: the value may be a token or a key.
fn describe(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    match kind {
        Kind::InvalidType(actual, expected) => {
            let found = match actual {
                figment::error::Actual::Bool(_) => "a boolean",
                figment::error::Actual::Signed(_) | figment::error::Actual::Unsigned(_) => {
                    "an integer"
                }
                figment::error::Actual::Float(_) => "a number",
                figment::error::Actual::Str(_) | figment::error::Actual::Char(_) => "a string",
                figment::error::Actual::Seq => "a list",
                figment::error::Actual::Map => "a table",
                _ => "another type",
            };
            // serde names Rust's integer types; the file has numbers.
            let expected = match expected.as_str() {
                "u8" | "u16" | "u32" | "u64" | "usize" => "a number (0 or more, no quotes)",
                "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number (no quotes)",
                other => other,
            };
            format!("expected {expected}, found {found}")
        }
        Kind::InvalidValue(_, expected) => format!("invalid value, expected {expected}"),
        // A key or a variant is never a secret: it is named, with the nearest right one.
        Kind::UnknownField(found, expected) => format!(
            "unknown key {found:?}{}",
            hint(found, expected.iter().copied(), "the keys here")
        ),
        Kind::UnknownVariant(found, expected) => not_one_of(found, expected.iter().copied()),
        Kind::MissingField(field) => format!("{field:?} is required"),
        Kind::DuplicateField(field) => format!("{field:?} is given twice"),
        other => other.to_string(),
    }
}

/// The candidate nearest a misspelt `name`, if one is near enough to be meant.
pub(super) fn closest<'n>(
    name: &str,
    candidates: impl IntoIterator<Item = &'n str>,
) -> Option<&'n str> {
    candidates
        .into_iter()
        .map(|candidate| (strsim::jaro_winkler(name, candidate), candidate))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate)
}

/// ` (did you mean "x"?)`, or ` (<what>: "a", "b")` when no candidate is near.
pub(super) fn hint<'n>(
    name: &str,
    candidates: impl IntoIterator<Item = &'n str> + Clone,
    what: &str,
) -> String {
    match closest(name, candidates.clone()) {
        Some(candidate) => format!(" (did you mean {candidate:?}?)"),
        None => {
            let list = quoted_list(candidates);
            if list.is_empty() {
                String::new()
            } else {
                format!(" ({what}: {list})")
            }
        }
    }
}

/// `"x" is not one of "a", "b" (did you mean "a"?)`: a value that is none of `allowed`.
pub(super) fn not_one_of<'n>(
    found: &str,
    allowed: impl IntoIterator<Item = &'n str> + Clone,
) -> String {
    format!(
        "{found:?} is not one of {}{}",
        quoted_list(allowed.clone()),
        closest(found, allowed)
            .map(|c| format!(" (did you mean {c:?}?)"))
            .unwrap_or_default()
    )
}

fn quoted_list<'n>(items: impl IntoIterator<Item = &'n str>) -> String {
    items
        .into_iter()
        .map(|item| format!("{item:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `name` (or another string key) of every table in an array, parsed or not.
fn strings_in(root: &Dict, section: &str, key: &str) -> Vec<String> {
    match root.get(section) {
        Some(Value::Array(_, items)) => items
            .iter()
            .filter_map(|item| item.as_dict()?.get(key)?.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// A problem has been recorded already; nothing more to say about this value.
struct Reported;

pub(super) struct Checker<'a> {
    base: &'a Path,
    problems: Vec<String>,
    warnings: Vec<String>,
    /// `$CREDENTIALS_DIRECTORY`, set by systemd for `LoadCredential=`.
    credentials: Option<PathBuf>,
    /// The keys the environment set, as problems name them, and the variable of each.
    pub(super) from_env: Vec<(String, String)>,
}

impl<'a> Checker<'a> {
    pub(super) fn new(base: &'a Path, problems: Vec<String>, credentials: Option<PathBuf>) -> Self {
        Self {
            base,
            problems,
            warnings: Vec::new(),
            credentials,
            from_env: Vec::new(),
        }
    }

    /// A `_file` path: `${CREDENTIALS_DIRECTORY}/name` is systemd's credential `name`; a
    /// relative path is relative to the config file's folder.
    fn secret_path(&self, file: &Path) -> Result<PathBuf, String> {
        let placeholder = format!("${{{CREDENTIALS_DIRECTORY}}}");
        let Ok(rest) = file.strip_prefix(&placeholder) else {
            return Ok(self.base.join(file));
        };
        match &self.credentials {
            Some(dir) => Ok(dir.join(rest)),
            None => Err(format!(
                "{placeholder} is not set (systemd sets it for a unit with LoadCredential=)"
            )),
        }
    }

    fn problem(&mut self, at: impl fmt::Display, why: impl fmt::Display) {
        let at = at.to_string();
        // A key the environment set: the variable is named, the file is not to blame.
        let by = self.from_env.iter().find(|(key, _)| {
            at == *key
                || at
                    .strip_prefix(key.as_str())
                    .is_some_and(|r| r.starts_with('.'))
        });
        match by {
            Some((_, var)) => self.problems.push(format!("{at}: {why} (set by {var})")),
            None => self.problems.push(format!("{at}: {why}")),
        }
    }

    /// Something allowed that is probably a mistake: said by `check` and at start.
    fn warn(&mut self, at: impl fmt::Display, why: impl fmt::Display) {
        self.warnings.push(format!("{at}: {why}"));
    }

    /// Warns when others can read `path`, or anyone but its owner can write it.
    pub(super) fn warn_loose_mode(&mut self, at: impl fmt::Display, path: &Path) {
        if let Some(why) = file_mode::loose_mode(path) {
            self.warn(at, why);
        }
    }

    /// Warns when others can read the config file itself (named by its path alone).
    pub(super) fn warn_config_mode(&mut self, path: &Path) {
        self.warnings.extend(file_mode::loose_mode(path));
    }

    /// Problems come in this order: the environment's, unknown sections, parse errors of
    /// each section and element, a missing `[[account]]`, duplicate names and paths, then the
    /// checks of server, store (and the replay window), log, admin, each account, target and
    /// route.
    pub(super) fn check(mut self, mut root: Dict) -> Result<Config, ConfigError> {
        for key in root.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                self.problems.push(format!(
                    "{key}: unknown section (expected one of {})",
                    SECTIONS.join(", ")
                ));
            }
        }
        let server = self.section::<RawServer>(&mut root, "server");
        let log = self.section::<RawLog>(&mut root, "log");
        let admin = root
            .remove("admin")
            .map(|value| self.raw::<RawAdmin>("admin", &value));
        let store = self.section::<RawStore>(&mut root, "store");
        // Names and paths come from every entry as written, parsed or not, so that one broken
        // target does not also show up as "not a [[target]] name" in each route that names it.
        let account_names = strings_in(&root, "account", "name");
        let account_paths = strings_in(&root, "account", "path");
        let target_names = strings_in(&root, "target", "name");
        let route_names = strings_in(&root, "route", "name");
        let raw_accounts: Vec<Option<RawAccount>> = self.list(&mut root, "account");
        let raw_targets: Vec<Option<RawTarget>> = self.list(&mut root, "target");
        let raw_routes: Vec<Option<RawRoute>> = self.list(&mut root, "route");
        if raw_accounts.is_empty() {
            self.problem("account", "at least one [[account]] is required");
        }
        self.unique("account", "name", &account_names);
        self.unique("account", "path", &account_paths);
        self.unique("target", "name", &target_names);
        self.unique("route", "name", &route_names);

        let server = server.and_then(|s| self.server(s));
        let store = store.and_then(|s| self.store(s));
        if let (Some(server), Some(store)) = (&server, &store) {
            self.replay_window(server, store);
        }
        let log = log.and_then(|l| self.log(l));
        let admin = match admin {
            None => Some(None),
            Some(raw) => raw.and_then(|a| self.admin(a)).map(Some),
        };
        let accounts = self.each(raw_accounts, Self::account);
        let targets = self.each(raw_targets, Self::target);
        let routes = self.each(raw_routes, |checker, i, raw| {
            checker.route(i, raw, &account_names, &target_names)
        });

        if !self.problems.is_empty() {
            return Err(ConfigError(self.problems));
        }
        match (server, store, log, admin) {
            (Some(server), Some(store), Some(log), Some(admin)) => Ok(Config {
                server,
                store,
                log,
                admin,
                accounts,
                targets,
                routes,
                warnings: self.warnings,
            }),
            _ => Err(ConfigError(vec!["invalid config".into()])),
        }
    }

    /// Checks each element of an array of tables that parsed (`check` gets its index), keeping
    /// those that pass.
    fn each<R, T>(
        &mut self,
        raws: Vec<Option<R>>,
        mut check: impl FnMut(&mut Self, usize, R) -> Option<T>,
    ) -> Vec<T> {
        raws.into_iter()
            .enumerate()
            .filter_map(|(i, raw)| check(self, i, raw?))
            .collect()
    }

    /// Deserializes `value` as `T` and reports every key that is wrong, not only the first:
    /// serde stops at the first error, so the key it names is taken out and the rest is tried
    /// again (a required key taken out so is not also reported missing).
    fn raw<T: for<'de> Deserialize<'de>>(&mut self, at: &str, value: &Value) -> Option<T> {
        let mut value = value.clone();
        let mut taken_out: Vec<String> = Vec::new();
        loop {
            let errors = match value.deserialize::<T>() {
                Ok(raw) if taken_out.is_empty() => return Some(raw),
                Ok(_) => return None,
                Err(errors) => errors,
            };
            let mut wrong_key = None;
            for error in errors {
                if let figment::error::Kind::MissingField(field) = &error.kind
                    && error.path.is_empty()
                    && taken_out.iter().any(|key| key == field)
                {
                    continue;
                }
                let mut at = at.to_owned();
                for key in &error.path {
                    at.push('.');
                    at.push_str(key);
                }
                self.problem(at, describe(&error.kind));
                wrong_key = wrong_key.or_else(|| error.path.first().cloned());
            }
            // Each round takes a key out, so this ends within the table's keys.
            let Value::Dict(_, dict) = &mut value else {
                return None;
            };
            match wrong_key {
                Some(key) if dict.remove(&key).is_some() => taken_out.push(key),
                _ => return None,
            }
        }
    }

    /// A section whose keys all have defaults: left out, it is all defaults.
    fn section<T: for<'de> Deserialize<'de> + Default>(
        &mut self,
        root: &mut Dict,
        section: &str,
    ) -> Option<T> {
        match root.remove(section) {
            Some(value) => self.raw::<T>(section, &value),
            None => Some(T::default()),
        }
    }

    /// Deserializes each element of an array of tables on its own, so that one bad element
    /// does not hide the problems of the next.
    fn list<T: for<'de> Deserialize<'de>>(
        &mut self,
        root: &mut Dict,
        section: &str,
    ) -> Vec<Option<T>> {
        match root.remove(section) {
            None => Vec::new(),
            Some(Value::Array(_, items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| self.raw::<T>(&format!("{section}[{i}]"), item))
                .collect(),
            Some(_) => {
                self.problem(
                    section,
                    format!("must be an array of tables: write [[{section}]]"),
                );
                Vec::new()
            }
        }
    }

    fn unique(&mut self, section: &str, key: &str, values: &[String]) {
        let mut seen: Vec<&String> = Vec::new();
        for value in values {
            if seen.contains(&value) {
                self.problem(section, format!("{key} {value:?} is used twice"));
            } else {
                seen.push(value);
            }
        }
    }

    /// Reports `value` outside `min..=max`.
    fn range(&mut self, at: &str, value: u64, min: u64, max: u64) {
        if !(min..=max).contains(&value) {
            self.problem(at, format!("must be {min} to {max}, got {value}"));
        }
    }

    /// A secret given inline or as `<key>_file` (relative to the config's folder), not both,
    /// in memory that is zeroed on drop; a file that others can read is warned about.
    /// `Err` means a problem was already reported for it.
    fn secret(
        &mut self,
        at: &str,
        key: &str,
        inline: Option<String>,
        file: Option<PathBuf>,
    ) -> Result<Option<Zeroizing<String>>, Reported> {
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.problem(at, format!("give {key} or {key}_file, not both"));
                Err(Reported)
            }
            (Some(value), None) => Ok(Some(Zeroizing::new(value))),
            (None, Some(file)) => {
                let path = match self.secret_path(&file) {
                    Ok(path) => path,
                    Err(why) => {
                        self.problem(format!("{at}.{key}_file"), why);
                        return Err(Reported);
                    }
                };
                match std::fs::read_to_string(&path).map(Zeroizing::new) {
                    Ok(text) => {
                        self.warn_loose_mode(format!("{at}.{key}_file"), &path);
                        Ok(Some(Zeroizing::new(text.trim().to_owned())))
                    }
                    Err(e) => {
                        self.problem(
                            format!("{at}.{key}_file"),
                            format!("cannot read {}: {e}", path.display()),
                        );
                        Err(Reported)
                    }
                }
            }
            (None, None) => Ok(None),
        }
    }

    fn name(&mut self, at: &str, name: &str) {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            self.problem(
                format!("{at}.name"),
                format!("{name:?} must be 1-64 of A-Z a-z 0-9 - _"),
            );
        }
    }
}
