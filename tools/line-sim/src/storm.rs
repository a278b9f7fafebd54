//! Webhook storms: signed LINE webhook bodies for many users at a set rate,
//! posted to a gateway as LINE would post them.
//!
//! User `i` of a storm is `U` followed by `first_user + i` in 32 hex digits,
//! so two storms (or a storm and a test) agree on who is who. Each webhook
//! carries one event of one user; the kinds cycle over the users (user `i`
//! gets `kinds[i % kinds.len()]`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hibiki_line::signature::{SIGNATURE_HEADER, sign};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::state::now_ms;

/// The kinds of event a storm sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A friend added the account (`follow`).
    Follow,
    /// A friend blocked the account (`unfollow`).
    Unfollow,
    /// A text message.
    Text,
    /// A tap on a button carrying postback data.
    Postback,
}

/// What a storm sends, where and how fast.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct StormSpec {
    /// The gateway's webhook URL for the channel, e.g.
    /// `http://127.0.0.1:8080/line/webhook/1000000001`.
    pub url: String,
    /// The channel the webhooks are for.
    pub channel_id: String,
    /// The channel secret the bodies are signed with (taken from the
    /// simulator's channel when empty and the storm runs in line-sim).
    pub secret: String,
    /// How many users (one webhook each).
    pub users: u64,
    /// The first user's number.
    pub first_user: u64,
    /// Webhooks a second.
    pub rate: f64,
    /// The event kinds, cycled over the users.
    pub kinds: Vec<EventKind>,
    /// A postback's data.
    pub postback_data: String,
    /// A text message's text.
    pub text: String,
    /// Webhooks in flight at most.
    pub connections: usize,
}

impl Default for StormSpec {
    fn default() -> Self {
        Self {
            url: String::new(),
            channel_id: String::new(),
            secret: String::new(),
            users: 100,
            first_user: 0,
            rate: 100.0,
            kinds: vec![EventKind::Postback],
            postback_data: "action=join&campaign=spring".into(),
            text: "hello".into(),
            connections: 32,
        }
    }
}

impl StormSpec {
    /// Why this storm cannot run, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if !self.url.starts_with("http://") && !self.url.starts_with("https://") {
            return Err(format!("url: must be an http(s) URL, got {:?}", self.url));
        }
        if self.secret.is_empty() {
            return Err("secret: must not be empty".into());
        }
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            return Err(format!("rate: must be above 0, got {}", self.rate));
        }
        if self.kinds.is_empty() {
            return Err("kinds: must name at least one kind".into());
        }
        if self.connections == 0 {
            return Err("connections: must be at least 1".into());
        }
        Ok(())
    }
}

/// The user id of storm user `n`.
pub fn user_id(n: u64) -> String {
    format!("U{n:032x}")
}

