//! PostgreSQL projections against the real server: the read-model change and the checkpoint commit
//! together (crashes at chosen points leave a non-idempotent counter exactly right), and a zombie
//! owner can never write after a new one took over.

mod common;

use std::time::Duration;

use common::fresh_store;
use cqrs_examples::bank::{AccountEvent, Deposit};
use evently_core::prelude::*;
use evently_core::projection::{HandlerError, LeaseLoss};
use evently_core::{EventData, RecordedEvent};
use evently_postgres::PostgresEventStore;
use evently_postgres::control::{DeadLetters, read_checkpoint};
use evently_postgres::projection::{FailureMode, FailurePolicy, ProjectionWorker, WorkerError};
use sqlx::{AssertSqlSafe, PgConnection};

/// Adds every deposit to one row: not idempotent, so any double or lost application shows.
#[derive(Projection)]
#[projection(name = "deposit_totals", events(AccountEvent), context = PgConnection)]
struct DepositTotals {
    schema: String,
    /// Crash (panic, as a process dies) on the n-th event this instance handles.
    crash_at: Option<u64>,
    /// Fail on every deposit whose amount is a multiple of 13 (poison events), while set.
    poison: bool,
    handled: u64,
}

impl DepositTotals {
    fn new(store: &PostgresEventStore) -> Self {
        Self {
            schema: store.schema().to_owned(),
            crash_at: None,
            poison: false,
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
        if Some(self.handled) == self.crash_at {
            // The process dies here: the handler never returns (the test kills the task). A
            // panic would not do: the engine turns a handler's panic into that event's failure.
            std::future::pending::<()>().await;
        }
        if let AccountEvent::Deposited(deposit) = &event.event {
            if self.poison && deposit.amount_cents % 13 == 0 {
                return Err(format!("poison deposit of {}", deposit.amount_cents).into());
            }
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

/// Readers never see past the cluster's oldest open transaction. The late-commit test holds one open
/// on purpose, so it runs alone (write lock) while the others, which expect what they appended to
/// be readable at once, share the read lock.
static XMIN_HORIZON: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

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
    settle(&store).await;
    store
}

/// Waits until every event committed so far is readable in the global order (no transaction that
/// started before the last commit is still open anywhere in the cluster), for the tests that
/// `step` by hand and expect to read what they just appended.
async fn settle(store: &PostgresEventStore) {
    let Some(head) = store.head().await.unwrap_or_else(|e| panic!("{e}")) else {
        return;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let horizon: String =
            sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
                .fetch_one(store.pool())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        if horizon.parse::<u64>().unwrap_or(0) > head.transaction {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a transaction stayed open for a minute"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Inserts a deposit as version 1 of `account/<id>` on `conn`, bypassing the store: the tests hold
/// transactions open or disable triggers on that connection, which the store's API never does.
async fn raw_deposit(conn: &mut PgConnection, schema: &str, id: &str, amount_cents: u64) {
    let data = EventData::from_event(
        &AccountEvent::Deposited(Deposit {
            amount_cents,
            reference: String::new(),
        }),
        Metadata::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO \"{schema}\".events (event_id, aggregate_type, aggregate_id, version, event_type, schema_version, payload, metadata) \
         VALUES ($1, 'account', $2, 1, $3, $4, $5, '{{}}')"
    )))
    .bind(data.event_id.0)
    .bind(id)
    .bind(&data.event_type)
    .bind(i32::try_from(data.schema_version).unwrap_or(1))
    .bind(&data.payload)
    .execute(conn)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
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
    let _horizon = XMIN_HORIZON.read().await;
    const M: u64 = 120;
    let store = setup("projection_crash", M).await;
    let mut worker =
        ProjectionWorker::new(store.clone(), DepositTotals::new(&store), "w1").with_batch(50);
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    let first = worker.step().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((first.read, first.applied), (50, 50));
    assert_eq!(totals(&store).await, (sum(50), 50));

    // The process crashes at the 7th event of the second batch: nothing of that batch stays.
    let mut crashing = DepositTotals::new(&store);
    crashing.crash_at = Some(7);
    let mut worker = ProjectionWorker::new(store.clone(), crashing, "w1").with_batch(50);
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    let crashed = tokio::spawn(async move { worker.step().await.map(|_| ()) });
    // Killed once the 7th event's handler runs (its batch's transaction open).
    tokio::time::sleep(Duration::from_millis(300)).await;
    crashed.abort();
    assert!(
        crashed.await.is_err_and(|e| e.is_cancelled()),
        "the step was killed mid-batch"
    );
    assert_eq!(
        totals(&store).await,
        (sum(50), 50),
        "the crashed batch left no trace"
    );
    assert_eq!(
        read_checkpoint(&store, "deposit_totals")
            .await
            .unwrap_or_else(|e| panic!("{e}")),
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
    assert_eq!(
        worker.lag().await.unwrap_or_else(|e| panic!("{e}")),
        0,
        "caught up: no lag"
    );
}

/// A worker that stalls past its lease with no one taking over is told its lease expired (with
/// the epoch it held), not that another worker owns the projection, by a step, by a rebuild (whose
/// reset finds the lease gone) and after an operator deleted its checkpoint row; nothing it did
/// meanwhile is kept, and taking the lease again works.
#[tokio::test]
async fn a_stalled_worker_is_told_its_lease_expired() {
    let _horizon = XMIN_HORIZON.read().await;
    let store = setup("projection_stalled", 20).await;
    let expire = format!(
        "UPDATE \"{}\".projection_checkpoints SET lease_until = clock_timestamp() - interval '1 second' \
         WHERE projection = 'deposit_totals'",
        store.schema()
    );
    let run = |sql: String| {
        let store = store.clone();
        async move {
            sqlx::query(AssertSqlSafe(sql))
                .execute(store.pool())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    };
    let mut worker =
        ProjectionWorker::new(store.clone(), DepositTotals::new(&store), "w").with_batch(10);
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    worker.step().await.unwrap_or_else(|e| panic!("{e}"));
    let (total, checkpoint) = (
        totals(&store).await,
        read_checkpoint(&store, "deposit_totals")
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );

    // A step after the lease ran out.
    run(expire.clone()).await;
    match worker.step().await {
        Err(
            error @ WorkerError::LeaseLost {
                projection: "deposit_totals",
                epoch: Some(1),
                loss: LeaseLoss::Expired,
            },
        ) => {
            let message = error.to_string();
            assert!(
                message.contains("held epoch 1") && message.contains("stalled for longer"),
                "{message}"
            );
            assert!(!message.contains("another worker"), "{message}");
        }
        other => panic!("the step must be told the lease expired, got {other:?}"),
    }
    assert_eq!(
        totals(&store).await,
        total,
        "the refused batch was rolled back"
    );

    // A rebuild after the lease ran out: its reset is refused, nothing is reset.
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    run(expire).await;
    match worker
        .rebuild(|conn| {
            Box::pin(async move {
                sqlx::query("SELECT 1").execute(conn).await?;
                Ok(())
            })
        })
        .await
    {
        Err(WorkerError::LeaseLost {
            epoch: Some(2),
            loss: LeaseLoss::Expired,
            ..
        }) => {}
        other => panic!("the rebuild must be told the lease expired, got {other:?}"),
    }
    assert_eq!(
        read_checkpoint(&store, "deposit_totals")
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        checkpoint,
        "the refused rebuild reset nothing"
    );

    // The row deleted by an operator under a live lease: gone.
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    run(format!(
        "DELETE FROM \"{}\".projection_checkpoints WHERE projection = 'deposit_totals'",
        store.schema()
    ))
    .await;
    match worker.step().await {
        Err(WorkerError::LeaseLost {
            epoch: Some(3),
            loss: LeaseLoss::Gone,
            ..
        }) => {}
        other => panic!("the step must be told the row is gone, got {other:?}"),
    }
    assert_eq!(totals(&store).await, total);
}

/// The owner pauses past its lease, a new owner takes over, the old one resumes: it writes nothing,
/// and the checkpoint never goes back.
#[tokio::test]
async fn a_zombie_owner_cannot_write_after_a_takeover() {
    let _horizon = XMIN_HORIZON.read().await;
    let store = setup("projection_zombie", 40).await;
    let lease = Duration::from_millis(600);
    let mut old = ProjectionWorker::new(store.clone(), DepositTotals::new(&store), "old")
        .with_batch(10)
        .with_lease(lease);
    assert!(old.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(
        old.lag().await.unwrap_or_else(|e| panic!("{e}")),
        40,
        "40 positions behind the head"
    );
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
    settle(&store).await;
    let before = totals(&store).await;
    let checkpoint = read_checkpoint(&store, "deposit_totals")
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // The zombie resumes: every step it tries is refused and rolled back. The first is told
    // its lease was taken over (naming the epoch it held and the new one), the later ones that
    // it holds none.
    match old.step().await {
        Err(
            error @ WorkerError::LeaseLost {
                epoch: Some(1),
                loss: LeaseLoss::TakenOver { epoch: 2 },
                ..
            },
        ) => {
            let message = error.to_string();
            assert!(
                message.contains("held epoch 1") && message.contains("taken over (now epoch 2)"),
                "{message}"
            );
        }
        other => panic!("the zombie must be told its lease was taken over, got {other:?}"),
    }
    for _ in 0..2 {
        match old.step().await {
            Err(WorkerError::LeaseLost {
                epoch: None,
                loss: LeaseLoss::NotHeld,
                ..
            }) => {}
            other => panic!("the zombie must hold no lease now, got {other:?}"),
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
    let metrics = new.metrics();
    assert_eq!(
        (metrics.applied, metrics.parked, metrics.failed_batches),
        (50, 0, 0),
        "{metrics:?}"
    );
    assert!(metrics.events_per_second > 0.0);
    assert_eq!(old.metrics().applied, 10);
}

/// Deposits inserted with triggers disabled send no NOTIFY: the running worker still applies them
/// within one poll interval. With notifications, it applies them well before.
#[tokio::test]
async fn a_lost_notification_costs_at_most_one_poll_interval() {
    let _horizon = XMIN_HORIZON.read().await;
    let store = setup("projection_lost_notify", 0).await;
    let poll = Duration::from_millis(700);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = ProjectionWorker::new(store.clone(), DepositTotals::new(&store), "runner");
    let running = tokio::spawn(worker.run(poll, async {
        let _ = stopped.await;
    }));

    // Notified: applied quickly.
    let start = std::time::Instant::now();
    append_deposits(&store, 1, 1).await;
    wait_for_count(&store, 1, Duration::from_secs(5)).await;
    let notified = start.elapsed();

    // Not notified (no trigger runs under session_replication_role = replica): applied by polling.
    // The worker is idle by then, waiting on its next wake-up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut conn = store
        .pool()
        .acquire()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let start = std::time::Instant::now();
    raw_deposit(&mut conn, store.schema(), "silent", 2).await;
    sqlx::query("RESET session_replication_role")
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drop(conn);
    wait_for_count(&store, 2, poll * 3).await;
    let polled = start.elapsed();
    assert!(
        polled <= poll + Duration::from_millis(500),
        "applied after {polled:?}, poll interval {poll:?}"
    );
    assert!(
        polled >= Duration::from_millis(150),
        "applied after {polled:?}: it was notified after all"
    );
    eprintln!(
        "lost notify: applied after {polled:?} (poll {poll:?}); with a notification after {notified:?}"
    );

    let _ = stop.send(());
    let projection = running
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(projection.handled, 2);
    assert_eq!(totals(&store).await, (3, 2));
}

async fn wait_for_count(store: &PostgresEventStore, count: i64, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    while totals(store).await.1 < count {
        assert!(
            std::time::Instant::now() < deadline,
            "not applied within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The skewed-commit scenario seen through a projection: a deposit whose transaction took a lower
/// position and commits late is applied, once, after it commits; nothing is skipped.
#[tokio::test]
async fn a_late_commit_is_applied_not_skipped() {
    let _horizon = XMIN_HORIZON.write().await;
    let store = setup("projection_skewed", 0).await;
    let mut worker = ProjectionWorker::new(store.clone(), DepositTotals::new(&store), "w");
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    let mut late = store.pool().begin().await.unwrap_or_else(|e| panic!("{e}"));
    raw_deposit(&mut late, store.schema(), "late", 1_000).await;
    append_deposits(&store, 1, 5).await;
    let step = worker.step().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(step.read, 0, "nothing past the open transaction");
    assert_eq!(totals(&store).await, (0, 0));
    // `catch_up` waits for what was committed before it: it returns once the late commit is in.
    let (caught_up, ()) = tokio::join!(worker.catch_up(), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        late.commit().await.unwrap_or_else(|e| panic!("{e}"));
    });
    assert_eq!(caught_up.unwrap_or_else(|e| panic!("{e}")), 6);
    assert_eq!(totals(&store).await, (1_000 + sum(5), 6));
}

fn policy(mode: FailureMode) -> FailurePolicy {
    FailurePolicy {
        attempts: 3,
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        mode,
    }
}

/// With `FailureMode::Skip`, only the poison events are parked; purge removes them.
#[tokio::test]
async fn skip_mode_parks_only_the_failing_events() {
    let _horizon = XMIN_HORIZON.read().await;
    const M: u64 = 40;
    let store = setup("projection_skip", M).await;
    let mut poisoned = DepositTotals::new(&store);
    poisoned.poison = true;
    let mut worker = ProjectionWorker::new(store.clone(), poisoned, "w")
        .with_failure_policy(policy(FailureMode::Skip));
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    worker.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    let poison: u64 = (1..=M).filter(|n| n % 13 == 0).sum();
    assert_eq!(
        totals(&store).await,
        (
            sum(M) - i64::try_from(poison).unwrap_or(0),
            i64::try_from(M - 3).unwrap_or(0)
        )
    );
    let dead = DeadLetters::new(store.clone());
    assert_eq!(
        dead.list("deposit_totals")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .len(),
        3
    );
    assert_eq!(
        dead.purge(
            "deposit_totals",
            Some(chrono::Utc::now() - chrono::Duration::hours(1))
        )
        .await
        .unwrap_or_else(|e| panic!("{e}")),
        0
    );
    assert_eq!(
        dead.purge("deposit_totals", None)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        3
    );
    assert!(
        dead.list("deposit_totals")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty()
    );
}

/// A rebuild while writers keep writing ends with the read model of a clean replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_during_live_writes_equals_a_clean_replay() {
    let _horizon = XMIN_HORIZON.read().await;
    const M: u64 = 300;
    let store = setup("projection_rebuild", 0).await;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for n in 1..=M {
                append_deposits(&store, n, n).await;
                if n % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    let mut worker =
        ProjectionWorker::new(store.clone(), DepositTotals::new(&store), "w").with_batch(40);
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    // The rebuild must have something to replay: wait for the writer's first events.
    worker.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    while totals(&store).await.1 == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        worker.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    }
    let schema = store.schema().to_owned();
    let replayed = worker
        .rebuild(move |conn| {
            Box::pin(async move {
                sqlx::query(AssertSqlSafe(format!(
                    "UPDATE \"{schema}\".deposit_totals SET total = 0, count = 0"
                )))
                .execute(conn)
                .await
                .map(drop)
            })
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    writer.await.unwrap_or_else(|e| panic!("{e}"));
    worker.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        totals(&store).await,
        (sum(M), i64::try_from(M).unwrap_or(0)),
        "the rebuilt read model is a clean replay's"
    );
    assert!(replayed > 0);
}

/// An inline projection runs in the append's transaction: the read model reflects an append as soon
/// as it returns, and a failing inline projection fails the append, which stores nothing.
#[tokio::test]
async fn inline_projections_give_read_your_writes() {
    let _horizon = XMIN_HORIZON.read().await;
    #[derive(Clone, Projection)]
    #[projection(name = "inline_totals", events(AccountEvent), context = PgConnection)]
    struct InlineTotals {
        schema: String,
    }

    #[async_trait::async_trait]
    impl Handles<AccountEvent, PgConnection> for InlineTotals {
        async fn handle(
            &mut self,
            event: &RecordedEvent<AccountEvent>,
            conn: &mut PgConnection,
        ) -> Result<(), HandlerError> {
            if let AccountEvent::Deposited(deposit) = &event.event {
                if deposit.amount_cents == 13 {
                    return Err("13 is refused".into());
                }
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

    let plain = setup("projection_inline", 0).await;
    let store = plain.clone().with_inline(InlineTotals {
        schema: plain.schema().to_owned(),
    });
    let stream = StreamId::new("account", "inline");
    for n in 1..=5u64 {
        let event = AccountEvent::Deposited(Deposit {
            amount_cents: n,
            reference: String::new(),
        });
        let data =
            EventData::from_event(&event, Metadata::default()).unwrap_or_else(|e| panic!("{e}"));
        store
            .append(&stream, ExpectedVersion::Any, vec![data])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            totals(&store).await,
            (sum(n), i64::try_from(n).unwrap_or(0)),
            "visible right after the append"
        );
    }
    let refused = EventData::from_event(
        &AccountEvent::Deposited(Deposit {
            amount_cents: 13,
            reference: String::new(),
        }),
        Metadata::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let error = store
        .append(&stream, ExpectedVersion::Exact(5), vec![refused])
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            evently_core::StoreError::InlineProjection {
                projection: "inline_totals",
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(
        store
            .stream_version(&stream)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        5,
        "the append stored nothing"
    );
    assert_eq!(totals(&store).await, (sum(5), 5));
}

/// The worker reads plainly while most events are subscribed and lets the server filter while few
/// are: phases of dense and sparse subscribed events, with prefetched windows, give exactly the
/// subscribed events, and the checkpoint reaches the head.
#[tokio::test]
async fn dense_and_sparse_phases_give_exactly_the_subscribed_events() {
    let _horizon = XMIN_HORIZON.read().await;
    let store = setup("projection_phases", 0).await;
    let noise = |n: u64| EventData {
        event_id: evently_core::EventId::new(),
        event_type: "Noise".into(),
        schema_version: 1,
        payload: serde_json::json!({ "n": n }),
        metadata: Metadata::default(),
    };
    let mut expected = 0;
    let mut next = 1;
    for (deposits, noises) in [(120u64, 0u64), (3, 400), (90, 5), (0, 300), (40, 0)] {
        append_deposits(&store, next, next + deposits - 1).await;
        expected += deposits;
        next += deposits;
        if noises > 0 {
            store
                .append(
                    &StreamId::new("noise", format!("n{next}")),
                    ExpectedVersion::Any,
                    (0..noises).map(noise).collect(),
                )
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let mut worker =
        ProjectionWorker::new(store.clone(), DepositTotals::new(&store), "w").with_batch(50);
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    let applied = worker.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(applied as u64, expected);
    assert_eq!(
        totals(&store).await,
        (sum(expected), i64::try_from(expected).unwrap_or(0))
    );
    assert_eq!(
        worker.checkpoint().await.unwrap_or_else(|e| panic!("{e}")),
        store
            .head()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_default()
    );
    assert_eq!(worker.lag().await.unwrap_or_else(|e| panic!("{e}")), 0);
}

/// Behind, each window that moved the checkpoint doubles the next up to the maximum, and a window
/// that finds nothing brings it back to the batch; the lag is counted on a task of its own beside
/// the batches and reported by the first step after the count is done; caught up, it is 0.
#[tokio::test]
async fn a_worker_behind_grows_its_windows_and_counts_its_lag_beside_them() {
    let _horizon = XMIN_HORIZON.read().await;
    let store = setup("projection_growth", 600).await;
    let mut worker = ProjectionWorker::new(store.clone(), DepositTotals::new(&store), "w")
        .with_batch(20)
        .with_max_batch(160);
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    let first = worker.step().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.read, 20);
    // The count after the first window runs on its own task: once done, the next step reports
    // it (events behind the first window's end).
    let metrics = worker.metrics_handle();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut reads = vec![first.read];
    loop {
        let step = worker.step().await.unwrap_or_else(|e| panic!("{e}"));
        if reads.len() == 1 {
            assert_eq!(metrics.get().lag.map(|lag| lag.events), Some(580));
        }
        if step.read == 0 {
            break;
        }
        reads.push(step.read);
    }
    assert_eq!(reads, [20, 40, 80, 160, 160, 140]);
    assert_eq!(totals(&store).await, (sum(600), 600));
    assert_eq!(metrics.get().lag.map(|lag| lag.events), Some(0));
    // Caught up: the batch again.
    append_deposits(&store, 601, 700).await;
    settle(&store).await;
    let mut reads = Vec::new();
    for _ in 0..3 {
        reads.push(worker.step().await.unwrap_or_else(|e| panic!("{e}")).read);
    }
    assert_eq!(reads, [20, 40, 40]);
    assert_eq!(totals(&store).await, (sum(700), 700));
}
