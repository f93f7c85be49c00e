//! Push bodies as XML (PROTOCOL.md §3 and §7): the envelope WeChat posts, the message inside it,
//! and the fields the relay routes on, always keeping the exact original bytes.
//!
//! Parsing is structural (quick-xml), never text matching: bodies come with or without CDATA,
//! with newlines and indentation between elements, in any element order, and sometimes with a
//! byte-order mark. Unknown message types and events parse like any other.
//!
//! Strict where a target's parser could read more than the relay does: no DTD (`<!DOCTYPE`,
//! `<!ENTITY`: an external entity would make a target fetch a file or a URL), no processing
//! instruction but the XML declaration, and only the characters XML 1.0 allows, also when
//! written as a character reference. WeChat sends none of these.

use bytes::Bytes;
use quick_xml::Reader;
use quick_xml::events::Event;
use sha2::{Digest, Sha256};

const BOM: &[u8] = b"\xEF\xBB\xBF";
/// WeChat's deepest messages (SendPicsInfo > PicList > item > PicMd5Sum) nest 5 levels.
pub const MAX_DEPTH: usize = 16;
/// Fields that must appear at most once at the top level.
const SINGLE_FIELDS: [&str; 11] = [
    "ToUserName",
    "FromUserName",
    "CreateTime",
    "MsgType",
    "Event",
    "EventKey",
    "Ticket",
    "Content",
    "MsgId",
    "MsgID",
    "Encrypt",
];

/// Why a body is not a usable XML document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    /// What went wrong, never the text around it: the body may be decrypted user content.
    #[error("body is not well-formed XML: {0} (-40002)")]
    Malformed(&'static str),
    #[error("body is not UTF-8 (-40002)")]
    Utf8,
    #[error("body has no root element (-40002)")]
    NoRoot,
    #[error("body has more than one root element (-40002)")]
    TrailingContent,
    #[error("body nests elements deeper than {MAX_DEPTH} (-40002)")]
    TooDeep,
    /// Two readers could take different values from it: the relay routes on one, a target
    /// might read the other.
    #[error("body has more than one {0} element (-40002)")]
    Repeated(&'static str),
    #[error("body's {0} element holds elements, not text (-40002)")]
    NotText(&'static str),
    /// A target's parser could resolve what it declares (external entities, entity bombs).
    #[error("body has a <!DOCTYPE> (-40002)")]
    Doctype,
    #[error("body declares an entity (<!ENTITY>) (-40002)")]
    Entity,
    #[error("body has a processing instruction other than the XML declaration (-40002)")]
    ProcessingInstruction,
    /// The code point, never the text around it.
    #[error("body has a character XML 1.0 does not allow: U+{0:04X} (-40002)")]
    InvalidChar(u32),
}

/// One element's content: text (CDATA and character data joined) or child elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Text(String),
    Element(Vec<(String, Node)>),
}

impl Node {
    fn to_json(&self) -> serde_json::Value {
        match self {
            Node::Text(text) => serde_json::Value::String(text.clone()),
            Node::Element(children) => children_to_json(children),
        }
    }
}

/// Children as a JSON object; a name that repeats (items of a list) becomes an array.
fn children_to_json(children: &[(String, Node)]) -> serde_json::Value {
    let mut counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (name, _) in children {
        *counts.entry(name.as_str()).or_default() += 1;
    }
    let mut object = serde_json::Map::new();
    for (name, node) in children {
        let value = node.to_json();
        if counts.get(name.as_str()).is_some_and(|&n| n > 1) {
            let items = object
                .entry(name.clone())
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
            if let serde_json::Value::Array(items) = items {
                items.push(value);
            }
        } else {
            object.insert(name.clone(), value);
        }
    }
    serde_json::Value::Object(object)
}

/// An open element while parsing: its name, its children so far and its text so far.
type Frame = (String, Vec<(String, Node)>, String);

/// The root element's name and its children, in document order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    root: String,
    children: Vec<(String, Node)>,
}

