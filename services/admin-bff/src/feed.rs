//! Live segment head counts, per tenant: one `WatchSegmentCounts` stream
//! from analytics for each tenant someone is looking at, shared by all of
//! that tenant's open dashboards, and the last hour of values per segment for
//! the chart (kept from the moment the tenant was first looked at).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hibiki_proto::analytics::v1::WatchSegmentCountsRequest;
use hibiki_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use hibiki_runtime::config::Secret;
use hibiki_runtime::grpc::ClientInterceptor;
use hibiki_runtime::{Shutdown, timestamp};
use serde::Serialize;
use tokio::sync::broadcast;
use tonic::transport::Channel;

/// How much history a segment keeps.
const HISTORY: Duration = Duration::from_secs(3600);
/// Values closer together than this replace each other in the history (the
/// live stream still carries each).
const RESOLUTION_MS: i64 = 1000;
/// How long a watch waits before trying again after analytics went away.
const RETRY: Duration = Duration::from_secs(1);
/// A tenant nobody has looked at for this long stops being watched (its
/// history goes with it; the next look starts anew).
const IDLE: Duration = Duration::from_secs(3600);

/// One segment's head count at a moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Count {
    /// The segment.
    pub segment_id: String,
    /// Its members.
    pub member_count: i64,
    /// When analytics counted it (Unix milliseconds).
    pub as_of_ms: i64,
}

/// Every tenant's feed.
pub struct Feeds {
    analytics: Channel,
    tenants: Mutex<HashMap<String, Arc<Feed>>>,
    stop: Shutdown,
}

impl Feeds {
    /// No feed yet; each starts when its tenant is first looked at.
    pub fn new(analytics: Channel, stop: Shutdown) -> Self {
        Self {
            analytics,
            tenants: Mutex::new(HashMap::new()),
            stop,
        }
    }

    /// The tenant's feed, started (watching with `token`) if there is none
    /// or the last one ended.
    pub fn feed(&self, tenant: &str, token: &Secret) -> Arc<Feed> {
        let mut tenants = self.tenants.lock().expect("never poisoned");
        if let Some(feed) = tenants.get(tenant)
            && !feed.ended()
        {
            feed.touch();
            return feed.clone();
        }
        tenants.retain(|_, f| !f.ended());
        let feed = Arc::new(Feed::new());
        tenants.insert(tenant.to_owned(), feed.clone());
        tokio::spawn(watch(
            feed.clone(),
            self.analytics.clone(),
            tenant.to_owned(),
            token.clone(),
            self.stop.clone(),
        ));
        feed
    }
}

/// One tenant's live counts.
pub struct Feed {
    updates: broadcast::Sender<Count>,
    state: Mutex<State>,
    used: Mutex<std::time::Instant>,
}

#[derive(Default)]
struct State {
    latest: BTreeMap<String, Count>,
    history: HashMap<String, VecDeque<(i64, i64)>>,
    ended: bool,
}

impl Feed {
    fn new() -> Self {
        Self {
            updates: broadcast::channel(4096).0,
            state: Mutex::new(State::default()),
            used: Mutex::new(std::time::Instant::now()),
        }
    }

    fn touch(&self) {
        *self.used.lock().expect("never poisoned") = std::time::Instant::now();
    }

    /// Nobody has the stream open, and nobody asked for the tenant lately.
    fn idle(&self) -> bool {
        self.idle_at(std::time::Instant::now())
    }

    fn idle_at(&self, now: std::time::Instant) -> bool {
        let used = *self.used.lock().expect("never poisoned");
        self.updates.receiver_count() == 0 && now.saturating_duration_since(used) >= IDLE
    }

    fn ended(&self) -> bool {
        self.state.lock().expect("never poisoned").ended
    }

    /// The current counts, and every change after them.
    pub fn subscribe(&self) -> (Vec<Count>, broadcast::Receiver<Count>) {
        self.touch();
        // Under the lock, so that no change falls between the two.
        let state = self.state.lock().expect("never poisoned");
        (
            state.latest.values().cloned().collect(),
            self.updates.subscribe(),
        )
    }

