//! Read-your-writes against the real server: every command waits for the projection's checkpoint
//! to pass its events, then reads its own row from the read model, while the worker is killed
//! and replaced and its connections are terminated; and the projection fixture on PostgreSQL.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fresh_store;
use cqrs_examples::order::{Order, OrderCommand, OrderEvent, OrderItem};
use evently_core::prelude::*;
use evently_core::projection::{
    HandlerError, NotCaughtUp, ProjectionFixture, wait_until_caught_up,
};
use evently_core::{CommandGateway, RecordedEvent};
use evently_postgres::projection::ProjectionWorker;
use evently_postgres::{PostgresEventStore, PostgresFixture};
use sqlx::{AssertSqlSafe, PgConnection};

/// One row per order, inserted by its creation: a second insert of the same order fails (so a
/// double application shows as a dead letter), a status update of an unknown order too.
#[derive(Clone, Projection)]
#[projection(name = "order_rows", events(OrderEvent), context = PgConnection)]
struct OrderRows {
    schema: String,
}

#[async_trait::async_trait]
impl Handles<OrderEvent, PgConnection> for OrderRows {
    async fn handle(
        &mut self,
        event: &RecordedEvent<OrderEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        let id = event.stream.aggregate_id.as_str();
        let (sql, value) = match &event.event {
            OrderEvent::OrderCreated { customer_id, .. } => (
                "INSERT INTO \"{s}\".order_rows (id, customer, status) VALUES ($1, $2, 'pending')",
                customer_id.as_str(),
            ),
            OrderEvent::OrderCancelled { .. } => (
                "UPDATE \"{s}\".order_rows SET status = $2 WHERE id = $1",
                "cancelled",
            ),
            _ => return Ok(()),
        };
        let done = sqlx::query(AssertSqlSafe(sql.replace("{s}", &self.schema)))
            .bind(id)
            .bind(value)
            .execute(conn)
            .await?;
        if done.rows_affected() != 1 {
            return Err(format!("no order row `{id}` to update").into());
        }
        Ok(())
    }
}

async fn setup(name: &str) -> PostgresEventStore {
    let store = fresh_store(name).await;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE \"{}\".order_rows (id TEXT PRIMARY KEY, customer TEXT NOT NULL, status TEXT NOT NULL)",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    store
}

fn rows(store: &PostgresEventStore) -> OrderRows {
    OrderRows {
        schema: store.schema().to_owned(),
    }
}

