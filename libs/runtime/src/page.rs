//! Listing pages: the size a caller asked for, clamped, and opaque cursor
//! tokens (a listing's own cursor text, hex-encoded).

/// Items per page when the caller does not say.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// The most items one page holds.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// The page size to use for a request's `page_size` (0: the default).
pub fn size(requested: u32) -> i64 {
    i64::from(match requested {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    })
}

/// A cursor as an opaque token.
pub fn encode_token(cursor: &str) -> String {
    cursor.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The cursor of a token this listing issued; `None` for anything else.
pub fn decode_token(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_sizes_are_clamped() {
        assert_eq!(decode_token(&encode_token("a:b")).as_deref(), Some("a:b"));
        assert_eq!(decode_token("zz"), None);
        assert_eq!(decode_token("abc"), None);
        assert_eq!((size(0), size(5), size(5000)), (100, 5, 1000));
    }
}
