//! WeChat's side of the protocol: signed (and encrypted) pushes and URL checks built the way
//! WeChat builds them (PROTOCOL.md §2 and §3). The test kit, the load benchmark and operators'
//! tooling use it to talk to a relay; the relay itself only receives.

use super::crypto::{self, AesKey};
use super::message::cdata;
use super::signature::sign;
use crate::secret::Secret;

/// What an account shares with WeChat: the token, the app id and, outside plaintext mode, the key.
#[derive(Debug, Clone)]
pub struct Sender {
    pub token: Secret,
    pub app_id: String,
    pub key: Option<AesKey>,
}

/// The per-request values of a push's query.
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    pub timestamp: &'a str,
    pub nonce: &'a str,
    /// The user's openid (WeChat adds it to push queries; it is not signed).
    pub openid: &'a str,
}

/// What a push says happened (PROTOCOL.md §7): a message from the user, or an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushContent<'a> {
    /// A text message (`MsgType` `text`).
    Text { content: &'a str, msg_id: u64 },
    /// An event (`MsgType` `event`): `subscribe`, `SCAN`, `CLICK`, ...
    Event {
        event: &'a str,
        event_key: Option<&'a str>,
        ticket: Option<&'a str>,
    },
}

/// The fields of a push from `from` (an openid) to `to` (the account's `gh_` id), in WeChat's
/// order and without the `<xml>` root: a compatible-mode push puts them beside `Encrypt`.
pub fn message_fields(to: &str, from: &str, create_time: u64, content: &PushContent<'_>) -> String {
    let head = format!(
        "<ToUserName>{}</ToUserName><FromUserName>{}</FromUserName><CreateTime>{create_time}</CreateTime>",
        cdata(to),
        cdata(from)
    );
    match *content {
        PushContent::Text { content, msg_id } => format!(
            "{head}<MsgType><![CDATA[text]]></MsgType><Content>{}</Content><MsgId>{msg_id}</MsgId>",
            cdata(content)
        ),
        PushContent::Event {
            event,
            event_key,
            ticket,
        } => {
            let mut fields = format!(
                "{head}<MsgType><![CDATA[event]]></MsgType><Event>{}</Event>",
                cdata(event)
            );
            if let Some(key) = event_key {
                fields.push_str(&format!("<EventKey>{}</EventKey>", cdata(key)));
            }
            if let Some(ticket) = ticket {
                fields.push_str(&format!("<Ticket>{}</Ticket>", cdata(ticket)));
            }
            fields
        }
    }
}

/// A push's message XML: [`message_fields`] in the `<xml>` root.
pub fn message_xml(to: &str, from: &str, create_time: u64, content: &PushContent<'_>) -> String {
    format!(
        "<xml>{}</xml>",
        message_fields(to, from, create_time, content)
    )
}

/// A request as WeChat sends it: the query string (without `?`) and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub query: String,
    pub body: String,
}

impl Sender {
    /// The query of a URL check (`GET`).
    pub fn url_check(&self, timestamp: &str, nonce: &str, echostr: &str) -> String {
        let signature = sign(&[self.token.expose_str(), timestamp, nonce]);
        format!("signature={signature}&echostr={echostr}&timestamp={timestamp}&nonce={nonce}")
    }

    /// The query of a plaintext push.
    pub fn plain_query(&self, stamp: &Stamp<'_>) -> String {
        let Stamp {
            timestamp,
            nonce,
            openid,
        } = *stamp;
        let signature = sign(&[self.token.expose_str(), timestamp, nonce]);
        format!("signature={signature}&timestamp={timestamp}&nonce={nonce}&openid={openid}")
    }

    /// A plaintext-mode push: the body is the message.
    pub fn plaintext(&self, xml: &str, stamp: &Stamp<'_>) -> Outgoing {
        Outgoing {
            query: self.plain_query(stamp),
            body: xml.to_owned(),
        }
    }

    /// The `Encrypt` text for `xml` with the given random prefix, if the sender has a key.
    pub fn encrypt(&self, xml: &str, random: &[u8; 16]) -> Option<String> {
        let key = self.key.as_ref()?;
        Some(crypto::encrypt(key, &self.app_id, xml.as_bytes(), random))
    }

