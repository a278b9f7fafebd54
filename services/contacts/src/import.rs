//! `ImportContacts`: the bulk sync of a company's own contact records.
//!
//! Records are numbered by their position in the stream (bad records
//! included) and cut into chunks of consecutive positions. Each chunk
//! commits in one transaction on the import's own small connection pool:
//! lock the chunk's existing contacts, merge each record into its contact in
//! Rust (a record that would change an attribute's type is rejected),
//! evaluate every segment of the tenant with the same evaluator the realtime
//! path uses, COPY the new contacts straight into `contacts`, update the
//! changed ones in one statement (a record that changes nothing is not
//! rewritten), add the net change of each segment's count as a delta row,
//! and record the chunk's positions as committed. A re-run with the same
//! import id skips the committed positions, so an interrupted import resumes
//! where it stopped. Bad records are reported with their row number, field
//! and reason, and the rest goes on.
//!
//! While the chunks of an import are all new contacts (a first sync), a
//! chunk skips the lookup of existing contacts; COPY fails if one exists
//! after all, and the chunk is done again with the lookup.
//!
//! Up to `HIBIKI_IMPORT_DB_CONNECTIONS` chunks commit at once; two chunks
//! that share a contact never run together (the later record wins).
//!
//! Realtime work keeps its latency while an import runs:
//! - the import uses its own pool, and at most `HIBIKI_IMPORT_CONCURRENCY`
//!   imports run at once;
//! - it holds segments only `FOR KEY SHARE` and writes no segment row, so a
//!   realtime writer waits on it only for a contact they both touch;
//! - while realtime calls arrive ([`RealtimeLoad`]), it commits one chunk at
//!   a time, of `HIBIKI_IMPORT_BUSY_CHUNK_ROWS`, starts each when no
//!   realtime call is in flight, and rests between chunks so that it works
//!   at most `HIBIKI_IMPORT_BUSY_SHARE` of the time;
//! - `HIBIKI_IMPORT_MAX_ROWS_PER_SECOND` can pace it further.
//!
//! Segment counts reach analytics as whole-count snapshots when the deltas
//! are folded (not one record per imported member), which keeps a
//! million-row import from writing millions of outbox rows.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hibiki_proto::contacts::v1::{
    ImportContactsRequest, ImportContactsResponse, ImportHeader, ImportRecord, ImportStatus,
    RowError, import_contacts_request::Item,
};
use hibiki_runtime::Caller;
use hibiki_runtime::timestamp::to_proto_opt;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tonic::Streaming;

use crate::attrs::{self, AttrValue, Attributes, MAX_ATTRIBUTES, MAX_TAGS};
use crate::error::{Error, Result, is_unique_violation};
use crate::rules::{ContactState, Rule};
use crate::store::{decode_rule, segs_literal, set_membership, text_array_literal};
use crate::tenants::require_tenant;
use crate::validate;

/// The most row errors an import keeps.
pub const MAX_ERRORS: usize = 1000;

/// Import settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportConfig {
    /// `HIBIKI_IMPORT_CHUNK_ROWS`: rows per committed chunk. Default 5,000.
    pub chunk_rows: usize,
    /// `HIBIKI_IMPORT_BUSY_CHUNK_ROWS`: rows per chunk while realtime calls
    /// arrive. Default 1,000.
    pub busy_chunk_rows: usize,
    /// `HIBIKI_IMPORT_DB_CONNECTIONS`: connections of the import pool.
    /// Default 2.
    pub db_connections: u32,
    /// `HIBIKI_IMPORT_CONCURRENCY`: imports running at once per process;
    /// more are refused with RESOURCE_EXHAUSTED. Default 2.
    pub concurrency: usize,
    /// `HIBIKI_IMPORT_MAX_ROWS_PER_SECOND`: pace per import; 0 for none.
    /// Default 0.
    pub max_rows_per_second: u64,
    /// `HIBIKI_IMPORT_BUSY_SHARE`: while realtime calls arrive, the share of
    /// the time an import may spend committing chunks (it rests between
    /// chunks for the rest), in (0, 1]. Default 0.25.
    pub busy_share: f64,
}

