//! Shared by the PostgreSQL tests: a fresh store in a schema of its own per test.
#![allow(dead_code)] // each test binary uses a different part

use cqrs_postgres::{PostgresEventStore, database_url};
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
