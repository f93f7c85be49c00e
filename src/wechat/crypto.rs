//! AES-256-CBC message crypto (PROTOCOL.md §4): key decoding, push decryption with the app id
//! check, and reply encryption.
//!
//! Plaintext layout: `random(16) || u32_be(len(xml)) || xml || app_id`, PKCS#7-padded to a
//! **32-byte** block, IV = the first 16 key bytes, standard base64 around the ciphertext.

use aes::Aes256;
use base64::Engine;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// WeChat pads to 32 bytes, not to the AES block of 16.
const PAD_BLOCK: usize = 32;
const RANDOM_LEN: usize = 16;
const LEN_FIELD: usize = 4;

/// Decodes the EncodingAESKey: the 43rd character carries two spare bits that WeChat does not
/// zero, so trailing bits must be allowed (the strict engine rejects the official sample key).
const KEY_ENGINE: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

/// Why an `EncodingAESKey` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("must be 43 characters of A-Z a-z 0-9, got {0}")]
    Length(usize),
    #[error("must be 43 characters of A-Z a-z 0-9, found another character")]
    Alphabet,
}

/// Why a ciphertext could not be opened. Each variant names the official error code it matches
/// (PROTOCOL.md §9) in its message so logs read like WeChat's own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("Encrypt is not valid base64 (-40010)")]
    Base64,
    #[error("ciphertext of {0} bytes is not a non-empty multiple of 32 (-40007)")]
    BlockLength(usize),
    #[error("bad PKCS#7 padding (-40007)")]
    Padding,
    #[error("message length field out of bounds (-40008)")]
    MessageLength,
    #[error("app id in the ciphertext does not match the account (-40005)")]
    AppId,
}

/// The 32-byte AES key decoded from an account's `EncodingAESKey`: zeroed on drop, compared in
/// constant time, never printed. (The AES key schedules built from it are zeroed on drop too:
/// the `zeroize` features of `aes` and `cbc`.)
#[derive(Clone)]
pub struct AesKey(Zeroizing<[u8; 32]>);

impl PartialEq for AesKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&*other.0).into()
    }
}

impl Eq for AesKey {}

impl std::fmt::Debug for AesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AesKey(<redacted>)")
    }
}

impl AesKey {
    /// Decodes a 43-character EncodingAESKey as `base64(key + "=")`, trailing bits allowed.
    pub fn from_encoding_aes_key(encoding_aes_key: &str) -> Result<Self, KeyError> {
        let chars = encoding_aes_key.chars().count();
        if chars != 43 {
            return Err(KeyError::Length(chars));
        }
        if !encoding_aes_key.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(KeyError::Alphabet);
        }
        // Every copy is zeroed: the padded text, the decoding buffer and the key.
        let mut padded = Zeroizing::new(String::with_capacity(44));
        padded.push_str(encoding_aes_key);
        padded.push('=');
        let mut decoded = Zeroizing::new([0u8; 33]);
        let len = KEY_ENGINE
            .decode_slice(padded.as_bytes(), &mut decoded[..])
            .map_err(|_| KeyError::Alphabet)?;
        let mut key = Zeroizing::new([0u8; 32]);
        match decoded.get(..len) {
            Some(bytes) if len == 32 => key.copy_from_slice(bytes),
            _ => return Err(KeyError::Length(chars)),
        }
        Ok(Self(key))
    }

    /// The raw key bytes (for tests and key fingerprints; never log them).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn iv(&self) -> &[u8] {
        &self.0[..16]
    }
}