async fn row(store: &PostgresEventStore, id: &str) -> Option<(String, String)> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT customer, status FROM \"{}\".order_rows WHERE id = $1",
        store.schema()
    )))
    .bind(id)
    .fetch_optional(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

fn created(customer: &str) -> OrderEvent {
    OrderEvent::OrderCreated {
        customer_id: customer.to_owned(),
        items: vec![OrderItem {
            sku: "sku".to_owned(),
            quantity: 1,
            unit_price_cents: 100,
        }],
    }
}

#[tokio::test]
async fn the_fixture_runs_the_worker_on_the_real_tables() {
    let store = setup("fixture_pg").await;
    let done = ProjectionFixture::new(rows(&store))
        .given("o-1", [created("ann")])
        .given(
            "o-2",
            [
                created("bob"),
                OrderEvent::OrderCancelled { reason: "x".into() },
            ],
        )
        // Cancelled before it exists: the handler fails, the event is parked, not an error.
        .given("o-3", [OrderEvent::OrderCancelled { reason: "y".into() }])
        .caught_up_in(&store)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .then(async |store| {
            assert_eq!(
                row(store, "o-1").await,
                Some(("ann".into(), "pending".into()))
            );
            assert_eq!(
                row(store, "o-2").await,
                Some(("bob".into(), "cancelled".into()))
            );
            assert_eq!(row(store, "o-3").await, None);
        })
        .await
        .then_dead_letters(|letters| {
            assert_eq!(letters.len(), 1);
            assert_eq!(letters[0].stream, StreamId::new("order", "o-3"));
            assert!(
                letters[0].error.contains("no order row `o-3`"),
                "{}",
                letters[0].error
            );
        });
    assert_eq!(done.applied(), 3);
    assert_eq!(
        done.checkpoint(),
        store
            .head()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap()
    );
    // The worker it used holds the lease and can go on.
    let mut worker = done.into_worker();
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
}

/// One worker process under `owner` until `stop` says so, its connections tagged with `app` so
/// they can be terminated.
async fn worker_store(store: &PostgresEventStore, app: &str) -> PostgresEventStore {
    let url = evently_postgres::database_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    PostgresEventStore::connect(
        &format!("{url}{separator}application_name={app}"),
        store.schema(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

fn spawn_worker(
    store: &PostgresEventStore,
    owner: &str,
) -> tokio::task::JoinHandle<Result<OrderRows, evently_postgres::projection::WorkerError>> {
    let worker = ProjectionWorker::new(store.clone(), rows(store), owner)
        .with_batch(7)
        .with_lease(Duration::from_millis(300));
    tokio::spawn(worker.run(Duration::from_millis(200), std::future::pending()))
}

fn create(customer: &str) -> OrderCommand {
    OrderCommand::CreateOrder {
        customer_id: customer.to_owned(),
        items: vec![OrderItem {
            sku: "sku".to_owned(),
            quantity: 1,
            unit_price_cents: 100,
        }],
    }
}

/// 4 writers x 60 commands; each command waits for the projection and then reads its row. Midway
/// the worker is killed (its task aborted mid-batch, its lease left to expire) and a new one under
/// another name takes over; all along, the server terminates the workers' connections every
/// 100-200 ms. Every read finds its row (read-your-writes held throughout), no event is applied
/// twice (the insert would fail and park it) and none is parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_reads_its_own_write_through_worker_deaths() {
    let store = setup("freshness_pg").await;
    let app = "cqrs_freshness_worker";
    let workers = worker_store(&store, app).await;
    let first = spawn_worker(&workers, "w1");
    let gateway = Arc::new(CommandGateway::<Order, _>::new(store.clone()));
    let killer = {
        let pool = store.pool().clone();
        tokio::spawn(async move {
            let mut terminated = 0i64;
            loop {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                )
                .bind(app)
                .fetch_one(&pool)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
                terminated += n;
                let pause = 100 + rand::random_range(0..100);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                if terminated > 1_000_000 {
                    return terminated;
                }
            }
        })
    };
    let mut writers = Vec::new();
    for w in 0..4 {
        let (gateway, store) = (gateway.clone(), store.clone());
        writers.push(tokio::spawn(async move {
            let mut waits = Vec::new();
            for n in 0..60 {
                let id = format!("w{w}-{n}");
                let executed = gateway
                    .execute(id.as_str(), create(&id), CommandMetadata::new())
                    .await
                    .unwrap_or_else(|e| panic!("{id}: {e}"));
                let started = Instant::now();
                wait_until_caught_up(
                    &store,
                    "order_rows",
                    executed.checkpoint().unwrap(),
                    Duration::from_secs(60),
                )
                .await
                .unwrap_or_else(|e| panic!("{id}: {e}"));
                waits.push(started.elapsed());
                assert_eq!(
                    row(&store, &id).await.map(|r| r.0),
                    Some(id.clone()),
                    "{id} was not in the read model after the wait"
                );
            }
            waits
        }));
    }
    // Midway: the first worker dies as a process would (no rollback sent, lease left to expire).
    tokio::time::sleep(Duration::from_secs(2)).await;
    first.abort();
    let _ = first.await;
    let second = spawn_worker(&workers, "w2");
    let mut waits = Vec::new();
    for writer in writers {
        waits.extend(writer.await.unwrap_or_else(|e| panic!("{e}")));
    }
    killer.abort();
    second.abort();
    waits.sort();
    let count: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{}\".order_rows",
        store.schema()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(count, 240);
    let letters = evently_postgres::control::DeadLetters::new(store.clone())
        .list("order_rows")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(letters.is_empty(), "{letters:?}");
    let at = |q: usize| waits[(waits.len() - 1) * q / 100];
    eprintln!(
        "waits of {} commands: p50 {:?}, p99 {:?}, max {:?}",
        waits.len(),
        at(50),
        at(99),
        waits[waits.len() - 1]
    );
}

#[tokio::test]
async fn a_wait_with_no_worker_times_out_with_the_checkpoint_reached() {
    let store = setup("freshness_none").await;
    let gateway = CommandGateway::<Order, _>::new(store.clone());
    let executed = gateway
        .execute("a", create("ann"), CommandMetadata::new())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let error = wait_until_caught_up(
        &store,
        "order_rows",
        executed.checkpoint().unwrap(),
        Duration::from_millis(150),
    )
    .await
    .unwrap_err();
    let NotCaughtUp::TimedOut { reached, .. } = error else {
        panic!("{error}");
    };
    assert_eq!(reached, evently_core::Checkpoint::START);
}
