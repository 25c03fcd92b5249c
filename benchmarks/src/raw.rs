//! Raw sqlx on a minimal events table: the limits (L1-L5) and the workloads written by hand
//! with one statement per command (the version computed by the insert itself). The payload column
//! is `json` bound as text, as in the store's own table (migration 0009), so a limit does the
//! same work by hand.

use std::sync::Arc;
use std::time::Instant;

use sqlx::{AssertSqlSafe, PgPool, Row};

use crate::framework::{Failure, Framework, REFERENCE, amount};

/// A pool on `url` with an empty `schema` holding `events`.
pub async fn pool(url: &str, schema: &str, connections: u32) -> PgPool {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
    for sql in [
        format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
        format!("CREATE SCHEMA {schema}"),
        format!(
            "CREATE TABLE {schema}.events (aggregate_id TEXT NOT NULL, version BIGINT NOT NULL, \
             event_type TEXT NOT NULL, payload JSON NOT NULL, \
             recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (aggregate_id, version))"
        ),
    ] {
        sqlx::query(AssertSqlSafe(sql.clone()))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    pool
}

/// The JSON text of deposit `n`.
fn payload(n: u64) -> String {
    serde_json::json!({ "amount_cents": amount(n), "reference": REFERENCE }).to_string()
}

/// The payload as a reader deserializes it.
#[derive(serde::Deserialize)]
struct Payload {
    amount_cents: Option<u64>,
    #[allow(dead_code)] // read as a reader would
    reference: Option<String>,
}

/// Raw sqlx as a framework: one statement per command.
pub struct Raw {
    pool: PgPool,
    schema: String,
    insert: String,
    select: String,
}

impl Raw {
    /// On an empty `schema`.
    pub async fn new(url: &str, schema: &str, connections: u32) -> Self {
        Self {
            pool: pool(url, schema, connections).await,
            schema: schema.to_owned(),
            insert: format!(
                "INSERT INTO {schema}.events (aggregate_id, version, event_type, payload) \
                 SELECT $1, COALESCE(max(version), 0) + 1, $2, $3::text::json FROM {schema}.events WHERE aggregate_id = $1"
            ),
            select: format!(
                "SELECT payload FROM {schema}.events WHERE aggregate_id = $1 ORDER BY version"
            ),
        }
    }

    async fn record(&self, id: u64, kind: &str, payload: String) -> Result<(), Failure> {
        sqlx::query(AssertSqlSafe(self.insert.clone()))
            .bind(format!("acc-{id}"))
            .bind(kind)
            .bind(payload)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| match &e {
                sqlx::Error::Database(d) if d.code().as_deref() == Some("23505") => {
                    Failure::Conflict
                }
                _ => Failure::other(e),
            })
    }
}

#[async_trait::async_trait]
impl Framework for Raw {
    fn name(&self) -> &'static str {
        "raw sqlx"
    }

    async fn open(&self, id: u64) -> Result<(), Failure> {
        self.record(
            id,
            "Opened",
            serde_json::json!({ "owner": "ada" }).to_string(),
        )
        .await
    }

    async fn deposit(&self, id: u64, n: u64) -> Result<(), Failure> {
        self.record(id, "Deposited", payload(n)).await
    }

    async fn balance(&self, id: u64) -> Result<u64, Failure> {
        let rows = sqlx::query(AssertSqlSafe(self.select.clone()))
            .bind(format!("acc-{id}"))
            .fetch_all(&self.pool)
            .await
            .map_err(Failure::other)?;
        let mut balance = 0;
        for row in &rows {
            let payload: sqlx::types::Json<Payload> = row.try_get(0).map_err(Failure::other)?;
            balance += payload.0.amount_cents.unwrap_or(0);
        }
        Ok(balance)
    }

    async fn events(&self, id: u64) -> Result<u64, Failure> {
        let rows = sqlx::query(AssertSqlSafe(self.select.clone()))
            .bind(format!("acc-{id}"))
            .fetch_all(&self.pool)
            .await
            .map_err(Failure::other)?;
        Ok(rows.len() as u64)
    }

    async fn bulk(&self, id: u64, count: u64) -> Result<(), Failure> {
        copy(&self.pool, &self.schema, &format!("acc-{id}"), count).await;
        Ok(())
    }
}

/// COPY of `count` deposits into stream `id`.
async fn copy(pool: &PgPool, schema: &str, id: &str, count: u64) {
    let mut data = String::with_capacity(count as usize * 100);
    for v in 1..=count {
        data.push_str(&format!("{id}\t{v}\tDeposited\t{}\n", payload(v - 1)));
    }
    copy_in(
        pool,
        &format!("COPY {schema}.events (aggregate_id, version, event_type, payload) FROM STDIN"),
        &data,
    )
    .await;
}

