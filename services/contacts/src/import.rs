//! `ImportContacts`: the bulk sync of a company's own contact records.
//!
//! Records are cut into chunks of a fixed number of rows, counted from the
//! start of the stream (bad rows included), so the same input always makes
//! the same chunks. Each chunk commits in one transaction on the import's own
//! small connection pool: COPY into a temporary staging table, reject rows
//! that would change an attribute's type, merge set-wise with `INSERT … ON
//! CONFLICT DO UPDATE`, then for every segment of the tenant add and remove
//! the chunk's members set-wise and move the count, and record the chunk as
//! done. A re-run with the same import id skips committed chunks, so an
//! interrupted import resumes where it stopped. Bad rows are reported with
//! their row number, field and reason, and the rest goes on.
//!
//! Realtime work keeps its latency while an import runs: the import uses its
//! own pool (`HIBIKI_IMPORT_DB_CONNECTIONS`), at most
//! `HIBIKI_IMPORT_CONCURRENCY` imports run at once, chunks are small enough
//! that segment locks are held briefly, and `HIBIKI_IMPORT_MAX_ROWS_PER_SECOND`
//! can pace it further.
//!
//! Segment counts change per chunk as whole-count snapshots on the outbox
//! (not one record per imported member), which is what analytics needs and
//! keeps a million-row import from writing millions of outbox rows.

use std::collections::BTreeMap;
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
use crate::error::{Error, Result};
use crate::rules::SqlParams;
use crate::store::decode_rule;
use crate::tenants::require_tenant;
use crate::validate;

/// The most row errors an import keeps.
pub const MAX_ERRORS: usize = 1000;

/// Import settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportConfig {
    /// `HIBIKI_IMPORT_CHUNK_ROWS`: rows per committed chunk. Default 5,000.
    pub chunk_rows: usize,
    /// `HIBIKI_IMPORT_DB_CONNECTIONS`: connections of the import pool.
    /// Default 2.
    pub db_connections: u32,
    /// `HIBIKI_IMPORT_CONCURRENCY`: imports running at once per process;
    /// more are refused with RESOURCE_EXHAUSTED. Default 2.
    pub concurrency: usize,
    /// `HIBIKI_IMPORT_MAX_ROWS_PER_SECOND`: pace per import; 0 for none.
    /// Default 0.
    pub max_rows_per_second: u64,
}

impl ImportConfig {
    /// Reads the import settings.
    pub fn from_env(env: &dyn hibiki_runtime::Env) -> Result<Self, hibiki_runtime::ConfigError> {
        let r = hibiki_runtime::config::Reader::new(env);
        Ok(Self {
            chunk_rows: r.positive("HIBIKI_IMPORT_CHUNK_ROWS", 5000)?,
            db_connections: r.positive("HIBIKI_IMPORT_DB_CONNECTIONS", 2)? as u32,
            concurrency: r.positive("HIBIKI_IMPORT_CONCURRENCY", 2)?,
            max_rows_per_second: r.parse("HIBIKI_IMPORT_MAX_ROWS_PER_SECOND", 0)?,
        })
    }
}

