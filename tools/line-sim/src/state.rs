//! What line-sim remembers: channels and their tokens, rate-limit buckets,
//! retry keys, reply tokens, rich menus and who has which, faults, and the
//! ledger of everything it accepted.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hibiki_line::api::{Endpoint, Limit};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A channel line-sim plays LINE for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimChannel {
    /// LINE's channel id.
    pub channel_id: String,
    /// The channel access token callers send as `Authorization: Bearer`.
    pub access_token: String,
    /// The channel secret that signs webhooks.
    pub secret: String,
}

/// Injected faults. Each request to an affected endpoint draws once: with
/// `error_rate` it is answered 500 or 503, with `timeout_rate` it is never
/// answered (held for the simulator's timeout hold, the caller gives up
/// first). A faulted request was processed first (LINE did the work, then
/// the answer was lost) with `processed_rate`, so a caller that retries
/// without a retry key sends twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Fraction of requests answered 500 or 503 (0 to 1).
    pub error_rate: f64,
    /// Fraction of requests never answered (0 to 1).
    pub timeout_rate: f64,
    /// Fraction of faulted requests processed before the fault (0 to 1).
    pub processed_rate: f64,
    /// Extra latency before every answer, drawn uniformly in
    /// `[latency_min_ms, latency_max_ms]`.
    pub latency_min_ms: u64,
    /// See `latency_min_ms`.
    pub latency_max_ms: u64,
    /// The endpoints faults apply to; empty means all.
    pub endpoints: Vec<Endpoint>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            timeout_rate: 0.0,
            processed_rate: 0.5,
            latency_min_ms: 0,
            latency_max_ms: 0,
            endpoints: Vec::new(),
        }
    }
}

impl Faults {
    /// Why these faults are not usable, if they are not.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("error_rate", self.error_rate),
            ("timeout_rate", self.timeout_rate),
            ("processed_rate", self.processed_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name}: must be between 0 and 1, got {v}"));
            }
        }
        if self.error_rate + self.timeout_rate > 1.0 {
            return Err("error_rate + timeout_rate: must not exceed 1".into());
        }
        if self.latency_min_ms > self.latency_max_ms {
            return Err("latency_min_ms: must not exceed latency_max_ms".into());
        }
        Ok(())
    }

    fn applies_to(&self, endpoint: Endpoint) -> bool {
        self.endpoints.is_empty() || self.endpoints.contains(&endpoint)
    }
}

/// A fault drawn for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this 5xx status.
    Error(u16),
    /// Never answer.
    Timeout,
}

/// What was drawn for one request: the fault, whether the request is
/// processed before it, and the latency to add.
#[derive(Debug, Clone, Copy)]
pub struct Draw {
    pub fault: Option<Fault>,
    pub processed: bool,
    pub latency: Duration,
}

/// One message LINE accepted for one recipient.
#[derive(Debug, Clone, Serialize)]
pub struct SentMessage {
    /// Position in the ledger (from 1).
    pub seq: u64,
    /// When it was accepted (ms since the epoch).
    pub at_ms: u64,
    pub channel_id: String,
    /// The endpoint's name (`push`, `multicast`, `reply`, `broadcast`,
    /// `narrowcast`).
    pub endpoint: Endpoint,
    /// The user (or group, room); `*` for a broadcast or narrowcast.
    pub recipient: String,
    /// The request's `X-Line-Retry-Key`, when it had one.
    pub retry_key: Option<String>,
    /// The request's `x-line-request-id`.
    pub request_id: String,
    /// The message objects.
    pub messages: Value,
    /// The `traceparent` header the request carried.
    pub traceparent: Option<String>,
}

/// One change of a user's rich menu.
#[derive(Debug, Clone, Serialize)]
pub struct MenuChange {
    pub seq: u64,
    pub at_ms: u64,
    pub channel_id: String,
    pub user_id: String,
    /// The menu linked; `None` for an unlink.
    pub rich_menu_id: Option<String>,
    pub endpoint: Endpoint,
    pub request_id: String,
    pub traceparent: Option<String>,
}

/// A retry key LINE accepted.
#[derive(Debug, Clone)]
pub struct AcceptedKey {
    pub request_id: String,
    pub at: Instant,
    pub sent_messages: Vec<Value>,
}

