//! `[[target]]`: the URL, the format, its signing and secret, timeouts and the retry policy.

use std::time::Duration;

use base64::Engine;
use zeroize::Zeroizing;

use super::{Checker, MAX_AGE_S, MAX_TIMEOUT_MS};
use crate::config::raw::RawTarget;
use crate::config::{ForwardFormat, Secret, Target, TargetUrl};

/// Deliveries at once to one target.
const MAX_CONCURRENCY: u64 = 1024;

impl Checker<'_> {
    /// `target[i]`; `None` when it has a problem (reported).
    pub(super) fn target(&mut self, i: usize, raw: RawTarget) -> Option<Target> {
        let at = format!("target[{i}]");
        let before = self.problems.len();
        self.name(&at, &raw.name);
        // The text may hold a password: zeroed once parsed.
        let url = match Zeroizing::new(raw.url).parse::<TargetUrl>() {
            Ok(url) => {
                self.warn_url(&at, url.uri());
                Some(url)
            }
            Err(why) => {
                self.problem(format!("{at}.url"), why);
                None
            }
        };
        self.range(
            &format!("{at}.timeout_ms"),
            raw.timeout_ms,
            1,
            MAX_TIMEOUT_MS,
        );
        self.range(
            &format!("{at}.concurrency"),
            raw.concurrency,
            1,
            MAX_CONCURRENCY,
        );
        self.range(
            &format!("{at}.retry_initial_ms"),
            raw.retry_initial_ms,
            1,
            MAX_AGE_S * 1000,
        );
        self.range(
            &format!("{at}.retry_max_ms"),
            raw.retry_max_ms,
            raw.retry_initial_ms,
            MAX_AGE_S * 1000,
        );
        self.range(
            &format!("{at}.max_attempts"),
            raw.max_attempts,
            1,
            u64::from(u32::MAX),
        );
        self.range(&format!("{at}.max_age_s"), raw.max_age_s, 1, MAX_AGE_S);
        let Ok(secret) = self.secret(&at, "secret", raw.secret, raw.secret_file) else {
            return None;
        };
        let secret = self.signing(&at, raw.format, raw.sign, secret);
        if self.problems.len() > before {
            return None;
        }
        Some(Target {
            name: raw.name,
            url: url?,
            format: raw.format,
            timeout: Duration::from_millis(raw.timeout_ms),
            secret,
            concurrency: usize::try_from(raw.concurrency).unwrap_or(1),
            retry_initial: Duration::from_millis(raw.retry_initial_ms),
            retry_max: Duration::from_millis(raw.retry_max_ms),
            max_attempts: u32::try_from(raw.max_attempts).unwrap_or(u32::MAX),
            max_age: Duration::from_secs(raw.max_age_s),
        })
    }

    /// The key a target signs its requests with (Standard Webhooks), if it signs: a `json`
    /// target always, a `raw` or `plain` one with `sign = true`. A secret that would sign
    /// nothing is refused rather than warned about: whoever set it believes the target's
    /// requests are authenticated, and they would not be.
    fn signing(
        &mut self,
        at: &str,
        format: ForwardFormat,
        sign: Option<bool>,
        secret: Option<Zeroizing<String>>,
    ) -> Option<Secret> {
        let signs = match (format, sign) {
            (ForwardFormat::Json, Some(false)) => {
                self.problem(
                    format!("{at}.sign"),
                    "a format = \"json\" target always signs its requests: leave sign out",
                );
                return None;
            }
            (ForwardFormat::Json, _) => true,
            (_, sign) => sign.unwrap_or(false),
        };
        let Some(secret) = secret else {
            if signs {
                let why = match format {
                    ForwardFormat::Json => "required for format = \"json\"",
                    _ => "required with sign = true",
                };
                self.problem(
                    format!("{at}.secret"),
                    format!("{why} (a Standard Webhooks secret, whsec_..., or secret_file)"),
                );
            }
            return None;
        };
        if !signs {
            self.problem(
                format!("{at}.secret"),
                format!(
                    "signs nothing without sign = true on a format = {:?} target: add sign = true, or remove the secret",
                    format.as_str()
                ),
            );
            return None;
        }
        let key = secret
            .strip_prefix("whsec_")
            .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
            .map(Secret::new)
            .filter(|key| key.expose().len() >= 16);
        if key.is_none() {
            self.problem(
                format!("{at}.secret"),
                "must be \"whsec_\" followed by the base64 of a key of at least 16 bytes",
            );
        }
        key
    }

    /// Warns of a target URL that is a documentation example (`example.com` and its kin), or
    /// plain HTTP to another machine (the push, decrypted, crosses the network in clear).
    fn warn_url(&mut self, at: &str, uri: &http::Uri) {
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        let host = host.to_ascii_lowercase();
        let example = ["example.com", "example.net", "example.org"]
            .iter()
            .any(|domain| host == *domain || host.ends_with(&format!(".{domain}")));
        if example {
            self.warn(
                format!("{at}.url"),
                format!("{host} is an example host: set your target's real URL"),
            );
        }
        let local = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if uri.scheme_str() == Some("http") && !local && !example {
            self.warn(
                format!("{at}.url"),
                format!("plain HTTP to {host}: the decrypted push crosses the network unencrypted (use https://, or keep the target on this machine)"),
            );
        }
    }
}
