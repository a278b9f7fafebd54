//! Field checks shared by contacts' RPCs. Each returns INVALID_ARGUMENT
//! naming the field.

use crate::error::{Error, Result};

/// A tenant id: 1 to 63 of `a-z`, `0-9`, `-`, starting with a letter or
/// digit.
pub fn tenant_id(field: &str, value: &str) -> Result<()> {
    let ok = (1..=63).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "{value:?} is not a tenant id (1 to 63 of a-z, 0-9 and '-', not starting with '-')"
            ),
        ))
    }
}

/// A LINE channel id: 1 to 32 digits.
pub fn channel_id(field: &str, value: &str) -> Result<()> {
    if (1..=32).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("{value:?} is not a LINE channel id (1 to 32 digits)"),
        ))
    }
}

/// A LINE user id: `U` followed by 32 hex digits.
pub fn line_user_id(field: &str, value: &str) -> Result<()> {
    let ok = value.len() == 33
        && value.starts_with('U')
        && value[1..].bytes().all(|b| b.is_ascii_hexdigit());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("{value:?} is not a LINE user id (U followed by 32 hex digits)"),
        ))
    }
}

/// A human-readable name: at most `max` characters, no control characters.
pub fn display_name(field: &str, value: &str, max: usize) -> Result<()> {
    if value.chars().count() > max {
        return Err(Error::invalid(
            field,
            format!("longer than {max} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "contains control characters"));
    }
    Ok(())
}

/// A required secret (never echoed back).
pub fn secret(field: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.len() > 4096 || value.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            "must be at most 4096 bytes without control characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids() {
        assert!(tenant_id("t", "acme-2").is_ok());
        for bad in ["", "-acme", "Acme", "acme_corp", &"a".repeat(64)] {
            let err = tenant_id("tenant_id", bad).unwrap_err();
            assert!(err.to_string().starts_with("tenant_id: "), "{err}");
        }
    }

    #[test]
    fn line_user_ids() {
        assert!(line_user_id("u", "U206d25c2ea6bd87c17655609a1c37cb8").is_ok());
        for bad in [
            "",
            "U123",
            "X206d25c2ea6bd87c17655609a1c37cb8",
            "U206d25c2ea6bd87c17655609a1c37cbz",
        ] {
            assert!(line_user_id("u", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_are_not_echoed() {
        let err = secret("channel_secret", "abc\u{7}def").unwrap_err();
        assert!(!err.to_string().contains("abc"), "{err}");
    }
}