/// Decrypts a push's `Encrypt` text and returns the exact message bytes inside it, after
/// checking the padding strictly, bounding the length field and comparing the app id.
pub fn decrypt(key: &AesKey, app_id: &str, encrypt: &str) -> Result<Vec<u8>, CryptoError> {
    let mut buf = STANDARD
        .decode(encrypt.trim_ascii())
        .map_err(|_| CryptoError::Base64)?;
    if buf.is_empty() || buf.len() % PAD_BLOCK != 0 {
        return Err(CryptoError::BlockLength(buf.len()));
    }
    let cipher_len = buf.len();
    let decryptor = cbc::Decryptor::<Aes256>::new_from_slices(key.as_bytes(), key.iv())
        .map_err(|_| CryptoError::BlockLength(cipher_len))?;
    let plain = decryptor
        .decrypt_padded::<NoPadding>(&mut buf)
        .map_err(|_| CryptoError::BlockLength(cipher_len))?;
    let plain_len = strip_padding(plain)?.len();
    let message = message_range(&buf[..plain_len], app_id)?;
    // The message is moved to the front of the decrypted buffer, which is cut to it: no copy
    // into a second buffer.
    buf.copy_within(message.clone(), 0);
    buf.truncate(message.len());
    Ok(buf)
}

/// Where the message lies in a decrypted, unpadded plaintext, after bounding the length field
/// and comparing the trailing app id.
fn message_range(plain: &[u8], app_id: &str) -> Result<std::ops::Range<usize>, CryptoError> {
    let start = RANDOM_LEN + LEN_FIELD;
    let len_bytes: [u8; 4] = plain
        .get(RANDOM_LEN..start)
        .and_then(|field| field.try_into().ok())
        .ok_or(CryptoError::MessageLength)?;
    let msg_len = u32::from_be_bytes(len_bytes) as usize;
    let end = start
        .checked_add(msg_len)
        .filter(|&end| end <= plain.len())
        .ok_or(CryptoError::MessageLength)?;
    if &plain[end..] != app_id.as_bytes() {
        return Err(CryptoError::AppId);
    }
    Ok(start..end)
}

/// Encrypts `message` for `app_id` with the given 16 random bytes and returns the base64 text
/// that goes into `<Encrypt>`.
pub fn encrypt(key: &AesKey, app_id: &str, message: &[u8], random: &[u8; 16]) -> String {
    let unpadded = RANDOM_LEN + LEN_FIELD + message.len() + app_id.len();
    let pad = PAD_BLOCK - unpadded % PAD_BLOCK;
    let mut buf = Vec::with_capacity(unpadded + pad);
    buf.extend_from_slice(random);
    // Messages are pushes (max_body_bytes, at most 1 MiB) and replies (at most 1 MiB read from a
    // target, or a configured text): far below the 4 GiB the length field holds.
    buf.extend_from_slice(&(message.len() as u32).to_be_bytes());
    buf.extend_from_slice(message);
    buf.extend_from_slice(app_id.as_bytes());
    buf.resize(unpadded + pad, pad as u8);
    let len = buf.len();
    let encryptor = cbc::Encryptor::<Aes256>::new_from_slices(key.as_bytes(), key.iv())
        .expect("a 32-byte key and a 16-byte IV are valid lengths for AES-256-CBC");
    let cipher = encryptor
        .encrypt_padded::<NoPadding>(&mut buf, len)
        .expect("the buffer is padded to a multiple of the block size");
    STANDARD.encode(cipher)
}

/// An encrypted passive reply (PROTOCOL.md §5): `message` sealed for `app_id`, signed with
/// `token` over the reply's own timestamp and nonce.
pub fn seal_reply(
    key: &AesKey,
    app_id: &str,
    token: &str,
    message: &[u8],
    timestamp: &str,
    nonce: &str,
    random: &[u8; 16],
) -> String {
    let encrypt = encrypt(key, app_id, message, random);
    let signature = super::signature::sign(&[token, timestamp, nonce, &encrypt]);
    format!(
        "<xml>\n<Encrypt><![CDATA[{encrypt}]]></Encrypt>\n\
         <MsgSignature><![CDATA[{signature}]]></MsgSignature>\n\
         <TimeStamp>{timestamp}</TimeStamp>\n<Nonce><![CDATA[{nonce}]]></Nonce>\n</xml>"
    )
}