/// Sends `data` with the `COPY .. FROM STDIN` statement `statement` on a connection of `pool`.
async fn copy_in(pool: &PgPool, statement: &str, data: &str) {
    let mut conn = pool.acquire().await.unwrap_or_else(|e| panic!("{e}"));
    let mut copy = conn
        .copy_in_raw(statement)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
    copy.send(data.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    copy.finish().await.unwrap_or_else(|e| panic!("{e}"));
}

/// L1 (`tasks` = 1) and L4 (`tasks` = 8): single-row insert transactions with known versions.
pub async fn inserts(url: &str, tasks: u64, total: u64) -> f64 {
    let schema = format!("bench_l{}", if tasks == 1 { 1 } else { 4 });
    let pool = pool(url, &schema, tasks as u32 + 1).await;
    let sql: Arc<str> = format!(
        "INSERT INTO {schema}.events (aggregate_id, version, event_type, payload) VALUES ($1, $2, 'Deposited', $3::text::json)"
    )
    .into();
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (pool, sql) = (pool.clone(), Arc::clone(&sql));
        handles.push(tokio::spawn(async move {
            for v in 1..=total / tasks {
                sqlx::query(AssertSqlSafe(Arc::clone(&sql)))
                    .bind(format!("raw-{t}"))
                    .bind(v as i64)
                    .bind(payload(v))
                    .execute(&pool)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap_or_else(|e| panic!("{e}"));
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// L3: COPY of `rows` rows.
pub async fn copy_rows(url: &str, rows: u64) -> f64 {
    let pool = pool(url, "bench_l3", 2).await;
    let start = Instant::now();
    copy(&pool, "bench_l3", "copy", rows).await;
    rows as f64 / start.elapsed().as_secs_f64()
}

/// L3f: COPY of `rows` rows into this framework's own events table (a store's schema, migrated),
/// each row with an event id and the metadata the store writes, positions and transaction id
/// left to the table's defaults: what the table itself costs, whoever writes into it. W5 against
/// L3 is the framework and its table; W5 against L3f is the framework alone.
pub async fn copy_into_store_table(url: &str, rows: u64) -> f64 {
    let schema = "bench_l3f";
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let store = evently_postgres::PostgresEventStore::new(pool.clone(), schema)
        .unwrap_or_else(|e| panic!("{e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
    let metadata = serde_json::to_string(&crate::ours::deposit_event(0).metadata)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !metadata.contains(['\\', '\t', '\n']),
        "the metadata needs no escaping in text COPY: {metadata}"
    );
    let start = Instant::now();
    let mut data = String::with_capacity(rows as usize * 250);
    for v in 1..=rows {
        let id = uuid::Uuid::now_v7();
        data.push_str(&format!(
            "{id}\taccount\tcopy\t{v}\tDeposited\t1\t{}\t{metadata}\n",
            payload(v - 1)
        ));
    }
    copy_in(
        &pool,
        &format!(
            "COPY {schema}.events (event_id, aggregate_type, aggregate_id, version, event_type, \
             schema_version, payload, metadata) FROM STDIN"
        ),
        &data,
    )
    .await;
    rows as f64 / start.elapsed().as_secs_f64()
}

/// L5: select the `len` rows of one stream and deserialize them (whole rows, or the payload
/// column alone: the stricter limit): seconds.
pub async fn select(url: &str, len: u64, whole_rows: bool) -> f64 {
    let pool = pool(url, "bench_l5", 2).await;
    copy(&pool, "bench_l5", "long", len).await;
    let columns = if whole_rows {
        "payload, version, event_type, recorded_at"
    } else {
        "payload"
    };
    let start = Instant::now();
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT {columns} FROM bench_l5.events WHERE aggregate_id = 'long' ORDER BY version"
    )))
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for row in &rows {
        let payload: sqlx::types::Json<Payload> = row.try_get(0).unwrap_or_else(|e| panic!("{e}"));
        std::hint::black_box(payload);
        if whole_rows {
            let version: i64 = row.try_get(1).unwrap_or_else(|e| panic!("{e}"));
            let kind: String = row.try_get(2).unwrap_or_else(|e| panic!("{e}"));
            let at: chrono::DateTime<chrono::Utc> =
                row.try_get(3).unwrap_or_else(|e| panic!("{e}"));
            std::hint::black_box((version, kind, at));
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(rows.len() as u64, len);
    elapsed
}
