//! No silent skips after a restore or a move to another server. Events are ordered by the id of
//! the transaction that wrote them; a store restored or replicated into another server carries
//! ids of the old server's counter. Simulated here by shifting the stored ids past this server's
//! counter (and, in `second_server.rs`, done for real with `pg_dump`/`pg_restore` into a second
//! PostgreSQL server): every global read and append is refused with a typed error naming what to
//! run, and after `rebase` every event reads back in the same order, each checkpoint resumes
//! after the same event, new appends come after the restored ones, and a worker that ran across
//! applies every event once.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{deposit, fresh_store, global_order, read_after};
use cqrs_examples::bank::AccountEvent;
use evently_core::prelude::*;
use evently_core::projection::HandlerError;
use evently_core::{Checkpoint, EventStore, ExpectedVersion, MoveEvidence, StoreError};
use evently_postgres::projection::ProjectionWorker;
use evently_postgres::{CheckpointLease, PostgresEventStore};
use futures::TryStreamExt as _;
use sqlx::{AssertSqlSafe, PgConnection};

/// `writers` tasks append `each` deposits, one transaction per event, at once (so commits
/// interleave).
async fn append_concurrently(store: &PostgresEventStore, writers: usize, each: u64) {
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let stream = StreamId::new("account", format!("a-{w}"));
                for n in 1..=each {
                    store
                        .append(&stream, ExpectedVersion::Any, vec![deposit(n)])
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The ids of `events`.
fn ids(events: &[evently_core::StoredEvent]) -> Vec<uuid::Uuid> {
    events.iter().map(|e| e.event_id.0).collect()
}

/// [`read_after`] until it reads `n` events: readers do not pass a transaction still open
/// anywhere on the server (another test's), so what was just appended can take a moment.
async fn read_n_after(store: &PostgresEventStore, after: Checkpoint, n: usize) -> Vec<uuid::Uuid> {
    for _ in 0..100 {
        let read = read_after(store, after, 37).await;
        if read.len() >= n {
            return read;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    read_after(store, after, 37).await
}

/// The first `n` events of the global order (waiting for them to be readable).
async fn first_n(store: &PostgresEventStore, n: usize) -> Vec<evently_core::StoredEvent> {
    for _ in 0..100 {
        let page = store
            .read_all(Checkpoint::START, n)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if page.len() == n {
            return page;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} events readable");
}

/// What the store would look like restored from a server whose counter was `shift` ahead: every
/// stamped id (events and checkpoints) moved up by `shift`, the order kept.
async fn shift_ids(store: &PostgresEventStore, shift: u64) {
    let s = format!("\"{}\"", store.schema());
    for table in ["events", "projection_checkpoints"] {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {s}.{table} SET transaction_id = (transaction_id::text::bigint + {shift})::text::xid8 \
             WHERE transaction_id <> '0'::xid8"
        )))
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Another process's view of the store: a pool of its own, so it checks the server anew.
async fn reopen(store: &PostgresEventStore) -> PostgresEventStore {
    PostgresEventStore::connect(&evently_postgres::database_url(), store.schema())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn evidence(error: StoreError) -> MoveEvidence {
    match error {
        StoreError::Moved(moved) => {
            assert!(
                moved
                    .to_string()
                    .contains("run `cqrs store rebase --schema")
                    || matches!(moved.evidence, MoveEvidence::CheckpointAhead { .. }),
                "{moved}"
            );
            moved.evidence
        }
        other => panic!("expected a moved store, got: {other}"),
    }
}

#[tokio::test]
async fn transaction_ids_ahead_of_the_server_are_refused_then_rebased_in_the_same_order() {
    let store = fresh_store("moved_ahead").await;
    append_concurrently(&store, 8, 25).await;
    let written = global_order(store.pool(), store.schema()).await;
    assert_eq!(written.len(), 200);

    // A reader read 120 events and keeps its checkpoint.
    let mut reader = CheckpointLease::new(store.clone(), "reader", "r1", Duration::from_secs(30));
    assert!(
        reader
            .acquire()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_some()
    );
    let first = first_n(&store, 120).await;
    assert_eq!(ids(&first), written[..120]);
    let held = first[119].checkpoint;
    assert_eq!(
        reader
            .advance(Checkpoint::START, held)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        evently_postgres::Advance::Done
    );

    shift_ids(&store, 1_000_000_000).await;
    // Without the check, the restored events would be unreadable: no committed transaction of
    // this server is past them.
    let readable: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{}\".events WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())",
        store.schema()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(readable, 0);

    let moved = reopen(&store).await;
    let stream = StreamId::new("account", "a-0");
    // Appends and every read in the global order are refused, saying what to run.
    let refused = moved
        .append(&stream, ExpectedVersion::Exact(25), vec![deposit(1)])
        .await
        .expect_err("an append onto a moved store");
    let MoveEvidence::TransactionIdsAhead { highest, next } = evidence(refused) else {
        panic!("expected ids ahead");
    };
    assert!(
        highest >= next && highest > 1_000_000_000,
        "{highest} {next}"
    );
    for refused in [
        moved.read_all(Checkpoint::START, 10).await.err(),
        moved.head().await.err(),
        moved.lag_after(Checkpoint::START).await.err(),
        moved
            .append_with_key(&stream, ExpectedVersion::Any, vec![deposit(2)], "k")
            .await
            .err(),
    ] {
        evidence(refused.expect("refused"));
    }
    // Reading one stream does not depend on the order: it still works (for inspection).
    let a0: Vec<_> = moved
        .load(&stream, 0)
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a0.len(), 25);
    assert!(
        moved
            .check_server()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_some()
    );
    assert_eq!(
        global_order(store.pool(), store.schema()).await,
        written,
        "nothing changed"
    );

    let rebased = moved.rebase().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(rebased.restamped, "{rebased:?}");
    assert_eq!(
        (rebased.events, rebased.checkpoints),
        (200, 1),
        "{rebased:?}"
    );
    assert!(rebased.transactions >= 1 && rebased.transactions <= 200);

    // The same events in the same order, from the start; the checkpoint resumes after the same
    // event.
    assert_eq!(global_order(store.pool(), store.schema()).await, written);
    assert_eq!(
        read_n_after(&moved, Checkpoint::START, written.len()).await,
        written
    );
    let mut reader = CheckpointLease::new(moved.clone(), "reader", "r1", Duration::from_secs(30));
    let resumed = reader
        .acquire()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("the lease");
    assert_eq!(read_n_after(&moved, resumed, 80).await, written[120..]);

    // New appends are ordered after the restored events.
    let appended = moved
        .append(
            &stream,
            ExpectedVersion::Exact(25),
            vec![deposit(26), deposit(27)],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let after_checkpoint = read_n_after(&moved, resumed, 82).await;
    assert_eq!(after_checkpoint.len(), 82);
    assert_eq!(after_checkpoint[..80], written[120..]);
    assert_eq!(
        after_checkpoint[80..],
        appended
            .events
            .iter()
            .map(|e| e.event_id.0)
            .collect::<Vec<_>>()
    );

    // A reader that kept its position from before the rebase is told, not left reading nothing.
    let stale = Checkpoint::new(held.transaction + 1_000_000_000, held.position);
    let MoveEvidence::CheckpointAhead { checkpoint, .. } = evidence(
        moved
            .read_all(stale, 10)
            .await
            .expect_err("a stale position"),
    ) else {
        panic!("expected a stale checkpoint");
    };
    assert_eq!(checkpoint, stale);

    // Nothing left to do.
    let again = moved.rebase().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(!again.changed(), "{again:?}");
}

#[tokio::test]
async fn a_rebase_keeps_an_order_the_global_position_does_not() {
    let store = fresh_store("moved_scrambled").await;
    append_concurrently(&store, 4, 50).await;
    // Ids from another server, in an order that goes back and forth in global position (as
    // concurrent writers commit out of insertion order), some shared by several events.
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{}\".events SET transaction_id = (2000000000 + (global_position * 7919) % 61)::text::xid8",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let restored = global_order(store.pool(), store.schema()).await;
    let mut lease = CheckpointLease::new(store.clone(), "relay", "r", Duration::from_secs(30));
    lease.acquire().await.unwrap_or_else(|e| panic!("{e}"));
    // A checkpoint at the 77th event of that order.
    let (xid, position): (String, i64) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT transaction_id::text, global_position FROM \"{}\".events \
         ORDER BY transaction_id, global_position OFFSET 76 LIMIT 1",
        store.schema()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{}\".projection_checkpoints SET transaction_id = $1::xid8, global_position = $2",
        store.schema()
    )))
    .bind(&xid)
    .bind(position)
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let moved = reopen(&store).await;
    evidence(moved.head().await.expect_err("refused"));
    let rebased = moved.rebase().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(rebased.restamped && rebased.transactions > 1, "{rebased:?}");
    assert_eq!(
        read_n_after(&moved, Checkpoint::START, restored.len()).await,
        restored
    );
    let checkpoint = evently_postgres::control::read_checkpoint(&moved, "relay")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        read_n_after(&moved, checkpoint, restored.len() - 77).await,
        restored[77..]
    );
}

#[tokio::test]
async fn a_changed_server_is_refused_and_a_rebase_only_records_the_new_one() {
    let store = fresh_store("moved_server").await;
    append_concurrently(&store, 2, 5).await;
    let written = global_order(store.pool(), store.schema()).await;
    let xids_before: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT transaction_id::text FROM \"{}\".events ORDER BY global_position",
        store.schema()
    )))
    .fetch_all(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // Restored from a server with another identity whose counter was behind this one's.
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{}\".store_server SET system_identifier = 42",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let moved = reopen(&store).await;
    let MoveEvidence::ServerChanged { recorded, current } = evidence(
        moved
            .read_all(Checkpoint::START, 5)
            .await
            .expect_err("refused"),
    ) else {
        panic!("expected another server");
    };
    assert_eq!(recorded, "42");
    assert_ne!(current, "42");

    let rebased = moved.rebase().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(!rebased.restamped, "{rebased:?}");
    assert_eq!(rebased.previous_server, Some(42));
    assert_eq!(rebased.server.map(|s| s.to_string()), Some(current));
    let xids_after: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT transaction_id::text FROM \"{}\".events ORDER BY global_position",
        store.schema()
    )))
    .fetch_all(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(xids_after, xids_before, "ids below the counter are kept");
    assert_eq!(
        read_n_after(&moved, Checkpoint::START, written.len()).await,
        written
    );
    assert!(
        moved
            .check_server()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none()
    );
}

