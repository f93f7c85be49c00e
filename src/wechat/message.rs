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

use std::borrow::Cow;

use bytes::Bytes;
use quick_xml::Reader;
use quick_xml::events::Event;
use quick_xml::name::QName;
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

/// An element's name: one of WeChat's own field names without an allocation, any other owned.
pub type Name = Cow<'static, str>;

/// WeChat's field names (PROTOCOL.md §7), shared instead of copied for every push.
const KNOWN_NAMES: [&str; 36] = [
    "xml",
    "ToUserName",
    "FromUserName",
    "CreateTime",
    "MsgType",
    "Content",
    "MsgId",
    "MsgID",
    "MsgDataId",
    "Idx",
    "Event",
    "EventKey",
    "Ticket",
    "Encrypt",
    "PicUrl",
    "MediaId",
    "Format",
    "Recognition",
    "ThumbMediaId",
    "Location_X",
    "Location_Y",
    "Scale",
    "Label",
    "Title",
    "Description",
    "Url",
    "Latitude",
    "Longitude",
    "Precision",
    "Status",
    "ScanCodeInfo",
    "ScanType",
    "ScanResult",
    "SendPicsInfo",
    "Count",
    "PicList",
];

fn name_of(name: &str) -> Name {
    match KNOWN_NAMES.iter().find(|&&known| known == name) {
        Some(known) => Cow::Borrowed(known),
        None => Cow::Owned(name.to_owned()),
    }
}

/// One element's content: text (CDATA and character data joined) or child elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Text(String),
    Element(Vec<(Name, Node)>),
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
fn children_to_json(children: &[(Name, Node)]) -> serde_json::Value {
    let mut counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (name, _) in children {
        *counts.entry(name.as_ref()).or_default() += 1;
    }
    let mut object = serde_json::Map::new();
    for (name, node) in children {
        let value = node.to_json();
        if counts.get(name.as_ref()).is_some_and(|&n| n > 1) {
            let items = object
                .entry(name.as_ref())
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
            if let serde_json::Value::Array(items) = items {
                items.push(value);
            }
        } else {
            object.insert(name.to_string(), value);
        }
    }
    serde_json::Value::Object(object)
}

/// A piece of an element's text as the reader meets it: a run of character data or CDATA
/// (borrowed from the document), or one resolved reference.
enum Piece<'a> {
    Str(&'a str),
    Char(char),
}

/// What [`walk`] tells about a document, in document order. Depth 0 is the root element.
trait Visitor<'a> {
    fn open(&mut self, depth: usize, name: &str);
    /// Text directly inside the innermost open element, at `depth`.
    fn text(&mut self, depth: usize, piece: Piece<'a>);
    fn close(&mut self);
}

