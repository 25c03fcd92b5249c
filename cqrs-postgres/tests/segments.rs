//! Partitioned projections against the real server: worker processes sharing a projection's
//! segments while writers append, killed with SIGKILL at random, one added and one removed, the
//! segments split 8 -> 16 while everything runs. The read model records every application, so a
//! double application, a missing one or a stream applied out of order shows. Midway a rebuild is
//! requested (one worker resets the read model and restarts every segment from the first event),
//! and later the segments are merged 16 -> 12, where each new segment gathers streams of segments
//! that stood at different places.
//!
//! The worker processes are this test binary run again (`--exact <test>` with
//! `SEGMENT_WORKER_SCHEMA` set): the test that orchestrates becomes a worker when that is set.

mod common;

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{deposit, fresh_store, pool};
use cqrs_examples::bank::AccountEvent;
use evently_core::prelude::*;
use evently_core::projection::{HandlerError, wait_until_caught_up};
use evently_core::{EventStore, RecordedEvent};
use evently_postgres::PostgresEventStore;
use evently_postgres::control::{Control, DeadLetters};
use evently_postgres::projection::SegmentedWorker;
use evently_postgres::segments::{layout, scale};
use rand::Rng as _;
use sqlx::{AssertSqlSafe, PgConnection};

/// Records each application: one row per applied event (no key: a second application is a second
/// row), and per stream the last version applied and how often a version did not follow the one
/// before.
#[derive(Projection)]
#[projection(name = "stream_sequence", events(AccountEvent), context = PgConnection)]
struct StreamSequence {
    schema: String,
}

#[async_trait::async_trait]
impl Handles<AccountEvent, PgConnection> for StreamSequence {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        let s = &self.schema;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{s}\".applied (event_id) VALUES ($1)"
        )))
        .bind(event.event_id.0)
        .execute(&mut *conn)
        .await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{s}\".sequence (stream, last_version, out_of_order) VALUES ($1, $2, \
               CASE WHEN $2 = 1 THEN 0 ELSE 1 END) \
             ON CONFLICT (stream) DO UPDATE SET last_version = EXCLUDED.last_version, \
               out_of_order = sequence.out_of_order \
                 + CASE WHEN sequence.last_version + 1 = EXCLUDED.last_version THEN 0 ELSE 1 END"
        )))
        .bind(event.stream.aggregate_id.as_str())
        .bind(i64::try_from(event.version)?)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

const WORKER_ENV: &str = "SEGMENT_WORKER_SCHEMA";
const TEST_NAME: &str = "workers_share_segments_through_kills_and_a_split";

/// The worker process: runs the projection's segments until its stdin closes.
async fn be_a_worker(schema: String) {
    let owner = std::env::var("SEGMENT_WORKER_OWNER").unwrap_or_else(|e| panic!("{e}"));
    let store = PostgresEventStore::new(pool(8).await, &schema).unwrap_or_else(|e| panic!("{e}"));
    let factory = {
        let schema = schema.clone();
        move || StreamSequence {
            schema: schema.clone(),
        }
    };
    let truncate = format!("TRUNCATE \"{schema}\".applied, \"{schema}\".sequence");
    let worker = SegmentedWorker::new(store, owner, factory)
        .with_reset(move |conn| {
            let truncate = truncate.clone();
            Box::pin(async move {
                sqlx::query(AssertSqlSafe(truncate))
                    .execute(conn)
                    .await
                    .map(|_| ())
            })
        })
        .with_segments(8)
        .with_lease(Duration::from_millis(1_000))
        .with_batch(200);
    let closed = async {
        // Stdin closing (the test dropping its end) is the graceful stop.
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await;
    };
    worker
        .run(Duration::from_millis(200), closed)
        .await
        .unwrap_or_else(|e| panic!("worker: {e}"));
}

