//! Pacing the calls of one channel's endpoint to the limit that every
//! delivery replica shares.
//!
//! The limit itself lives in Redis (GCRA, [`queue::RESERVE`]). A replica's
//! calls waiting at one limit take turns at a [`Pacer`]: the call whose turn
//! it is reserves, in one round trip, a time for itself and for every call
//! waiting behind it, and each call then sleeps until its own time. Asking
//! Redis once per call (and again after each wait) cost Redis more than the
//! sends did when hundreds of calls waited at once, and asking for only as
//! many as the limit let through at that instant capped a replica at what
//! one round trip could fetch.
//!
//! A 429 from LINE pauses the endpoint for every replica (a key in Redis,
//! which [`queue::RESERVE`] honours) and, at once, for the calls of this
//! replica that hold a time already: they reserve again after the pause.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hibiki_line::api::{Endpoint, Limit};
use hibiki_runtime::redis::Redis;

use crate::queue;

/// No time is reserved further ahead than this: other replicas' calls get
/// their turn within it.
pub const HORIZON: Duration = Duration::from_secs(1);

/// A reserved time left this long unused (its call went away) is dropped:
/// sent late together with fresh ones, it would add to a burst.
const STALE: Duration = Duration::from_millis(250);

/// One channel's endpoint, as this replica paces it.
#[derive(Default)]
pub struct Pacer {
    /// Times reserved in Redis and not yet taken, earliest first; held by
    /// the call whose turn it is.
    times: tokio::sync::Mutex<VecDeque<Instant>>,
    /// Calls waiting for their turn.
    waiting: AtomicUsize,
    /// Until when LINE asked this endpoint to wait (a 429 seen here).
    paused_until: Mutex<Option<Instant>>,
    /// Round trips to the shared limit so far.
    asked: AtomicU64,
}

/// Counts a call as waiting for its turn until it has it (or is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A channel endpoint's limit, as delivery keeps to it.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Between two calls at the sustained rate.
    pub interval: Duration,
    /// How far ahead of the sustained rate a burst may run.
    pub tolerance: Duration,
}

impl Pace {
    /// `share` of `limit` (a little under LINE's numbers), with a burst of
    /// at most 1 % of a second's calls (at least one).
    pub fn new(limit: Limit, share: f64) -> Self {
        let interval_us = 1e6 / (limit.rate() * share);
        let tolerance_us = (interval_us * (limit.rate() / 100.0).max(1.0)).round();
        Self {
            interval: Duration::from_micros(interval_us.round().max(1.0) as u64),
            tolerance: Duration::from_micros(tolerance_us as u64),
        }
    }
}

impl Pacer {
    /// Waits until this call may go: its turn, a time reserved at the
    /// shared limit (`rate` and `pause` keys), and that time.
    pub async fn acquire(&self, redis: &Redis, keys: [&str; 2], pace: Pace) {
        loop {
            let at = self.reserve(redis, keys, pace).await;
            tokio::time::sleep_until(at.into()).await;
            // A 429 seen while this call slept: its time is void.
            if self.paused().is_none() {
                return;
            }
        }
    }

    /// Tells this replica's calls that LINE answered 429: the times they
    /// hold are void, and they reserve again after `pause`.
    pub fn pause(&self, pause: Duration) {
        *self.paused_until.lock().expect("never poisoned") = Some(Instant::now() + pause);
    }

    /// How many times this pacer has asked the shared limit for times.
    pub fn asked(&self) -> u64 {
        self.asked.load(Ordering::Relaxed)
    }

    /// When LINE's pause ends, while it lasts.
    fn paused(&self) -> Option<Instant> {
        self.paused_until
            .lock()
            .expect("never poisoned")
            .filter(|until| *until > Instant::now())
    }

    /// The time reserved for this call: taken from those reserved before,
    /// or reserved now for it and every call waiting behind it.
    async fn reserve(&self, redis: &Redis, keys: [&str; 2], pace: Pace) -> Instant {
        let mut times = {
            let _waiting = Waiting::new(&self.waiting);
            self.times.lock().await
        };
        if let Some(until) = self.paused() {
            times.clear();
            tokio::time::sleep_until(until.into()).await;
        }
        while let Some(at) = times.pop_front() {
            if at.elapsed() <= STALE {
                return at;
            }
        }
        let interval = pace.interval.as_micros().to_string();
        let tolerance = pace.tolerance.as_micros().to_string();
        let horizon = HORIZON.as_micros().to_string();
        loop {
            let wanted = (self.waiting.load(Ordering::Relaxed) + 1).to_string();
            self.asked.fetch_add(1, Ordering::Relaxed);
            let reserved: Result<(i64, i64), _> = redis
                .script(
                    &queue::RESERVE,
                    &keys,
                    &[
                        interval.as_bytes(),
                        tolerance.as_bytes(),
                        wanted.as_bytes(),
                        horizon.as_bytes(),
                    ],
                )
                .await;
            let wait =
                match reserved {
                    Ok((n, offset)) if n > 0 => {
                        let now = Instant::now();
                        let step = pace.interval.as_micros() as i64;
                        times.extend((0..n).map(|i| {
                            now + Duration::from_micros((offset + i * step).max(0) as u64)
                        }));
                        return times.pop_front().expect("n > 0 times were reserved");
                    }
                    Ok((_, wait_us)) => Duration::from_micros(wait_us.max(1000) as u64),
                    Err(e) => {
                        tracing::debug!(error = %e, "rate limit unreadable; waiting");
                        Duration::from_millis(100)
                    }
                };
            tokio::time::sleep(wait).await;
        }
    }
}

