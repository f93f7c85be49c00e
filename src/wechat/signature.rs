//! SHA-1 signatures over sorted parts: the URL check, `signature` and `msg_signature`
//! (PROTOCOL.md §2, §3 and §5).

use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

/// The most parts any WeChat signature covers (`msg_signature`: token, timestamp, nonce, Encrypt).
const MAX_PARTS: usize = 4;

/// `sha1(concat(sort_bytewise(parts)))`, sorted on the stack for up to [`MAX_PARTS`] parts.
///
/// The sort is by bytes, so `+` and `/` (which start some `Encrypt` values) sort before digits.
fn digest(parts: &[&str]) -> [u8; 20] {
    let mut hasher = Sha1::new();
    if parts.len() <= MAX_PARTS {
        let mut sorted: [&[u8]; MAX_PARTS] = [&[]; MAX_PARTS];
        for (slot, part) in sorted.iter_mut().zip(parts) {
            *slot = part.as_bytes();
        }
        let sorted = &mut sorted[..parts.len()];
        sorted.sort_unstable();
        sorted.iter().for_each(|part| hasher.update(part));
    } else {
        let mut sorted: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
        sorted.sort_unstable();
        sorted.iter().for_each(|part| hasher.update(part));
    }
    hasher.finalize().into()
}

/// `lowercase_hex(sha1(concat(sort_bytewise(parts))))`.
pub fn sign(parts: &[&str]) -> String {
    hex::encode(digest(parts))
}

/// Checks `given` against the signature of `parts` in constant time.
///
/// The comparison is case-insensitive on the hex digits, so an upper-case signature from a proxy
/// still verifies; anything that is not 40 hex digits fails.
pub fn verify(parts: &[&str], given: &str) -> bool {
    let mut given_bytes = [0u8; 20];
    if hex::decode_to_slice(given, &mut given_bytes).is_err() {
        return false;
    }
    digest(parts).ct_eq(&given_bytes).into()
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
        // More parts than any WeChat signature still sort (off the stack).
        let mut h = Sha1::new();
        h.update(b"+12345");
        assert_eq!(
            sign(&["5", "4", "3", "2", "1", "+"]),
            hex::encode(h.finalize())
        );
    }

    #[test]
    fn only_forty_hex_digits_verify() {
        let sig = sign(&["a", "b"]);
        let mixed: String = sig
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i % 2 == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect();
        assert!(verify(&["a", "b"], &mixed));
        for bad in [
            format!("{sig}0"),
            format!(" {sig}"),
            sig.replace(|c: char| c.is_ascii_digit(), "g"),
            String::new(),
        ] {
            assert!(!verify(&["a", "b"], &bad), "{bad:?}");
        }
    }
}