/// Reads a whole document once, enforcing every rule of this module, and tells `visitor` its
/// elements and text: the one reader behind [`Fields::parse`] and [`Envelope::parse`].
fn walk<'a>(xml: &'a [u8], visitor: &mut impl Visitor<'a>) -> Result<(), XmlError> {
    let xml = xml.strip_prefix(BOM).unwrap_or(xml);
    check_chars(utf8(xml)?)?;
    let mut reader = Reader::from_reader(xml);
    // How many elements are open, and whether the root has been closed.
    let mut depth = 0usize;
    let mut rooted = false;
    let mut singles = SingleFields::default();
    let mut first = true;
    loop {
        let event = reader.read_event().map_err(|e| read_error(&e))?;
        let at_start = std::mem::replace(&mut first, false);
        match event {
            Event::Start(start) => {
                check_attributes(&start)?;
                if rooted {
                    return Err(XmlError::TrailingContent);
                }
                if depth >= MAX_DEPTH {
                    return Err(XmlError::TooDeep);
                }
                let name = name(&start)?;
                singles.opened(depth, name);
                visitor.open(depth, name);
                depth += 1;
            }
            Event::Empty(empty) => {
                check_attributes(&empty)?;
                let name = name(&empty)?;
                if depth == 0 {
                    if rooted {
                        return Err(XmlError::TrailingContent);
                    }
                    rooted = true;
                }
                singles.opened(depth, name);
                visitor.open(depth, name);
                visitor.close();
            }
            Event::End(_) => {
                depth = depth
                    .checked_sub(1)
                    .ok_or(XmlError::Malformed("unexpected end tag"))?;
                rooted |= depth == 0;
                visitor.close();
            }
            Event::Text(text) => {
                let text = match text.into_inner() {
                    Cow::Borrowed(bytes) => std::str::from_utf8(bytes)
                        .map_err(|_| XmlError::Malformed("bad text encoding"))?,
                    Cow::Owned(_) => return Err(XmlError::Malformed("bad text encoding")),
                };
                match depth {
                    0 if text.trim().is_empty() => {}
                    0 => return Err(XmlError::Malformed("text outside the root")),
                    _ => visitor.text(depth - 1, Piece::Str(text)),
                }
            }
            Event::CData(cdata) => {
                let text = match cdata.into_inner() {
                    Cow::Borrowed(bytes) => utf8(bytes)?,
                    Cow::Owned(_) => return Err(XmlError::Utf8),
                };
                match depth {
                    0 => return Err(XmlError::Malformed("CDATA outside the root")),
                    _ => visitor.text(depth - 1, Piece::Str(text)),
                }
            }
            Event::GeneralRef(reference) => {
                let resolved = resolve_reference(&reference)?;
                match depth {
                    0 => return Err(XmlError::Malformed("reference outside the root")),
                    _ => visitor.text(depth - 1, Piece::Char(resolved)),
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
    if depth != 0 {
        return Err(XmlError::Malformed("unclosed element"));
    }
    if !rooted {
        return Err(XmlError::NoRoot);
    }
    singles.check()
}

/// Tracks the [`SINGLE_FIELDS`] at the top level: how often each appears, and whether its first
/// appearance holds an element.
#[derive(Default)]
struct SingleFields {
    seen: [(u8, bool); SINGLE_FIELDS.len()],
    /// The entry open at depth 1, if the element open there is one of them.
    open: Option<usize>,
}

impl SingleFields {
    fn opened(&mut self, depth: usize, name: &str) {
        if depth == 1 {
            self.open = SINGLE_FIELDS.iter().position(|&field| field == name);
            if let Some(i) = self.open {
                self.seen[i].0 = self.seen[i].0.saturating_add(1);
            }
        } else if depth == 2
            && let Some(i) = self.open
            && self.seen[i].0 == 1
        {
            self.seen[i].1 = true;
        }
    }

    fn check(&self) -> Result<(), XmlError> {
        for (field, &(count, holds_element)) in SINGLE_FIELDS.into_iter().zip(&self.seen) {
            if count > 1 {
                return Err(XmlError::Repeated(field));
            }
            // Text only: a reader that flattens child elements would see another value.
            if holds_element {
                return Err(XmlError::NotText(field));
            }
        }
        Ok(())
    }
}

/// An element's name as the document spells it.
fn name<'e>(start: &'e quick_xml::events::BytesStart<'_>) -> Result<&'e str, XmlError> {
    let QName(name) = start.name();
    utf8(name)
}

/// An open element while parsing: its name, its children so far and its text so far.
type Frame = (Name, Vec<(Name, Node)>, String);

/// Builds [`Fields`] from what [`walk`] reads.
#[derive(Default)]
struct Tree {
    stack: Vec<Frame>,
    root: Name,
    children: Vec<(Name, Node)>,
}

impl<'a> Visitor<'a> for Tree {
    fn open(&mut self, depth: usize, name: &str) {
        let name = name_of(name);
        if depth == 0 {
            self.root.clone_from(&name);
        }
        self.stack.push((name, Vec::new(), String::new()));
    }

    fn text(&mut self, _depth: usize, piece: Piece<'a>) {
        if let Some((_, _, text)) = self.stack.last_mut() {
            match piece {
                Piece::Str(s) => text.push_str(s),
                Piece::Char(ch) => text.push(ch),
            }
        }
    }

    fn close(&mut self) {
        let Some((name, children, text)) = self.stack.pop() else {
            return;
        };
        let node = if children.is_empty() {
            Node::Text(text)
        } else {
            Node::Element(children)
        };
        match self.stack.last_mut() {
            Some((_, siblings, _)) => siblings.push((name, node)),
            None => {
                if let Node::Element(children) = node {
                    self.children = children;
                }
            }
        }
    }
}

/// The root element's name and its children, in document order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    root: Name,
    children: Vec<(Name, Node)>,
}

impl Fields {
    /// Parses a document and returns its root's children. A leading BOM is skipped.
    pub fn parse(xml: &[u8]) -> Result<Self, XmlError> {
        let mut tree = Tree::default();
        walk(xml, &mut tree)?;
        Ok(Fields {
            root: tree.root,
            children: tree.children,
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
        self.children.iter().map(|(n, node)| (n.as_ref(), node))
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
///
/// Scanned as bytes: in valid UTF-8 (no surrogates) the only refused characters are the C0
/// controls but tab, newline and carriage return, and U+FFFE and U+FFFF (`EF BF BE`/`EF BF BF`).
fn check_chars(text: &str) -> Result<(), XmlError> {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = bytes
        .get(from..)
        .and_then(|rest| rest.iter().position(|&b| b < 0x20 || b == 0xEF))
    {
        let at = from + at;
        match bytes[at..] {
            [b'\t' | b'\n' | b'\r', ..] => {}
            [0xEF, 0xBF, last @ (0xBE | 0xBF), ..] => {
                return Err(XmlError::InvalidChar(0xFFC0 | u32::from(last & 0x3F)));
            }
            [0xEF, ..] => {}
            [control, ..] => return Err(XmlError::InvalidChar(u32::from(control))),
            [] => break,
        }
        from = at + 1;
    }
    Ok(())
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

/// A push as WeChat posted it, before any decryption: its `Encrypt` text, if any, borrowed from
/// the body unless a reference or a split CDATA section makes it differ from the body's bytes.
///
/// Read in one pass, without a tree, under every rule [`Fields::parse`] applies.
#[derive(Debug, Clone)]
pub struct Envelope<'a> {
    encrypt: Option<Cow<'a, str>>,
    xml_root: bool,
}

impl<'a> Envelope<'a> {
    pub fn parse(body: &'a [u8]) -> Result<Self, XmlError> {
        let mut finder = EncryptFinder::default();
        walk(body, &mut finder)?;
        Ok(Self {
            encrypt: finder.text,
            xml_root: finder.xml_root,
        })
    }

    /// Whether the root element is `<xml>`, as in everything WeChat sends and accepts.
    pub fn is_wechat_xml(&self) -> bool {
        self.xml_root
    }

    /// The `Encrypt` text with surrounding ASCII whitespace trimmed (base64 never contains it),
    /// exactly as it is to be hashed for `msg_signature`.
    pub fn encrypt(&self) -> Option<&str> {
        self.encrypt.as_deref().map(str::trim_ascii)
    }
}

/// Collects the text of the top-level `Encrypt` element (at most one: [`walk`] refuses two).
#[derive(Default)]
struct EncryptFinder<'a> {
    /// Whether the element open at depth 1 is `Encrypt`.
    inside: bool,
    text: Option<Cow<'a, str>>,
    xml_root: bool,
}

impl<'a> Visitor<'a> for EncryptFinder<'a> {
    fn open(&mut self, depth: usize, name: &str) {
        if depth == 0 {
            self.xml_root = name == "xml";
        } else if depth == 1 {
            self.inside = name == "Encrypt";
            if self.inside {
                self.text.get_or_insert(Cow::Borrowed(""));
            }
        }
    }

    fn text(&mut self, depth: usize, piece: Piece<'a>) {
        if depth != 1 || !self.inside {
            return;
        }
        let Some(text) = self.text.as_mut() else {
            return;
        };
        match piece {
            Piece::Str(s) if text.is_empty() => *text = Cow::Borrowed(s),
            Piece::Str(s) => text.to_mut().push_str(s),
            Piece::Char(ch) => text.to_mut().push(ch),
        }
    }

    fn close(&mut self) {}
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
    pub fn dedupe_key(&self) -> DedupeKey<'_> {
        let part = |name: &str| self.get(name).unwrap_or_default();
        let (to, from, create_time) =
            (part("ToUserName"), part("FromUserName"), part("CreateTime"));
        if self.is_event() {
            DedupeKey {
                parts: [to, from, create_time, part("Event"), part("EventKey")],
                len: 5,
            }
        } else {
            let msg_id = self.msg_id().unwrap_or_default();
            DedupeKey {
                parts: [to, from, msg_id, create_time, ""],
                len: 4,
            }
        }
    }
}

/// The parts that identify a push (see [`Message::dedupe_key`]), borrowed from the message:
/// the first `len` of `parts` (a message has four, an event five).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DedupeKey<'m> {
    parts: [&'m str; 5],
    len: usize,
}

impl DedupeKey<'_> {
    /// A stable id for the push on `account`: the same for every retry of it. 32 hex digits of
    /// SHA-256, so it reveals nothing of the openid it covers.
    pub fn event_id(&self, account: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(account.as_bytes());
        for part in self.parts.iter().take(self.len) {
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

    fn encrypt_of(body: &str) -> Result<Option<String>, XmlError> {
        Envelope::parse(body.as_bytes()).map(|e| e.encrypt().map(str::to_owned))
    }

    #[test]
    fn envelope_reads_encrypt_on_odd_but_valid_inputs() {
        for (body, expected) in [
            (
                "<xml><ToUserName>gh</ToUserName><Encrypt>abc+/=</Encrypt></xml>",
                Some("abc+/="),
            ),
            (
                "<xml><Encrypt><![CDATA[ab]]><![CDATA[c=]]></Encrypt></xml>",
                Some("abc="),
            ),
            (
                "<xml>\n  <Encrypt>\n    <![CDATA[abc]]>\n  </Encrypt>\n</xml>\n",
                Some("abc"),
            ),
            (
                "<xml a=\"1\"><Encrypt b='2'>abc</Encrypt></xml>",
                Some("abc"),
            ),
            (
                "<xml><Encrypt>ab&#x2B;c&amp;</Encrypt></xml>",
                Some("ab+c&"),
            ),
            (
                "\u{feff}<?xml version=\"1.0\"?><!-- c --><xml><Encrypt>abc</Encrypt></xml>",
                Some("abc"),
            ),
            // Only the top level's: a nested one is another field.
            (
                "<xml><A><Encrypt>x</Encrypt></A><Encrypt>abc</Encrypt></xml>",
                Some("abc"),
            ),
            ("<xml><A><Encrypt>x</Encrypt></A></xml>", None),
            ("<xml><Encrypt/></xml>", Some("")),
            ("<xml/>", None),
        ] {
            assert!(Envelope::parse(body.as_bytes()).is_ok_and(|e| e.is_wechat_xml()));
            assert_eq!(
                encrypt_of(body),
                Ok(expected.map(str::to_owned)),
                "{body:?}"
            );
        }
        // One CDATA section is borrowed from the body, not copied.
        let body = b"<xml><Encrypt><![CDATA[abc]]></Encrypt></xml>";
        let envelope = Envelope::parse(body).expect("valid");
        assert!(matches!(envelope.encrypt, Some(Cow::Borrowed(_))));
        for other in ["<html><Encrypt>abc</Encrypt></html>", "<XML/>", "<xmlx/>"] {
            assert!(
                Envelope::parse(other.as_bytes()).is_ok_and(|e| !e.is_wechat_xml()),
                "{other:?}"
            );
        }
    }

    #[test]
    fn envelope_refuses_what_fields_refuses() {
        for (body, expected) in [
            (
                "<xml><Encrypt>a</Encrypt><Encrypt>b</Encrypt></xml>",
                XmlError::Repeated("Encrypt"),
            ),
            (
                "<xml><Encrypt><b>a</b></Encrypt></xml>",
                XmlError::NotText("Encrypt"),
            ),
            (
                "<xml><ToUserName>a</ToUserName><ToUserName>b</ToUserName><Encrypt>x</Encrypt></xml>",
                XmlError::Repeated("ToUserName"),
            ),
            (
                "<!DOCTYPE xml><xml><Encrypt>a</Encrypt></xml>",
                XmlError::Doctype,
            ),
            (
                "<xml><?pi x?><Encrypt>a</Encrypt></xml>",
                XmlError::ProcessingInstruction,
            ),
            (
                "<xml><Encrypt>a\u{1}</Encrypt></xml>",
                XmlError::InvalidChar(1),
            ),
            (
                "<xml><Encrypt>a&#0;</Encrypt></xml>",
                XmlError::InvalidChar(0),
            ),
            (
                "<xml><Encrypt>a</Encrypt></xml><xml/>",
                XmlError::TrailingContent,
            ),
            ("", XmlError::NoRoot),
        ] {
            assert_eq!(encrypt_of(body), Err(expected.clone()), "{body:?}");
            assert_eq!(Fields::parse(body.as_bytes()), Err(expected), "{body:?}");
        }
        for body in [
            "<xml><Encrypt>a</Encrypt>",
            "<xml><Encrypt>&bogus;</Encrypt></xml>",
            "x<xml/>",
        ] {
            assert!(
                matches!(encrypt_of(body), Err(XmlError::Malformed(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn refused_characters_are_found_as_bytes() {
        // Around the bytes the scan stops at: fullwidth forms (EF BC..) are allowed, EF BF BE/BF
        // are not; the first refused one is reported.
        let fields = Fields::parse("<xml><a>\u{FF0C}\u{FFFD}\u{EFFF}\t</a></xml>".as_bytes())
            .expect("allowed");
        assert_eq!(fields.get("a"), Some("\u{FF0C}\u{FFFD}\u{EFFF}\t"));
        for (body, code) in [
            ("<xml><a>\u{FF0C}\u{FFFF}\u{1}</a></xml>", 0xFFFF),
            ("<xml><a>\u{1F}\u{FFFE}</a></xml>", 0x1F),
            ("<xml><a>\u{FFFE}</a></xml>", 0xFFFE),
            ("<xml/>\u{7}", 7),
        ] {
            assert_eq!(
                Fields::parse(body.as_bytes()),
                Err(XmlError::InvalidChar(code)),
                "{body:?}"
            );
        }
    }

    #[test]
    fn known_names_are_not_copied() {
        let fields =
            Fields::parse(b"<xml><MsgType>text</MsgType><Custom>1</Custom></xml>").expect("xml");
        assert!(matches!(fields.root, Cow::Borrowed("xml")));
        let names: Vec<_> = fields
            .children
            .iter()
            .map(|(n, _)| matches!(n, Cow::Borrowed(_)))
            .collect();
        assert_eq!(names, [true, false]);
        assert_eq!(fields.get("Custom"), Some("1"));
    }

    #[test]
    fn cdata_escapes_terminator() {
        assert_eq!(cdata("a]]>b"), "<![CDATA[a]]]]><![CDATA[>b]]>");
        let m = message(&format!("<xml><Content>{}</Content></xml>", cdata("x]]>y")));
        assert_eq!(m.content(), Some("x]]>y"));
    }
}
