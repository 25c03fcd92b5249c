//! Exactly-once projections tested as an attacker would, against the real server: futures cut at
//! random points (after `COMMIT` was sent too) and retried at once, two live workers under one
//! owner name, worker processes killed with SIGKILL mid-batch and restarted under the same name,
//! the server terminating the worker's connections in a loop, 32 listeners and workers on one
//! small pool, and stored rows no reader can decode. The read model records every application of
//! every event (no unique key), so a double or a missing application shows as a count.

mod common;

use std::time::{Duration, Instant};

use common::{fresh_store, pool};
use cqrs_examples::bank::{AccountEvent, Deposit};
use evently_core::prelude::*;
use evently_core::projection::HandlerError;
use evently_core::{Checkpoint, EventData, EventStoreExt as _, RecordedEvent, StoreError};
use evently_postgres::PostgresEventStore;
use evently_postgres::control::{DeadLetters, read_checkpoint};
use evently_postgres::projection::{ProjectionWorker, WorkerError};
use rand::Rng as _;
use sqlx::{AssertSqlSafe, PgConnection};

/// Records each application: one row per (event, application), no unique key.
#[derive(Projection)]
#[projection(name = "applications", events(AccountEvent), context = PgConnection)]
struct Applications {
    schema: String,
    /// A pause per event (the killed children's, so kills land inside batches).
    pause: Duration,
}

#[async_trait::async_trait]
impl Handles<AccountEvent, PgConnection> for Applications {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        if !self.pause.is_zero() {
            tokio::time::sleep(self.pause).await;
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{}\".applied (event_id) VALUES ($1)",
            self.schema
        )))
        .bind(event.event_id.0)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// The stored type name of a deposit.
