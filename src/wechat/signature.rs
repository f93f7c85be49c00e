//! SHA-1 signatures over sorted parts: the URL check, `signature` and `msg_signature`
//! (PROTOCOL.md §2, §3 and §5).

use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

/// `lowercase_hex(sha1(concat(sort_bytewise(parts))))`.
///
/// The sort is by bytes, so `+` and `/` (which start some `Encrypt` values) sort before digits.
pub fn sign(parts: &[&str]) -> String {
    let mut sorted: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
    sorted.sort_unstable();
    let mut hasher = Sha1::new();
    for part in sorted {
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// Checks `given` against the signature of `parts` in constant time.
///
/// The comparison is case-insensitive on the hex digits, so an upper-case signature from a proxy
/// still verifies; anything that is not 40 hex digits fails.
pub fn verify(parts: &[&str], given: &str) -> bool {
    let expected = sign(parts);
    let given = given.to_ascii_lowercase();
    expected.as_bytes().ct_eq(given.as_bytes()).into()
}

/// The plain `signature` of the URL check and of every push: token, timestamp, nonce.
pub fn verify_signature(token: &str, timestamp: &str, nonce: &str, signature: &str) -> bool {
    verify(&[token, timestamp, nonce], signature)
}

/// `msg_signature` of an encrypted push: token, timestamp, nonce and the `Encrypt` text.
pub fn verify_msg_signature(
    token: &str,
    timestamp: &str,
    nonce: &str,
    encrypt: &str,
    msg_signature: &str,
) -> bool {
    verify(&[token, timestamp, nonce, encrypt], msg_signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_url_check_example() {
        // PROTOCOL.md §2: token AAAAA.
        let sig = sign(&["AAAAA", "1714036504", "1514711492"]);
        assert_eq!(sig, "f464b24fc39322e44b38aa78f5edd27bd1441696");
        assert!(verify_signature("AAAAA", "1714036504", "1514711492", &sig));
        assert!(verify_signature(
            "AAAAA",
            "1714036504",
            "1514711492",
            &sig.to_uppercase()
        ));
        assert!(!verify_signature("AAAAA", "1714036505", "1514711492", &sig));
        assert!(!verify_signature("AAAAA", "1714036504", "1514711492", ""));
        assert!(!verify_signature(
            "AAAAA",
            "1714036504",
            "1514711492",
            &sig[..39]
        ));
    }

    #[test]
    fn sort_is_bytewise() {
        // '+' (0x2b) sorts before '1' (0x31): a locale or numeric sort would differ.
        assert_eq!(sign(&["1", "+"]), sign(&["+", "1"]));
        let mut h = Sha1::new();
        h.update(b"+1");
        assert_eq!(sign(&["1", "+"]), hex::encode(h.finalize()));
    }
}
