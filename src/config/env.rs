//! `WECHAT_RELAY_*` environment overrides, applied to the parsed file before it is checked:
//! `WECHAT_RELAY_A__B__C=value` sets `a.b.c`, an array element named by its index or its `name`.

use figment::value::{Dict, Value};

/// Prefix of the environment variables that override relay.toml; `__` separates key parts.
pub const ENV_PREFIX: &str = "WECHAT_RELAY_";
/// Stands for a variable of ours whose value is not UTF-8 (a NUL cannot be in a real value).
const NOT_UTF8: &str = "\0not-utf-8";

/// This process's environment as `(NAME, value)` pairs. A variable that is not UTF-8 is
/// skipped, or kept to be reported when it is one of ours (its value is never shown).
pub(super) fn of_process() -> Vec<(String, String)> {
    let mut env = Vec::new();
    for (name, value) in std::env::vars_os() {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => env.push((name, value)),
            (Ok(name), Err(_)) if name.starts_with(ENV_PREFIX) => {
                env.push((name, NOT_UTF8.to_owned()));
            }
            _ => {}
        }
    }
    env
}

/// Applies `WECHAT_RELAY_A__B__C=value` as `a.b.c = value`. An array element is named by its
/// index or by its `name` (`WECHAT_RELAY_ACCOUNT__MAIN__TOKEN`, `-` written as `_`). Returns
/// each key set, as the checks name it (`target[0].url`), with the variable that set it.
pub(super) fn apply_env(
    root: &mut Dict,
    env: &[(String, String)],
    problems: &mut Vec<String>,
) -> Vec<(String, String)> {
    let mut set = Vec::new();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        // WECHAT_RELAY_CONFIG names the file itself; WECHAT_RELAY_TEST_* are the test
        // suite's (WECHAT_RELAY_TEST_POSTGRES: the server its PostgreSQL tests use).
        if rest.eq_ignore_ascii_case("config")
            || rest
                .get(..5)
                .is_some_and(|head| head.eq_ignore_ascii_case("test_"))
        {
            continue;
        }
        if raw == NOT_UTF8 {
            problems.push(format!("{name}: the value is not UTF-8"));
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if path.iter().any(String::is_empty) {
            problems.push(format!("{name}: empty key part"));
            continue;
        }
        let mut at = String::new();
        match set_path(root, &path, raw, &mut at) {
            Ok(()) => set.push((at, name.clone())),
            Err(why) => problems.push(format!("{name}: {why}")),
        }
    }
    set
}

/// Sets `path` under `root`; `at` gets the key's path as the checks name it.
fn set_path(root: &mut Dict, path: &[String], raw: &str, at: &mut String) -> Result<(), String> {
    let (first, rest) = path.split_first().ok_or("empty key")?;
    if !at.is_empty() {
        at.push('.');
    }
    at.push_str(first);
    if rest.is_empty() {
        let value = typed_like(first, root.get(first.as_str()), raw);
        // A secret set from the environment replaces the file's way of giving it, and back.
        match first.strip_suffix("_file") {
            Some(stem) => root.remove(stem),
            None => root.remove(&format!("{first}_file")),
        };
        root.insert(first.clone(), value);
        return Ok(());
    }
    let slot = root
        .entry(first.clone())
        .or_insert_with(|| Value::from(Dict::new()));
    set_in_value(slot, first, rest, raw, at)
}

fn set_in_value(
    slot: &mut Value,
    key: &str,
    path: &[String],
    raw: &str,
    at: &mut String,
) -> Result<(), String> {
    match slot {
        Value::Dict(_, dict) => set_path(dict, path, raw, at),
        Value::Array(_, items) => {
            let (selector, rest) = path.split_first().ok_or("empty key")?;
            let position = match selector.parse::<usize>() {
                Ok(index) => (index < items.len()).then_some(index),
                Err(_) => items.iter().position(|item| element_named(item, selector)),
            };
            let index =
                position.ok_or_else(|| format!("there is no {key} {selector:?} in the file"))?;
            if rest.is_empty() {
                return Err(format!("{key}.{selector} needs a key after it"));
            }
            at.push_str(&format!("[{index}]"));
            set_in_value(&mut items[index], key, rest, raw, at)
        }
        _ => Err(format!("{key} is not a table")),
    }
}

fn element_named(item: &Value, selector: &str) -> bool {
    item.as_dict()
        .and_then(|d| d.get("name"))
        .and_then(Value::as_str)
        .is_some_and(|n| n.to_ascii_lowercase().replace('-', "_") == selector)
}

/// Keys whose values are numbers, booleans or lists; every other key takes text.
const TYPED_KEYS: &[&str] = &[
    "reply_deadline_ms",
    "max_body_bytes",
    "timestamp_skew_s",
    "max_connections",
    "allow_ips",
    "trusted_proxies",
    "keepalive_timeout_ms",
    "max_requests_per_connection",
    "max_connection_age_s",
    "shutdown_grace_ms",
    "dedupe_ttl_s",
    "max_bytes",
    "dead_letter_retention_s",
    "timeout_ms",
    "concurrency",
    "retry_initial_ms",
    "retry_max_ms",
    "max_attempts",
    "max_age_s",
    "ticket",
    "msg_type",
    "event",
    "event_key",
    "content",
    "to",
];

/// A variable's value as text, or parsed (`8080`, `true`, `[a, b]`) for a key that takes a
/// number, a boolean or a list: a token of digits stays text.
fn typed_like(key: &str, existing: Option<&Value>, raw: &str) -> Value {
    let typed = match existing {
        Some(Value::String(..)) => false,
        Some(_) => true,
        None => TYPED_KEYS.contains(&key),
    };
    if typed {
        raw.parse::<Value>()
            .unwrap_or_else(|_| Value::from(raw.to_owned()))
    } else {
        Value::from(raw.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_s_variable_and_the_test_suite_s_are_not_overrides() {
        let mut root = Dict::new();
        let mut problems = Vec::new();
        let env = [
            ("WECHAT_RELAY_CONFIG".to_owned(), "relay.toml".to_owned()),
            (
                "WECHAT_RELAY_TEST_POSTGRES".to_owned(),
                "postgres://relay@127.0.0.1/postgres".to_owned(),
            ),
            (
                "WECHAT_RELAY_SERVER__LISTEN".to_owned(),
                "127.0.0.1:1".to_owned(),
            ),
        ];
        let set = apply_env(&mut root, &env, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            set,
            vec![(
                "server.listen".to_owned(),
                "WECHAT_RELAY_SERVER__LISTEN".to_owned()
            )]
        );
        assert!(!root.contains_key("test_postgres"));
    }

    #[test]
    fn env_values_keep_text_for_text_keys() {
        assert_eq!(typed_like("token", None, "12345").as_str(), Some("12345"));
        assert_eq!(
            typed_like("timeout_ms", None, "12345")
                .to_num()
                .and_then(|n| n.to_u128()),
            Some(12345)
        );
        assert_eq!(typed_like("ticket", None, "true").to_bool(), Some(true));
    }
}