    /// The query of an encrypted push carrying `encrypt`.
    pub fn encrypted_query(&self, encrypt: &str, stamp: &Stamp<'_>) -> String {
        let msg_signature = sign(&[
            self.token.expose_str(),
            stamp.timestamp,
            stamp.nonce,
            encrypt,
        ]);
        format!(
            "{}&encrypt_type=aes&msg_signature={msg_signature}",
            self.plain_query(stamp)
        )
    }

    /// A safe-mode push (`ToUserName` and `Encrypt` only), or a compatible-mode one when
    /// `plaintext_fields` gives the unencrypted copy to put beside `Encrypt`. `None` without a key.
    pub fn encrypted(
        &self,
        xml: &str,
        to_user_name: &str,
        plaintext_fields: Option<&str>,
        stamp: &Stamp<'_>,
        random: &[u8; 16],
    ) -> Option<Outgoing> {
        let encrypt = self.encrypt(xml, random)?;
        let head = match plaintext_fields {
            Some(fields) => fields.to_owned(),
            None => format!("<ToUserName>{}</ToUserName>", cdata(to_user_name)),
        };
        Some(Outgoing {
            query: self.encrypted_query(&encrypt, stamp),
            body: format!("<xml>{head}<Encrypt>{}</Encrypt></xml>", cdata(&encrypt)),
        })
    }

    /// Opens an encrypted reply from the relay after checking its `MsgSignature`: the inner XML.
    pub fn open_reply(&self, body: &[u8]) -> Result<Vec<u8>, ReplyError> {
        let fields = super::message::Fields::parse(body).map_err(|_| ReplyError::Xml)?;
        let field = |name: &'static str| fields.get(name).ok_or(ReplyError::Missing(name));
        let (encrypt, timestamp, nonce) = (field("Encrypt")?, field("TimeStamp")?, field("Nonce")?);
        if !super::signature::verify(
            &[self.token.expose_str(), timestamp, nonce, encrypt],
            field("MsgSignature")?,
        ) {
            return Err(ReplyError::Signature);
        }
        let key = self.key.as_ref().ok_or(ReplyError::NoKey)?;
        crypto::decrypt(key, &self.app_id, encrypt).map_err(ReplyError::Crypto)
    }
}

