//! The projection-engine conformance suite against the PostgreSQL worker: the same checks as the
//! in-process runner's (`tests/tests/projection_conformance_memory.rs`), with the ledger in a table
//! written in each batch's transaction.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::fresh_store;
use evently_core::prelude::*;
use evently_core::projection::{
    Batch, DeadLetter, DeliveryError, FailurePolicy, HandlerError, Redrive,
};
use evently_core::projection_conformance::{LedgerRuntime, is_poison};
use evently_postgres::PostgresEventStore;
use evently_postgres::control::DeadLetters;
use evently_postgres::projection::ProjectionWorker;
use sqlx::{AssertSqlSafe, PgConnection};

/// The suite's credits.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum LedgerEvent {
    Credited { amount: u64 },
}

/// Events the ledger does not listen to.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum NoiseEvent {
    Noise,
}

/// The ledger in a table: one row per application, in application order.
#[derive(Clone, Projection)]
#[projection(name = "ledger", events(LedgerEvent), context = PgConnection)]
struct Ledger {
    schema: String,
    poisoned: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl Handles<LedgerEvent, PgConnection> for Ledger {
    async fn handle(
        &mut self,
        event: &RecordedEvent<LedgerEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        let LedgerEvent::Credited { amount } = event.event;
        if self.poisoned.load(Ordering::SeqCst) && is_poison(amount) {
            return Err(format!("poison credit {amount}").into());
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{}\".ledger (stream, amount) VALUES ($1, $2)",
            self.schema
        )))
        .bind(event.stream.aggregate_id.as_str())
        .bind(i64::try_from(amount)?)
        .execute(conn)
        .await?;
        Ok(())
    }
}

struct PostgresLedger {
    store: PostgresEventStore,
    ledger: Ledger,
    policy: FailurePolicy,
    worker: ProjectionWorker<Ledger>,
}

impl PostgresLedger {
    async fn worker(&self) -> ProjectionWorker<Ledger> {
        let schema = self.ledger.schema.clone();
        let mut worker =
            ProjectionWorker::new(self.store.clone(), self.ledger.clone(), "conformance")
                .with_failure_policy(self.policy)
                .with_batch(16)
                .with_reset(move |conn| {
                    let schema = schema.clone();
                    Box::pin(async move {
                        sqlx::query(AssertSqlSafe(format!("TRUNCATE \"{schema}\".ledger")))
                            .execute(conn)
                            .await
                            .map(drop)
                    })
                });
        assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
        worker
    }

    async fn new(test: &str) -> Self {
        let store = fresh_store(&format!("engine_{test}")).await;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE \"{}\".ledger (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, stream TEXT NOT NULL, amount BIGINT NOT NULL)",
            store.schema()
        )))
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let ledger = Ledger {
            schema: store.schema().to_owned(),
            poisoned: Arc::default(),
        };
        let worker = ProjectionWorker::new(store.clone(), ledger.clone(), "placeholder");
        let mut this = Self {
            store,
            ledger,
            policy: FailurePolicy::default(),
            worker,
        };
        this.worker = this.worker().await;
        this
    }
}

#[async_trait::async_trait]
impl LedgerRuntime for PostgresLedger {
    type Store = PostgresEventStore;

    fn store(&self) -> &PostgresEventStore {
        &self.store
    }

    fn credit(amount: u64) -> evently_core::EventData {
        evently_core::EventData::from_event(&LedgerEvent::Credited { amount }, Metadata::default())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn noise() -> evently_core::EventData {
        evently_core::EventData::from_event(&NoiseEvent::Noise, Metadata::default())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn reopen(&self) -> Self {
        Self {
            store: self.store.clone(),
            ledger: self.ledger.clone(),
            policy: self.policy,
            worker: self.worker().await,
        }
    }

    fn set_poisoned(&mut self, poisoned: bool) {
        self.ledger.poisoned.store(poisoned, Ordering::SeqCst);
    }

    async fn set_policy(&mut self, policy: FailurePolicy) {
        self.policy = policy;
        self.worker = self.worker().await;
    }

    async fn step(&mut self) -> Result<Batch, DeliveryError> {
        self.worker.step().await
    }

    async fn catch_up(&mut self) -> Result<usize, DeliveryError> {
        self.worker.catch_up().await
    }

    async fn retry_all(&mut self) -> Result<Redrive, DeliveryError> {
        self.worker.retry_all().await
    }

    async fn rebuild(&mut self) -> Result<usize, DeliveryError> {
        let schema = self.ledger.schema.clone();
        self.worker
            .rebuild(move |conn| {
                Box::pin(async move {
                    sqlx::query(AssertSqlSafe(format!("TRUNCATE \"{schema}\".ledger")))
                        .execute(conn)
                        .await
                        .map(drop)
                })
            })
            .await
    }

    async fn applications(&self) -> Vec<(StreamId, u64)> {
        let rows: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT stream, amount FROM \"{}\".ledger ORDER BY id",
            self.ledger.schema
        )))
        .fetch_all(self.store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        rows.into_iter()
            .map(|(stream, amount)| {
                (
                    StreamId::new("ledger", stream),
                    u64::try_from(amount).unwrap_or(0),
                )
            })
            .collect()
    }

    async fn dead_letters(&self) -> Vec<DeadLetter> {
        DeadLetters::new(self.store.clone())
            .list("ledger")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

evently_core::projection_conformance_tests!(|test: &'static str| PostgresLedger::new(test));