fn spawn_worker(schema: &str, owner: &str) -> Child {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    Command::new(exe)
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(WORKER_ENV, schema)
        .env("SEGMENT_WORKER_OWNER", owner)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning a worker: {e}"))
}

async fn count(store: &PostgresEventStore, sql: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(sql.replace("{s}", store.schema())))
        .fetch_one(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_segments_through_kills_and_a_split() {
    if let Ok(schema) = std::env::var(WORKER_ENV) {
        be_a_worker(schema).await;
        return;
    }
    let store = fresh_store("segments_kill").await;
    let schema = store.schema().to_owned();
    for sql in [
        "CREATE TABLE \"{s}\".applied (event_id UUID NOT NULL)",
        "CREATE TABLE \"{s}\".sequence (stream TEXT PRIMARY KEY, last_version BIGINT NOT NULL, out_of_order BIGINT NOT NULL)",
    ] {
        sqlx::query(AssertSqlSafe(sql.replace("{s}", &schema)))
            .execute(store.pool())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // Writers: 4 tasks on 64 streams until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let stream = StreamId::new("account", format!("s{}", (n * 4 + w) % 64));
                    store
                        .append(&stream, ExpectedVersion::Any, vec![deposit(n + 1)])
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                    n += 1;
                }
                n
            })
        })
        .collect();

    let mut workers: Vec<(String, Child)> = (0..4)
        .map(|i| {
            let owner = format!("w{i}");
            (owner.clone(), spawn_worker(&schema, &owner))
        })
        .collect();
    let mut rng = rand::rng();
    let mut incarnation = 0;
    for kill in 1..=20 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..900))).await;
        let victim = rng.random_range(0..workers.len());
        let (owner, mut child) = workers.swap_remove(victim);
        child
            .kill()
            .unwrap_or_else(|e| panic!("kill -9 {owner}: {e}"));
        let _ = child.wait();
        // Half come back under the same name (taking their leases over at once), half under a
        // new one (the dead name's leases expire first).
        incarnation += 1;
        let owner = if kill % 2 == 0 {
            owner
        } else {
            format!("{owner}-{incarnation}")
        };
        workers.push((owner.clone(), spawn_worker(&schema, &owner)));
        if kill == 6 {
            workers.push(("added".to_owned(), spawn_worker(&schema, "added")));
        }
        if kill == 10 {
            let segments = scale(&store, "stream_sequence", 16)
                .await
                .unwrap_or_else(|e| panic!("split: {e}"));
            assert_eq!(segments.count(), 16);
        }
        if kill == 17 {
            // A merge that is not a halving: each of the 12 new segments takes streams from
            // four of the 16, which stood at different checkpoints.
            let segments = scale(&store, "stream_sequence", 12)
                .await
                .unwrap_or_else(|e| panic!("merge: {e}"));
            assert_eq!(segments.count(), 12);
        }
        if kill == 12 {
            // A rebuild on request, served by one of the workers while the others run.
            Control::new(store.clone())
                .request_rebuild("stream_sequence")
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("no projection to rebuild"));
        }
        if kill == 14 {
            // One leaves gracefully: its stdin closes, it stops and releases its segments.
            let (owner, mut child) = workers.remove(0);
            drop(child.stdin.take());
            let status = child.wait().unwrap_or_else(|e| panic!("{e}"));
            assert!(
                status.success(),
                "worker {owner} did not stop cleanly: {status}"
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut written = 0;
    for writer in writers {
        written += writer.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let head = store
        .head()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("nothing was written"));
    let started = Instant::now();
    wait_until_caught_up(&store, "stream_sequence", head, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("the workers did not catch up: {e}"));
    let caught_up_in = started.elapsed();
    // Balanced: the live workers end up with a fair share each (12 segments on 4: 3 each).
    let live = workers.len();
    let balanced_by = Instant::now() + Duration::from_secs(20);
    let shares = loop {
        let layout = layout(&store, "stream_sequence")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("not segmented"));
        let mut shares = std::collections::BTreeMap::<String, usize>::new();
        for segment in layout.segments.iter().filter(|s| s.leased) {
            if let Some(owner) = &segment.owner {
                *shares.entry(owner.clone()).or_default() += 1;
            }
        }
        let fair = layout.count().div_ceil(live);
        let balanced = shares.len() == live
            && shares.values().sum::<usize>() == layout.count()
            && shares.values().all(|&n| n <= fair);
        if balanced {
            break shares;
        }
        assert!(
            Instant::now() < balanced_by,
            "not balanced over {live} workers after 20 s: {shares:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let events = count(&store, "SELECT count(*) FROM \"{s}\".events").await;
    let applications = count(&store, "SELECT count(*) FROM \"{s}\".applied").await;
    let doubles = count(
        &store,
        "SELECT count(*) - count(DISTINCT event_id) FROM \"{s}\".applied",
    )
    .await;
    let missing = count(
        &store,
        "SELECT count(*) FROM \"{s}\".events e WHERE NOT EXISTS \
           (SELECT 1 FROM \"{s}\".applied a WHERE a.event_id = e.event_id)",
    )
    .await;
    let out_of_order = count(
        &store,
        "SELECT COALESCE(sum(out_of_order), 0)::int8 FROM \"{s}\".sequence",
    )
    .await;
    let behind = count(
        &store,
        "SELECT count(*) FROM \"{s}\".sequence q WHERE q.last_version <> \
           (SELECT max(version) FROM \"{s}\".events e WHERE e.aggregate_id = q.stream)",
    )
    .await;
    let layout = layout(&store, "stream_sequence")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("not segmented"));
    let letters = DeadLetters::new(store.clone())
        .list("stream_sequence")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for (_, mut child) in workers {
        drop(child.stdin.take());
        let _ = child.wait();
    }
    eprintln!(
        "segments: {written} events by 4 writers, 20 kills, 8 -> 16 -> 12 segments, a rebuild; caught up {caught_up_in:?} \
         after the writers stopped; {applications} applications, {doubles} double, {missing} missing, \
         {out_of_order} out of order; at the end {} segments shared {shares:?}",
        layout.count()
    );
    assert_eq!(u64::try_from(events).unwrap_or(0), written);
    assert_eq!(doubles, 0, "events applied twice");
    assert_eq!(missing, 0, "events never applied");
    assert_eq!(applications, events);
    assert_eq!(out_of_order, 0, "a stream applied out of order");
    assert_eq!(behind, 0, "a stream's last applied version is not its last");
    assert!(letters.is_empty(), "dead letters: {letters:?}");
    assert_eq!(layout.count(), 12);
    let requests = Control::new(store.clone())
        .requests("stream_sequence")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no projection"));
    assert!(
        requests.rebuilt_at.is_some() && requests.rebuild_requested_at.is_none(),
        "the rebuild was not served: {requests:?}"
    );
}

