//! `[[route]]`: matchers, the targets named in `to`, and what WeChat is answered.

use super::Checker;
use crate::config::raw::RawRoute;
use crate::config::{Reply, Route};

impl Checker<'_> {
    /// `route[i]`, whose `account`, `to` and `reply` must name what the file has (as written,
    /// parsed or not); `None` when it has a problem (reported).
    pub(super) fn route(
        &mut self,
        i: usize,
        raw: RawRoute,
        accounts: &[String],
        targets: &[String],
    ) -> Option<Route> {
        let at = format!("route[{i}]");
        let before = self.problems.len();
        if let Some(name) = &raw.name {
            self.name(&at, name);
        }
        if let Some(account) = &raw.account
            && !accounts.contains(account)
        {
            self.problem(
                format!("{at}.account"),
                format!("{account:?} is not an [[account]] name"),
            );
        }
        for (key, list) in [
            ("msg_type", &raw.msg_type),
            ("event", &raw.event),
            ("event_key", &raw.event_key),
            ("content", &raw.content),
        ] {
            if list.as_ref().is_some_and(Vec::is_empty) {
                self.problem(
                    format!("{at}.{key}"),
                    "an empty list matches nothing: leave the key out to match anything",
                );
            }
        }
        if raw.to.is_empty() {
            self.problem(format!("{at}.to"), "must name at least one target");
        }
        let mut seen = Vec::new();
        for name in &raw.to {
            if !targets.contains(name) {
                self.problem(
                    format!("{at}.to"),
                    format!(
                        "{name:?} is not a [[target]] name{}",
                        super::hint(name, targets.iter().map(String::as_str), "the targets")
                    ),
                );
            }
            if seen.contains(&name) {
                self.problem(format!("{at}.to"), format!("{name:?} is listed twice"));
            }
            seen.push(name);
        }
        let reply = match (raw.reply, raw.reply_text) {
            (Some(_), Some(_)) => {
                self.problem(&at, "give reply or reply_text, not both");
                Reply::None
            }
            (Some(target), None) => {
                if !targets.contains(&target) {
                    self.problem(
                        format!("{at}.reply"),
                        format!(
                            "{target:?} is not a [[target]] name{}",
                            super::hint(&target, targets.iter().map(String::as_str), "the targets")
                        ),
                    );
                } else if !raw.to.contains(&target) {
                    self.problem(
                        format!("{at}.reply"),
                        format!("{target:?} is a target, but not in this route's to: add it there"),
                    );
                }
                Reply::Target(target)
            }
            (None, Some(text)) => {
                if text.is_empty() {
                    self.problem(format!("{at}.reply_text"), "must not be empty");
                }
                Reply::Text(text)
            }
            (None, None) => Reply::None,
        };
        if self.problems.len() > before {
            return None;
        }
        Some(Route {
            name: raw.name.unwrap_or(at),
            account: raw.account,
            msg_type: raw.msg_type,
            event: raw.event,
            ticket: raw.ticket,
            event_key: raw.event_key,
            content: raw.content,
            to: raw.to,
            reply,
        })
    }
}
