//! PostgreSQL projections against the real server: the read-model change and the checkpoint commit
//! together (crashes at chosen points leave a non-idempotent counter exactly right), and a zombie
//! owner can never write after a new one took over.

mod common;

use std::time::Duration;

use common::fresh_store;
use cqrs_core::prelude::*;
use cqrs_core::projection::HandlerError;
use cqrs_core::{EventData, RecordedEvent};
use cqrs_examples::bank::{AccountEvent, Deposit};
use cqrs_postgres::PostgresEventStore;
use cqrs_postgres::projection::{ProjectionWorker, WorkerError, read_checkpoint};
use sqlx::{AssertSqlSafe, PgConnection};

/// Adds every deposit to one row: not idempotent, so any double or lost application shows.
#[derive(Projection)]
#[projection(name = "deposit_totals", events(AccountEvent), context = PgConnection)]
struct DepositTotals {
    schema: String,
    /// Fail on the n-th event this instance handles (a crash at a chosen point).
    fail_at: Option<u64>,
    handled: u64,
}

impl DepositTotals {
    fn new(store: &PostgresEventStore) -> Self {
        Self {
            schema: store.schema().to_owned(),
            fail_at: None,
            handled: 0,
        }
    }
}

#[async_trait::async_trait]
impl Handles<AccountEvent, PgConnection> for DepositTotals {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        self.handled += 1;
        if Some(self.handled) == self.fail_at {
            return Err(format!("crash at event {}", self.handled).into());
        }
        if let AccountEvent::Deposited(deposit) = &event.event {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE \"{}\".deposit_totals SET total = total + $1, count = count + 1 WHERE id = 1",
                self.schema
            )))
            .bind(i64::try_from(deposit.amount_cents)?)
            .execute(conn)
            .await?;
        }
        Ok(())
    }
}

async fn setup(name: &str, deposits: u64) -> PostgresEventStore {
    let store = fresh_store(name).await;
    for sql in [
        "CREATE TABLE \"{0}\".deposit_totals (id INT PRIMARY KEY, total BIGINT NOT NULL, count BIGINT NOT NULL)",
        "INSERT INTO \"{0}\".deposit_totals VALUES (1, 0, 0)",
    ] {
        sqlx::query(AssertSqlSafe(sql.replace("{0}", store.schema())))
            .execute(store.pool())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    append_deposits(&store, 1, deposits).await;
    store
}

async fn append_deposits(store: &PostgresEventStore, from: u64, to: u64) {
    for n in from..=to {
        let event = AccountEvent::Deposited(Deposit {
            amount_cents: n,
            reference: String::new(),
        });
        let data =
            EventData::from_event(&event, Metadata::default()).unwrap_or_else(|e| panic!("{e}"));
        store
            .append(
                &StreamId::new("account", format!("a{}", n % 7)),
                ExpectedVersion::Any,
                vec![data],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

async fn totals(store: &PostgresEventStore) -> (i64, i64) {
    let row: (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT total, count FROM \"{}\".deposit_totals WHERE id = 1",
        store.schema()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    row
}

fn sum(n: u64) -> i64 {
    i64::try_from(n * (n + 1) / 2).unwrap_or(i64::MAX)
}

/// A handler fails after k of m events of a batch, then the future of a step is dropped midway:
/// each time the batch is rolled back whole, and the resumed projection ends exactly right.
#[tokio::test]
async fn crashes_mid_batch_leave_the_read_model_exactly_right() {
    const M: u64 = 120;
    let store = setup("projection_crash", M).await;
    let mut worker =
        ProjectionWorker::new(store.clone(), DepositTotals::new(&store), "w1").with_batch(50);
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    let first = worker.step().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((first.read, first.applied), (50, 50));
    assert_eq!(totals(&store).await, (sum(50), 50));

    // Crash at the 7th event of the second batch: nothing of that batch stays.
    let mut crashing = DepositTotals::new(&store);
    crashing.fail_at = Some(7);
    let mut worker = ProjectionWorker::new(store.clone(), crashing, "w1").with_batch(50);
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    let error = worker.step().await.unwrap_err();
    assert!(matches!(error, WorkerError::Projection(_)), "{error}");
    assert_eq!(
        totals(&store).await,
        (sum(50), 50),
        "the failed batch left no trace"
    );
    assert_eq!(
        worker.checkpoint().await.unwrap_or_else(|e| panic!("{e}")),
        first.checkpoint
    );

    // A step whose future is dropped at random points (a process killed mid-batch).
    for cut in [1u64, 3, 5, 8, 13] {
        let mut worker =
            ProjectionWorker::new(store.clone(), DepositTotals::new(&store), "w1").with_batch(50);
        assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
        let _ = tokio::time::timeout(Duration::from_millis(cut), worker.step()).await;
        let (total, count) = totals(&store).await;
        let checkpoint = worker.checkpoint().await.unwrap_or_else(|e| panic!("{e}"));
        // Whatever committed, the read model and the checkpoint agree.
        let committed = u64::try_from(count).unwrap_or(0);
        assert_eq!(
            total,
            sum(committed),
            "cut after {cut} ms: the totals match the checkpoint"
        );
        assert!(
            committed == 50 || committed == 100 || committed == M,
            "whole batches only: {committed}"
        );
        let _ = checkpoint;
    }

    let mut worker =
        ProjectionWorker::new(store.clone(), DepositTotals::new(&store), "w1").with_batch(50);
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    worker.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        totals(&store).await,
        (sum(M), i64::try_from(M).unwrap_or(0)),
        "exactly once in effect"
    );
}

/// The owner pauses past its lease, a new owner takes over, the old one resumes: it writes nothing,
/// and the checkpoint never goes back.
#[tokio::test]
async fn a_zombie_owner_cannot_write_after_a_takeover() {
    let store = setup("projection_zombie", 40).await;
    let lease = Duration::from_millis(600);
    let mut old = ProjectionWorker::new(store.clone(), DepositTotals::new(&store), "old")
        .with_batch(10)
        .with_lease(lease);
    assert!(old.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    old.step().await.unwrap_or_else(|e| panic!("{e}"));

    let mut new = ProjectionWorker::new(store.clone(), DepositTotals::new(&store), "new")
        .with_batch(10)
        .with_lease(lease);
    assert!(
        !new.acquire().await.unwrap_or_else(|e| panic!("{e}")),
        "the old lease is live"
    );

    // The old owner stalls past its lease; the new one takes over and catches up.
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    assert!(new.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    new.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    append_deposits(&store, 41, 60).await;
    let before = totals(&store).await;
    let checkpoint = read_checkpoint(&store, "deposit_totals")
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // The zombie resumes: every step it tries is refused and rolled back.
    for _ in 0..3 {
        match old.step().await {
            Err(WorkerError::LeaseLost { .. }) => {}
            other => panic!("the zombie must lose its lease, got {other:?}"),
        }
    }
    assert_eq!(
        totals(&store).await,
        before,
        "0 writes accepted from the old owner"
    );
    assert_eq!(
        read_checkpoint(&store, "deposit_totals")
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        checkpoint
    );

    new.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(totals(&store).await, (sum(60), 60));
}
