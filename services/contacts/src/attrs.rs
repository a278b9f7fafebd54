//! Typed contact attributes and tags: how they are checked, held in Rust and
//! stored in PostgreSQL.
//!
//! Attributes live in a `jsonb` object per contact. Strings, numbers and
//! booleans are stored as the JSON value itself; a timestamp, which JSON
//! lacks, as `{"ts": <microseconds since the epoch>}`. The SQL evaluator in
//! `rules` reads them back with the same conventions.

use std::collections::BTreeMap;

use hibiki_proto::common::v1::{Value, value::Kind};
use prost_types::Timestamp;
use serde_json::json;

use crate::error::{Error, Result};

/// The longest string attribute value, in bytes.
pub const MAX_STRING_BYTES: usize = 1024;
/// The longest attribute key or tag, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// The most attributes one contact holds.
pub const MAX_ATTRIBUTES: usize = 256;
/// The most tags one contact holds.
pub const MAX_TAGS: usize = 1000;

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// A string.
    Str(String),
    /// A finite number.
    Num(f64),
    /// A boolean.
    Bool(bool),
    /// A timestamp, in microseconds since the Unix epoch.
    Ts(i64),
}

/// The type of an attribute value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrType {
    /// String.
    Str,
    /// Number.
    Num,
    /// Boolean.
    Bool,
    /// Timestamp.
    Ts,
}

impl AttrType {
    /// Lowercase name for messages.
    pub fn name(self) -> &'static str {
        match self {
            AttrType::Str => "string",
            AttrType::Num => "number",
            AttrType::Bool => "bool",
            AttrType::Ts => "timestamp",
        }
    }
}

impl AttrValue {
    /// The value's type.
    pub fn kind(&self) -> AttrType {
        match self {
            AttrValue::Str(_) => AttrType::Str,
            AttrValue::Num(_) => AttrType::Num,
            AttrValue::Bool(_) => AttrType::Bool,
            AttrValue::Ts(_) => AttrType::Ts,
        }
    }

    /// Reads a protobuf value; INVALID_ARGUMENT naming `field` when it is
    /// unset, a string too long, a number not finite, or a timestamp out of
    /// range.
    pub fn from_proto(field: &str, value: Option<&Value>) -> Result<Self> {
        let Some(kind) = value.and_then(|v| v.kind.as_ref()) else {
            return Err(Error::invalid(field, "a value is required"));
        };
        Ok(match kind {
            Kind::StringValue(s) => {
                if s.len() > MAX_STRING_BYTES {
                    return Err(Error::invalid(
                        field,
                        format!("a string value is at most {MAX_STRING_BYTES} bytes"),
                    ));
                }
                AttrValue::Str(s.clone())
            }
            Kind::NumberValue(n) => {
                if !n.is_finite() {
                    return Err(Error::invalid(field, "a number must be finite"));
                }
                AttrValue::Num(*n)
            }
            Kind::BoolValue(b) => AttrValue::Bool(*b),
            Kind::TimestampValue(t) => {
                if !(0..1_000_000_000).contains(&t.nanos) {
                    return Err(Error::invalid(field, "timestamp nanos out of range"));
                }
                let micros = t
                    .seconds
                    .checked_mul(1_000_000)
                    .and_then(|s| s.checked_add(i64::from(t.nanos / 1000)))
                    .ok_or_else(|| Error::invalid(field, "timestamp out of range"))?;
                AttrValue::Ts(micros)
            }
        })
    }

    /// The protobuf value.
    pub fn to_proto(&self) -> Value {
        let kind = match self {
            AttrValue::Str(s) => Kind::StringValue(s.clone()),
            AttrValue::Num(n) => Kind::NumberValue(*n),
            AttrValue::Bool(b) => Kind::BoolValue(*b),
            AttrValue::Ts(us) => Kind::TimestampValue(Timestamp {
                seconds: us.div_euclid(1_000_000),
                nanos: (us.rem_euclid(1_000_000) * 1000) as i32,
            }),
        };
        Value { kind: Some(kind) }
    }

    /// The stored JSON form.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            AttrValue::Str(s) => json!(s),
            AttrValue::Num(n) => json!(n),
            AttrValue::Bool(b) => json!(b),
            AttrValue::Ts(us) => json!({ "ts": us }),
        }
    }

    /// Reads the stored JSON form; `None` for anything else.
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        match v {
            serde_json::Value::String(s) => Some(AttrValue::Str(s.clone())),
            serde_json::Value::Number(n) => n.as_f64().map(AttrValue::Num),
            serde_json::Value::Bool(b) => Some(AttrValue::Bool(*b)),
            serde_json::Value::Object(o) => o.get("ts").and_then(|t| t.as_i64()).map(AttrValue::Ts),
            _ => None,
        }
    }
}

/// Attributes by key.
pub type Attributes = BTreeMap<String, AttrValue>;

/// Reads a stored attributes object.
pub fn attributes_from_json(v: &serde_json::Value) -> Attributes {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| AttrValue::from_json(v).map(|a| (k.clone(), a)))
                .collect()
        })
        .unwrap_or_default()
}

/// The stored form of attributes.
pub fn attributes_to_json(a: &Attributes) -> serde_json::Value {
    serde_json::Value::Object(a.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
}

/// A tag or attribute key: 1 to 64 characters, no control characters, no
/// leading or trailing whitespace.
pub fn check_name(field: &str, name: &str) -> Result<()> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(Error::invalid(
            field,
            format!("must be 1 to {MAX_NAME_CHARS} characters"),
        ));
    }
    if name.chars().any(char::is_control) || name.trim() != name {
        return Err(Error::invalid(
            field,
            "must not contain control characters or surrounding whitespace",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_json_and_proto() {
        for v in [
            AttrValue::Str("tokyo".into()),
            AttrValue::Num(0.1 + 0.2),
            AttrValue::Num(-1e300),
            AttrValue::Bool(true),
            AttrValue::Ts(1_700_000_000_123_456),
            AttrValue::Ts(-5),
        ] {
            assert_eq!(AttrValue::from_json(&v.to_json()), Some(v.clone()));
            assert_eq!(AttrValue::from_proto("v", Some(&v.to_proto())).unwrap(), v);
        }
    }

    #[test]
    fn bad_values_name_the_field() {
        let nan = Value {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        let err = AttrValue::from_proto("set.age", Some(&nan)).unwrap_err();
        assert!(err.to_string().starts_with("set.age: "), "{err}");
        let err = AttrValue::from_proto("set.age", None).unwrap_err();
        assert!(err.to_string().starts_with("set.age: "), "{err}");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("tags[0]", "campaign:spring").is_ok());
        for bad in ["", " padded", "tab\tbed", &"x".repeat(65)] {
            assert!(check_name("tags[0]", bad).is_err(), "{bad:?}");
        }
    }
}
