//! PostgreSQL: one pool per service, whose connections see the service's own
//! schema first (`search_path`), and the service's migrations applied into
//! that schema at start-up.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};

use crate::config::PostgresConfig;

/// A PostgreSQL operation of the runtime failed.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// `HIBIKI_DATABASE_URL` does not parse.
    #[error("HIBIKI_DATABASE_URL: {0}")]
    Url(sqlx::Error),
    /// The server could not be reached or refused a statement.
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migrating schema {schema}: {source}")]
    Migrate {
        /// The service's schema.
        schema: &'static str,
        /// The cause.
        source: sqlx::migrate::MigrateError,
    },
}

/// Parses the configured URL.
pub fn connect_options(config: &PostgresConfig) -> Result<PgConnectOptions, PostgresError> {
    PgConnectOptions::from_str(config.url.expose()).map_err(PostgresError::Url)
}

/// A pool that connects on first use, so a service starts (and reports
/// NOT_SERVING) while PostgreSQL is down. Its connections resolve names in
/// `schema` first, then `public`.
pub fn connect_lazy(config: &PostgresConfig, schema: &str) -> Result<PgPool, PostgresError> {
    let options = connect_options(config)?
        .options([
            ("search_path", format!("{schema},public")),
            // hibiki's tables grow from empty within minutes (a new tenant,
            // a storm). A generic plan chosen while a table was small stays
            // cached in the connection until its statistics change, and
            // then reads thousands of rows per lookup; planning each
            // statement for its parameters and the table's current size
            // costs a little CPU and never goes that wrong. Custom plans
            // still trust column statistics, which lag behind a storm: the
            // hot statements are written so that one index serves them
            // whatever the statistics say (scenario's `runs`, contacts'
            // `store`).
            ("plan_cache_mode", "force_custom_plan".to_owned()),
        ])
        .log_statements(tracing::log::LevelFilter::Debug);
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        // Fail fast when the server is down: the health monitor retries.
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy_with(options))
}

/// Creates the service's schema if missing and applies its migrations there.
/// Safe to run from several replicas at once: sqlx takes an advisory lock.
pub async fn migrate(
    pool: &PgPool,
    schema: &'static str,
    migrator: &sqlx::migrate::Migrator,
) -> Result<(), PostgresError> {
    // The schema name is a compile-time constant of the service, never input.
    let create = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
    sqlx::query(sqlx::AssertSqlSafe(create))
        .execute(pool)
        .await?;
    migrator
        .run(pool)
        .await
        .map_err(|source| PostgresError::Migrate { schema, source })?;
    warn_without_autovacuum(pool).await;
    Ok(())
}

/// Logs a warning when the server runs without autovacuum: nothing then
/// removes dead rows or refreshes the planner's statistics, and hibiki's
/// hot tables (runs, contacts) slow down as they grow.
async fn warn_without_autovacuum(pool: &PgPool) {
    if let Ok(setting) = sqlx::query_scalar::<_, String>("SHOW autovacuum")
        .fetch_one(pool)
        .await
        && setting != "on"
    {
        tracing::warn!(
            "PostgreSQL's autovacuum is off: dead rows pile up and query plans are chosen \
             on stale statistics, so queries slow down as tables grow; set autovacuum = on \
             in postgresql.conf, or run VACUUM (ANALYZE) regularly"
        );
    }
}

/// Creates the database named in the URL when it does not exist (used by
/// `hibiki dev` and tests; in a cluster the database is provisioned). Returns
/// whether it was created.
pub async fn ensure_database(config: &PostgresConfig) -> Result<bool, PostgresError> {
    let options = connect_options(config)?;
    let name = options
        .get_database()
        .unwrap_or(options.get_username())
        .to_owned();
    let mut admin = sqlx::PgConnection::connect_with(&options.clone().database("postgres")).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if exists {
        return Ok(false);
    }
    let create = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match sqlx::query(sqlx::AssertSqlSafe(create))
        .execute(&mut admin)
        .await
    {
        Ok(_) => Ok(true),
        // Another process created it between our check and our CREATE.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Checks that the server answers.
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(|_| ())
}

/// Keeps a queue table (rows written, then deleted once handled) lean:
/// after `every` deleted rows it runs `VACUUM` on the table, so scans in id
/// order do not wade through the dead rows of every row ever handled. The
/// server's autovacuum would get there too, but it may be slow to start, or
/// off; a queue table is small once vacuumed, so this costs little.
#[derive(Debug)]
pub struct QueueVacuum {
    table: &'static str,
    every: u64,
    deleted: std::sync::atomic::AtomicU64,
}

impl QueueVacuum {
    /// Vacuums `table` (a plain identifier) after every `every` deletions.
    pub const fn new(table: &'static str, every: u64) -> Self {
        Self {
            table,
            every,
            deleted: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Counts `rows` deleted; vacuums the table once enough were.
    /// Must not be called inside a transaction.
    pub async fn deleted(&self, pool: &PgPool, rows: u64) -> Result<(), sqlx::Error> {
        use std::sync::atomic::Ordering;
        let total = self.deleted.fetch_add(rows, Ordering::Relaxed) + rows;
        if total < self.every {
            return Ok(());
        }
        self.deleted.store(0, Ordering::Relaxed);
        // No truncation: it takes the table's exclusive lock, which every
        // writer of the queue would queue behind.
        let sql = format!("VACUUM (SKIP_LOCKED, TRUNCATE false) {}", self.table);
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(pool)
            .await?;
        tracing::debug!(table = self.table, deleted = total, "queue table vacuumed");
        Ok(())
    }
}
