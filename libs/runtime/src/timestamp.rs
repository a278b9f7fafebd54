//! Conversions between chrono's UTC times (what sqlx reads from
//! `timestamptz`) and protobuf's `Timestamp`.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

/// A UTC time as a protobuf `Timestamp`.
pub fn to_proto(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// An optional UTC time as an optional `Timestamp`.
pub fn to_proto_opt(t: Option<DateTime<Utc>>) -> Option<Timestamp> {
    t.map(to_proto)
}

/// A protobuf `Timestamp` as a UTC time; `None` when out of range.
pub fn from_proto(t: &Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

/// Milliseconds since the Unix epoch as a UTC time; `None` when out of range.
pub fn from_millis(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_to_the_microsecond() {
        let t = DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap();
        assert_eq!(from_proto(&to_proto(t)), Some(t));
    }

    #[test]
    fn negative_nanos_are_rejected() {
        let bad = Timestamp {
            seconds: 1,
            nanos: -1,
        };
        assert_eq!(from_proto(&bad), None);
    }
}