/// This replica's pacers, one per channel and endpoint.
#[derive(Default)]
pub struct Pacers(Mutex<HashMap<String, HashMap<Endpoint, std::sync::Arc<Pacer>>>>);

impl Pacers {
    /// The pacer of `channel_id`'s `endpoint` (made on first use; looked up
    /// by reference on every call after).
    pub fn get(&self, channel_id: &str, endpoint: Endpoint) -> std::sync::Arc<Pacer> {
        let mut channels = self.0.lock().expect("never poisoned");
        let endpoints = match channels.get_mut(channel_id) {
            Some(endpoints) => endpoints,
            None => channels.entry(channel_id.to_owned()).or_default(),
        };
        endpoints.entry(endpoint).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use hibiki_runtime::config::{DEFAULT_REDIS_URL, RedisConfig, Secret};
    use hibiki_testkit::RedisKeys;

    use super::*;

    /// A Redis handle under a prefix of its own, deleted with the guard.
    fn redis(test: &str) -> (Redis, RedisKeys) {
        let prefix = format!("test-pace-{test}-{}", std::process::id());
        let redis = Redis::connect_lazy(&RedisConfig {
            url: Secret::new(DEFAULT_REDIS_URL.to_owned()),
            cluster: false,
            key_prefix: prefix.clone(),
            pool_size: 1,
        })
        .expect("a Redis handle");
        (redis, RedisKeys::new(DEFAULT_REDIS_URL, &prefix))
    }

    /// `calls` calls, spread over `pacers` (replicas) sharing one limit,
    /// all acquiring at once; returns how long the last one waited.
    async fn acquire_all(
        redis: &Redis,
        pacers: &[Arc<Pacer>],
        calls: usize,
        pace: Pace,
    ) -> Duration {
        let keys = [redis.key(&["rl"]), redis.key(&["pause"])];
        let replicas = pacers.len();
        let started = Instant::now();
        let tasks: Vec<_> = (0..calls)
            .map(|n| {
                let (pacer, redis, keys) =
                    (pacers[n % replicas].clone(), redis.clone(), keys.clone());
                tokio::spawn(async move {
                    pacer.acquire(&redis, [&keys[0], &keys[1]], pace).await;
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("the call acquired");
        }
        started.elapsed()
    }

    #[test]
    fn a_pace_is_a_share_of_the_limit_with_a_burst_of_a_hundredth_of_a_second() {
        let pace = Pace::new(Limit::per_second(2000), 0.98);
        assert_eq!(pace.interval, Duration::from_micros(510));
        assert_eq!(pace.tolerance, Duration::from_micros(10_204));
        // A slow limit still lets one call through at once.
        let slow = Pace::new(Limit::per_second(50), 1.0);
        assert_eq!(slow.tolerance, slow.interval);
    }

    #[tokio::test]
    async fn calls_from_several_replicas_never_run_ahead_of_the_shared_limit() {
        let (redis, _guard) = redis("ahead");
        // 400 calls at 1,000/s with a burst of 10: at least 389 intervals,
        // however the three replicas' reservations interleave.
        let pace = Pace {
            interval: Duration::from_millis(1),
            tolerance: Duration::from_millis(10),
        };
        let replicas: Vec<Arc<Pacer>> = (0..3).map(|_| Arc::default()).collect();
        let took = acquire_all(&redis, &replicas, 400, pace).await;
        assert!(took >= Duration::from_millis(389), "400 calls in {took:?}");
    }

    #[tokio::test]
    async fn a_call_reserves_for_the_calls_waiting_behind_it() {
        let (redis, _guard) = redis("together");
        let pace = Pace {
            interval: Duration::from_micros(500),
            tolerance: Duration::from_millis(5),
        };
        let pacer: Arc<Pacer> = Arc::default();
        let took = acquire_all(&redis, std::slice::from_ref(&pacer), 300, pace).await;
        // 300 calls at 2,000/s with a burst of 10: paced, not all at once.
        assert!(took >= Duration::from_millis(140), "300 calls in {took:?}");
        // One reservation per call would be 300 (and more with retries);
        // calls that arrive while a reservation is under way ask again, so
        // a few are expected, never one each.
        let asked = pacer.asked();
        assert!(
            (1..30).contains(&asked),
            "300 calls took {asked} reservations"
        );
    }

    #[tokio::test]
    async fn a_paused_endpoint_lets_no_call_through_until_the_pause_ends() {
        let (redis, _guard) = redis("paused");
        let pace = Pace {
            interval: Duration::from_micros(100),
            tolerance: Duration::from_millis(1),
        };
        let keys = [redis.key(&["rl"]), redis.key(&["pause"])];
        let pacer = Pacer::default();
        // Another replica saw a 429: the pause key in Redis.
        let _: () = redis
            .command(
                hibiki_runtime::redis::redis::cmd("SET")
                    .arg(&keys[1])
                    .arg(1)
                    .arg("PX")
                    .arg(300),
            )
            .await
            .expect("SET");
        let waited = async || {
            let started = Instant::now();
            pacer.acquire(&redis, [&keys[0], &keys[1]], pace).await;
            started.elapsed()
        };
        let took = waited().await;
        assert!(took >= Duration::from_millis(290), "{took:?}");
        // This replica saw one: times already reserved are void too.
        pacer.pause(Duration::from_millis(300));
        let took = waited().await;
        assert!(took >= Duration::from_millis(290), "{took:?}");
    }
}
