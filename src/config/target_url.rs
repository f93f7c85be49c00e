//! A target's `url` as the relay holds it: the URI the HTTP client is given never has the
//! `user:password@` it may be written with (so no client log line, at any level, can show it);
//! that credential becomes an `Authorization: Basic` header, built once at load, held in
//! zeroed memory and marked sensitive.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{HeaderValue, Uri};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::secret::Secret;

/// Why a target URL was refused. No variant holds any part of the URL: it may be a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("must be an http:// or https:// URL with a host (not shown: it may hold a credential)")]
    NotHttp,
    #[error("has an @ with no user name or password before it")]
    EmptyUserInfo,
    #[error(
        "the user name (before the first :) decodes to a text with a colon, which Basic authentication cannot carry"
    )]
    ColonInUser,
    #[error("the user name or password decodes to a control character")]
    ControlInUserInfo,
}

/// A checked target URL: an `http` or `https` URI with a host and without user info, and the
/// `Authorization` header of the user info it was written with.
///
/// `Display` and `Debug` show it redacted: `https://<redacted>@host/path?<redacted>`.
#[derive(Clone, PartialEq)]
pub struct TargetUrl {
    uri: Uri,
    authorization: Option<BasicAuth>,
}

impl TargetUrl {
    /// What the HTTP client is given: never any user info.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// `Basic base64(user:password)` from the URL's user info, sensitive, for every attempt.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_ref().map(|auth| &auth.0)
    }
}

impl FromStr for TargetUrl {
    type Err = UrlError;

    /// The user info is cut from the text before it is parsed, so no `Uri` ever holds it.
    fn from_str(text: &str) -> Result<Self, UrlError> {
        let (user_info, without) = split_user_info(text);
        let uri = without.parse::<Uri>().map_err(|_| UrlError::NotHttp)?;
        let http = matches!(uri.scheme_str(), Some("http" | "https"));
        if !http || uri.host().is_none_or(str::is_empty) {
            return Err(UrlError::NotHttp);
        }
        let authorization = user_info.map(BasicAuth::from_user_info).transpose()?;
        Ok(Self { uri, authorization })
    }
}

/// `scheme://user:password@rest` as the user info and `scheme://rest`; `None` and the text
/// itself when there is no user info. The authority ends at the first `/`, `?` or `#`; its user
/// info at its last `@`.
fn split_user_info(text: &str) -> (Option<&str>, std::borrow::Cow<'_, str>) {
    let Some(scheme_end) = text.find("://").map(|i| i + 3) else {
        return (None, text.into());
    };
    let (head, rest) = text.split_at(scheme_end);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => (
            Some(&rest[..at]),
            format!("{head}{}", &rest[at + 1..]).into(),
        ),
        None => (None, text.into()),
    }
}

impl fmt::Display for TargetUrl {
    /// Without what may be a credential: the user info and the query.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self.uri.scheme_str().unwrap_or("http");
        let authority = self.uri.authority().map_or("", |a| a.as_str());
        let user_info = if self.authorization.is_some() {
            "<redacted>@"
        } else {
            ""
        };
        let query = if self.uri.query().is_some() {
            "?<redacted>"
        } else {
            ""
        };
        write!(
            f,
            "{scheme}://{user_info}{authority}{}{query}",
            self.uri.path()
        )
    }
}

impl fmt::Debug for TargetUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TargetUrl({self})")
    }
}

/// An `Authorization: Basic` value whose bytes live in a [`Secret`] (zeroed when the last
/// request holding it is dropped), marked sensitive (HTTP/2 never indexes it; `Debug` shows
/// `Sensitive`).
#[derive(Clone)]
struct BasicAuth(HeaderValue);