/// A read model whose handler, after its write, waits while the test holds an advisory lock: a
/// batch in flight that the test holds at will.
#[derive(Projection)]
#[projection(name = "held_sequence", events(AccountEvent), context = PgConnection)]
struct HeldSequence {
    schema: String,
    gate: i64,
}

#[async_trait::async_trait]
impl Handles<AccountEvent, PgConnection> for HeldSequence {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{}\".applied (event_id) VALUES ($1)",
            self.schema
        )))
        .bind(event.event_id.0)
        .execute(&mut *conn)
        .await?;
        // The comment names the test's schema, for `waiting` to find this statement.
        sqlx::query(AssertSqlSafe(format!(
            "SELECT pg_advisory_lock_shared($1), pg_advisory_unlock_shared($1) /* {} */",
            self.schema
        )))
        .bind(self.gate)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// What the backend running `pattern` in `schema`'s statements waits for, once one waits on a
/// lock.
async fn waiting(store: &PostgresEventStore, pattern: &str) -> Option<String> {
    sqlx::query_scalar(
        "SELECT query FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
           AND query LIKE $1 AND query LIKE '%' || $2 || '%'",
    )
    .bind(pattern)
    .bind(store.schema())
    .fetch_optional(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

async fn eventually(store: &PostgresEventStore, pattern: &str, what: &str) -> String {
    let by = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(query) = waiting(store, pattern).await {
            return query;
        }
        assert!(Instant::now() < by, "{what} after 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The deadlock the kill test found once in CI: a rebuild's reset (here a `TRUNCATE`) waiting for
/// a batch's write, while the batch waits for the segment row the rebuild locked. A batch now
/// moves its checkpoint first, so it holds its segment row before it writes: the rebuild waits at
/// the segment row for the batch to end, and the batch never waits for the rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_waits_for_the_batch_in_flight_without_a_deadlock() {
    let store = fresh_store("segments_rebuild_wait").await;
    let schema = store.schema().to_owned();
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE \"{schema}\".applied (event_id UUID NOT NULL)"
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let gate: i64 = rand::rng().random_range(1..i64::MAX);
    // The test holds the gate: the first batch stops inside its transaction, after its write.
    let mut holder = store
        .pool()
        .acquire()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(gate)
        .execute(&mut *holder)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for n in 1..=3 {
        store
            .append(
                &StreamId::new("account", format!("h{n}")),
                ExpectedVersion::NoStream,
                vec![deposit(n)],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let factory = {
        let schema = schema.clone();
        move || HeldSequence {
            schema: schema.clone(),
            gate,
        }
    };
    let truncate = format!("TRUNCATE \"{schema}\".applied");
    let worker = SegmentedWorker::new(store.clone(), "only", factory)
        .with_reset(move |conn| {
            let truncate = truncate.clone();
            Box::pin(async move {
                sqlx::query(AssertSqlSafe(truncate))
                    .execute(conn)
                    .await
                    .map(|_| ())
            })
        })
        .with_segments(2)
        .with_lease(Duration::from_millis(600))
        .with_batch(10);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(Duration::from_millis(50), async move {
        let _ = stopped.await;
    }));
    eventually(
        &store,
        "%pg_advisory_lock_shared%",
        "no batch held at the gate",
    )
    .await;
    Control::new(store.clone())
        .request_rebuild("held_sequence")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no projection to rebuild"));
    // The rebuild waits, and at the segment rows: not inside its reset.
    let query = eventually(
        &store,
        "%projection_checkpoints%FOR UPDATE%",
        "the rebuild does not wait for the segment rows",
    )
    .await;
    assert!(query.contains("segment_of"), "waits at {query}");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        waiting(&store, "%TRUNCATE%").await.is_none(),
        "the reset ran while a batch was in flight"
    );
    // Let the batch go: it commits, then the rebuild runs and every event is applied once again.
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(gate)
        .execute(&mut *holder)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let by = Instant::now() + Duration::from_secs(20);
    let requests = loop {
        let requests = Control::new(store.clone())
            .requests("held_sequence")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no projection"));
        if requests.rebuilt_at.is_some() || requests.error.is_some() {
            break requests;
        }
        assert!(
            Instant::now() < by,
            "the rebuild was not served: {requests:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(requests.error, None, "{requests:?}");
    let head = store
        .head()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("nothing was written"));
    wait_until_caught_up(&store, "held_sequence", head, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("not caught up after the rebuild: {e}"));
    let applied = count(&store, "SELECT count(*) FROM \"{s}\".applied").await;
    let distinct = count(
        &store,
        "SELECT count(DISTINCT event_id) FROM \"{s}\".applied",
    )
    .await;
    assert_eq!(
        (applied, distinct),
        (3, 3),
        "after the rebuild each event once"
    );
    let _ = stop.send(());
    running
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("worker: {e}"));
}
