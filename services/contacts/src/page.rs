//! Cursor pagination: a listing ordered by a text key continues after the
//! last key of the previous page. The token is that key, hex-encoded, so
//! callers treat it as opaque.

use hibiki_proto::common::v1::PageRequest;

use crate::error::{Error, Result};

/// Items per page when the caller does not say.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// The most items one page holds.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// A decoded page request.
#[derive(Debug, Clone)]
pub struct Page {
    size: u32,
    after: String,
}

impl Page {
    /// Decodes `page` (absent means the first page at the default size).
    /// `field` names the request's page field in errors.
    pub fn from_request(page: Option<&PageRequest>, field: &str) -> Result<Self> {
        let (size, token) = match page {
            Some(p) => (p.page_size, p.page_token.as_str()),
            None => (0, ""),
        };
        let size = match size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = decode(token).ok_or_else(|| {
            Error::invalid(
                format!("{field}.page_token"),
                "not a token issued by this listing",
            )
        })?;
        Ok(Self { size, after })
    }

    /// The key the page starts after ("" for the first page).
    pub fn after(&self) -> &str {
        &self.after
    }

    /// Rows to fetch: one more than the page holds, to learn whether another
    /// page follows.
    pub fn fetch_limit(&self) -> i64 {
        i64::from(self.size) + 1
    }

    /// Cuts the fetched rows to the page and returns the next token ("" when
    /// this is the last page).
    pub fn split<T>(&self, mut rows: Vec<T>, key: impl Fn(&T) -> String) -> (Vec<T>, String) {
        if rows.len() > self.size as usize {
            rows.truncate(self.size as usize);
            let next = rows.last().map(|r| encode(&key(r))).unwrap_or_default();
            (rows, next)
        } else {
            (rows, String::new())
        }
    }
}

fn encode(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode(token: &str) -> Option<String> {
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
    fn tokens_round_trip_and_garbage_is_rejected() {
        assert_eq!(decode(&encode("U123")).as_deref(), Some("U123"));
        assert_eq!(decode("").as_deref(), Some(""));
        assert!(decode("zz").is_none());
        assert!(decode("abc").is_none());
        let err = Page::from_request(
            Some(&PageRequest {
                page_size: 10,
                page_token: "not hex".into(),
            }),
            "page",
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("page.page_token:"), "{err}");
    }

    #[test]
    fn a_full_page_points_at_the_next() {
        let page = Page::from_request(
            Some(&PageRequest {
                page_size: 2,
                page_token: String::new(),
            }),
            "page",
        )
        .unwrap();
        let (rows, next) = page.split(vec!["a", "b", "c"], |s| s.to_string());
        assert_eq!(rows, ["a", "b"]);
        assert_eq!(decode(&next).as_deref(), Some("b"));
        let (rows, next) = page.split(vec!["a"], |s| s.to_string());
        assert_eq!(rows, ["a"]);
        assert_eq!(next, "");
    }
}