impl ImportConfig {
    /// Reads the import settings.
    pub fn from_env(env: &dyn hibiki_runtime::Env) -> Result<Self, hibiki_runtime::ConfigError> {
        let r = hibiki_runtime::config::Reader::new(env);
        Ok(Self {
            chunk_rows: r.positive("HIBIKI_IMPORT_CHUNK_ROWS", 5000)?,
            busy_chunk_rows: r.positive("HIBIKI_IMPORT_BUSY_CHUNK_ROWS", 1000)?,
            db_connections: r.positive("HIBIKI_IMPORT_DB_CONNECTIONS", 2)? as u32,
            concurrency: r.positive("HIBIKI_IMPORT_CONCURRENCY", 2)?,
            max_rows_per_second: r.parse("HIBIKI_IMPORT_MAX_ROWS_PER_SECOND", 0)?,
            busy_share: {
                let share: f64 = r.parse("HIBIKI_IMPORT_BUSY_SHARE", 0.25)?;
                if !(share > 0.0 && share <= 1.0) {
                    return Err(hibiki_runtime::ConfigError::new(
                        "HIBIKI_IMPORT_BUSY_SHARE",
                        format!("{share} is not in (0, 1]"),
                    ));
                }
                share
            },
        })
    }
}

/// The import machinery of one contacts process.
#[derive(Clone)]
pub struct Importer {
    pool: PgPool,
    slots: Arc<Semaphore>,
    config: ImportConfig,
    realtime: Arc<RealtimeLoad>,
    /// The runs of each import in this process, so that a re-run waits for
    /// the run before it (a client that reconnects at once) instead of
    /// racing it for the same rows.
    runs: Arc<std::sync::Mutex<Runs>>,
}

/// The run lock of each (tenant, import id) running in this process.
type Runs = HashMap<(String, String), std::sync::Weak<tokio::sync::Mutex<()>>>;

/// How long a run of an import waits for an earlier run of the same import
/// in this process to finish.
const RUN_WAIT: Duration = Duration::from_secs(30);

/// How busy the process is with realtime contact writes, so imports give
/// way: while realtime calls arrive, an import commits one chunk at a time
/// (not `HIBIKI_IMPORT_DB_CONNECTIONS`), rests between chunks so that it
/// commits at most `HIBIKI_IMPORT_BUSY_SHARE` of the time, and starts each
/// chunk only when no realtime call is in flight (waiting at most
/// [`RealtimeLoad::MAX_WAIT`]).
/// On a small machine the import and the realtime path share the same
/// cores; this keeps the realtime path's latency while an import runs.
#[derive(Debug)]
pub struct RealtimeLoad {
    in_flight: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
    last_call: std::sync::Mutex<Option<Instant>>,
}

/// Marks a realtime call in flight until dropped.
pub struct RealtimeCall<'a>(&'a RealtimeLoad);

impl Drop for RealtimeCall<'_> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl RealtimeLoad {
    /// The longest an import chunk waits for realtime calls to finish.
    pub const MAX_WAIT: Duration = Duration::from_millis(50);
    /// How long after the last realtime call the import counts the
    /// process as busy.
    pub const BUSY_FOR: Duration = Duration::from_secs(1);

    fn new() -> Self {
        Self {
            in_flight: Default::default(),
            idle: tokio::sync::Notify::new(),
            last_call: std::sync::Mutex::new(None),
        }
    }

    /// Marks a realtime call; it counts as in flight until the guard drops.
    pub fn enter(&self) -> RealtimeCall<'_> {
        use std::sync::atomic::Ordering;
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        *self.last_call.lock().expect("not poisoned") = Some(Instant::now());
        RealtimeCall(self)
    }

    /// Whether a realtime call came in the last [`Self::BUSY_FOR`].
    pub fn busy(&self) -> bool {
        self.last_call
            .lock()
            .expect("not poisoned")
            .is_some_and(|t| t.elapsed() < Self::BUSY_FOR)
    }

    /// Waits until no realtime call is in flight, or `MAX_WAIT` passed.
    async fn give_way(&self) {
        use std::sync::atomic::Ordering;
        let _ = tokio::time::timeout(Self::MAX_WAIT, async {
            loop {
                let idle = self.idle.notified();
                if self.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await;
    }
}

/// A record that passed validation.
struct Row {
    line_user_id: String,
    display_name: String,
    tags: Vec<String>,
    attributes: Attributes,
}

fn check_import_id(id: &str) -> Result<()> {
    let ok = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "header.import_id",
            "must be 1 to 128 of letters, digits and . _ : -",
        ))
    }
}

fn row_error(row: u64, field: impl Into<String>, message: impl Into<String>) -> RowError {
    RowError {
        row,
        field: field.into(),
        message: message.into(),
    }
}