/// Rebases cut at points sweeping its whole run (the future dropped mid-statement, including
/// right after the COMMIT was sent) and started again at once: each leaves the store entirely as it was or
/// entirely rebased, never in between.
#[tokio::test]
async fn a_rebase_cut_at_any_point_leaves_all_or_nothing() {
    let store = fresh_store("moved_cut").await;
    append_concurrently(&store, 4, 30).await;
    let mut lease = CheckpointLease::new(store.clone(), "reader", "r", Duration::from_secs(30));
    lease.acquire().await.unwrap_or_else(|e| panic!("{e}"));
    let page = first_n(&store, 50).await;
    let _ = lease
        .advance(Checkpoint::START, page[49].checkpoint)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let written = global_order(store.pool(), store.schema()).await;
    shift_ids(&store, 3_000_000_000).await;

    let moved = reopen(&store).await;
    let (mut cut, mut finished) = (0, 0);
    // Cut points sweep the rebase from its first statement on, a millisecond apart with jitter.
    for step in 0..200 {
        let wait = Duration::from_micros(step * 500 + rand::random_range(0..500));
        match tokio::time::timeout(wait, moved.rebase()).await {
            Err(_) => cut += 1,
            Ok(result) => {
                result.unwrap_or_else(|e| panic!("{e}"));
                finished += 1;
            }
        }
        // All or nothing: every id shifted, or every id rebased below the counter.
        let (high, low): (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT count(*) FILTER (WHERE transaction_id >= '3000000000'::xid8), \
                    count(*) FILTER (WHERE transaction_id < '3000000000'::xid8) \
             FROM \"{}\".events",
            store.schema()
        )))
        .fetch_one(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            (high, low) == (120, 0) || (high, low) == (0, 120),
            "{high} {low}"
        );
        assert_eq!(global_order(store.pool(), store.schema()).await, written);
        if finished > 0 {
            break;
        }
    }
    if finished == 0 {
        moved.rebase().await.unwrap_or_else(|e| panic!("{e}"));
    }
    eprintln!("rebases cut: {cut}, finished: {finished}");
    let resumed = evently_postgres::control::read_checkpoint(&moved, "reader")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_n_after(&moved, resumed, 70).await, written[50..]);
}