impl BasicAuth {
    /// RFC 7617: `user:password` percent-decoded, joined by `:`, in base64 after `Basic `.
    fn from_user_info(user_info: &str) -> Result<Self, UrlError> {
        if user_info.is_empty() {
            return Err(UrlError::EmptyUserInfo);
        }
        let (user, password) = user_info.split_once(':').unwrap_or((user_info, ""));
        // Decoded text is never longer than the encoded one: no buffer grows (and leaves an
        // unzeroed copy behind).
        let mut joined = Zeroizing::new(Vec::with_capacity(user_info.len()));
        joined.extend(percent_encoding::percent_decode_str(user));
        if joined.contains(&b':') {
            return Err(UrlError::ColonInUser);
        }
        joined.push(b':');
        joined.extend(percent_encoding::percent_decode_str(password));
        if joined.iter().any(u8::is_ascii_control) {
            return Err(UrlError::ControlInUserInfo);
        }
        let mut value = Zeroizing::new(String::with_capacity(
            "Basic ".len() + joined.len().div_ceil(3) * 4,
        ));
        value.push_str("Basic ");
        STANDARD.encode_string(joined.as_slice(), &mut value);
        let secret = Secret::from(value);
        let mut header = HeaderValue::from_maybe_shared(Bytes::from_owner(secret))
            .map_err(|_| UrlError::ControlInUserInfo)?;
        header.set_sensitive(true);
        Ok(Self(header))
    }
}

impl PartialEq for BasicAuth {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> TargetUrl {
        text.parse().expect("a valid target URL")
    }

    #[test]
    fn user_info_becomes_a_basic_header_and_leaves_the_uri() {
        let target = url("https://user:s3cret@hooks.example.com:8443/a/b?token=x");
        assert_eq!(
            target.uri().to_string(),
            "https://hooks.example.com:8443/a/b?token=x"
        );
        let header = target.authorization().expect("a header");
        // base64("user:s3cret")
        assert_eq!(header.as_bytes(), b"Basic dXNlcjpzM2NyZXQ=");
        assert!(header.is_sensitive());
        assert_eq!(
            target.to_string(),
            "https://<redacted>@hooks.example.com:8443/a/b?<redacted>"
        );
        assert_eq!(url("http://127.0.0.1:9000/wechat").authorization(), None);
        assert_eq!(
            url("http://127.0.0.1:9000/wechat").to_string(),
            "http://127.0.0.1:9000/wechat"
        );
    }

    #[test]
    fn user_info_is_percent_decoded_and_split_at_the_last_at() {
        // "us er" and "p@ss:w%rd": the password may hold ':' and (even unencoded) '@'.
        let target = url("http://us%20er:p@ss:w%25rd@h/");
        assert_eq!(target.uri().to_string(), "http://h/");
        let encoded = STANDARD.encode("us er:p@ss:w%rd");
        assert_eq!(
            target.authorization().map(HeaderValue::as_bytes),
            Some(format!("Basic {encoded}").as_bytes())
        );
        // No password: "user:".
        let encoded = STANDARD.encode("user:");
        assert_eq!(
            url("http://user@h/")
                .authorization()
                .map(HeaderValue::as_bytes),
            Some(format!("Basic {encoded}").as_bytes())
        );
        // An @ in the path is not user info.
        assert_eq!(url("http://h/a@b").authorization(), None);
        assert_eq!(url("http://h/a@b").uri().path(), "/a@b");
    }

    #[test]
    fn bad_user_info_is_refused_without_showing_it() {
        assert_eq!(
            "http://@h/".parse::<TargetUrl>(),
            Err(UrlError::EmptyUserInfo)
        );
        assert_eq!(
            "http://a%3Ab:pw@h/".parse::<TargetUrl>(),
            Err(UrlError::ColonInUser)
        );
        assert_eq!(
            "http://a:p%0Aw@h/".parse::<TargetUrl>(),
            Err(UrlError::ControlInUserInfo)
        );
        assert_eq!("ftp://a:pw@h/".parse::<TargetUrl>(), Err(UrlError::NotHttp));
        assert_eq!(
            "http://a:pw@/x".parse::<TargetUrl>(),
            Err(UrlError::NotHttp)
        );
        for error in [
            UrlError::NotHttp,
            UrlError::EmptyUserInfo,
            UrlError::ColonInUser,
            UrlError::ControlInUserInfo,
        ] {
            assert!(!error.to_string().contains("pw"), "{error}");
        }
    }

    #[test]
    fn debug_shows_no_credential() {
        let target = url("https://user:s3cretPassw0rd@h/p");
        let debug = format!("{target:?} {:?}", target.authorization);
        assert!(!debug.contains("s3cretPassw0rd"), "{debug}");
        assert!(!debug.contains("dXNlcjpzM2NyZXRQYXNzdzByZA"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn equality_includes_the_credential() {
        assert_eq!(url("http://a:b@h/"), url("http://a:b@h/"));
        assert_ne!(url("http://a:b@h/"), url("http://a:c@h/"));
        assert_ne!(url("http://a:b@h/"), url("http://h/"));
    }
}
