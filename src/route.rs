//! The route table: `[[route]]` entries compiled into matchers, tried in order; the first that
//! matches a message wins. Knows messages and names, nothing of HTTP.

use crate::config::{Reply, Route};
use crate::wechat::message::Message;

/// A `*`-only glob (`qrscene_*`, `refund*`); every other character stands for itself.
#[derive(Debug, Clone)]
pub struct Glob {
    parts: Vec<String>,
}

impl Glob {
    pub fn new(pattern: &str) -> Self {
        Self {
            parts: pattern.split('*').map(str::to_owned).collect(),
        }
    }

    pub fn matches(&self, text: &str) -> bool {
        let (first, rest) = match self.parts.split_first() {
            Some(split) => split,
            None => return text.is_empty(),
        };
        let Some(mut remaining) = text.strip_prefix(first.as_str()) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            // No `*`: the pattern is the whole text.
            return remaining.is_empty();
        };
        for part in middle {
            match remaining.find(part.as_str()) {
                Some(at) => remaining = &remaining[at + part.len()..],
                None => return false,
            }
        }
        remaining.len() >= last.len() && remaining.ends_with(last.as_str())
    }
}

/// One compiled route.
#[derive(Debug, Clone)]
pub struct CompiledRoute {
    pub name: String,
    account: Option<String>,
    msg_type: Option<Vec<String>>,
    event: Option<Vec<String>>,
    ticket: Option<bool>,
    event_key: Option<Vec<Glob>>,
    content: Option<Vec<Glob>>,
    /// Target names, in the order of `to`.
    pub to: Vec<String>,
    pub reply: Reply,
}

impl CompiledRoute {
    fn new(route: &Route) -> Self {
        let globs = |list: &Option<Vec<String>>| {
            list.as_ref()
                .map(|patterns| patterns.iter().map(|p| Glob::new(p)).collect())
        };
        Self {
            name: route.name.clone(),
            account: route.account.clone(),
            msg_type: route.msg_type.clone(),
            event: route.event.clone(),
            ticket: route.ticket,
            event_key: globs(&route.event_key),
            content: globs(&route.content),
            to: route.to.clone(),
            reply: route.reply.clone(),
        }
    }

    /// Whether this route takes `message` pushed to `account`. An absent key matches anything;
    /// a present one needs the field: `event = [...]` never matches a text message.
    pub fn matches(&self, account: &str, message: &Message) -> bool {
        if self.account.as_deref().is_some_and(|a| a != account) {
            return false;
        }
        // MsgType and Event values differ in case between events (subscribe, SCAN, CLICK):
        // compare without case so that "scan" in relay.toml is not a silent miss.
        let one_of = |list: &Option<Vec<String>>, value: Option<&str>| match list {
            None => true,
            Some(list) => value.is_some_and(|v| list.iter().any(|l| l.eq_ignore_ascii_case(v))),
        };
        let glob_of = |list: &Option<Vec<Glob>>, value: Option<&str>| match list {
            None => true,
            Some(list) => value.is_some_and(|v| list.iter().any(|g| g.matches(v))),
        };
        one_of(&self.msg_type, message.msg_type())
            && one_of(&self.event, message.event())
            && self
                .ticket
                .is_none_or(|want| message.ticket().is_some() == want)
            && glob_of(&self.event_key, message.event_key())
            && glob_of(&self.content, message.content())
    }
}

/// The routes of a config, in file order.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<CompiledRoute>,
}

impl RouteTable {
    pub fn new(routes: &[Route]) -> Self {
        Self {
            routes: routes.iter().map(CompiledRoute::new).collect(),
        }
    }

    /// The first route that matches, if any.
    pub fn route(&self, account: &str, message: &Message) -> Option<&CompiledRoute> {
        self.routes.iter().find(|r| r.matches(account, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn route(f: impl FnOnce(&mut Route)) -> Route {
        let mut r = Route {
            name: "r".into(),
            account: None,
            msg_type: None,
            event: None,
            ticket: None,
            event_key: None,
            content: None,
            to: vec!["t".into()],
            reply: Reply::None,
        };
        f(&mut r);
        r
    }

    fn message(xml: &str) -> Message {
        Message::parse(Bytes::copy_from_slice(xml.as_bytes())).expect("xml")
    }

    #[test]
    fn globs() {
        assert!(Glob::new("qrscene_*").matches("qrscene_42"));
        assert!(Glob::new("qrscene_*").matches("qrscene_"));
        assert!(!Glob::new("qrscene_*").matches("qrscen"));
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("a*b*c").matches("a-b-c"));
        assert!(Glob::new("a*b*c").matches("abc"));
        assert!(!Glob::new("a*b*c").matches("acb"));
        assert!(!Glob::new("ab*ba").matches("aba"));
        assert!(Glob::new("refund").matches("refund"));
        assert!(!Glob::new("refund").matches("refunds"));
        assert!(Glob::new("*退款*").matches("我要退款了"));
    }

    #[test]
    fn first_match_wins_and_absent_keys_match_anything() {
        let login = route(|r| {
            r.name = "login".into();
            r.msg_type = Some(vec!["event".into()]);
            r.event = Some(vec!["subscribe".into(), "scan".into()]);
            r.ticket = Some(true);
        });
        let keyword = route(|r| {
            r.name = "keyword".into();
            r.content = Some(vec!["refund*".into()]);
        });
        let other_account = route(|r| {
            r.name = "other".into();
            r.account = Some("second".into());
        });
        let rest = route(|r| r.name = "rest".into());
        let table = RouteTable::new(&[login, keyword, other_account, rest]);
        let scan = message(
            "<xml><MsgType>event</MsgType><Event>SCAN</Event><EventKey>42</EventKey><Ticket>t</Ticket></xml>",
        );
        let follow = message(
            "<xml><MsgType>event</MsgType><Event>subscribe</Event><EventKey></EventKey></xml>",
        );
        let refund = message("<xml><MsgType>text</MsgType><Content>refund please</Content></xml>");
        let hello = message("<xml><MsgType>text</MsgType><Content>hello</Content></xml>");
        let name = |account: &str, m: &Message| table.route(account, m).map(|r| r.name.clone());
        assert_eq!(name("main", &scan).as_deref(), Some("login"));
        assert_eq!(name("main", &follow).as_deref(), Some("rest"));
        assert_eq!(name("main", &refund).as_deref(), Some("keyword"));
        assert_eq!(name("main", &hello).as_deref(), Some("rest"));
        assert_eq!(name("second", &hello).as_deref(), Some("other"));
        assert_eq!(
            RouteTable::new(&[]).route("main", &hello).map(|r| &r.name),
            None
        );
    }

    #[test]
    fn ticket_false_needs_no_ticket() {
        let table = RouteTable::new(&[route(|r| r.ticket = Some(false))]);
        let plain = message("<xml><MsgType>event</MsgType><Event>subscribe</Event></xml>");
        let qr = message(
            "<xml><MsgType>event</MsgType><Event>subscribe</Event><Ticket>x</Ticket></xml>",
        );
        assert!(table.route("main", &plain).is_some());
        assert!(table.route("main", &qr).is_none());
    }
}