/// A fresh ULID (what LINE's `webhookEventId`s are): 48 bits of
/// milliseconds and 80 random bits in Crockford's base 32.
pub fn ulid() -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let random: u128 = rand::rng().random::<u128>() & ((1u128 << 80) - 1);
    let value = (u128::from(now_ms()) << 80) | random;
    (0..26)
        .rev()
        .map(|i| ALPHABET[((value >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// One webhook event of `kind` for `user`, with `reply_token` where LINE
/// gives one.
pub fn event(spec: &StormSpec, kind: EventKind, user: &str, reply_token: &str) -> Value {
    let mut e = json!({
        "mode": "active",
        "timestamp": now_ms(),
        "webhookEventId": ulid(),
        "deliveryContext": {"isRedelivery": false},
        "source": {"type": "user", "userId": user},
    });
    match kind {
        EventKind::Follow => {
            e["type"] = json!("follow");
            e["replyToken"] = json!(reply_token);
            e["follow"] = json!({"isUnblocked": false});
        }
        EventKind::Unfollow => e["type"] = json!("unfollow"),
        EventKind::Text => {
            e["type"] = json!("message");
            e["replyToken"] = json!(reply_token);
            let id: u64 = rand::rng().random_range(10_000_000_000_000..99_999_999_999_999);
            e["message"] = json!({"id": id.to_string(), "type": "text", "text": spec.text, "quoteToken": ulid()});
        }
        EventKind::Postback => {
            e["type"] = json!("postback");
            e["replyToken"] = json!(reply_token);
            e["postback"] = json!({"data": spec.postback_data});
        }
    }
    e
}

/// The bot's own user id for a channel (the webhook's `destination`).
pub fn destination(channel_id: &str) -> String {
    let h = channel_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("U{h:016x}{:016x}", h.rotate_left(17))
}

/// How a storm went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StormReport {
    /// Webhooks posted.
    pub sent: u64,
    /// Webhooks the gateway answered 200.
    pub accepted: u64,
    /// Answers by status (`"200"`, `"503"`, …; `"error"` when none came).
    pub statuses: std::collections::BTreeMap<String, u64>,
    /// Seconds from the first post to the last answer.
    pub seconds: f64,
    /// Webhooks a second achieved.
    pub rate: f64,
    /// Median answer time, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile answer time, in milliseconds.
    pub p99_ms: f64,
    /// Whether the storm is over.
    pub done: bool,
    /// What became of the accepted webhooks (filled in by line-sim's admin
    /// API from its ledger when the report is read).
    #[serde(default)]
    pub chain: Option<ChainReport>,
}

/// What the mesh did with a storm's accepted webhooks, as line-sim saw it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ChainReport {
    /// Users whose webhook was accepted.
    pub users: u64,
    /// Of them, users whose rich menu was linked after their webhook.
    pub linked: u64,
    /// Of them, users sent at least one message after their webhook.
    pub messaged: u64,
    /// Of them, users sent more than one.
    pub messaged_twice: u64,
    /// Webhook posted → rich-menu link accepted, in milliseconds.
    pub link_p50_ms: f64,
    pub link_p99_ms: f64,
    pub link_max_ms: f64,
    /// Links accepted a second, between the 10th and 90th percentile of
    /// link times.
    pub link_rate: f64,
}

/// What became of one storm's accepted webhooks, kept up to date entry by
/// entry as the ledger grows (`State::record_menu`, `State::record_sent`),
/// so that reading a storm's progress never walks the ledger. A storm's
/// progress is read four times a second while it runs, under the one lock
/// every LINE call takes.
#[derive(Debug, Default)]
pub struct StormChain {
    /// Each accepted user, and when their webhook was posted (ms).
    posted: HashMap<String, u64>,
    /// Users linked to a rich menu at or after their post.
    linked: HashSet<String>,
    /// The link times, and webhook → link latencies, as they came.
    link_at: Vec<u64>,
    latencies: Vec<u64>,
    /// Messages each posted user got at or after their post.
    messages: HashMap<String, u32>,
    messaged_twice: u64,
    /// While the storm posts: what the ledger recorded for users not yet
    /// known to be accepted. The mesh may act on a webhook before the
    /// generator has read the gateway's answer.
    early: HashMap<String, Vec<Early>>,
    /// Every accepted post is in (early entries are no longer kept).
    closed: bool,
}

#[derive(Debug, Clone, Copy)]
enum Early {
    Link(u64),
    Message(u64),
}

impl StormChain {
    /// A user's webhook was accepted; it was posted at `at` (ms).
    pub fn post(&mut self, user: &str, at: u64) {
        self.posted.insert(user.to_owned(), at);
        for early in self.early.remove(user).unwrap_or_default() {
            match early {
                Early::Link(t) => self.link(user, t),
                Early::Message(t) => self.message(user, t),
            }
        }
    }

    /// The ledger recorded a rich menu linked to `user` at `at`.
    pub fn link(&mut self, user: &str, at: u64) {
        match self.posted.get(user) {
            Some(&posted) if at >= posted && !self.linked.contains(user) => {
                self.linked.insert(user.to_owned());
                self.link_at.push(at);
                self.latencies.push(at - posted);
            }
            Some(_) => {}
            None => self.keep_early(user, Early::Link(at)),
        }
    }

    /// The ledger recorded a message to `user` at `at`.
    pub fn message(&mut self, user: &str, at: u64) {
        match self.posted.get(user) {
            Some(&posted) if at >= posted => {
                let n = self.messages.entry(user.to_owned()).or_default();
                *n += 1;
                if *n == 2 {
                    self.messaged_twice += 1;
                }
            }
            Some(_) => {}
            None => self.keep_early(user, Early::Message(at)),
        }
    }

    /// Keeps an entry for a user not known to be accepted yet, while posts
    /// still come in.
    fn keep_early(&mut self, user: &str, entry: Early) {
        if !self.closed {
            self.early.entry(user.to_owned()).or_default().push(entry);
        }
    }

    /// Every accepted post is in: the ledger's entries for other users are
    /// not this storm's.
    pub fn close(&mut self) {
        self.closed = true;
        self.early = HashMap::new();
    }

    /// The figures so far, copied out so that the percentiles can be
    /// worked out after the lock is released.
    pub fn snapshot(&self) -> ChainSnapshot {
        ChainSnapshot {
            users: self.posted.len() as u64,
            messaged: self.messages.len() as u64,
            messaged_twice: self.messaged_twice,
            link_at: self.link_at.clone(),
            latencies: self.latencies.clone(),
        }
    }
}

/// A storm chain's figures at one moment (`StormChain::snapshot`).
#[derive(Debug, Clone, Default)]
pub struct ChainSnapshot {
    users: u64,
    messaged: u64,
    messaged_twice: u64,
    link_at: Vec<u64>,
    latencies: Vec<u64>,
}

impl ChainSnapshot {
    /// The report: counts, link latency percentiles, and the link rate
    /// between the 10th and 90th percentile of link times.
    pub fn report(mut self) -> ChainReport {
        self.latencies.sort_unstable();
        self.link_at.sort_unstable();
        let pick = |v: &[u64], q: f64| -> u64 {
            if v.is_empty() {
                return 0;
            }
            v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
        };
        let at = &self.link_at;
        let (lo, hi) = (pick(at, 0.1), pick(at, 0.9));
        let middle = at.iter().filter(|t| **t >= lo && **t <= hi).count();
        ChainReport {
            users: self.users,
            linked: self.link_at.len() as u64,
            messaged: self.messaged,
            messaged_twice: self.messaged_twice,
            link_p50_ms: pick(&self.latencies, 0.5) as f64,
            link_p99_ms: pick(&self.latencies, 0.99) as f64,
            link_max_ms: pick(&self.latencies, 1.0) as f64,
            link_rate: if hi > lo {
                middle as f64 * 1000.0 / (hi - lo) as f64
            } else {
                0.0
            },
        }
    }
}

/// Called for each webhook the gateway accepted: the user, and when it was
/// posted (ms since the epoch).
pub type OnAccepted = Arc<dyn Fn(&str, u64) + Send + Sync>;

/// Runs a storm: every user's webhook, signed, at `spec.rate`. Reply
/// tokens come from `issue_token(user)`.
pub async fn run(
    spec: StormSpec,
    issue_token: Arc<dyn Fn(&str) -> String + Send + Sync>,
    on_accepted: OnAccepted,
) -> Result<StormReport, String> {
    spec.check()?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(spec.connections)
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| format!("an HTTP client: {e}"))?;
    let spec = Arc::new(spec);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..spec.connections)
        .map(|_| {
            let (spec, next, client, issue_token, on_accepted) = (
                spec.clone(),
                next.clone(),
                client.clone(),
                issue_token.clone(),
                on_accepted.clone(),
            );
            tokio::spawn(async move {
                let mut answers: Vec<(String, Duration)> = Vec::new();
                let destination = destination(&spec.channel_id);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= spec.users {
                        return answers;
                    }
                    let due = started + Duration::from_secs_f64(i as f64 / spec.rate);
                    tokio::time::sleep_until(due.into()).await;
                    let user = user_id(spec.first_user + i);
                    let kind = spec.kinds[(i % spec.kinds.len() as u64) as usize];
                    let token = issue_token(&user);
                    let body = json!({
                        "destination": destination,
                        "events": [event(&spec, kind, &user, &token)],
                    })
                    .to_string();
                    let signature = sign(spec.secret.as_bytes(), body.as_bytes());
                    let sent = Instant::now();
                    let sent_ms = now_ms();
                    let status = match client
                        .post(&spec.url)
                        .header("content-type", "application/json")
                        .header(SIGNATURE_HEADER, signature)
                        .body(body)
                        .send()
                        .await
                    {
                        Ok(r) => r.status().as_u16().to_string(),
                        Err(_) => "error".to_owned(),
                    };
                    if status == "200" {
                        on_accepted(&user, sent_ms);
                    }
                    answers.push((status, sent.elapsed()));
                }
            })
        })
        .collect();
    let mut report = StormReport::default();
    let mut times = Vec::new();
    for w in workers {
        for (status, took) in w.await.map_err(|e| format!("a storm worker failed: {e}"))? {
            report.sent += 1;
            if status == "200" {
                report.accepted += 1;
            }
            *report.statuses.entry(status).or_default() += 1;
            times.push(took);
        }
    }
    times.sort_unstable();
    let quantile = |q: f64| {
        if times.is_empty() {
            return 0.0;
        }
        let rank = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len());
        times[rank - 1].as_secs_f64() * 1000.0
    };
    report.seconds = started.elapsed().as_secs_f64();
    report.rate = report.sent as f64 / report.seconds.max(f64::EPSILON);
    report.p50_ms = quantile(0.5);
    report.p99_ms = quantile(0.99);
    report.done = true;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_chain_counts_what_came_after_each_post_even_before_it_was_known() {
        let mut chain = StormChain::default();
        chain.post("U1", 1_000);
        // Before U1's post: an earlier storm's link, not this one's.
        chain.link("U1", 999);
        chain.link("U1", 1_010);
        chain.link("U1", 1_020);
        // U2's link and message reach the ledger before its answer does.
        chain.link("U2", 1_030);
        chain.message("U2", 1_031);
        chain.post("U2", 1_000);
        chain.message("U1", 1_040);
        chain.message("U1", 1_050);
        // Once every post is in, other users are not the storm's.
        chain.close();
        chain.link("U3", 1_060);
        chain.post("U3", 1_000);
        let report = chain.snapshot().report();
        assert_eq!(report.users, 3);
        assert_eq!(report.linked, 2);
        assert_eq!(report.messaged, 2);
        assert_eq!(report.messaged_twice, 1);
        assert_eq!(report.link_p50_ms, 10.0);
        assert_eq!(report.link_max_ms, 30.0);
    }

    #[test]
    fn ulids_are_26_crockford_characters_in_time_order() {
        let a = ulid();
        assert_eq!(a.len(), 26);
        assert!(
            a.bytes()
                .all(|b| b"0123456789ABCDEFGHJKMNPQRSTVWXYZ".contains(&b))
        );
        std::thread::sleep(Duration::from_millis(2));
        assert!(ulid()[..10] > a[..10]);
    }

    #[test]
    fn storm_users_and_destinations_are_line_ids() {
        assert!(hibiki_line::api::is_user_id(&user_id(7)));
        assert!(hibiki_line::api::is_user_id(&destination("1000000001")));
        assert_ne!(user_id(7), user_id(8));
    }
}
