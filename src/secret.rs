//! [`Secret`]: a token, key, HMAC key or credential in memory that is zeroed when it is
//! dropped, compared in constant time, and never printed.

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Secret bytes: zeroed on drop (each clone too), equal only in constant time, `<redacted>` in
/// `Debug`. There is no `Display`: showing one takes an explicit [`Secret::expose`].
#[derive(Clone, Default)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Takes `bytes` without copying them.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The secret as text (tokens are ASCII by validation); empty if it is not UTF-8.
    pub fn expose_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    /// Takes the text's buffer without copying it.
    fn from(text: String) -> Self {
        Self::new(text.into_bytes())
    }
}

impl From<&str> for Secret {
    fn from(text: &str) -> Self {
        Self::new(text.as_bytes().to_vec())
    }
}

impl From<Zeroizing<String>> for Secret {
    /// Takes the text's buffer: the secret is never in memory that is not zeroed.
    fn from(mut text: Zeroizing<String>) -> Self {
        Self::from(std::mem::take(&mut *text))
    }
}

/// For `Bytes::from_owner`: a buffer (a header value) that is zeroed when its last user drops it.
impl AsRef<[u8]> for Secret {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl PartialEq for Secret {
    /// Constant time in the contents (the lengths may differ in time).
    fn eq(&self, other: &Self) -> bool {
        self.0.as_slice().ct_eq(other.0.as_slice()).into()
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_secret() {
        let secret = Secret::from("s3cretToken");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(secret.clone())), "Some(<redacted>)");
    }

    #[test]
    fn equality_is_by_content() {
        assert_eq!(Secret::from("abc"), Secret::from("abc".to_owned()));
        assert_ne!(Secret::from("abc"), Secret::from("abd"));
        assert_ne!(Secret::from("abc"), Secret::from("abcd"));
        assert_eq!(
            Secret::from(Zeroizing::new("abc".to_owned())).expose(),
            b"abc"
        );
    }
}