/// Each deposit it applies, as a row (no key: a second application shows as a second row).
#[derive(Projection, Clone)]
#[projection(name = "deposit_rows", events(AccountEvent), context = PgConnection)]
struct DepositRows {
    schema: Arc<str>,
}

#[async_trait::async_trait]
impl Handles<AccountEvent, PgConnection> for DepositRows {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{}\".deposit_rows (event_id) VALUES ($1)",
            self.schema
        )))
        .bind(event.event_id.0)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// A worker runs while its store is moved under it, refused while it is, and resumed by the
/// rebase: every event applied exactly once.
#[tokio::test]
async fn a_worker_running_across_a_move_applies_every_event_once() {
    let store = fresh_store("moved_worker").await;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE \"{}\".deposit_rows (seq BIGSERIAL PRIMARY KEY, event_id UUID NOT NULL)",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    append_concurrently(&store, 4, 20).await;
    let worker_store = reopen(&store).await;
    let worker = ProjectionWorker::new(
        worker_store.clone(),
        DepositRows {
            schema: store.schema().into(),
        },
        "w",
    )
    .with_batch(7);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(Duration::from_millis(50), async {
        let _ = stopped.await;
    }));
    let rows = |store: PostgresEventStore| async move {
        let (all, distinct): (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT count(*), count(DISTINCT event_id) FROM \"{}\".deposit_rows",
            store.schema()
        )))
        .fetch_one(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        (all, distinct)
    };
    let wait_for = |n: i64| {
        let store = store.clone();
        async move {
            for _ in 0..200 {
                if rows(store.clone()).await.1 >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!(
                "the worker did not reach {n} events: {:?}",
                rows(store).await
            );
        }
    };
    wait_for(80).await;

    // Moved under the running worker (its pool keeps its connections).
    shift_ids(&store, 1_000_000_000).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let moved = reopen(&store).await;
    let stream = StreamId::new("account", "a-0");
    evidence(
        moved
            .append(&stream, ExpectedVersion::Exact(20), vec![deposit(21)])
            .await
            .expect_err("refused"),
    );
    moved.rebase().await.unwrap_or_else(|e| panic!("{e}"));
    append_concurrently(&moved, 4, 5).await;
    wait_for(100).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop.send(());
    running
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows(store.clone()).await, (100, 100));
    let applied: Vec<uuid::Uuid> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT event_id FROM \"{}\".deposit_rows ORDER BY seq",
        store.schema()
    )))
    .fetch_all(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let order = global_order(store.pool(), store.schema()).await;
    assert_eq!(applied, order, "applied in the global order");
}