/// Fresh random bytes for the head of a reply's plaintext.
pub fn random_prefix() -> [u8; 16] {
    use rand::RngExt;
    rand::rng().random::<[u8; 16]>()
}

/// A fresh reply nonce: ten decimal digits, like WeChat's own.
pub fn random_nonce() -> String {
    use rand::RngExt;
    rand::rng()
        .random_range(1_000_000_000u64..10_000_000_000)
        .to_string()
}

/// Strict PKCS#7 with a 32-byte block: last byte `n` in `1..=32`, and every one of the last `n`
/// bytes equal to `n`.
fn strip_padding(plain: &[u8]) -> Result<&[u8], CryptoError> {
    let n = *plain.last().ok_or(CryptoError::Padding)? as usize;
    if n == 0 || n > PAD_BLOCK || n > plain.len() {
        return Err(CryptoError::Padding);
    }
    let (message, pad) = plain.split_at(plain.len() - n);
    if pad.iter().any(|&b| b as usize != n) {
        return Err(CryptoError::Padding);
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";

    #[test]
    fn sample_key_with_trailing_bits_decodes() {
        let key = AesKey::from_encoding_aes_key(SAMPLE_KEY).expect("official sample key");
        // The canonical re-encoding ends in E: the G's two spare bits are dropped.
        let canonical =
            AesKey::from_encoding_aes_key("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFE")
                .expect("canonical key");
        assert_eq!(key, canonical);
    }

    #[test]
    fn key_shape_errors() {
        assert_eq!(
            AesKey::from_encoding_aes_key(&SAMPLE_KEY[..42]),
            Err(KeyError::Length(42))
        );
        let with_plus = format!("{}+", &SAMPLE_KEY[..42]);
        assert_eq!(
            AesKey::from_encoding_aes_key(&with_plus),
            Err(KeyError::Alphabet)
        );
        assert!(format!("{:?}", AesKey::from_encoding_aes_key(SAMPLE_KEY)).contains("redacted"));
    }

    #[test]
    fn round_trip_every_padding_length() {
        let key = AesKey::from_encoding_aes_key(SAMPLE_KEY).expect("key");
        let app_id = "wx0123456789abcdef";
        for len in 0..80 {
            let message = vec![b'x'; len];
            let enc = encrypt(&key, app_id, &message, &[7; 16]);
            assert_eq!(decrypt(&key, app_id, &enc), Ok(message));
            assert_eq!(
                decrypt(&key, "wx0000000000000000", &enc),
                Err(CryptoError::AppId)
            );
        }
    }

    #[test]
    fn padding_is_checked_strictly() {
        assert_eq!(strip_padding(&[1, 2, 3, 1]), Ok(&[1, 2, 3][..]));
        assert_eq!(strip_padding(&[1, 0]), Err(CryptoError::Padding));
        assert_eq!(strip_padding(&[1, 2, 2]), Ok(&[1][..]));
        assert_eq!(strip_padding(&[1, 3, 2]), Err(CryptoError::Padding));
        assert_eq!(strip_padding(&[33; 64]), Err(CryptoError::Padding));
        assert_eq!(strip_padding(&[32; 32]), Ok(&[][..]));
        assert_eq!(strip_padding(&[]), Err(CryptoError::Padding));
    }

    #[test]
    fn garbage_never_panics() {
        let key = AesKey::from_encoding_aes_key(SAMPLE_KEY).expect("key");
        for len in [0usize, 16, 32, 48, 64, 96] {
            let junk = STANDARD.encode(vec![0xa5; len]);
            assert!(decrypt(&key, "wx0123456789abcdef", &junk).is_err());
        }
        assert_eq!(
            decrypt(&key, "wx0123456789abcdef", "not base64!"),
            Err(CryptoError::Base64)
        );
    }
}
