//! Sign-in sessions every replica can read: the session cookie carries the
//! tenant, the operator's token and when the session ends, signed with
//! HMAC-SHA256 under `HIBIKI_DASHBOARD_SESSION_KEY`, so that a dashboard
//! behind a load balancer works whichever replica answers. The cookie is
//! HttpOnly and SameSite=Strict: the page's scripts never see it. It holds
//! nothing the operator did not type in; signing keeps anyone from changing
//! the tenant or stretching the end. Without a configured key each process
//! makes its own (one replica: sign-ins end when it restarts).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hibiki_runtime::config::Secret;
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The shortest session key accepted.
pub const MIN_KEY_LEN: usize = 32;

/// Issues and opens session cookies.
pub struct Sessions {
    key: Vec<u8>,
    ttl: Duration,
}

/// A signed-in operator.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// The tenant the operator signed in to.
    pub tenant: String,
    /// The operator's token, passed on with every backend call.
    pub token: Secret,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    t: String,
    k: String,
    e: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Sessions {
    /// Sessions lasting `ttl`, signed with `key` (or a key of this process's
    /// own when none is configured).
    pub fn new(key: Option<&Secret>, ttl: Duration) -> Self {
        let key = match key {
            Some(k) => k.expose().as_bytes().to_vec(),
            None => rand::rng().random::<[u8; 32]>().to_vec(),
        };
        Self { key, ttl }
    }

    /// How long a session lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn mac(&self, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(payload);
        mac
    }

    /// The cookie value of a new session.
    pub fn issue(&self, session: &Session) -> String {
        self.issue_at(session, now())
    }

    fn issue_at(&self, session: &Session, now: u64) -> String {
        let claims = Claims {
            t: session.tenant.clone(),
            k: session.token.expose().to_owned(),
            e: now + self.ttl.as_secs(),
        };
        let payload =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let signature =
            URL_SAFE_NO_PAD.encode(self.mac(payload.as_bytes()).finalize().into_bytes());
        format!("{payload}.{signature}")
    }

    /// The session a cookie value carries, if it is signed with this key and
    /// has not ended.
    pub fn open(&self, value: &str) -> Option<Session> {
        self.open_at(value, now())
    }

    fn open_at(&self, value: &str, now: u64) -> Option<Session> {
        let (payload, signature) = value.split_once('.')?;
        let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
        // `verify_slice` compares in constant time.
        self.mac(payload.as_bytes()).verify_slice(&signature).ok()?;
        let claims: Claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        (claims.e > now).then(|| Session {
            tenant: claims.t,
            token: Secret::new(claims.k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acme() -> Session {
        Session {
            tenant: "acme".into(),
            token: Secret::new("operator-acme-token-0123456789"),
        }
    }

    #[test]
    fn a_session_opens_on_every_replica_with_the_key_until_it_ends() {
        let key = Secret::new("k".repeat(MIN_KEY_LEN));
        let one = Sessions::new(Some(&key), Duration::from_secs(3600));
        let two = Sessions::new(Some(&key), Duration::from_secs(3600));
        let cookie = one.issue_at(&acme(), 1_000);
        assert_eq!(two.open_at(&cookie, 1_001), Some(acme()));
        assert_eq!(two.open_at(&cookie, 1_000 + 3600), None, "ended");
        let stranger = Sessions::new(None, Duration::from_secs(3600));
        assert_eq!(stranger.open_at(&cookie, 1_001), None, "another key");
    }

    #[test]
    fn a_changed_cookie_opens_nothing() {
        let sessions = Sessions::new(None, Duration::from_secs(3600));
        let cookie = sessions.issue_at(&acme(), 1_000);
        let (payload, signature) = cookie.split_once('.').unwrap();
        let forged = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&Claims {
                t: "globex".into(),
                k: "operator-acme-token-0123456789".into(),
                e: 9_999_999_999,
            })
            .unwrap(),
        );
        assert_eq!(
            sessions.open_at(&format!("{forged}.{signature}"), 1_001),
            None
        );
        assert_eq!(sessions.open_at(payload, 1_001), None);
        assert_eq!(sessions.open_at("", 1_001), None);
        assert_eq!(sessions.open_at("a.b", 1_001), None);
    }
}
