//! `x-line-signature`: Base64(HMAC-SHA256(channel secret, raw body)).

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The header LINE signs its webhooks in.
pub const SIGNATURE_HEADER: &str = "x-line-signature";

/// Whether `signature` (the header's value) is the Base64 HMAC-SHA256 of
/// `body` under the channel `secret`. The comparison takes the same time
/// whatever the signature's content.
pub fn signature_is_valid(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&given).is_ok()
}

/// The signature LINE sends with `body` (line-sim's webhooks, tests).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_body_and_secret() {
        let s = sign(b"secret", b"{\"events\":[]}");
        assert!(signature_is_valid(b"secret", b"{\"events\":[]}", &s));
        assert!(!signature_is_valid(b"other", b"{\"events\":[]}", &s));
        assert!(!signature_is_valid(b"secret", b"{\"events\":[ ]}", &s));
        assert!(!signature_is_valid(b"secret", b"{}", "not base64!"));
    }
}