/// A reply token handed out with a webhook.
#[derive(Debug, Clone)]
struct ReplyToken {
    channel_id: String,
    user_id: String,
    issued: Instant,
    used: bool,
}

/// A token bucket: `limit.requests` of burst, refilled at the limit's rate.
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// line-sim's settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The channels it knows.
    pub channels: Vec<SimChannel>,
    /// Rate limits that differ from LINE's (per channel and endpoint).
    pub limits: BTreeMap<Endpoint, Limit>,
    /// Faults from the start.
    pub faults: Faults,
    /// How long a retry key is remembered (LINE: 24 h).
    pub retry_key_ttl: Duration,
    /// How long a reply token stays usable.
    pub reply_token_ttl: Duration,
    /// How long a request drawn to time out is held before the connection
    /// is dropped.
    pub timeout_hold: Duration,
    /// Messages each channel may send a month (push, multicast); `None`:
    /// no limit.
    pub monthly_quota: Option<u64>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            channels: Vec::new(),
            limits: BTreeMap::new(),
            faults: Faults::default(),
            retry_key_ttl: hibiki_line::api::RETRY_KEY_TTL,
            reply_token_ttl: Duration::from_secs(60),
            timeout_hold: Duration::from_secs(60),
            monthly_quota: None,
        }
    }
}