/// The import machinery of one contacts process.
#[derive(Clone)]
pub struct Importer {
    pool: PgPool,
    slots: Arc<Semaphore>,
    config: ImportConfig,
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

/// One chunk's records, in stream order, with its row errors.
#[derive(Default)]
struct Chunk {
    index: u64,
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
        })
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
        let _slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!(
                "{} imports are running in this process; retry later",
                self.config.concurrency
            ))
        })?;
        sqlx::query(
            "INSERT INTO imports (tenant_id, import_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(&tenant_id)
        .bind(&import_id)
        .execute(&self.pool)
        .await?;
        // Committed chunks and how many rows each had.
        let done: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT chunk, received FROM import_chunks WHERE tenant_id = $1 AND import_id = $2",
        )
        .bind(&tenant_id)
        .bind(&import_id)
        .fetch_all(&self.pool)
        .await?;
        let done: std::collections::HashMap<u64, u64> = done
            .into_iter()
            .map(|(c, r)| (c as u64, r as u64))
            .collect();
        let is_done = |chunk: &Chunk| done.get(&chunk.index) == Some(&chunk.received);
        tracing::info!(
            tenant_id,
            import_id,
            resumed_chunks = done.len(),
            "import started"
        );

        // Reading and checking the next chunk overlaps with committing the
        // previous one; chunks still commit one at a time, in order.
        let started = Instant::now();
        let (chunks_tx, mut chunks_rx) = tokio::sync::mpsc::channel::<Chunk>(1);
        let committer = {
            let importer = self.clone();
            let (tenant_id, import_id) = (tenant_id.clone(), import_id.clone());
            tokio::spawn(async move {
                let mut rows_done: u64 = 0;
                while let Some(chunk) = chunks_rx.recv().await {
                    rows_done += chunk.received;
                    importer
                        .commit_chunk(&tenant_id, &import_id, replace_tags, chunk)
                        .await?;
                    importer.pace(started, rows_done).await;
                }
                Ok::<(), Error>(())
            })
        };
        let read = async {
            let mut chunk = Chunk::default();
            let chunk_rows = self.config.chunk_rows as u64;
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
                    if chunk.received == chunk_rows {
                        let next = Chunk {
                            index: chunk.index + 1,
                            ..Chunk::default()
                        };
                        let full = std::mem::replace(&mut chunk, next);
                        if !is_done(&full) && chunks_tx.send(full).await.is_err() {
                            // The committer stopped on an error: it reports it.
                            return Ok(());
                        }
                    }
                }
            }
            if chunk.received > 0 && !is_done(&chunk) {
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

    async fn commit_chunk(
        &self,
        tenant: &str,
        import_id: &str,
        replace_tags: bool,
        mut chunk: Chunk,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "CREATE TEMP TABLE IF NOT EXISTS import_staging \
               (row_no bigint, line_user_id text, display_name text, tags jsonb, attributes jsonb) \
             ON COMMIT DELETE ROWS",
        )
        .execute(&mut *tx)
        .await?;
        if !chunk.rows.is_empty() {
            let mut data = String::with_capacity(chunk.rows.len() * 128);
            for (row_no, row) in chunk.rows.values() {
                data.push_str(&row_no.to_string());
                data.push('\t');
                copy_field(&mut data, &row.line_user_id);
                data.push('\t');
                copy_field(&mut data, &row.display_name);
                data.push('\t');
                copy_field(&mut data, &json!(row.tags).to_string());
                data.push('\t');
                copy_field(
                    &mut data,
                    &attrs::attributes_to_json(&row.attributes).to_string(),
                );
                data.push('\n');
            }
            let mut copy = tx
                .copy_in_raw("COPY import_staging (row_no, line_user_id, display_name, tags, attributes) FROM STDIN")
                .await?;
            copy.send(data.into_bytes()).await?;
            copy.finish().await?;
            // Without statistics the planner takes the staging table for
            // empty-ish and may scan all of the tenant's contacts per join.
            sqlx::query("ANALYZE import_staging")
                .execute(&mut *tx)
                .await?;
        }
        // An attribute keeps its type: rows that would change one are
        // rejected, not merged.
        let conflicts: Vec<(i64, String, String, String)> = sqlx::query_as(
            "WITH conflicts AS ( \
               SELECT s.row_no, e.key, jsonb_typeof(c.attributes -> e.key) AS have, \
                      jsonb_typeof(e.value) AS got \
               FROM contacts c \
               JOIN import_staging s ON s.line_user_id = c.line_user_id \
               CROSS JOIN LATERAL jsonb_each(s.attributes) AS e \
               WHERE c.tenant_id = $1 \
                 AND c.line_user_id = ANY(ARRAY(SELECT line_user_id FROM import_staging)) \
                 AND c.attributes ? e.key \
                 AND jsonb_typeof(c.attributes -> e.key) <> jsonb_typeof(e.value)), \
             gone AS (DELETE FROM import_staging s USING conflicts x WHERE s.row_no = x.row_no) \
             SELECT row_no, key, have, got FROM conflicts ORDER BY row_no, key",
        )
        .bind(tenant)
        .fetch_all(&mut *tx)
        .await?;
        let mut conflicted_rows = std::collections::BTreeSet::new();
        for (row, key, have, got) in conflicts {
            if conflicted_rows.insert(row) {
                chunk.errors.push(row_error(
                    row as u64,
                    format!("attributes.{key}"),
                    format!("the contact's attribute is a {have}; the import gives a {got}"),
                ));
            }
        }
        // Merge, in user id order (the lock order of every writer).
        let upserted = sqlx::query(
            "INSERT INTO contacts (tenant_id, line_user_id, display_name, tags, attributes) \
             SELECT $1, s.line_user_id, s.display_name, \
                    ARRAY(SELECT jsonb_array_elements_text(s.tags)), s.attributes \
             FROM import_staging s ORDER BY s.line_user_id \
             ON CONFLICT (tenant_id, line_user_id) DO UPDATE SET \
               display_name = CASE WHEN EXCLUDED.display_name = '' THEN contacts.display_name \
                                   ELSE EXCLUDED.display_name END, \
               tags = CASE WHEN $2 THEN EXCLUDED.tags \
                           ELSE ARRAY(SELECT DISTINCT t FROM unnest(contacts.tags || EXCLUDED.tags) AS t ORDER BY t) END, \
               attributes = contacts.attributes || EXCLUDED.attributes, \
               updated_at = now()",
        )
        .bind(tenant)
        .bind(replace_tags)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        self.maintain_segments(&mut tx, tenant).await?;

        chunk.errors.sort_by_key(|e| e.row);
        let rejected = chunk.errors.len() as i64;
        let errors: Vec<serde_json::Value> = chunk
            .errors
            .iter()
            .map(|e| json!({"row": e.row, "field": e.field, "message": e.message}))
            .collect();
        // A chunk done again (its first commit was short) replaces its
        // earlier figures instead of adding to them.
        let previous: Option<(i64, i64, i64)> = sqlx::query_as(
            "SELECT received, upserted, rejected FROM import_chunks \
             WHERE tenant_id = $1 AND import_id = $2 AND chunk = $3 FOR UPDATE",
        )
        .bind(tenant)
        .bind(import_id)
        .bind(chunk.index as i64)
        .fetch_optional(&mut *tx)
        .await?;
        let (old_received, old_upserted, old_rejected) = previous.unwrap_or((0, 0, 0));
        sqlx::query(
            "UPDATE imports SET received = received + $3, upserted = upserted + $4, \
               rejected = rejected + $5, \
               errors = CASE WHEN jsonb_array_length(errors) >= $7 THEN errors \
                        ELSE (SELECT COALESCE(jsonb_agg(x), '[]') FROM (SELECT x FROM jsonb_array_elements(errors || $6) AS x LIMIT $7) l) END \
             WHERE tenant_id = $1 AND import_id = $2",
        )
        .bind(tenant)
        .bind(import_id)
        .bind(chunk.received as i64 - old_received)
        .bind(upserted as i64 - old_upserted)
        .bind(rejected - old_rejected)
        .bind(serde_json::Value::Array(errors))
        .bind(MAX_ERRORS as i64)
        .execute(&mut *tx)
        .await?;
        tracing::debug!(
            import_id,
            chunk = chunk.index,
            rows = chunk.received,
            "import chunk committed"
        );
        sqlx::query(
            "INSERT INTO import_chunks (tenant_id, import_id, chunk, received, upserted, rejected) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (tenant_id, import_id, chunk) DO UPDATE SET \
               received = EXCLUDED.received, upserted = EXCLUDED.upserted, rejected = EXCLUDED.rejected",
        )
        .bind(tenant)
        .bind(import_id)
        .bind(chunk.index as i64)
        .bind(chunk.received as i64)
        .bind(upserted as i64)
        .bind(rejected)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Moves the chunk's contacts in and out of every segment of the
    /// tenant, set-wise, and publishes each changed segment's new count.
    ///
    /// The chunk's contacts are fetched with `line_user_id = ANY(ARRAY(…))`:
    /// a primary-key lookup, where a join with the staging table is planned
    /// as a scan of all the tenant's contacts (half a second at a million).
    ///
    /// One statement evaluates every segment's rule over the chunk's
    /// contacts, adds the missing memberships, removes the stale ones and
    /// returns the net change per segment, so the segment locks (taken
    /// first, in id order like every writer) are held for as short a time as
    /// possible: realtime writers wait on them.
    async fn maintain_segments(&self, tx: &mut sqlx::PgConnection, tenant: &str) -> Result<()> {
        let segments: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT segment_id, rule FROM segments WHERE tenant_id = $1 ORDER BY segment_id FOR UPDATE",
        )
        .bind(tenant)
        .fetch_all(&mut *tx)
        .await?;
        if segments.is_empty() {
            return Ok(());
        }
        let mut params = SqlParams::starting_at(3);
        let mut selects = Vec::with_capacity(segments.len());
        let mut ids = Vec::with_capacity(segments.len());
        for (segment, rule) in &segments {
            let rule = decode_rule(segment, rule)?;
            let id = params.push(crate::rules::SqlParam::Text(segment.clone()));
            let predicate = rule.to_sql(&mut params);
            selects.push(format!(
                "SELECT {id}::text AS segment_id, c.line_user_id FROM c WHERE {predicate}"
            ));
            ids.push(segment.clone());
        }
        let sql = format!(
            "WITH c AS MATERIALIZED ( \
               SELECT c.line_user_id, c.tags, c.attributes, c.follow_state \
               FROM contacts c \
               WHERE c.tenant_id = $1 \
                 AND c.line_user_id = ANY(ARRAY(SELECT line_user_id FROM import_staging))), \
             should AS ({}), \
             added AS ( \
               INSERT INTO segment_members (tenant_id, segment_id, line_user_id) \
               SELECT $1, segment_id, line_user_id FROM should \
               ON CONFLICT DO NOTHING RETURNING segment_id), \
             removed AS ( \
               DELETE FROM segment_members m USING import_staging s \
               WHERE m.tenant_id = $1 AND m.line_user_id = s.line_user_id \
                 AND m.segment_id = ANY($2) \
                 AND NOT EXISTS (SELECT 1 FROM should x \
                                 WHERE x.segment_id = m.segment_id AND x.line_user_id = m.line_user_id) \
               RETURNING m.segment_id), \
             delta AS ( \
               SELECT segment_id, count(*) AS d FROM added GROUP BY segment_id \
               UNION ALL SELECT segment_id, -count(*) AS d FROM removed GROUP BY segment_id) \
             SELECT segment_id, sum(d)::bigint FROM delta GROUP BY segment_id ORDER BY segment_id",
            selects.join(" UNION ALL ")
        );
        let deltas: Vec<(String, i64)> = params
            .bind(
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(tenant)
                    .bind(&ids),
            )
            .fetch_all(&mut *tx)
            .await
            .map(|rows| {
                use sqlx::Row;
                rows.iter().map(|r| (r.get(0), r.get(1))).collect()
            })?;
        for (segment, delta) in deltas.into_iter().filter(|(_, d)| *d != 0) {
            let count: i64 = sqlx::query_scalar(
                "UPDATE segments SET member_count = member_count + $3, updated_at = now() \
                 WHERE tenant_id = $1 AND segment_id = $2 RETURNING member_count",
            )
            .bind(tenant)
            .bind(&segment)
            .bind(delta)
            .fetch_one(&mut *tx)
            .await?;
            crate::segments::write_snapshot(tx, tenant, &segment, count, false).await?;
        }
        Ok(())
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
