//! Shared by the PostgreSQL tests: a fresh store in a schema of its own per test.
#![allow(dead_code)] // each test binary uses a different part

use evently_postgres::{PostgresEventStore, database_url};
use sqlx::postgres::PgPoolOptions;

/// A pool on `DATABASE_URL` with room for `connections`.
pub async fn pool(connections: u32) -> sqlx::PgPool {
    let url = database_url();
    PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(std::time::Duration::from_secs(120))
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is not reachable at {url} (set DATABASE_URL): {e}"))
}

/// An empty, migrated store in schema `t_<name>` (dropped first, so reruns start clean).
pub async fn fresh_store(name: &str) -> PostgresEventStore {
    fresh_store_with(name, 16).await
}

/// As [`fresh_store`], with a pool of `connections`.
pub async fn fresh_store_with(name: &str, connections: u32) -> PostgresEventStore {
    let pool = pool(connections).await;
    let schema = format!("t_{name}");
    let quoted = format!("\"{}\"", schema.replace('"', "\"\""));
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {quoted} CASCADE"
    )))
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("drop schema {schema}: {e}"));
    let store = PostgresEventStore::new(pool, &schema).unwrap_or_else(|e| panic!("{e}"));
    store
        .migrate()
        .await
        .unwrap_or_else(|e| panic!("migrate {schema}: {e}"));
    store
}

/// A deposit event of `amount_cents`.
pub fn deposit(amount_cents: u64) -> evently_core::EventData {
    use cqrs_examples::bank::{AccountEvent, Deposit};
    evently_core::EventData::from_event(
        &AccountEvent::Deposited(Deposit {
            amount_cents,
            reference: String::new(),
        }),
        evently_core::Metadata::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The ids of every event readable after `after`, read through the store in pages of `page`.
pub async fn read_after(
    store: &PostgresEventStore,
    mut after: evently_core::Checkpoint,
    page: usize,
) -> Vec<uuid::Uuid> {
    use evently_core::EventStore as _;
    let mut all = Vec::new();
    loop {
        let events = store
            .read_all(after, page)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let Some(last) = events.last() else {
            return all;
        };
        after = last.checkpoint;
        all.extend(events.iter().map(|e| e.event_id.0));
    }
}

/// Every event id of `schema` in the global order, read with plain SQL (whatever the store would
/// refuse).
pub async fn global_order(pool: &sqlx::PgPool, schema: &str) -> Vec<uuid::Uuid> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT event_id FROM \"{schema}\".events ORDER BY transaction_id, global_position"
    )))
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}