/// Everything line-sim holds, behind one lock.
#[derive(Debug)]
pub struct State {
    pub config: SimConfig,
    channels: HashMap<String, SimChannel>,
    by_token: HashMap<String, String>,
    buckets: HashMap<(String, Endpoint), Bucket>,
    /// Every request is answered 429 until then (a 429 burst).
    throttle_until: Option<Instant>,
    retry_keys: HashMap<(String, String), AcceptedKey>,
    reply_tokens: HashMap<String, ReplyToken>,
    /// Rich menus per channel: id → the object as created.
    pub rich_menus: HashMap<String, BTreeMap<String, Value>>,
    /// Aliases per channel: alias → rich menu id.
    pub aliases: HashMap<String, BTreeMap<String, String>>,
    /// Each user's linked rich menu.
    pub user_menus: HashMap<(String, String), String>,
    /// Narrowcasts accepted: request id → (accepted, recipients).
    pub narrowcasts: HashMap<String, u64>,
    /// Messages counted against each channel's monthly quota.
    pub usage: HashMap<String, u64>,
    pub sent: Vec<SentMessage>,
    pub menu_changes: Vec<MenuChange>,
    /// Answers per endpoint and status (0: no answer, a timeout fault).
    pub counts: BTreeMap<Endpoint, BTreeMap<u16, u64>>,
    /// Storms started over the admin API, by id.
    pub storms: BTreeMap<u64, crate::storm::StormReport>,
    /// What became of each admin storm's accepted webhooks, kept up to
    /// date as the ledger grows.
    pub storm_chains: BTreeMap<u64, crate::storm::StormChain>,
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fresh id in UUID form (LINE's request ids look like this).
pub fn new_request_id() -> String {
    let b: [u8; 16] = rand::rng().random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A fresh rich menu id, as LINE makes them (`richmenu-` and 32 hex).
pub fn new_rich_menu_id() -> String {
    let b: [u8; 16] = rand::rng().random();
    format!("richmenu-{}", hex::encode(b))
}

/// Room made up front in the ledger and the per-user maps: a storm's worth.
/// Growing a collection of a hundred thousand entries copies (or rehashes)
/// all of it while every request waits on the one lock: tens of
/// milliseconds in which line-sim answers nothing, which is line-sim's own
/// cost, not LINE's nor the caller's. The room is address space until used.
const ROOM: usize = 1 << 18;

impl State {
    /// The state of a fresh simulator.
    pub fn new(config: SimConfig) -> Self {
        let mut state = Self {
            channels: HashMap::new(),
            by_token: HashMap::new(),
            buckets: HashMap::new(),
            throttle_until: None,
            retry_keys: HashMap::with_capacity(ROOM),
            reply_tokens: HashMap::with_capacity(ROOM),
            rich_menus: HashMap::new(),
            aliases: HashMap::new(),
            user_menus: HashMap::with_capacity(ROOM),
            narrowcasts: HashMap::new(),
            usage: HashMap::new(),
            sent: Vec::with_capacity(ROOM),
            menu_changes: Vec::with_capacity(ROOM),
            counts: BTreeMap::new(),
            storms: BTreeMap::new(),
            storm_chains: BTreeMap::new(),
            config,
        };
        for c in state.config.channels.clone() {
            state.put_channel(c);
        }
        state
    }

    /// Adds or replaces a channel.
    pub fn put_channel(&mut self, channel: SimChannel) {
        if let Some(old) = self.channels.get(&channel.channel_id) {
            self.by_token.remove(&old.access_token);
        }
        self.by_token
            .insert(channel.access_token.clone(), channel.channel_id.clone());
        self.channels.insert(channel.channel_id.clone(), channel);
    }

    /// The channels, by id.
    pub fn channels(&self) -> Vec<SimChannel> {
        let mut list: Vec<SimChannel> = self.channels.values().cloned().collect();
        list.sort_by(|a, b| a.channel_id.cmp(&b.channel_id));
        list
    }

    /// The channel `channel_id`.
    pub fn channel(&self, channel_id: &str) -> Option<&SimChannel> {
        self.channels.get(channel_id)
    }

    /// The channel whose access token is `token`.
    pub fn channel_of_token(&self, token: &str) -> Option<String> {
        self.by_token.get(token).cloned()
    }

    /// The rate limit of `endpoint`.
    pub fn limit(&self, endpoint: Endpoint) -> Limit {
        self.config
            .limits
            .get(&endpoint)
            .copied()
            .unwrap_or_else(|| endpoint.default_limit())
    }

    /// Answers 429 to every request for `d`.
    pub fn throttle_for(&mut self, d: Duration) {
        self.throttle_until = Some(Instant::now() + d);
    }

    /// Takes one request from the channel's bucket for `endpoint`; false
    /// when the channel is over its limit (or in a 429 burst).
    pub fn take(&mut self, channel_id: &str, endpoint: Endpoint, now: Instant) -> bool {
        if self.throttle_until.is_some_and(|t| now < t) {
            return false;
        }
        let limit = self.limit(endpoint);
        let capacity = f64::from(limit.requests);
        let bucket = self
            .buckets
            .entry((channel_id.to_owned(), endpoint))
            .or_insert(Bucket {
                tokens: capacity,
                at: now,
            });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * limit.rate();
        bucket.tokens = (bucket.tokens + refill).min(capacity);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Draws this request's fault and latency.
    pub fn draw(&self, endpoint: Endpoint) -> Draw {
        let f = &self.config.faults;
        let mut rng = rand::rng();
        let latency = if f.latency_max_ms > 0 {
            Duration::from_millis(rng.random_range(f.latency_min_ms..=f.latency_max_ms))
        } else {
            Duration::ZERO
        };
        if !f.applies_to(endpoint) {
            return Draw {
                fault: None,
                processed: false,
                latency,
            };
        }
        let roll: f64 = rng.random();
        let fault = if roll < f.error_rate {
            Some(Fault::Error(if rng.random_bool(0.5) { 500 } else { 503 }))
        } else if roll < f.error_rate + f.timeout_rate {
            Some(Fault::Timeout)
        } else {
            None
        };
        Draw {
            fault,
            processed: fault.is_some() && rng.random_bool(f.processed_rate),
            latency,
        }
    }

    /// The accepted request of a retry key still remembered.
    pub fn accepted_key(&mut self, channel_id: &str, key: &str) -> Option<AcceptedKey> {
        let ttl = self.config.retry_key_ttl;
        let k = (channel_id.to_owned(), key.to_owned());
        match self.retry_keys.get(&k) {
            Some(a) if a.at.elapsed() < ttl => Some(a.clone()),
            Some(_) => {
                self.retry_keys.remove(&k);
                None
            }
            None => None,
        }
    }

    /// Remembers an accepted retry key.
    pub fn accept_key(&mut self, channel_id: &str, key: &str, accepted: AcceptedKey) {
        // Forget expired keys now and then, so memory follows the window.
        if self.retry_keys.len() % 4096 == 4095 {
            let ttl = self.config.retry_key_ttl;
            self.retry_keys.retain(|_, a| a.at.elapsed() < ttl);
        }
        self.retry_keys
            .insert((channel_id.to_owned(), key.to_owned()), accepted);
    }

    /// Hands out a reply token for a webhook event of `user_id`.
    pub fn issue_reply_token(&mut self, channel_id: &str, user_id: &str) -> String {
        let b: [u8; 16] = rand::rng().random();
        let token = hex::encode(b);
        self.reply_tokens.insert(
            token.clone(),
            ReplyToken {
                channel_id: channel_id.to_owned(),
                user_id: user_id.to_owned(),
                issued: Instant::now(),
                used: false,
            },
        );
        token
    }

    /// Uses a reply token of `channel_id`: the user it was issued for, or
    /// `None` when it is unknown, used, expired or another channel's.
    pub fn use_reply_token(&mut self, channel_id: &str, token: &str) -> Option<String> {
        let ttl = self.config.reply_token_ttl;
        let t = self.reply_tokens.get_mut(token)?;
        if t.used || t.channel_id != channel_id || t.issued.elapsed() >= ttl {
            return None;
        }
        t.used = true;
        Some(t.user_id.clone())
    }

    /// Records a message accepted for `recipient`.
    pub fn record_sent(&mut self, mut m: SentMessage) {
        m.seq = self.sent.len() as u64 + 1;
        for chain in self.storm_chains.values_mut() {
            chain.message(&m.recipient, m.at_ms);
        }
        self.sent.push(m);
    }

    /// Links (or with `None` unlinks) a user's rich menu.
    pub fn record_menu(&mut self, mut change: MenuChange) {
        change.seq = self.menu_changes.len() as u64 + 1;
        if change.rich_menu_id.is_some() {
            for chain in self.storm_chains.values_mut() {
                chain.link(&change.user_id, change.at_ms);
            }
        }
        let key = (change.channel_id.clone(), change.user_id.clone());
        match &change.rich_menu_id {
            Some(menu) => {
                self.user_menus.insert(key, menu.clone());
            }
            None => {
                self.user_menus.remove(&key);
            }
        }
        self.menu_changes.push(change);
    }

    /// Counts an answer.
    pub fn count(&mut self, endpoint: Endpoint, status: u16) {
        *self
            .counts
            .entry(endpoint)
            .or_default()
            .entry(status)
            .or_default() += 1;
    }

    /// Forgets everything sent, counted and remembered (channels, limits and
    /// faults stay).
    pub fn reset(&mut self) {
        self.buckets.clear();
        self.throttle_until = None;
        self.retry_keys.clear();
        self.reply_tokens.clear();
        self.user_menus.clear();
        self.narrowcasts.clear();
        self.usage.clear();
        self.sent.clear();
        self.menu_changes.clear();
        self.counts.clear();
        self.storm_chains.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let mut config = SimConfig::default();
        config.limits.insert(Endpoint::Push, Limit::per_second(10));
        let mut s = State::new(config);
        let t0 = Instant::now();
        assert!((0..10).all(|_| s.take("c", Endpoint::Push, t0)));
        assert!(!s.take("c", Endpoint::Push, t0));
        // Another channel and another endpoint have their own buckets.
        assert!(s.take("d", Endpoint::Push, t0));
        assert!(s.take("c", Endpoint::Multicast, t0));
        // A tenth of a second refills one request.
        assert!(s.take("c", Endpoint::Push, t0 + Duration::from_millis(100)));
        assert!(!s.take("c", Endpoint::Push, t0 + Duration::from_millis(100)));
    }

    #[test]
    fn reply_tokens_are_single_use_and_per_channel() {
        let mut s = State::new(SimConfig::default());
        let t = s.issue_reply_token("c", "U1");
        assert_eq!(s.use_reply_token("d", &t), None);
        assert_eq!(s.use_reply_token("c", &t).as_deref(), Some("U1"));
        assert_eq!(s.use_reply_token("c", &t), None);
        assert_eq!(s.use_reply_token("c", "nope"), None);
    }

    #[test]
    fn faults_are_checked() {
        let mut f = Faults {
            error_rate: 0.7,
            timeout_rate: 0.4,
            ..Faults::default()
        };
        assert!(f.check().is_err());
        f.timeout_rate = 0.3;
        assert!(f.check().is_ok());
        f.latency_min_ms = 5;
        assert!(f.check().is_err());
    }
}
