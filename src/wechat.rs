//! The WeChat official-account push protocol, as the relay sees it (see PROTOCOL.md, kept in
//! the project's shared docs, for the full text):
//!
//! - every request carries `signature = sha1(sort(token, timestamp, nonce))` ([`signature`]);
//! - encrypted pushes (`encrypt_type=aes`) add `msg_signature`, which also covers `Encrypt`,
//!   and wrap the message in AES-256-CBC with a 32-byte PKCS#7 block ([`crypto`]);
//! - the message is XML whose fields say what happened ([`message`]).
//!
//! Nothing here knows about routes, targets or HTTP.

pub mod crypto;
pub mod message;
pub mod sender;
pub mod signature;
