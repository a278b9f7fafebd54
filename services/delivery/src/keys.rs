//! Ids and retry keys, derived deterministically so that a retried,
//! reclaimed or replayed call carries the same `X-Line-Retry-Key` and LINE
//! answers 409 instead of sending twice.

use sha2::{Digest, Sha256};

/// A UUID (RFC 9562 version 8, "custom") made from the SHA-256 of `parts`.
fn uuid_of(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x80; // version 8
    b[8] = (b[8] & 0x3f) | 0x80; // RFC variant
    let hex = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The retry key of a request: the same tenant, channel and idempotency key
/// always give the same key, and nothing else gives it.
pub fn retry_key(tenant_id: &str, channel_id: &str, idempotency_key: &str) -> String {
    uuid_of(&["request", tenant_id, channel_id, idempotency_key])
}

/// The retry key of a call coalesced from parts with these retry keys (in
/// any order).
pub fn merged_retry_key(part_keys: &[&str]) -> String {
    let mut keys = part_keys.to_vec();
    keys.sort_unstable();
    keys.insert(0, "merged");
    uuid_of(&keys)
}

/// A job id: the channel (so the job's Redis keys share the channel's hash
/// tag) and a key derived from the request.
pub fn job_id(tenant_id: &str, channel_id: &str, idempotency_key: &str) -> String {
    let u = uuid_of(&["job", tenant_id, channel_id, idempotency_key]).replace('-', "");
    format!("{channel_id}.{}", &u[..24])
}

/// The channel a job id belongs to.
pub fn channel_of_job(job_id: &str) -> Option<&str> {
    job_id
        .split_once('.')
        .map(|(c, _)| c)
        .filter(|c| !c.is_empty())
}

/// A dead letter's id: derived from the call's parts, so the same call
/// dead-lettered twice is one row.
pub fn dead_letter_id(call_key: &str) -> String {
    let u = uuid_of(&["dead", call_key]).replace('-', "");
    format!("dl-{}", &u[..24])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_keys_are_uuids_fixed_by_the_request() {
        let k = retry_key("t", "c", "run:1:step:2");
        assert!(hibiki_line::api::is_retry_key(&k), "{k}");
        assert_eq!(k, retry_key("t", "c", "run:1:step:2"));
        assert_ne!(k, retry_key("t", "c", "run:1:step:3"));
        assert_ne!(k, retry_key("u", "c", "run:1:step:2"));
        // Fields cannot run into each other.
        assert_ne!(retry_key("ab", "c", "d"), retry_key("a", "bc", "d"));
    }

    #[test]
    fn a_merged_key_does_not_depend_on_order() {
        let (a, b) = (retry_key("t", "c", "1"), retry_key("t", "c", "2"));
        assert_eq!(merged_retry_key(&[&a, &b]), merged_retry_key(&[&b, &a]));
        assert_ne!(merged_retry_key(&[&a, &b]), a);
    }

    #[test]
    fn job_ids_carry_their_channel() {
        let id = job_id("t", "1000000001", "k");
        assert_eq!(channel_of_job(&id), Some("1000000001"));
        assert_eq!(id, job_id("t", "1000000001", "k"));
        assert_eq!(channel_of_job("nodot"), None);
    }
}