/// Checks one record.
fn check_record(r: &ImportRecord) -> std::result::Result<Row, RowError> {
    let fail = |e: Error| match e {
        Error::InvalidArgument { field, message } => row_error(r.row, field, message),
        other => row_error(r.row, "", other.to_string()),
    };
    validate::line_user_id("line_user_id", &r.line_user_id).map_err(fail)?;
    validate::display_name("display_name", &r.display_name, 200).map_err(fail)?;
    if r.tags.len() > MAX_TAGS {
        return Err(row_error(r.row, "tags", format!("at most {MAX_TAGS} tags")));
    }
    for (i, t) in r.tags.iter().enumerate() {
        attrs::check_name(&format!("tags[{i}]"), t).map_err(fail)?;
    }
    if r.attributes.len() > MAX_ATTRIBUTES {
        return Err(row_error(
            r.row,
            "attributes",
            format!("at most {MAX_ATTRIBUTES} attributes"),
        ));
    }
    let mut attributes = Attributes::new();
    for (k, v) in &r.attributes {
        let field = format!("attributes.{k}");
        attrs::check_name(&field, k).map_err(fail)?;
        attributes.insert(
            k.clone(),
            AttrValue::from_proto(&field, Some(v)).map_err(fail)?,
        );
    }
    let mut tags = r.tags.clone();
    tags.sort();
    tags.dedup();
    Ok(Row {
        line_user_id: r.line_user_id.clone(),
        display_name: r.display_name.clone(),
        tags,
        attributes,
    })
}

/// A user id's hash, to tell cheaply whether two chunks share a contact (a
/// collision only makes a chunk wait).
fn user_hash(user: &str) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    static STATE: std::sync::LazyLock<RandomState> = std::sync::LazyLock::new(RandomState::new);
    STATE.hash_one(user)
}

/// The stream positions an import has committed, walked in order.
struct Committed {
    ranges: Vec<(i64, i64)>,
    next: usize,
}

impl Committed {
    fn new(ranges: Vec<(i64, i64)>) -> Self {
        Self { ranges, next: 0 }
    }

    /// Whether `position` is committed; positions must be asked in order.
    fn contains(&mut self, position: u64) -> bool {
        let p = position as i64;
        while let Some(&(first, rows)) = self.ranges.get(self.next) {
            if p < first {
                return false;
            }
            if p < first + rows {
                return true;
            }
            self.next += 1;
        }
        false
    }
}

/// One chunk: consecutive stream positions from `first`, its records by
/// user, and its row errors.
#[derive(Default)]
struct Chunk {
    first: u64,
    received: u64,
    rows: BTreeMap<String, (u64, Row)>,
    errors: Vec<RowError>,
}

impl Importer {
    /// An importer with its own pool on the service's database.
    pub fn new(
        config: &hibiki_runtime::config::PostgresConfig,
        import: ImportConfig,
    ) -> Result<Self, hibiki_runtime::postgres::PostgresError> {
        let mut pg = config.clone();
        pg.max_connections = import.db_connections;
        let pool = hibiki_runtime::postgres::connect_lazy(&pg, "contacts")?;
        Ok(Self {
            pool,
            slots: Arc::new(Semaphore::new(import.concurrency)),
            config: import,
            realtime: Arc::new(RealtimeLoad::new()),
            runs: Arc::default(),
        })
    }

    /// Waits (at most [`RUN_WAIT`]) until no other run of this import is
    /// going on in this process; the guard keeps others out until dropped.
    /// (A run in another replica at the same time is caught when it commits
    /// rows this one committed: FAILED_PRECONDITION.)
    async fn exclusive_run(
        &self,
        tenant: &str,
        import_id: &str,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>> {
        let lock = {
            let mut runs = self.runs.lock().expect("not poisoned");
            runs.retain(|_, run| run.strong_count() > 0);
            let key = (tenant.to_owned(), import_id.to_owned());
            match runs.get(&key).and_then(std::sync::Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    runs.insert(key, Arc::downgrade(&lock));
                    lock
                }
            }
        };
        tokio::time::timeout(RUN_WAIT, lock.lock_owned())
            .await
            .map_err(|_| {
                Error::FailedPrecondition(format!(
                    "import {import_id:?} is still running; retry once it has finished"
                ))
            })
    }

    /// The realtime load imports give way to.
    pub fn realtime(&self) -> &RealtimeLoad {
        &self.realtime
    }