impl Fields {
    /// Parses a document and returns its root's children. A leading BOM is skipped.
    pub fn parse(xml: &[u8]) -> Result<Self, XmlError> {
        let xml = xml.strip_prefix(BOM).unwrap_or(xml);
        check_chars(utf8(xml)?)?;
        let mut reader = Reader::from_reader(xml);
        let mut stack: Vec<Frame> = Vec::new();
        let mut root: Option<Vec<(String, Node)>> = None;
        let mut root_name = String::new();
        let mut first = true;
        loop {
            let event = reader.read_event().map_err(|e| read_error(&e))?;
            let at_start = std::mem::replace(&mut first, false);
            match event {
                Event::Start(start) => {
                    check_attributes(&start)?;
                    if root.is_some() {
                        return Err(XmlError::TrailingContent);
                    }
                    if stack.len() >= MAX_DEPTH {
                        return Err(XmlError::TooDeep);
                    }
                    let name = utf8(start.name().as_ref())?.to_owned();
                    if stack.is_empty() {
                        root_name.clone_from(&name);
                    }
                    stack.push((name, Vec::new(), String::new()));
                }
                Event::Empty(empty) => {
                    check_attributes(&empty)?;
                    let name = utf8(empty.name().as_ref())?.to_owned();
                    match stack.last_mut() {
                        Some((_, children, _)) => children.push((name, Node::Text(String::new()))),
                        None if root.is_none() => {
                            root_name = name;
                            root = Some(Vec::new());
                        }
                        None => return Err(XmlError::TrailingContent),
                    }
                }
                Event::End(_) => {
                    let Some((name, children, text)) = stack.pop() else {
                        return Err(XmlError::Malformed("unexpected end tag"));
                    };
                    let node = if children.is_empty() {
                        Node::Text(text)
                    } else {
                        Node::Element(children)
                    };
                    match stack.last_mut() {
                        Some((_, siblings, _)) => siblings.push((name, node)),
                        None => {
                            root = Some(match node {
                                Node::Element(children) => children,
                                Node::Text(_) => Vec::new(),
                            })
                        }
                    }
                }
                Event::Text(text) => {
                    let decoded = text
                        .decode()
                        .map_err(|_| XmlError::Malformed("bad text encoding"))?;
                    match stack.last_mut() {
                        Some((_, _, buf)) => buf.push_str(&decoded),
                        None if decoded.trim().is_empty() => {}
                        None => return Err(XmlError::Malformed("text outside the root")),
                    }
                }
                Event::CData(cdata) => {
                    let inner = cdata.into_inner();
                    let text = utf8(&inner)?;
                    match stack.last_mut() {
                        Some((_, _, buf)) => buf.push_str(text),
                        None => return Err(XmlError::Malformed("CDATA outside the root")),
                    }
                }
                Event::GeneralRef(reference) => {
                    let resolved = resolve_reference(&reference)?;
                    match stack.last_mut() {
                        Some((_, _, buf)) => buf.push(resolved),
                        None => {
                            return Err(XmlError::Malformed("reference outside the root"));
                        }
                    }
                }
                Event::Eof => break,
                // The declaration only where XML allows it: first, at most once.
                Event::Decl(_) if at_start => {}
                Event::Decl(_) | Event::PI(_) => return Err(XmlError::ProcessingInstruction),
                Event::DocType(doctype) => {
                    return Err(if contains_ignore_case(&doctype, b"<!ENTITY") {
                        XmlError::Entity
                    } else {
                        XmlError::Doctype
                    });
                }
                Event::Comment(_) => {}
            }
        }
        if !stack.is_empty() {
            return Err(XmlError::Malformed("unclosed element"));
        }
        let children = root.ok_or(XmlError::NoRoot)?;
        for field in SINGLE_FIELDS {
            let mut found = children.iter().filter(|(n, _)| n == field);
            let first = found.next();
            if found.next().is_some() {
                return Err(XmlError::Repeated(field));
            }
            // Text only: a reader that flattens child elements would see another value.
            if let Some((_, Node::Element(_))) = first {
                return Err(XmlError::NotText(field));
            }
        }
        Ok(Fields {
            root: root_name,
            children,
        })
    }

    /// The root element's name (`xml` for everything WeChat sends and accepts).
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The text of the first top-level element called `name` (names are case-sensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.children.iter().find_map(|(n, node)| match node {
            Node::Text(text) if n == name => Some(text.as_str()),
            _ => None,
        })
    }

