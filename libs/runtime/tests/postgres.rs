//! A service's migrations land in its own schema, run once however often
//! they are applied, and `ensure_database` creates a missing database once.

use hibiki_runtime::config::{PostgresConfig, Secret};
use hibiki_runtime::postgres;
use hibiki_testkit::TestDatabase;

fn config(url: &str) -> PostgresConfig {
    PostgresConfig {
        url: Secret::new(url),
        max_connections: 2,
    }
}

#[tokio::test]
async fn migrations_create_tables_in_the_services_own_schema_and_run_once() {
    let database = TestDatabase::create().await;
    let pool = postgres::connect_lazy(&config(database.url()), "notes_service").unwrap();
    let migrator = sqlx::migrate::Migrator::new(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/migrations_fixture"
    )))
    .await
    .unwrap();

    postgres::migrate(&pool, "notes_service", &migrator)
        .await
        .unwrap();
    // A second start (or a second replica) finds nothing left to do.
    postgres::migrate(&pool, "notes_service", &migrator)
        .await
        .unwrap();

    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema::text, table_name::text FROM information_schema.tables
         WHERE table_name IN ('notes', '_sqlx_migrations') ORDER BY table_name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        tables,
        [
            ("notes_service".to_owned(), "_sqlx_migrations".to_owned()),
            ("notes_service".to_owned(), "notes".to_owned()),
        ]
    );
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied, 1);
}

#[tokio::test]
async fn ensure_database_creates_a_missing_database_once() {
    let database = TestDatabase::reserve();
    assert!(!database.exists().await);
    assert!(
        postgres::ensure_database(&config(database.url()))
            .await
            .unwrap()
    );
    assert!(database.exists().await);
    assert!(
        !postgres::ensure_database(&config(database.url()))
            .await
            .unwrap()
    );
}