    /// Each segment's values over the last hour: (Unix ms, count), oldest
    /// first.
    pub fn history(&self) -> HashMap<String, Vec<(i64, i64)>> {
        let state = self.state.lock().expect("never poisoned");
        state
            .history
            .iter()
            .map(|(segment, points)| (segment.clone(), points.iter().copied().collect()))
            .collect()
    }

    fn record(&self, count: Count) {
        let mut state = self.state.lock().expect("never poisoned");
        let points = state.history.entry(count.segment_id.clone()).or_default();
        match points.back_mut() {
            Some(last) if count.as_of_ms - last.0 < RESOLUTION_MS => {
                *last = (last.0, count.member_count)
            }
            _ => points.push_back((count.as_of_ms, count.member_count)),
        }
        let horizon = count.as_of_ms - HISTORY.as_millis() as i64;
        while points.front().is_some_and(|p| p.0 < horizon) {
            points.pop_front();
        }
        state.latest.insert(count.segment_id.clone(), count.clone());
        // No receiver (nobody watching right now) is not an error.
        let _ = self.updates.send(count);
    }

    fn end(&self) {
        self.state.lock().expect("never poisoned").ended = true;
    }
}

/// Follows the tenant's counts until shutdown, reconnecting while analytics
/// is away; ends when the token is refused (the next sign-in starts anew).
async fn watch(feed: Arc<Feed>, analytics: Channel, tenant: String, token: Secret, stop: Shutdown) {
    let Ok(interceptor) = ClientInterceptor::new(&token) else {
        feed.end();
        return;
    };
    let mut client = AnalyticsServiceClient::with_interceptor(analytics, interceptor);
    loop {
        let request = WatchSegmentCountsRequest {
            tenant_id: tenant.clone(),
            segment_ids: Vec::new(),
        };
        match client.watch_segment_counts(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                let mut check = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = check.tick() => if feed.idle() {
                            feed.end();
                            return;
                        },
                        message = stream.message() => match message {
                            Ok(Some(u)) => feed.record(Count {
                                as_of_ms: u
                                    .as_of
                                    .as_ref()
                                    .and_then(timestamp::from_proto)
                                    .unwrap_or_else(chrono::Utc::now)
                                    .timestamp_millis(),
                                segment_id: u.segment_id,
                                member_count: u.member_count,
                            }),
                            Ok(None) => break,
                            Err(status) => {
                                tracing::debug!(tenant, %status, "segment count watch ended");
                                break;
                            }
                        }
                    }
                }
            }
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) =>
            {
                tracing::info!(tenant, %status, "segment count watch refused");
                feed.end();
                return;
            }
            Err(status) => tracing::debug!(tenant, %status, "analytics unreachable"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(at: i64, n: i64) -> Count {
        Count {
            segment_id: "s".into(),
            member_count: n,
            as_of_ms: at,
        }
    }

    #[test]
    fn history_keeps_an_hour_at_a_second_and_subscribers_see_what_follows() {
        let feed = Feed::new();
        feed.record(count(0, 1));
        let (now, mut rx) = feed.subscribe();
        assert_eq!(now, [count(0, 1)]);
        feed.record(count(400, 2)); // within a second: replaces the point
        feed.record(count(1500, 3));
        assert_eq!(feed.history()["s"], [(0, 2), (1500, 3)]);
        assert_eq!(rx.try_recv().unwrap(), count(400, 2));
        assert_eq!(rx.try_recv().unwrap(), count(1500, 3));
        feed.record(count(3_600_000 + 1000, 4)); // an hour on: the first goes
        assert_eq!(feed.history()["s"], [(1500, 3), (3_601_000, 4)]);
    }

    #[test]
    fn a_feed_is_idle_only_when_nobody_watches_or_asked_for_an_hour() {
        let feed = Feed::new();
        let later = std::time::Instant::now() + IDLE + Duration::from_secs(1);
        assert!(!feed.idle(), "just asked for");
        let (_, watcher) = feed.subscribe();
        assert!(!feed.idle_at(later), "a page still has the stream open");
        drop(watcher);
        assert!(feed.idle_at(later));
    }
}