    /// Every top-level element in document order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.children.iter().map(|(n, node)| (n.as_str(), node))
    }

    /// The fields as a JSON object (text stays text: WeChat's XML carries no types).
    pub fn to_json(&self) -> serde_json::Value {
        children_to_json(&self.children)
    }
}

/// Whether XML 1.0 allows `ch` in a document (its `Char` production): tab, newline, carriage
/// return, and everything from U+0020 except surrogates, U+FFFE and U+FFFF.
pub fn allowed_char(ch: char) -> bool {
    matches!(ch, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// The first character of `text` that XML 1.0 does not allow (NUL among them).
fn check_chars(text: &str) -> Result<(), XmlError> {
    match text.chars().find(|&ch| !allowed_char(ch)) {
        Some(ch) => Err(XmlError::InvalidChar(u32::from(ch))),
        None => Ok(()),
    }
}

/// Attributes are not read, but a target's parser reads them: each must parse, and its
/// references must resolve to allowed characters.
fn check_attributes(start: &quick_xml::events::BytesStart<'_>) -> Result<(), XmlError> {
    for attribute in start.attributes() {
        let attribute = attribute.map_err(|_| XmlError::Malformed("bad attribute"))?;
        let value = attribute.unescape_value().map_err(|e| read_error(&e))?;
        check_chars(&value)?;
    }
    Ok(())
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// A quick-xml error as a refusal: a character reference to a character XML does not allow is
/// [`XmlError::InvalidChar`]; anything else is [`XmlError::Malformed`].
fn read_error(error: &quick_xml::Error) -> XmlError {
    use quick_xml::escape::{EscapeError, ParseCharRefError};
    match error {
        quick_xml::Error::Escape(EscapeError::InvalidCharRef(
            ParseCharRefError::IllegalCharacter(code) | ParseCharRefError::InvalidCodepoint(code),
        )) => XmlError::InvalidChar(*code),
        _ => XmlError::Malformed(syntax_error(error)),
    }
}

/// The kind of a quick-xml error, without the names or text it quotes.
fn syntax_error(error: &quick_xml::Error) -> &'static str {
    match error {
        quick_xml::Error::Syntax(_) => "syntax error",
        quick_xml::Error::IllFormed(_) => "ill-formed document",
        quick_xml::Error::Encoding(_) => "bad text encoding",
        quick_xml::Error::Escape(_) => "bad escape",
        _ => "unreadable document",
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, XmlError> {
    std::str::from_utf8(bytes).map_err(|_| XmlError::Utf8)
}

fn resolve_reference(reference: &quick_xml::events::BytesRef<'_>) -> Result<char, XmlError> {
    if let Some(ch) = reference
        .resolve_char_ref()
        .map_err(|e| match read_error(&e) {
            invalid @ XmlError::InvalidChar(_) => invalid,
            _ => XmlError::Malformed("bad character reference"),
        })?
    {
        if !allowed_char(ch) {
            return Err(XmlError::InvalidChar(u32::from(ch)));
        }
        return Ok(ch);
    }
    let name = utf8(reference.as_ref())?;
    quick_xml::escape::resolve_predefined_entity(name)
        .and_then(|s| s.chars().next())
        .ok_or(XmlError::Malformed("unknown entity"))
}

/// A push as WeChat posted it, before any decryption: the root's fields and `Encrypt`, if any.
#[derive(Debug, Clone)]
pub struct Envelope {
    fields: Fields,
}

impl Envelope {
    pub fn parse(body: &[u8]) -> Result<Self, XmlError> {
        Ok(Self {
            fields: Fields::parse(body)?,
        })
    }

    /// The `Encrypt` text with surrounding ASCII whitespace trimmed (base64 never contains it),
    /// exactly as it is to be hashed for `msg_signature`.
    pub fn encrypt(&self) -> Option<&str> {
        self.fields.get("Encrypt").map(str::trim_ascii)
    }

    pub fn into_fields(self) -> Fields {
        self.fields
    }
}

/// A message or event: its exact XML bytes (decrypted, for encrypted pushes) and its fields.
#[derive(Debug, Clone)]
pub struct Message {
    xml: Bytes,
    fields: Fields,
}

impl Message {
    /// Parses a message document, keeping `xml` byte for byte.
    pub fn parse(xml: Bytes) -> Result<Self, XmlError> {
        let fields = Fields::parse(&xml)?;
        Ok(Self { xml, fields })
    }

    /// A message whose fields were already parsed from `xml` (a plaintext push's envelope).
    pub fn from_parts(xml: Bytes, fields: Fields) -> Self {
        Self { xml, fields }
    }

    pub fn xml(&self) -> &Bytes {
        &self.xml
    }

    pub fn fields(&self) -> &Fields {
        &self.fields
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields.get(name)
    }

    pub fn msg_type(&self) -> Option<&str> {
        self.get("MsgType")
    }

    pub fn event(&self) -> Option<&str> {
        self.get("Event")
    }

    pub fn event_key(&self) -> Option<&str> {
        self.get("EventKey")
    }

    pub fn ticket(&self) -> Option<&str> {
        self.get("Ticket").filter(|t| !t.is_empty())
    }

    pub fn content(&self) -> Option<&str> {
        self.get("Content")
    }

    pub fn to_user_name(&self) -> Option<&str> {
        self.get("ToUserName")
    }

    pub fn from_user_name(&self) -> Option<&str> {
        self.get("FromUserName")
    }

    /// `MsgId` of a message (`MsgID` in the job-finished events).
    pub fn msg_id(&self) -> Option<&str> {
        self.get("MsgId").or_else(|| self.get("MsgID"))
    }

    pub fn is_event(&self) -> bool {
        self.msg_type() == Some("event")
    }

    /// The identity of a push across WeChat's retries (PROTOCOL.md §6): a retry may carry a new
    /// timestamp, nonce and signatures, but the decrypted message is the same.
    pub fn dedupe_key(&self) -> DedupeKey {
        let part = |name: &str| self.get(name).unwrap_or_default().to_owned();
        let mut parts = vec![part("ToUserName"), part("FromUserName")];
        if self.is_event() {
            parts.extend([part("CreateTime"), part("Event"), part("EventKey")]);
        } else {
            parts.extend([
                self.msg_id().unwrap_or_default().to_owned(),
                part("CreateTime"),
            ]);
        }
        DedupeKey(parts)
    }
}

/// The parts that identify a push (see [`Message::dedupe_key`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DedupeKey(Vec<String>);

impl DedupeKey {
    /// A stable id for the push on `account`: the same for every retry of it. 32 hex digits of
    /// SHA-256, so it reveals nothing of the openid it covers.
    pub fn event_id(&self, account: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(account.as_bytes());
        for part in &self.0 {
            // Length-prefixed so that ("ab", "c") and ("a", "bc") differ.
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        hex::encode(&hasher.finalize()[..16])
    }
}

/// A passive text reply to `message`: `ToUserName` and `FromUserName` swapped.
pub fn text_reply(message: &Message, create_time: u64, content: &str) -> String {
    format!(
        "<xml><ToUserName>{}</ToUserName><FromUserName>{}</FromUserName>\
         <CreateTime>{create_time}</CreateTime><MsgType><![CDATA[text]]></MsgType>\
         <Content>{}</Content></xml>",
        cdata(message.from_user_name().unwrap_or_default()),
        cdata(message.to_user_name().unwrap_or_default()),
        cdata(content),
    )
}

/// Escapes text for a CDATA section: `]]>` is split across two sections.
pub fn cdata(text: &str) -> String {
    format!("<![CDATA[{}]]>", text.replace("]]>", "]]]]><![CDATA[>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(xml: &str) -> Message {
        Message::parse(Bytes::copy_from_slice(xml.as_bytes())).expect("valid xml")
    }

    #[test]
    fn cdata_plain_text_and_references_read_alike() {
        let m = message(
            "\u{feff}<?xml version=\"1.0\"?>\n<xml>\n  <ToUserName><![CDATA[gh_1]]></ToUserName>\n  \
             <MsgType>text</MsgType>\n  <Content><![CDATA[a ]]]]><![CDATA[> b]]> &amp; &#20320;</Content>\n</xml>\n",
        );
        assert_eq!(m.to_user_name(), Some("gh_1"));
        assert_eq!(m.msg_type(), Some("text"));
        assert_eq!(m.content(), Some("a ]]> b & 你"));
    }

    #[test]
    fn nested_and_repeated_elements_become_json() {
        let m = message(
            "<xml><MsgType>event</MsgType><Event>pic_weixin</Event><SendPicsInfo><Count>2</Count>\
             <PicList><item><PicMd5Sum>a</PicMd5Sum></item><item><PicMd5Sum>b</PicMd5Sum></item></PicList>\
             </SendPicsInfo></xml>",
        );
        let json = m.fields().to_json();
        assert_eq!(json["SendPicsInfo"]["Count"], "2");
        assert_eq!(json["SendPicsInfo"]["PicList"]["item"][1]["PicMd5Sum"], "b");
    }

    #[test]
    fn three_repeats_stay_one_array() {
        let fields = Fields::parse(b"<xml><a>1</a><a>2</a><a>3</a></xml>").expect("xml");
        assert_eq!(fields.to_json()["a"], serde_json::json!(["1", "2", "3"]));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for bad in [
            &b""[..],
            b"not xml",
            b"<xml><a></b></xml>",
            b"<xml><a>",
            b"<xml/><xml/>",
            b"<xml></xml><xml></xml>",
            b"<xml>&bogus;</xml>",
            b"<xml><a>\xff</a></xml>",
            b"<xml><MsgType>text</MsgType><MsgType>event</MsgType></xml>",
            b"<xml><Encrypt>a</Encrypt><Encrypt>b</Encrypt></xml>",
            b"<xml><MsgType><b>text</b></MsgType></xml>",
        ] {
            assert!(
                Fields::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let ok = format!("{}{}", "<a>".repeat(MAX_DEPTH), "</a>".repeat(MAX_DEPTH));
        assert!(Fields::parse(ok.as_bytes()).is_ok());
        let deep = format!("{}{}", "<a>".repeat(10_000), "</a>".repeat(10_000));
        assert_eq!(Fields::parse(deep.as_bytes()), Err(XmlError::TooDeep));
    }

    #[test]
    fn root_name_is_kept() {
        assert_eq!(
            Fields::parse(b"<xml><a>1</a></xml>").map(|f| f.root().to_owned()),
            Ok("xml".into())
        );
        assert_eq!(
            Fields::parse(b"<html/>").map(|f| f.root().to_owned()),
            Ok("html".into())
        );
    }

    #[test]
    fn dedupe_key_ignores_everything_but_identity() {
        let a = message(
            "<xml><ToUserName>gh</ToUserName><FromUserName>o1</FromUserName><CreateTime>1</CreateTime><MsgType>event</MsgType><Event>SCAN</Event><EventKey>7</EventKey><Ticket>t1</Ticket></xml>",
        );
        let b = message(
            "<xml><ToUserName>gh</ToUserName><FromUserName>o1</FromUserName><CreateTime>1</CreateTime><MsgType>event</MsgType><Event>SCAN</Event><EventKey>7</EventKey><Ticket>t2</Ticket></xml>",
        );
        let c = message(
            "<xml><ToUserName>gh</ToUserName><FromUserName>o1</FromUserName><CreateTime>2</CreateTime><MsgType>event</MsgType><Event>SCAN</Event><EventKey>7</EventKey></xml>",
        );
        assert_eq!(a.dedupe_key(), b.dedupe_key());
        assert_ne!(a.dedupe_key(), c.dedupe_key());
        assert_eq!(
            a.dedupe_key().event_id("main"),
            b.dedupe_key().event_id("main")
        );
        assert_ne!(
            a.dedupe_key().event_id("main"),
            a.dedupe_key().event_id("other")
        );
        assert_eq!(a.dedupe_key().event_id("main").len(), 32);
    }

    #[test]
    fn dtds_entities_and_processing_instructions_are_refused() {
        let external = "<?xml version=\"1.0\"?><!DOCTYPE xml [<!ENTITY % ext SYSTEM \"http://127.0.0.1/x.dtd\"> %ext;]><xml><a>1</a></xml>";
        for (bad, expected) in [
            (&b"<!DOCTYPE xml><xml><a>1</a></xml>"[..], XmlError::Doctype),
            (
                b"<!DOCTYPE xml SYSTEM \"file:///etc/passwd\"><xml/>",
                XmlError::Doctype,
            ),
            (external.as_bytes(), XmlError::Entity),
            (
                b"<!doctype xml [<!entity e \"x\">]><xml>&e;</xml>",
                XmlError::Entity,
            ),
            (
                b"<?xml-stylesheet href=\"x\"?><xml/>",
                XmlError::ProcessingInstruction,
            ),
            (
                b"<xml><a><?php echo 1; ?></a></xml>",
                XmlError::ProcessingInstruction,
            ),
            // The declaration is allowed only first.
            (
                b"<xml/><?xml version=\"1.0\"?>",
                XmlError::ProcessingInstruction,
            ),
            (
                b"\n<?xml version=\"1.0\"?><xml/>",
                XmlError::ProcessingInstruction,
            ),
        ] {
            assert_eq!(
                Fields::parse(bad),
                Err(expected),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // An <!ENTITY outside a DOCTYPE is not XML at all.
        assert!(matches!(
            Fields::parse(b"<!ENTITY e \"x\"><xml/>"),
            Err(XmlError::Malformed(_))
        ));
        // The declaration first, after a BOM, and comments are fine.
        assert!(Fields::parse(b"\xEF\xBB\xBF<?xml version=\"1.0\"?><!-- c --><xml/>").is_ok());
    }

    #[test]
    fn characters_xml_does_not_allow_are_refused() {
        for (bad, code) in [
            (&b"<xml><a>\0</a></xml>"[..], 0),
            (b"<xml>\0<a>1</a></xml>", 0),
            (b"<xml><!-- \x01 --></xml>", 1),
            (b"<xml><a><![CDATA[\x1f]]></a></xml>", 0x1F),
            (b"<xml><a>\xEF\xBF\xBE</a></xml>", 0xFFFE),
            (b"<xml><a>&#0;</a></xml>", 0),
            (b"<xml><a>&#x1;</a></xml>", 1),
            (b"<xml><a>&#x0000;</a></xml>", 0),
            (b"<xml><a>&#8;</a></xml>", 8),
            (b"<xml><a>&#xFFFF;</a></xml>", 0xFFFF),
            (b"<xml><a>&#xD800;</a></xml>", 0xD800),
            (b"<xml><a>&#x110000;</a></xml>", 0x11_0000),
            (b"<xml a=\"&#1;\"/>", 1),
            (b"<xml><a b=\"x&#0;\">1</a></xml>", 0),
        ] {
            assert_eq!(
                Fields::parse(bad),
                Err(XmlError::InvalidChar(code)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Tab, newline, carriage return and the ranges XML allows, raw or as references.
        let fields = Fields::parse(
            "<xml a=\"&#9;\"><a>\t\r\n&#x9;&#xA;&#xD;&#x20;&#xD7FF;&#xE000;&#xFFFD;&#x10000;&#x10FFFF;\u{10FFFF}</a></xml>"
                .as_bytes(),
        )
        .expect("allowed characters");
        assert_eq!(fields.get("a").map(|a| a.chars().count()), Some(13));
    }

    #[test]
    fn allowed_chars_are_xml_1_0s() {
        for ch in [
            '\u{0}', '\u{8}', '\u{B}', '\u{C}', '\u{1F}', '\u{FFFE}', '\u{FFFF}',
        ] {
            assert!(!allowed_char(ch), "{:?}", ch);
        }
        for ch in [
            '\u{9}',
            '\u{A}',
            '\u{D}',
            ' ',
            '\u{D7FF}',
            '\u{E000}',
            '\u{FFFD}',
            '\u{10000}',
            '\u{10FFFF}',
        ] {
            assert!(allowed_char(ch), "{:?}", ch);
        }
    }

    #[test]
    fn cdata_escapes_terminator() {
        assert_eq!(cdata("a]]>b"), "<![CDATA[a]]]]><![CDATA[>b]]>");
        let m = message(&format!("<xml><Content>{}</Content></xml>", cdata("x]]>y")));
        assert_eq!(m.content(), Some("x]]>y"));
    }
}
