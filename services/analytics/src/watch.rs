//! Watching segment counts. One poller per watched tenant reads what
//! changed in PostgreSQL every 100 ms (rows whose `version` grew) and
//! publishes the tenant's counts as a whole on a `watch` channel. Every
//! watcher of the tenant shares it:
//! - at most 10 updates a second per segment, whatever the rate of changes;
//! - a watcher that reads slowly finds only the latest counts when it next
//!   reads, never a backlog, and slows nobody else;
//! - whichever replica folded a change, every replica's watchers see it.
//!
//! The poller stops when its tenant's last watcher leaves.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hibiki_proto::analytics::v1::SegmentCountUpdate;
use hibiki_runtime::Shutdown;
use hibiki_runtime::timestamp;
use sqlx::PgPool;
use tokio::sync::watch;
use tonic::Status;

use crate::fold::SegmentCount;

/// How often a watched tenant's counts are read.
pub const POLL: Duration = Duration::from_millis(100);

/// A tenant's counts by segment, as last read.
pub type Counts = BTreeMap<String, SegmentCount>;

type Feed = watch::Receiver<Option<Arc<Counts>>>;
type Publisher = watch::Sender<Option<Arc<Counts>>>;
type Feeds = Arc<Mutex<HashMap<String, Publisher>>>;

/// The pollers of watched tenants.
pub struct Watches {
    pool: PgPool,
    feeds: Feeds,
    shutdown: Shutdown,
}

impl Watches {
    pub fn new(pool: PgPool, shutdown: Shutdown) -> Arc<Self> {
        Arc::new(Self {
            pool,
            feeds: Feeds::default(),
            shutdown,
        })
    }

    /// The tenant's feed, starting its poller when nobody watches it yet.
    fn feed(&self, tenant_id: &str) -> Feed {
        let mut feeds = self.feeds.lock().expect("feeds");
        if let Some(tx) = feeds.get(tenant_id) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(None);
        feeds.insert(tenant_id.to_owned(), tx.clone());
        tokio::spawn(poll(
            self.pool.clone(),
            tenant_id.to_owned(),
            tx,
            self.feeds.clone(),
            self.shutdown.clone(),
        ));
        rx
    }

    /// The updates a watcher of `segment_ids` (all when empty) receives:
    /// the current counts first, then each change.
    pub fn watch(
        &self,
        tenant_id: &str,
        segment_ids: Vec<String>,
    ) -> impl futures::Stream<Item = Result<SegmentCountUpdate, Status>> + Send + 'static {
        let state = Watcher {
            feed: self.feed(tenant_id),
            only: segment_ids,
            sent: HashMap::new(),
            ready: VecDeque::new(),
            shutdown: self.shutdown.clone(),
            first: true,
            ended: false,
        };
        futures::stream::unfold(state, |mut w| async move {
            let item = w.next().await?;
            Some((item, w))
        })
    }
}

struct Watcher {
    feed: Feed,
    only: Vec<String>,
    /// What this watcher was last sent, per segment.
    sent: HashMap<String, (i64, bool)>,
    ready: VecDeque<SegmentCountUpdate>,
    shutdown: Shutdown,
    first: bool,
    ended: bool,
}

impl Watcher {
    async fn next(&mut self) -> Option<Result<SegmentCountUpdate, Status>> {
        loop {
            if self.ended {
                return None;
            }
            if let Some(u) = self.ready.pop_front() {
                return Some(Ok(u));
            }
            if !self.first {
                tokio::select! {
                    () = self.shutdown.cancelled() => {
                        self.ended = true;
                        return Some(Err(Status::unavailable("analytics is shutting down")));
                    }
                    changed = self.feed.changed() => {
                        if changed.is_err() {
                            self.ended = true;
                            return Some(Err(Status::unavailable("analytics is shutting down")));
                        }
                    }
                }
            }
            let counts = self.feed.borrow_and_update().clone();
            let Some(counts) = counts else {
                // Not read yet: wait for the first read.
                self.first = false;
                continue;
            };
            self.first = false;
            for (segment, c) in counts.iter() {
                if !self.only.is_empty() && !self.only.contains(segment) {
                    continue;
                }
                let now = (c.member_count, c.deleted);
                if self.sent.get(segment) == Some(&now) {
                    continue;
                }
                self.sent.insert(segment.clone(), now);
                self.ready.push_back(update(c));
            }
        }
    }
}

/// A count as the API shows it (a deleted segment counts 0).
pub fn update(c: &SegmentCount) -> SegmentCountUpdate {
    SegmentCountUpdate {
        segment_id: c.segment_id.clone(),
        member_count: if c.deleted { 0 } else { c.member_count },
        as_of: Some(timestamp::to_proto(c.as_of)),
    }
}

async fn poll(pool: PgPool, tenant_id: String, tx: Publisher, feeds: Feeds, shutdown: Shutdown) {
    let mut counts = Counts::new();
    let mut version = 0i64;
    let mut read_once = false;
    let mut tick = tokio::time::interval(POLL);
    // A watcher's first values come at once.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tx.closed() => {
                // The last watcher left; one may have come meanwhile
                // (subscribing under the same lock).
                let mut feeds = feeds.lock().expect("feeds");
                if tx.receiver_count() == 0 {
                    feeds.remove(&tenant_id);
                    return;
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        let rows: Result<Vec<SegmentCount>, sqlx::Error> = sqlx::query_as(
            "SELECT tenant_id, segment_id, member_count, as_of, deleted, version
               FROM segment_counts WHERE tenant_id = $1 AND version > $2 ORDER BY version",
        )
        .bind(&tenant_id)
        .bind(version)
        .fetch_all(&pool)
        .await;
        match rows {
            Ok(rows) if rows.is_empty() && read_once => {}
            Ok(rows) => {
                for r in rows {
                    version = version.max(r.version);
                    counts.insert(r.segment_id.clone(), r);
                }
                read_once = true;
                tx.send_replace(Some(Arc::new(counts.clone())));
            }
            Err(e) => tracing::warn!(tenant = %tenant_id, error = %e, "segment counts not read"),
        }
    }
}
