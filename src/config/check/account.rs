//! `[[account]]`: names, paths, app ids, tokens and EncodingAESKeys, and the mode they allow.

use super::{Checker, Reported};
use crate::config::raw::RawAccount;
use crate::config::{Account, Mode, Secret};
use crate::wechat::crypto::AesKey;

/// The shipped relay.toml's Token and EncodingAESKey: fine for a first run on one machine,
/// never for WeChat.
const PLACEHOLDER_TOKEN: &str = "ReplaceWithYourToken2024";
const PLACEHOLDER_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";

impl Checker<'_> {
    /// `account[i]`; `None` when it has a problem (reported).
    pub(super) fn account(&mut self, i: usize, raw: RawAccount) -> Option<Account> {
        let at = format!("account[{i}]");
        let before = self.problems.len();
        self.name(&at, &raw.name);
        if !raw.path.starts_with('/') || raw.path.contains(['?', '#', ' ']) {
            self.problem(
                format!("{at}.path"),
                format!(
                    "{:?} must be a URL path starting with / (no query)",
                    raw.path
                ),
            );
        }
        let app_id_ok = raw.app_id.len() == 18
            && raw.app_id.starts_with("wx")
            && raw.app_id[2..].bytes().all(|b| b.is_ascii_hexdigit());
        if !app_id_ok {
            self.problem(
                format!("{at}.app_id"),
                format!("{:?} must be wx followed by 16 hex digits", raw.app_id),
            );
        }
        let token = self.secret(&at, "token", raw.token, raw.token_file);
        match &token {
            Err(Reported) => {}
            Ok(None) => self.problem(format!("{at}.token"), "required (or token_file)"),
            Ok(Some(token)) => {
                let ok = (3..=32).contains(&token.len())
                    && token.bytes().all(|b| b.is_ascii_alphanumeric());
                if token.as_str() == PLACEHOLDER_TOKEN {
                    self.warn(
                        format!("{at}.token"),
                        "the placeholder of the shipped relay.toml: set the Token of your official account (its admin, Settings and Development > Basic Configuration)",
                    );
                }
                if !ok {
                    let n = token.chars().count();
                    // The first character that is not a letter or digit (the token is not
                    // usable with it, so naming it gives nothing away; the rest is never
                    // printed).
                    let bad = token
                        .chars()
                        .enumerate()
                        .find(|(_, c)| !c.is_ascii_alphanumeric());
                    let why = match bad {
                        Some((i, c)) if (3..=32).contains(&n) => format!(
                            "must be 3-32 letters or digits: character {} is {c:?}",
                            i + 1
                        ),
                        _ => format!(
                            "must be 3-32 letters or digits, got {n} character{}",
                            if n == 1 { "" } else { "s" }
                        ),
                    };
                    self.problem(format!("{at}.token"), why);
                }
            }
        }
        let key = self.secret(
            &at,
            "encoding_aes_key",
            raw.encoding_aes_key,
            raw.encoding_aes_key_file,
        );
        let previous = self.secret(
            &at,
            "previous_encoding_aes_key",
            raw.previous_encoding_aes_key,
            raw.previous_encoding_aes_key_file,
        );
        // A key that was given but could not be read counts as given: its problem is reported.
        let key_given = !matches!(key, Ok(None));
        let previous_given = !matches!(previous, Ok(None));
        let mut keys = Vec::new();
        for (key_name, value) in [
            ("encoding_aes_key", &key),
            ("previous_encoding_aes_key", &previous),
        ] {
            if let Ok(Some(value)) = value {
                if value.as_str() == PLACEHOLDER_KEY {
                    self.warn(
                        format!("{at}.{key_name}"),
                        "the placeholder of the shipped relay.toml: set the EncodingAESKey of your official account",
                    );
                }
                match AesKey::from_encoding_aes_key(value) {
                    Ok(k) => keys.push(k),
                    Err(e) => self.problem(format!("{at}.{key_name}"), e),
                }
            }
        }
        if !key_given && previous_given {
            self.problem(
                format!("{at}.previous_encoding_aes_key"),
                "needs encoding_aes_key too",
            );
        }
        let given = match raw.mode.as_deref() {
            None => None,
            Some(text) => {
                let modes = [Mode::Safe, Mode::Compatible, Mode::Plaintext];
                match modes.into_iter().find(|m| m.as_str() == text) {
                    Some(mode) => Some(mode),
                    None => {
                        let why = super::not_one_of(text, modes.map(Mode::as_str));
                        self.problem(format!("{at}.mode"), why);
                        return None;
                    }
                }
            }
        };
        let mode = given.unwrap_or(if key_given {
            Mode::Safe
        } else {
            Mode::Plaintext
        });
        if mode != Mode::Plaintext && !key_given {
            self.problem(
                format!("{at}.encoding_aes_key"),
                format!("required in {} mode", mode.as_str()),
            );
        }
        if self.problems.len() > before {
            return None;
        }
        Some(Account {
            name: raw.name,
            path: raw.path,
            app_id: raw.app_id,
            token: Secret::from(token.ok()??),
            keys,
            mode,
        })
    }
}