    /// Runs one import stream to its end.
    pub async fn run(
        &self,
        caller: Caller,
        mut stream: Streaming<ImportContactsRequest>,
    ) -> Result<ImportContactsResponse> {
        let header = match stream
            .message()
            .await
            .map_err(|s| Error::invalid("stream", s.message().to_owned()))?
        {
            Some(ImportContactsRequest {
                item: Some(Item::Header(h)),
            }) => h,
            _ => {
                return Err(Error::invalid(
                    "header",
                    "the first message of an import must carry the header",
                ));
            }
        };
        let ImportHeader {
            tenant_id,
            import_id,
            replace_tags,
        } = header;
        validate::tenant_id("header.tenant_id", &tenant_id)?;
        check_import_id(&import_id)?;
        caller
            .authorize_tenant(&tenant_id)
            .map_err(|s| Error::invalid("header.tenant_id", s.message().to_owned()))?;
        require_tenant(&self.pool, &tenant_id).await?;
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!(
                "{} imports are running in this process; retry later",
                self.config.concurrency
            ))
        })?;
        let run = self.exclusive_run(&tenant_id, &import_id).await?;
        sqlx::query(
            "INSERT INTO imports (tenant_id, import_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(&tenant_id)
        .bind(&import_id)
        .execute(&self.pool)
        .await?;
        // The stream positions already committed, as sorted ranges.
        let committed: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT first_row, rows FROM import_ranges WHERE tenant_id = $1 AND import_id = $2 \
             ORDER BY first_row",
        )
        .bind(&tenant_id)
        .bind(&import_id)
        .fetch_all(&self.pool)
        .await?;
        let resumed_rows: i64 = committed.iter().map(|r| r.1).sum();
        let mut committed = Committed::new(committed);
        tracing::info!(tenant_id, import_id, resumed_rows, "import started");

        // Chunks commit on up to `db_connections` connections at once while
        // the next ones are read and checked. Two chunks that share a contact
        // never run together: the later one waits, so the later record wins.
        let started = Instant::now();
        let (chunks_tx, mut chunks_rx) = tokio::sync::mpsc::channel::<Chunk>(1);
        let committer = {
            let importer = self.clone();
            let (tenant_id, import_id) = (tenant_id.clone(), import_id.clone());
            let parallel = self.config.db_connections.max(1) as usize;
            // The committer holds the import's slot and run lock: if the
            // client goes away, this call is dropped, but chunks already
            // handed over still commit, and a re-run waits for them.
            let held = (slot, run);
            tokio::spawn(async move {
                let _held = held;
                let mut running: tokio::task::JoinSet<Result<Duration>> =
                    tokio::task::JoinSet::new();
                let mut users_running: Vec<(tokio::task::Id, HashSet<u64>)> = Vec::new();
                let mut rows_done: u64 = 0;
                let mut last_took: Option<Duration> = None;
                // Whether the last chunk created all its contacts.
                let all_new = Arc::new(std::sync::atomic::AtomicBool::new(true));
                while let Some(chunk) = chunks_rx.recv().await {
                    let users: HashSet<u64> = chunk.rows.keys().map(|u| user_hash(u)).collect();
                    loop {
                        let parallel = if importer.realtime.busy() {
                            1
                        } else {
                            parallel
                        };
                        let overlaps = users_running
                            .iter()
                            .any(|(_, other)| !other.is_disjoint(&users));
                        if running.len() < parallel && !overlaps {
                            break;
                        }
                        let (id, result) = running
                            .join_next_with_id()
                            .await
                            .expect("a chunk is running")
                            .map_err(|e| Error::Unavailable(format!("import chunk: {e}")))?;
                        users_running.retain(|(t, _)| *t != id);
                        last_took = Some(result?);
                    }
                    if importer.realtime.busy() {
                        // Realtime calls are arriving: run at most
                        // `busy_share` of the time, and start only when none
                        // is in flight.
                        if let Some(took) = last_took.take() {
                            let share = importer.config.busy_share;
                            tokio::time::sleep(took.mul_f64((1.0 - share) / share)).await;
                        }
                        importer.realtime.give_way().await;
                    }
                    rows_done += chunk.received;
                    let importer2 = importer.clone();
                    let all_new = all_new.clone();
                    let (t, i) = (tenant_id.clone(), import_id.clone());
                    let handle = running.spawn(async move {
                        let started = Instant::now();
                        let new = all_new.load(std::sync::atomic::Ordering::Relaxed);
                        let new = importer2
                            .commit_chunk(&t, &i, replace_tags, chunk, new)
                            .await?;
                        all_new.store(new, std::sync::atomic::Ordering::Relaxed);
                        Ok(started.elapsed())
                    });
                    users_running.push((handle.id(), users));
                    importer.pace(started, rows_done).await;
                }
                while let Some(joined) = running.join_next().await {
                    joined.map_err(|e| Error::Unavailable(format!("import chunk: {e}")))??;
                }
                Ok::<(), Error>(())
            })
        };
        let read = async {
            let mut chunk = Chunk::default();
            let mut position: u64 = 0;
            while let Some(message) = stream
                .message()
                .await
                .map_err(|s| Error::invalid("stream", s.message().to_owned()))?
            {
                let batch = match message.item {
                    Some(Item::Batch(b)) => b,
                    Some(Item::Header(_)) => {
                        return Err(Error::invalid(
                            "header",
                            "only the first message carries the header",
                        ));
                    }
                    None => continue,
                };
                for record in &batch.records {
                    position += 1;
                    if committed.contains(position) {
                        // Committed by an earlier run: skipped, and a chunk
                        // never spans it.
                        if chunk.received > 0 {
                            let full = std::mem::take(&mut chunk);
                            if chunks_tx.send(full).await.is_err() {
                                return Ok(());
                            }
                        }
                        continue;
                    }
                    if chunk.received == 0 {
                        chunk.first = position;
                    }
                    chunk.received += 1;
                    match check_record(record) {
                        // A later record for the same user in a chunk wins.
                        Ok(row) => {
                            chunk
                                .rows
                                .insert(row.line_user_id.clone(), (record.row, row));
                        }
                        Err(e) => chunk.errors.push(e),
                    }
                    // Smaller chunks while realtime calls arrive: each is a
                    // shorter burst of work for them to share the machine with.
                    let size = if self.realtime.busy() {
                        self.config.busy_chunk_rows
                    } else {
                        self.config.chunk_rows
                    };
                    if chunk.received >= size as u64 {
                        let full = std::mem::take(&mut chunk);
                        if chunks_tx.send(full).await.is_err() {
                            // The committer stopped on an error: it reports it.
                            return Ok(());
                        }
                    }
                }
            }
            if chunk.received > 0 {
                let _ = chunks_tx.send(chunk).await;
            }
            Ok(())
        };
        let read_result = read.await;
        drop(chunks_tx);
        let commit_result = committer
            .await
            .map_err(|e| Error::Unavailable(format!("import committer: {e}")))?;
        commit_result?;
        read_result?;
        sqlx::query(
            "UPDATE imports SET done = true, finished_at = COALESCE(finished_at, now()) \
             WHERE tenant_id = $1 AND import_id = $2",
        )
        .bind(&tenant_id)
        .bind(&import_id)
        .execute(&self.pool)
        .await?;
        let status = status(&self.pool, &tenant_id, &import_id).await?;
        tracing::info!(
            tenant_id,
            import_id,
            received = status.received,
            upserted = status.upserted,
            rejected = status.rejected,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "import finished"
        );
        Ok(ImportContactsResponse {
            import_id,
            status: Some(status),
        })
    }

    /// Sleeps as needed to keep to the configured rows per second.
    async fn pace(&self, started: Instant, rows: u64) {
        if self.config.max_rows_per_second == 0 {
            return;
        }
        let due = Duration::from_secs_f64(rows as f64 / self.config.max_rows_per_second as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// Commits one chunk, again from the start when a contact it meant to
    /// create was created meanwhile by someone else.
    ///
    /// `all_new` says the import's last chunk created all its contacts: this
    /// one is then first tried without looking for existing contacts (a
    /// first sync of a tenant is all new contacts, and the lookup is a third
    /// of a chunk's cost); if one exists after all, the chunk is done again
    /// the normal way. Returns whether every contact of the chunk was new.
    async fn commit_chunk(
        &self,
        tenant: &str,
        import_id: &str,
        replace_tags: bool,
        chunk: Chunk,
        all_new: bool,
    ) -> Result<bool> {
        let mut lookup = !all_new;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .try_commit_chunk(tenant, import_id, replace_tags, &chunk, lookup)
                .await
            {
                Err(Error::Aborted(why)) if attempt < 5 => {
                    tracing::debug!(
                        import_id,
                        first_row = chunk.first,
                        why,
                        "import chunk retried"
                    );
                    lookup = true;
                }
                other => return other,
            }
        }
    }

    /// One transaction: lock the chunk's existing contacts, merge and
    /// evaluate every segment in Rust (the evaluator the realtime path uses),
    /// create the new contacts with COPY and update the changed ones in one
    /// statement, record the count changes as deltas and the chunk as done.
    ///
    /// The segments are held `FOR KEY SHARE`, as every writer holds them: a
    /// rule change waits for the chunk, nobody else does. No segment row is
    /// written, so realtime writers never wait on an import chunk unless
    /// they touch the same contacts.
    async fn try_commit_chunk(
        &self,
        tenant: &str,
        import_id: &str,
        replace_tags: bool,
        chunk: &Chunk,
        lookup: bool,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let segments: Vec<(String, i32, Vec<u8>)> = sqlx::query_as(
            "SELECT segment_id, no, rule FROM segments WHERE tenant_id = $1 \
             ORDER BY segment_id FOR KEY SHARE",
        )
        .bind(tenant)
        .fetch_all(&mut *tx)
        .await?;
        let segments = segments
            .into_iter()
            .map(|(id, no, rule)| Ok((decode_rule(&id, &rule)?, id, no)))
            .collect::<Result<Vec<(Rule, String, i32)>>>()?;
        let mut existing: HashMap<String, Existing> = HashMap::new();
        if lookup {
            let ids: Vec<&str> = chunk.rows.keys().map(String::as_str).collect();
            let rows: Vec<Existing> = sqlx::query_as(
                "SELECT line_user_id, follow_state, display_name, tags, attributes, segs \
                 FROM contacts WHERE tenant_id = $1 AND line_user_id = ANY($2) \
                 ORDER BY line_user_id FOR UPDATE",
            )
            .bind(tenant)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
            existing.extend(rows.into_iter().map(|e| (e.line_user_id.clone(), e)));
        }

        // No contact of the chunk exists (or the lookup was skipped, and
        // COPY below will tell).
        let all_new = existing.is_empty();
        let mut errors = chunk.errors.clone();
        let mut created = Copied::default();
        let mut updated = Written::default();
        let mut deltas: Vec<i64> = vec![0; segments.len()];
        let mut unchanged: u64 = 0;
        for (user, (row_no, row)) in &chunk.rows {
            let old = existing.remove(user);
            let merged = match merge(old.as_ref(), row, replace_tags) {
                Ok(m) => m,
                Err((field, message)) => {
                    errors.push(row_error(*row_no, field, message));
                    continue;
                }
            };
            let mut segs = old.as_ref().map(|o| o.segs.clone()).unwrap_or_default();
            for (i, (rule, _, no)) in segments.iter().enumerate() {
                let should = rule.matches(&merged.state);
                if set_membership(&mut segs, *no, should) {
                    deltas[i] += if should { 1 } else { -1 };
                }
            }
            match &old {
                // A record that changes nothing is not rewritten.
                Some(o) if merged.unchanged && segs == o.segs => unchanged += 1,
                Some(_) => updated.push(user, merged, &segs),
                None => created.push(tenant, user, &merged, &segs),
            }
        }

        let mut upserted = unchanged;
        if !created.rows.is_empty() {
            // COPY fails on a contact that exists: one created since the
            // lookup (by a realtime event), or any when the lookup was
            // skipped. The chunk is then done again, with the lookup.
            let mut copy = tx
                .copy_in_raw(
                    "COPY contacts (tenant_id, line_user_id, display_name, tags, attributes, segs) \
                     FROM STDIN",
                )
                .await?;
            copy.send(created.rows.into_bytes()).await?;
            match copy.finish().await {
                Ok(n) => upserted += n,
                Err(e) if is_unique_violation(&e) => {
                    return Err(Error::Aborted(
                        "a contact of the chunk exists already".into(),
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !updated.ids.is_empty() {
            upserted += sqlx::query(
                "UPDATE contacts c SET display_name = x.n, tags = x.t::text[], attributes = x.a, \
                   segs = x.s::int[], updated_at = now() \
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::jsonb[], $6::text[]) AS x(u, n, t, a, s) \
                 WHERE c.tenant_id = $1 AND c.line_user_id = x.u",
            )
            .bind(tenant)
            .bind(&updated.ids)
            .bind(&updated.names)
            .bind(&updated.tags)
            .bind(&updated.attributes)
            .bind(&updated.segs)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        let moved: Vec<(&str, i64)> = segments
            .iter()
            .zip(&deltas)
            .filter(|(_, d)| **d != 0)
            .map(|((_, id, _), d)| (id.as_str(), *d))
            .collect();
        if !moved.is_empty() {
            sqlx::query(
                "INSERT INTO segment_count_deltas (tenant_id, segment_id, delta) \
                 SELECT $1, s, d FROM unnest($2::text[], $3::bigint[]) AS x(s, d)",
            )
            .bind(tenant)
            .bind(moved.iter().map(|m| m.0).collect::<Vec<_>>())
            .bind(moved.iter().map(|m| m.1).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }

        errors.sort_by_key(|e| e.row);
        let rejected = errors.len() as i64;
        let errors: Vec<serde_json::Value> = errors
            .iter()
            .map(|e| json!({"row": e.row, "field": e.field, "message": e.message}))
            .collect();
        // The import's row, locked until commit, serializes the end of its
        // chunks: a chunk sees every range committed before it, so two runs
        // of the same import cannot both commit the same rows.
        let last = chunk.first + chunk.received;
        let overlap: Option<(i64, i64)> = sqlx::query_as(
            "WITH me AS (UPDATE imports SET received = received + $5, upserted = upserted + $6, \
                 rejected = rejected + $7, \
                 errors = CASE WHEN jsonb_array_length($8) = 0 THEN errors \
                   ELSE (SELECT COALESCE(jsonb_agg(x ORDER BY (x->>'row')::bigint), '[]') \
                         FROM (SELECT DISTINCT ON ((x->>'row')::bigint) x \
                               FROM jsonb_array_elements(errors || $8) AS x \
                               ORDER BY (x->>'row')::bigint LIMIT $9) l) END \
               WHERE tenant_id = $1 AND import_id = $2 RETURNING 1) \
             SELECT first_row, rows FROM import_ranges \
             WHERE tenant_id = $1 AND import_id = $2 AND first_row < $4 AND first_row + rows > $3 \
             LIMIT 1",
        )
        .bind(tenant)
        .bind(import_id)
        .bind(chunk.first as i64)
        .bind(last as i64)
        .bind(chunk.received as i64)
        .bind(upserted as i64)
        .bind(rejected)
        .bind(serde_json::Value::Array(errors))
        .bind(MAX_ERRORS as i64)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((first, rows)) = overlap {
            return Err(Error::FailedPrecondition(format!(
                "rows {first} to {} of import {import_id:?} were committed by another run of \
                 the same import; retry once it has finished",
                first + rows - 1
            )));
        }
        sqlx::query(
            "INSERT INTO import_ranges (tenant_id, import_id, first_row, rows, upserted, rejected) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(tenant)
        .bind(import_id)
        .bind(chunk.first as i64)
        .bind(chunk.received as i64)
        .bind(upserted as i64)
        .bind(rejected)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::debug!(
            import_id,
            first_row = chunk.first,
            rows = chunk.received,
            "import chunk committed"
        );
        Ok(all_new)
    }
}

/// A contact of a chunk as it is stored, locked.
#[derive(sqlx::FromRow)]
struct Existing {
    line_user_id: String,
    follow_state: i16,
    display_name: String,
    tags: Vec<String>,
    attributes: serde_json::Value,
    segs: Vec<i32>,
}

/// A contact as the import leaves it.
struct Merged {
    display_name: String,
    tags: Vec<String>,
    attributes: Attributes,
    state: ContactState,
    /// Whether the stored name, tags and attributes are already so.
    unchanged: bool,
}

/// Merges an import row into the contact as stored (if any): a non-empty
/// display name replaces the stored one; tags are added (or replace the
/// stored ones with `replace_tags`); attributes are set, each keeping its
/// type. The error is (field, reason).
fn merge(
    old: Option<&Existing>,
    row: &Row,
    replace_tags: bool,
) -> std::result::Result<Merged, (String, String)> {
    let Some(old) = old else {
        return Ok(Merged {
            display_name: row.display_name.clone(),
            tags: row.tags.clone(),
            attributes: row.attributes.clone(),
            state: ContactState {
                follow_state: 0,
                tags: row.tags.iter().cloned().collect(),
                attributes: row.attributes.clone(),
            },
            unchanged: false,
        });
    };
    let stored = attrs::attributes_from_json(&old.attributes);
    let mut attributes = stored.clone();
    for (k, v) in &row.attributes {
        if let Some(have) = attributes.get(k)
            && have.kind() != v.kind()
        {
            return Err((
                format!("attributes.{k}"),
                format!(
                    "the contact's attribute is a {}; the import gives a {}",
                    have.kind().name(),
                    v.kind().name()
                ),
            ));
        }
        attributes.insert(k.clone(), v.clone());
    }
    if attributes.len() > MAX_ATTRIBUTES {
        return Err((
            "attributes".into(),
            format!("a contact has at most {MAX_ATTRIBUTES} attributes"),
        ));
    }
    let tags: BTreeSet<String> = if replace_tags {
        row.tags.iter().cloned().collect()
    } else {
        old.tags.iter().chain(&row.tags).cloned().collect()
    };
    if tags.len() > MAX_TAGS {
        return Err((
            "tags".into(),
            format!("a contact has at most {MAX_TAGS} tags"),
        ));
    }
    let display_name = if row.display_name.is_empty() {
        old.display_name.clone()
    } else {
        row.display_name.clone()
    };
    let tags_vec: Vec<String> = tags.iter().cloned().collect();
    Ok(Merged {
        unchanged: display_name == old.display_name && tags_vec == old.tags && attributes == stored,
        display_name,
        tags: tags_vec,
        state: ContactState {
            follow_state: i32::from(old.follow_state),
            tags,
            attributes: attributes.clone(),
        },
        attributes,
    })
}

/// New contacts in COPY text format.
#[derive(Default)]
struct Copied {
    rows: String,
}

impl Copied {
    fn push(&mut self, tenant: &str, user: &str, m: &Merged, segs: &[i32]) {
        let line = &mut self.rows;
        copy_field(line, tenant);
        line.push('\t');
        copy_field(line, user);
        line.push('\t');
        copy_field(line, &m.display_name);
        line.push('\t');
        copy_field(line, &text_array_literal(&m.tags));
        line.push('\t');
        copy_field(line, &attrs::attributes_to_json(&m.attributes).to_string());
        line.push('\t');
        line.push_str(&segs_literal(segs));
        line.push('\n');
    }
}

/// Appends `value` to a COPY text-format line, escaped.
fn copy_field(line: &mut String, value: &str) {
    for ch in value.chars() {
        match ch {
            '\\' => line.push_str("\\\\"),
            '\t' => line.push_str("\\t"),
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            c => line.push(c),
        }
    }
}

/// The columns of one set-wise write, as parallel arrays.
#[derive(Default)]
struct Written {
    ids: Vec<String>,
    names: Vec<String>,
    tags: Vec<String>,
    attributes: Vec<serde_json::Value>,
    segs: Vec<String>,
}

impl Written {
    fn push(&mut self, user: &str, m: Merged, segs: &[i32]) {
        self.ids.push(user.to_owned());
        self.tags.push(text_array_literal(&m.tags));
        self.attributes
            .push(attrs::attributes_to_json(&m.attributes));
        self.names.push(m.display_name);
        self.segs.push(segs_literal(segs));
    }
}

/// The progress of an import.
pub async fn status(pool: &PgPool, tenant: &str, import_id: &str) -> Result<ImportStatus> {
    type StatusRow = (
        i64,
        i64,
        i64,
        serde_json::Value,
        bool,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
    );
    let row: Option<StatusRow> = sqlx::query_as(
        "SELECT received, upserted, rejected, errors, done, started_at, finished_at \
         FROM imports WHERE tenant_id = $1 AND import_id = $2",
    )
    .bind(tenant)
    .bind(import_id)
    .fetch_optional(pool)
    .await?;
    let Some((received, upserted, rejected, errors, done, started_at, finished_at)) = row else {
        return Err(Error::NotFound(format!(
            "import {import_id:?} does not exist in tenant {tenant:?}"
        )));
    };
    let errors = errors
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| RowError {
                    row: e["row"].as_u64().unwrap_or(0),
                    field: e["field"].as_str().unwrap_or("").to_owned(),
                    message: e["message"].as_str().unwrap_or("").to_owned(),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(ImportStatus {
        import_id: import_id.to_owned(),
        received: received as u64,
        upserted: upserted as u64,
        rejected: rejected as u64,
        errors,
        done,
        started_at: to_proto_opt(Some(started_at)),
        finished_at: to_proto_opt(finished_at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_fields_are_escaped() {
        let mut line = String::new();
        copy_field(&mut line, "a\tb\nc\\d\re");
        assert_eq!(line, "a\\tb\\nc\\\\d\\re");
    }

    #[test]
    fn a_bad_record_names_its_row_and_field() {
        let record = ImportRecord {
            row: 42,
            line_user_id: "not-a-user".into(),
            ..Default::default()
        };
        let err = check_record(&record).err().unwrap();
        assert_eq!((err.row, err.field.as_str()), (42, "line_user_id"));
    }
}