/// Why an encrypted reply could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply is not XML")]
    Xml,
    #[error("reply has no {0}")]
    Missing(&'static str),
    #[error("reply MsgSignature does not match")]
    Signature,
    #[error("no key to open the reply")]
    NoKey,
    #[error("{0}")]
    Crypto(crypto::CryptoError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_generated_safe_vector() {
        // "subscribe_qrscene" from the generated vectors, rebuilt with its random prefix.
        let sender = Sender {
            token: "relayToken2024".into(),
            app_id: "wxa1b2c3d4e5f60789".into(),
            key: AesKey::from_encoding_aes_key("RelayVectorsEncodingAESKey0123456789abcdefZ").ok(),
        };
        let xml = "<xml><ToUserName><![CDATA[gh_0123456789ab]]></ToUserName>\n<FromUserName><![CDATA[oUpF8uMuAJO_M2pxb1Q9zNjWeS6o]]></FromUserName>\n<CreateTime>1718000000</CreateTime>\n<MsgType><![CDATA[event]]></MsgType>\n<Event><![CDATA[subscribe]]></Event>\n<EventKey><![CDATA[qrscene_123123]]></EventKey>\n<Ticket><![CDATA[gQH47joAAAAAAAAAASxodHRwOi8vd2VpeGluLnFxLmNvbS9xL2taZ2Z3TVRtNzJXV1Brb3ZhYmJJAAIEZ23sUwMEmm3sUw==]]></Ticket>\n</xml>";
        let push = sender
            .encrypted(
                xml,
                "gh_0123456789ab",
                None,
                &Stamp {
                    timestamp: "1718000000",
                    nonce: "1234567890",
                    openid: "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o",
                },
                b"a1b2c3d4e5f6g7h8",
            )
            .expect("has a key");
        assert_eq!(
            push.query,
            "signature=efabbad8dc3ee84083f379a1a3bef71c24d74cc5&timestamp=1718000000&nonce=1234567890\
             &openid=oUpF8uMuAJO_M2pxb1Q9zNjWeS6o&encrypt_type=aes&msg_signature=0b9842de5643c4c7e7cead7701e45ee6616ee317"
        );
        assert!(push.body.starts_with("<xml><ToUserName><![CDATA[gh_0123456789ab]]></ToUserName><Encrypt><![CDATA[XQ1uVuIVycLr33T35Z+rACPc"));
        let reply = crypto::seal_reply(
            sender.key.as_ref().expect("key"),
            &sender.app_id,
            sender.token.expose_str(),
            b"<xml>hi</xml>",
            "1",
            "2",
            &[0; 16],
        );
        assert_eq!(
            sender.open_reply(reply.as_bytes()),
            Ok(b"<xml>hi</xml>".to_vec())
        );
        let tampered = reply.replace("<TimeStamp>1<", "<TimeStamp>3<");
        assert_eq!(
            sender.open_reply(tampered.as_bytes()),
            Err(ReplyError::Signature)
        );
    }

    #[test]
    fn message_xml_reads_back_field_by_field() {
        let text = message_xml(
            "gh_1",
            "o_1",
            1_700_000_000,
            &PushContent::Text {
                content: "a ]]> b",
                msg_id: 42,
            },
        );
        let fields = super::super::message::Fields::parse(text.as_bytes()).expect("xml");
        assert_eq!(fields.get("ToUserName"), Some("gh_1"));
        assert_eq!(fields.get("FromUserName"), Some("o_1"));
        assert_eq!(fields.get("CreateTime"), Some("1700000000"));
        assert_eq!(fields.get("MsgType"), Some("text"));
        assert_eq!(fields.get("Content"), Some("a ]]> b"));
        assert_eq!(fields.get("MsgId"), Some("42"));
        let event = message_xml(
            "gh_1",
            "o_1",
            1,
            &PushContent::Event {
                event: "subscribe",
                event_key: Some("qrscene_42"),
                ticket: Some("T"),
            },
        );
        let fields = super::super::message::Fields::parse(event.as_bytes()).expect("xml");
        assert_eq!(fields.get("MsgType"), Some("event"));
        assert_eq!(fields.get("Event"), Some("subscribe"));
        assert_eq!(fields.get("EventKey"), Some("qrscene_42"));
        assert_eq!(fields.get("Ticket"), Some("T"));
        let bare = message_fields(
            "gh_1",
            "o_1",
            1,
            &PushContent::Event {
                event: "unsubscribe",
                event_key: None,
                ticket: None,
            },
        );
        assert!(!bare.contains("EventKey") && !bare.contains("Ticket") && !bare.contains("<xml>"));
    }

    #[test]
    fn url_check_query_matches_the_docs() {
        let sender = Sender {
            token: "AAAAA".into(),
            app_id: String::new(),
            key: None,
        };
        assert_eq!(
            sender.url_check("1714036504", "1514711492", "4375120948345356249"),
            "signature=f464b24fc39322e44b38aa78f5edd27bd1441696&echostr=4375120948345356249&timestamp=1714036504&nonce=1514711492"
        );
        assert!(sender.encrypt("<xml/>", &[0; 16]).is_none());
    }

    #[test]
    fn debug_shows_no_token_or_key() {
        let key = AesKey::from_encoding_aes_key("RelayVectorsEncodingAESKey0123456789abcdefZ")
            .expect("key");
        let bytes = *key.as_bytes();
        let sender = Sender {
            token: "relayToken2024".into(),
            app_id: "wxa1b2c3d4e5f60789".into(),
            key: Some(key),
        };
        let debug = format!("{sender:?}");
        assert!(debug.contains("wxa1b2c3d4e5f60789"), "{debug}");
        for secret in [
            "relayToken2024".to_owned(),
            format!("{bytes:?}"),
            hex::encode(bytes),
        ] {
            assert!(!debug.contains(&secret), "{secret} in {debug}");
        }
    }
}