fn deposited_type() -> String {
    EventData::from_event(
        &AccountEvent::Deposited(Deposit {
            amount_cents: 0,
            reference: String::new(),
        }),
        Metadata::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .event_type
}

fn projection(store: &PostgresEventStore) -> Applications {
    Applications {
        schema: store.schema().to_owned(),
        pause: Duration::ZERO,
    }
}

async fn setup(name: &str, deposits: u64) -> PostgresEventStore {
    let store = fresh_store(name).await;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE \"{}\".applied (event_id UUID NOT NULL)",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    append_deposits(&store, 0, deposits).await;
    store
}

/// Appends deposits `from..to` over 7 streams, 50 to an append.
async fn append_deposits(store: &PostgresEventStore, from: u64, to: u64) {
    let mut n = from;
    while n < to {
        let stream = StreamId::new("account", format!("a{}", n % 7));
        let batch: Vec<EventData> = (n..to.min(n + 50))
            .map(|amount_cents| {
                EventData::from_event(
                    &AccountEvent::Deposited(Deposit {
                        amount_cents,
                        reference: String::new(),
                    }),
                    Metadata::default(),
                )
                .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        n += batch.len() as u64;
        store
            .append(&stream, ExpectedVersion::Any, batch)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// (applications, distinct events applied).
async fn applied(store: &PostgresEventStore) -> (i64, i64) {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT count(*), count(DISTINCT event_id) FROM \"{}\".applied",
        store.schema()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until the projection's checkpoint has reached the head of the log.
async fn wait_caught_up(store: &PostgresEventStore, within: Duration) {
    let deadline = Instant::now() + within;
    let head = store
        .head()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or(Checkpoint::START);
    loop {
        let at = read_checkpoint(store, Applications::NAME)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if at >= head {
            return;
        }
        assert!(Instant::now() < deadline, "checkpoint {at}, head {head}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `step` and `catch_up` futures cut at random points, many of them while `COMMIT` is on the
/// wire or being applied, and called again at once (no pause for the cut transaction to end):
/// every event is applied exactly once. Windows of 25 events throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_cut_at_random_points_and_retried_at_once_apply_each_event_once() {
    steps_cut_at_random_points(25, "cut_steps").await;
}

/// The same with windows growing from 25 to 200 events while behind: a cut batch is larger, and
/// the window after a cut may be of any size in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_windows_cut_at_random_points_and_retried_at_once_apply_each_event_once() {
    steps_cut_at_random_points(200, "cut_growing").await;
}

async fn steps_cut_at_random_points(max_batch: usize, name: &str) {
    const EVENTS: u64 = 6_000;
    let store = setup(name, EVENTS).await;
    let mut worker = ProjectionWorker::new(store.clone(), projection(&store), "cutter")
        .with_batch(25)
        .with_max_batch(max_batch);
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    let mut rng = rand::rng();
    let (mut cuts, mut rounds, mut moved) = (0u32, 0u32, 0u32);
    // A step of 25 events takes a few milliseconds here: cut anywhere in it, and past it. On a
    // loaded machine a step takes longer than the cut range and nothing would move (seen in CI:
    // 52,143 rounds in 240 s): after 50 cuts in a row the range doubles.
    let (mut bound, mut streak) = (6_000u64, 0u32);
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        assert!(
            Instant::now() < deadline,
            "not done after {rounds} rounds (cut range {bound} us)"
        );
        rounds += 1;
        let cut = Duration::from_micros(rng.random_range(0..bound));
        let outcome = if rng.random_bool(0.2) {
            tokio::time::timeout(cut, worker.catch_up())
                .await
                .map(|r| r.map(|_| 0))
        } else {
            tokio::time::timeout(cut, worker.step())
                .await
                .map(|r| r.map(|s| s.read))
        };
        match outcome {
            // Cut: step again at once, before anything else (a pause would let an in-doubt
            // COMMIT finish before the next step reads the checkpoint, hiding the race).
            Err(_) => {
                cuts += 1;
                streak += 1;
                if streak >= 50 {
                    bound = (bound * 2).min(2_000_000);
                    streak = 0;
                }
                continue;
            }
            Ok(Ok(_)) => streak = 0,
            Ok(Err(WorkerError::CheckpointMoved { .. })) => moved += 1,
            Ok(Err(WorkerError::LeaseLost { .. })) => {
                assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
            }
            Ok(Err(error)) => panic!("{error}"),
        }
        if read_checkpoint(&store, Applications::NAME)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            >= store
                .head()
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or(Checkpoint::START)
        {
            break;
        }
    }
    let (applications, distinct) = applied(&store).await;
    eprintln!(
        "windows of 25 up to {max_batch}: {rounds} rounds, {cuts} cut (range up to {bound} us), \
         {moved} windows found their checkpoint moved by an in-doubt commit; {applications} \
         applications of {distinct} events"
    );
    assert!(cuts >= 100, "only {cuts} cuts");
    assert_eq!((applications, distinct), (EVENTS as i64, EVENTS as i64));
}

/// Two live workers under one owner name (two processes started with the same name by mistake)
/// while events are appended: they take the lease from each other, and nothing is applied twice
/// or missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_live_workers_under_one_name_apply_each_event_once() {
    let store = setup("same_name", 2_000).await;
    // Each with a store of its own, as two processes would have.
    let other =
        PostgresEventStore::new(pool(8).await, store.schema()).unwrap_or_else(|e| panic!("{e}"));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut runs = Vec::new();
    for s in [store.clone(), other.clone()] {
        let worker = ProjectionWorker::new(s.clone(), projection(&s), "twin").with_batch(50);
        let mut stopped = stopped.clone();
        runs.push(tokio::spawn(worker.run(
            Duration::from_millis(20),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        )));
    }
    append_deposits(&store, 2_000, 6_000).await;
    wait_caught_up(&store, Duration::from_secs(120)).await;
    let _ = stop.send(true);
    for run in runs {
        run.await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let (applications, distinct) = applied(&store).await;
    let epoch: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT epoch FROM \"{}\".projection_checkpoints WHERE projection = 'applications'",
        store.schema()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "two workers named `twin`: {applications} applications of {distinct} events, epoch {epoch}"
    );
    assert_eq!((applications, distinct), (6_000, 6_000));
}

/// The server terminates the worker's connections every 30-80 ms for 4 s while events are
/// appended: `run` keeps going, and the read model ends equal to a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_rides_out_terminated_connections() {
    let store = setup("terminated", 1_000).await;
    let app = "cqrs_terminated_worker";
    let url = evently_postgres::database_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    let worker_store = PostgresEventStore::connect(
        &format!("{url}{separator}application_name={app}"),
        store.schema(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let worker =
        ProjectionWorker::new(worker_store.clone(), projection(&worker_store), "w").with_batch(100);
    let run = tokio::spawn(worker.run(Duration::from_millis(50), async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    let killer = {
        let pool = store.pool().clone();
        tokio::spawn(async move {
            let mut terminated = 0i64;
            let until = Instant::now() + Duration::from_secs(4);
            while Instant::now() < until {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                )
                .bind(app)
                .fetch_one(&pool)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
                terminated += n;
                let pause = rand::rng().random_range(30..80);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            terminated
        })
    };
    append_deposits(&store, 1_000, 5_000).await;
    let terminated = killer.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !run.is_finished(),
        "run returned while its connections were terminated"
    );
    wait_caught_up(&store, Duration::from_secs(120)).await;
    let _ = stop.send(true);
    run.await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("run returned an error: {e}"));
    let (applications, distinct) = applied(&store).await;
    eprintln!(
        "{terminated} connections terminated; {applications} applications of {distinct} events"
    );
    assert!(terminated >= 10, "only {terminated} connections terminated");
    assert_eq!((applications, distinct), (5_000, 5_000));
}

/// 32 listeners and 32 running workers on a store whose pool has 8 connections: appends never
/// wait on the pool (the listeners share one connection outside it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_and_workers_never_starve_appends_of_connections() {
    let base = setup("crowded", 10).await;
    let url = evently_postgres::database_url();
    let pool = evently_postgres::PoolOptions {
        max_connections: 8,
        acquire_timeout: Duration::from_secs(5),
    };
    let small = PostgresEventStore::connect_with(&url, base.schema(), pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        PostgresEventStore::connect_with(
            &url,
            base.schema(),
            evently_postgres::PoolOptions {
                max_connections: 0,
                ..pool
            }
        )
        .await,
        Err(StoreError::InvalidInput(_))
    ));
    let mut listeners = Vec::new();
    for _ in 0..32 {
        listeners.push(small.listen().await.unwrap_or_else(|e| panic!("{e}")));
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut runs = Vec::new();
    for n in 0..32 {
        let worker = ProjectionWorker::new(small.clone(), projection(&small), format!("w{n}"));
        let mut stopped = stopped.clone();
        runs.push(tokio::spawn(worker.run(
            Duration::from_millis(100),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        )));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut slowest = Duration::ZERO;
    for n in 0..200u64 {
        let started = Instant::now();
        small
            .append(
                &StreamId::new("account", format!("c{}", n % 5)),
                ExpectedVersion::Any,
                vec![
                    EventData::from_event(
                        &AccountEvent::Deposited(Deposit {
                            amount_cents: n,
                            reference: String::new(),
                        }),
                        Metadata::default(),
                    )
                    .unwrap_or_else(|e| panic!("{e}")),
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("append {n} with 32 listeners and 32 workers: {e}"));
        slowest = slowest.max(started.elapsed());
    }
    // The listeners were woken by those commits, through one connection.
    let mut woken = 0;
    for listener in &mut listeners {
        if listener
            .next_within(Duration::from_secs(1))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
        {
            woken += 1;
        }
    }
    wait_caught_up(&small, Duration::from_secs(60)).await;
    let _ = stop.send(true);
    for run in runs {
        run.await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let connections: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%' AND datname = current_database()",
    )
    .fetch_one(base.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "200 appends beside 32 listeners and 32 workers on a pool of 8: slowest {slowest:?}; \
         {woken} of 32 listeners woken; {connections} listening connection(s) in the database"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "an append waited {slowest:?}"
    );
    assert_eq!(woken, 32);
    assert_eq!(applied(&small).await, (210, 210));
}

/// What append accepts, every reader reads: payloads nested deeper than the readers' limit are
/// refused with a typed error; rows written from outside that no reader can decode (a negative
/// version, metadata of another shape, a negative schema version) are parked with their position
/// by the worker, which goes on past them, while the later events of their streams wait behind
/// them. A payload nested 200 deep written from outside is a `Corrupt` row, with its position,
/// to a reader of parsed payloads (`read_all`); the worker decodes payload text straight into the
/// event, which does not hold the deep part, and applies it.
#[tokio::test]
async fn unreadable_rows_are_parked_with_their_position_and_passed() {
    let store = setup("unreadable", 0).await;
    let nested = |depth: usize| {
        let mut value = serde_json::json!(1);
        for _ in 0..depth {
            value = serde_json::json!([value]);
        }
        value
    };
    let deep_event = |depth: usize| EventData {
        event_id: evently_core::EventId::new(),
        event_type: deposited_type(),
        schema_version: 2,
        payload: serde_json::json!({ "amount_cents": 1, "reference": "", "extra": nested(depth) }),
        metadata: Metadata::default(),
    };
    // The append side: the deepest readable payload is accepted and read back; one deeper is
    // refused, naming why.
    let limit = evently_core::store::MAX_JSON_DEPTH;
    store
        .append(
            &StreamId::new("account", "deepest"),
            ExpectedVersion::NoStream,
            vec![deep_event(limit - 1)],
        )
        .await
        .unwrap_or_else(|e| panic!("depth {limit}: {e}"));
    match store
        .append(
            &StreamId::new("account", "too-deep"),
            ExpectedVersion::NoStream,
            vec![deep_event(limit)],
        )
        .await
    {
        Err(StoreError::InvalidInput(message)) => assert!(message.contains("nested"), "{message}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    let deepest = store
        .load_all(&StreamId::new("account", "deepest"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(evently_core::store::json_depth(&deepest[0].payload), limit);

    // The read side: rows written around the store (its version check dropped, as an import
    // from elsewhere might have).
    let s = store.schema().to_owned();
    sqlx::query(AssertSqlSafe(format!(
        "ALTER TABLE \"{s}\".events DROP CONSTRAINT events_version_positive"
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let deep =
        serde_json::json!({ "amount_cents": 2, "reference": "", "extra": nested(200) }).to_string();
    let good = r#"{"amount_cents": 3, "reference": ""}"#;
    let raw = |id: &str, version: i64, schema_version: i32, payload: &str, metadata: &str| {
        format!(
            "INSERT INTO \"{s}\".events (event_id, aggregate_type, aggregate_id, version, event_type, schema_version, payload, metadata) \
             VALUES (gen_random_uuid(), 'account', '{id}', {version}, '{}', {schema_version}, '{payload}', '{metadata}')",
            deposited_type()
        )
    };
    for sql in [
        raw("deep", 1, 2, &deep, "{}"),
        raw("deep", 2, 2, good, "{}"),
        raw("negative", -3, 2, good, "{}"),
        raw("metadata", 1, 2, good, r#"{"correlation_id": [1, 2]}"#),
        raw("schema", 1, -1, good, "{}"),
        raw("fine", 1, 2, good, "{}"),
    ] {
        sqlx::query(AssertSqlSafe(sql))
            .execute(store.pool())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut worker = ProjectionWorker::new(store.clone(), projection(&store), "reader");
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    tokio::time::timeout(Duration::from_secs(60), worker.catch_up())
        .await
        .unwrap_or_else(|_| panic!("catch_up stuck"))
        .unwrap_or_else(|e| panic!("{e}"));
    let letters = DeadLetters::new(store.clone())
        .list(Applications::NAME)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let parked: Vec<(String, u64, bool)> = letters
        .iter()
        .map(|l| {
            (
                l.stream.aggregate_id.to_string(),
                l.version,
                l.error.contains(" at "),
            )
        })
        .collect();
    eprintln!(
        "parked: {:#?}",
        letters.iter().map(|l| &l.error).collect::<Vec<_>>()
    );
    assert_eq!(
        parked,
        [
            ("metadata".to_owned(), 1, true),
            ("negative".to_owned(), 0, true),
            ("schema".to_owned(), 1, true),
        ]
    );
    assert!(
        letters[0].error.contains("metadata"),
        "{}",
        letters[0].error
    );
    assert!(
        letters[1].error.contains("negative version -3"),
        "{}",
        letters[1].error
    );
    // The readable ones were applied: `deepest`, both events of `deep` and `fine`.
    assert_eq!(applied(&store).await, (4, 4));
    // A reader of parsed payloads gets the 200-deep row as `Corrupt`, with its position.
    let first = store
        .read_all(Checkpoint::START, 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.len(), 1, "the read ends before the deep row");
    match store.read_all(first[0].checkpoint, 10).await {
        Err(StoreError::Corrupt(corrupt)) => {
            assert_eq!(corrupt.stream, StreamId::new("account", "deep"));
            assert!(corrupt.message.contains("payload"), "{corrupt}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Retrying a stream whose first letter is still unreadable keeps it parked, with the reason.
    let redrive = worker
        .retry(&StreamId::new("account", "negative"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((redrive.applied, redrive.failed), (0, 1));
}

/// A worker process killed with SIGKILL at a random point of its work, 20 times, each time
/// restarted under the same owner name (it takes over at once with a new epoch), while the log
/// grows: the read model ends equal to a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_processes_killed_mid_batch_and_restarted_apply_each_event_once() {
    if let Ok(schema) = std::env::var("CQRS_KILLED_WORKER_SCHEMA") {
        // The child: a worker that runs until it is killed.
        let store =
            PostgresEventStore::new(pool(4).await, &schema).unwrap_or_else(|e| panic!("{e}"));
        // 1 ms per event: a batch of 100 takes over 100 ms, so most kills land inside one.
        let slow = Applications {
            pause: Duration::from_millis(1),
            ..projection(&store)
        };
        let worker = ProjectionWorker::new(store.clone(), slow, "victim").with_batch(100);
        let never = std::future::pending::<()>();
        let _ = worker.run(Duration::from_millis(20), never).await;
        return;
    }
    let store = setup("killed", 4_000).await;
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    let mut rng = rand::rng();
    let mut appended = 4_000;
    for round in 0..20 {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "worker_processes_killed_mid_batch_and_restarted_apply_each_event_once",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CQRS_KILLED_WORKER_SCHEMA", store.schema())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        append_deposits(&store, appended, appended + 300).await;
        appended += 300;
        // The child needs some 50-150 ms to start; kill it anywhere in its work after that.
        tokio::time::sleep(Duration::from_millis(rng.random_range(80..700))).await;
        child
            .kill()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let _ = child.wait();
    }
    let killed_at = applied(&store).await;
    // A last worker under the same name finishes the log.
    let mut worker = ProjectionWorker::new(store.clone(), projection(&store), "victim");
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    worker.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    let (applications, distinct) = applied(&store).await;
    eprintln!(
        "20 kills; {} of {appended} events applied by the killed processes, \
         {applications} applications of {distinct} after the last run",
        killed_at.1
    );
    assert!(killed_at.1 > 0, "the children applied nothing");
    assert_eq!((applications, distinct), (appended as i64, appended as i64));
}
