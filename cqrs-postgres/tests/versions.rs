//! Blue/green projection versions against the real server: version 2 catches up beside version 1
//! under live writes while readers keep querying (never a partial model), is promoted, readers see
//! it complete; the side effects of every event run exactly once across the two versions, also
//! when the old version lags behind the handover; retiring refuses what would lose effects.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{deposit, fresh_store};
use cqrs_examples::bank::AccountEvent;
use evently_core::prelude::*;
use evently_core::projection::{HandlerError, Projection, wait_until_caught_up};
use evently_core::{Checkpoint, EventStore, RecordedEvent};
use evently_postgres::PostgresEventStore;
use evently_postgres::projection::ProjectionWorker;
use evently_postgres::versions::{
    EffectGate, Promotion, VersionState, promote, register, retire, versions,
};
use sqlx::{AssertSqlSafe, PgConnection};

/// What both versions do with an event: count it in their own table, and run its side effect (a
/// row in `effects`) when the gate says the event's effects are theirs.
async fn apply<P: Projection>(
    schema: &str,
    gate: &EffectGate,
    event: &RecordedEvent<AccountEvent>,
    conn: &mut PgConnection,
) -> Result<(), HandlerError> {
    let table = P::table("balances");
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO \"{schema}\".{table} (account, events, version) VALUES ($1, 1, $2) \
         ON CONFLICT (account) DO UPDATE SET events = {table}.events + 1"
    )))
    .bind(event.stream.aggregate_id.as_str())
    .bind(i32::try_from(P::VERSION)?)
    .execute(&mut *conn)
    .await?;
    if gate.allows::<P>(conn, event.checkpoint).await? {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{schema}\".effects (event_id, version) VALUES ($1, $2)"
        )))
        .bind(event.event_id.0)
        .bind(i32::try_from(P::VERSION)?)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

#[derive(Projection)]
#[projection(name = "balances", version = 1, tables("balances"), events(AccountEvent), context = PgConnection)]
struct BalancesV1 {
    schema: String,
    gate: EffectGate,
}

#[async_trait::async_trait]
impl Handles<AccountEvent, PgConnection> for BalancesV1 {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        apply::<Self>(&self.schema, &self.gate, event, conn).await
    }
}

#[derive(Projection)]
#[projection(name = "balances", version = 2, tables("balances"), events(AccountEvent), context = PgConnection)]
struct BalancesV2 {
    schema: String,
    gate: EffectGate,
}

#[async_trait::async_trait]
impl Handles<AccountEvent, PgConnection> for BalancesV2 {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        apply::<Self>(&self.schema, &self.gate, event, conn).await
    }
}

async fn exec(store: &PostgresEventStore, sql: &str) {
    sqlx::raw_sql(AssertSqlSafe(sql.replace("{s}", store.schema())))
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn count(store: &PostgresEventStore, sql: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(sql.replace("{s}", store.schema())))
        .fetch_one(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The tables of both versions (each version's table is created before its worker starts).
async fn setup(name: &str) -> PostgresEventStore {
    let store = fresh_store(name).await;
    exec(
        &store,
        "CREATE TABLE \"{s}\".balances_v1 (account TEXT PRIMARY KEY, events BIGINT NOT NULL, version INT NOT NULL); \
         CREATE TABLE \"{s}\".effects (event_id UUID NOT NULL, version INT NOT NULL)",
    )
    .await;
    store
}

/// A running worker: stop it with `stop`, its outcome from `task`.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

fn run<P>(worker: ProjectionWorker<P>) -> Running
where
    P: Projection<Context = PgConnection> + Send + Sync + 'static,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        worker
            .run(Duration::from_millis(20), async move {
                let _ = stopped.await;
            })
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    });
    Running { stop, task }
}

fn v1(store: &PostgresEventStore) -> ProjectionWorker<BalancesV1> {
    let projection = BalancesV1 {
        schema: store.schema().to_owned(),
        gate: EffectGate::new(store),
    };
    ProjectionWorker::new(store.clone(), projection, "v1-worker")
        .with_lease(Duration::from_secs(2))
        .with_batch(200)
}

fn v2(store: &PostgresEventStore) -> ProjectionWorker<BalancesV2> {
    let projection = BalancesV2 {
        schema: store.schema().to_owned(),
        gate: EffectGate::new(store),
    };
    ProjectionWorker::new(store.clone(), projection, "v2-worker")
        .with_lease(Duration::from_secs(2))
        .with_batch(200)
}

/// Writers on 32 streams until `stop`; each returns how many events it wrote.
fn writers(
    store: &PostgresEventStore,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..4u64)
        .map(|w| {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let stream = StreamId::new("account", format!("a{}", (n * 4 + w) % 32));
                    store
                        .append(&stream, ExpectedVersion::Any, vec![deposit(n + 1)])
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                    n += 1;
                    // Paced: the projections keep up on a busy 2-core machine.
                    tokio::time::sleep(Duration::from_millis(8)).await;
                }
                n
            })
        })
        .collect()
}

/// Every event's side effect ran once, in one version or the other.
async fn effects_once(store: &PostgresEventStore) -> (i64, i64) {
    let events = count(store, "SELECT count(*) FROM \"{s}\".events").await;
    let effects = count(store, "SELECT count(*) FROM \"{s}\".effects").await;
    let distinct = count(
        store,
        "SELECT count(DISTINCT event_id) FROM \"{s}\".effects",
    )
    .await;
    assert_eq!(
        (effects, distinct),
        (events, events),
        "effects per event: not once each"
    );
    let by_v1 = count(
        store,
        "SELECT count(*) FROM \"{s}\".effects WHERE version = 1",
    )
    .await;
    (by_v1, effects - by_v1)
}

async fn head(store: &PostgresEventStore) -> Checkpoint {
    store
        .head()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or(Checkpoint::START)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn version_two_catches_up_beside_version_one_and_readers_switch_whole() {
    let store = setup("versions_live").await;
    let first = run(v1(&store));
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writers(&store, &stop);
    // Readers: the view of the plain name, without pause. The total of events applied never goes
    // down (a partial version 2 would show fewer), the version only from 1 to 2.
    let reading: Vec<_> = (0..2)
        .map(|_| {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut last, mut seen, mut reads) = ((0i64, 0i32), Vec::<i32>::new(), 0u64);
                let sql = format!(
                    "SELECT COALESCE(sum(events), 0)::int8, COALESCE(max(version), 0) FROM \"{}\".balances",
                    store.schema()
                );
                while !stop.load(Ordering::Relaxed) {
                    let Ok(now) = sqlx::query_as::<_, (i64, i32)>(AssertSqlSafe(sql.clone()))
                        .fetch_one(store.pool())
                        .await
                    else {
                        // The view exists once version 1 registered.
                        assert!(seen.is_empty(), "a read failed after the view existed");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    reads += 1;
                    assert!(now.0 >= last.0, "readers saw fewer events applied: {last:?} then {now:?}");
                    assert!(now.1 >= last.1, "readers went back a version: {last:?} then {now:?}");
                    if now.1 != 0 && seen.last() != Some(&now.1) {
                        seen.push(now.1);
                    }
                    last = now;
                }
                (reads, seen)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Version 2 is deployed: its table, its worker, catching up from the first event.
    exec(
        &store,
        "CREATE TABLE \"{s}\".balances_v2 (account TEXT PRIMARY KEY, events BIGINT NOT NULL, version INT NOT NULL, since TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await;
    let second = run(v2(&store));
    let started = Instant::now();
    // The old version is retired by the live one's worker as soon as its effects are done.
    let promotion = Promotion::new()
        .wait(Duration::from_secs(120))
        .retire_after(Duration::ZERO);
    let promoted = promote(&store, "balances", None, promotion)
        .await
        .unwrap_or_else(|e| panic!("promote: {e}"));
    let promoted_in = started.elapsed();
    assert_eq!((promoted.version, promoted.previous), (2, Some(1)));
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut written = 0;
    for writer in writing {
        written += writer.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let mut reads = 0;
    for reader in reading {
        let (n, seen) = reader.await.unwrap_or_else(|e| panic!("a reader: {e}"));
        assert_eq!(seen, vec![1, 2], "a reader's versions");
        reads += n;
    }
    // The live version is not retired; the old one is, by the live one's worker, once it has run
    // its effects up to the handover (the grace is 0).
    let refused = retire(&store, "balances", 2, false).await;
    assert!(refused.is_err(), "the live version was retired");
    let by = Instant::now() + Duration::from_secs(30);
    while versions(&store, "balances")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .any(|v| v.version == 1 && v.state != VersionState::Retired)
    {
        assert!(
            Instant::now() < by,
            "version 2's worker did not retire version 1 after the grace"
        );
        // A catch-up of version 2's worker is when it tends to the versions.
        store
            .append(
                &StreamId::new("account", "tick"),
                ExpectedVersion::Any,
                vec![deposit(1)],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at = head(&store).await;
    wait_until_caught_up(&store, "balances@v2", at, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("version 2: {e}"));
    let shown = count(
        &store,
        "SELECT COALESCE(sum(events), 0)::int8 FROM \"{s}\".balances",
    )
    .await;
    let events = count(&store, "SELECT count(*) FROM \"{s}\".events").await;
    assert_eq!(shown, events, "version 2 complete");
    let (by_v1, by_v2) = effects_once(&store).await;
    assert!(
        by_v1 > 0 && by_v2 > 0,
        "both versions ran effects: {by_v1} and {by_v2}"
    );
    assert!(
        !retire(&store, "balances", 1, false)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    let gone = count(
        &store,
        "SELECT count(*) FROM pg_tables WHERE schemaname = '{s}' AND tablename = 'balances_v1'",
    )
    .await;
    assert_eq!(gone, 0, "version 1's table is dropped");
    // Its worker stops at its next batch, saying why, and never makes its checkpoint again.
    store
        .append(
            &StreamId::new("account", "late"),
            ExpectedVersion::Any,
            vec![deposit(1)],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let outcome = tokio::time::timeout(Duration::from_secs(20), first.task)
        .await
        .unwrap_or_else(|_| panic!("the retired version's worker kept running"))
        .unwrap_or_else(|e| panic!("{e}"));
    let error = outcome.expect_err("the retired worker ended without an error");
    assert!(error.contains("retired"), "{error}");
    let rows = count(
        &store,
        "SELECT count(*) FROM \"{s}\".projection_checkpoints WHERE projection = 'balances'",
    )
    .await;
    assert_eq!(rows, 0, "the retired version's checkpoint came back");
    let states: Vec<_> = versions(&store, "balances")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|v| (v.version, v.state))
        .collect();
    assert_eq!(
        states,
        vec![(1, VersionState::Retired), (2, VersionState::Live)]
    );
    let _ = second.stop.send(());
    second
        .task
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("version 2's worker: {e}"));
    eprintln!(
        "versions: {written} events by 4 writers; version 2 caught up and was promoted {promoted_in:?} after it started \
         (handover at {}); {reads} reads by 2 readers, each saw version 1 then version 2, never fewer events; \
         side effects: {by_v1} by version 1, {by_v2} by version 2, each event once",
        promoted.handover
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_old_version_runs_the_effects_up_to_the_handover() {
    let store = setup("versions_lag").await;
    exec(
        &store,
        "CREATE TABLE \"{s}\".balances_v2 (account TEXT PRIMARY KEY, events BIGINT NOT NULL, version INT NOT NULL)",
    )
    .await;
    let append = |n: u64| {
        let store = store.clone();
        async move {
            for i in 0..n {
                store
                    .append(
                        &StreamId::new("account", format!("b{}", i % 8)),
                        ExpectedVersion::Any,
                        vec![deposit(i + 1)],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
    };
    let mut first = v1(&store);
    assert!(first.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    first.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    append(100).await;
    first.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    // Version 1 stops here; 100 more events come.
    append(100).await;
    assert_eq!(
        register::<BalancesV2>(&store)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        VersionState::CatchingUp
    );
    // Not running: it has not caught up, and promoting it says so.
    let refused = promote(&store, "balances", Some(2), Promotion::new())
        .await
        .expect_err("promoted a version that has applied nothing");
    assert!(
        refused.to_string().contains("has not caught up"),
        "{refused}"
    );
    // It promotes itself once caught up.
    let second = run(v2(&store).with_auto_promote(Promotion::new()));
    let by = Instant::now() + Duration::from_secs(30);
    let handover = loop {
        let all = versions(&store, "balances")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if let Some(v) = all
            .iter()
            .find(|v| v.version == 2 && v.state == VersionState::Live)
        {
            break v
                .effects_after
                .unwrap_or_else(|| panic!("no handover: {v:?}"));
        }
        assert!(
            Instant::now() < by,
            "version 2 did not promote itself: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    append(50).await;
    // Version 1 owes the effects of the 100 events it has not applied: it is not retired.
    let owed = retire(&store, "balances", 1, false)
        .await
        .expect_err("retired a version that still owes side effects");
    assert!(
        owed.to_string().contains("still runs side effects"),
        "{owed}"
    );
    // It catches up: effects up to the handover, none after.
    first.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    let at = head(&store).await;
    wait_until_caught_up(&store, "balances@v2", at, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (by_v1, by_v2) = effects_once(&store).await;
    assert_eq!(
        (by_v1, by_v2),
        (200, 50),
        "effects split at the handover {handover}"
    );
    assert!(
        retire(&store, "balances", 1, false)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    assert!(
        !retire(&store, "balances", 1, false)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    let _ = second.stop.send(());
    second
        .task
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("version 2's worker: {e}"));
}

/// Version 2 run in segments by a `SegmentedWorker` promotes itself once its slowest segment has
/// applied what version 1 has; effects stay once per event across the handover, though the
/// segments stood at different places when it was recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segmented_version_promotes_itself() {
    let store = setup("versions_segmented").await;
    exec(
        &store,
        "CREATE TABLE \"{s}\".balances_v2 (account TEXT PRIMARY KEY, events BIGINT NOT NULL, version INT NOT NULL)",
    )
    .await;
    let first = run(v1(&store));
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writers(&store, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let factory = {
        let (schema, gate) = (store.schema().to_owned(), EffectGate::new(&store));
        move || BalancesV2 {
            schema: schema.clone(),
            gate: gate.clone(),
        }
    };
    let (halt, halted) = tokio::sync::oneshot::channel::<()>();
    let segmented = tokio::spawn(
        evently_postgres::projection::SegmentedWorker::new(store.clone(), "v2-segments", factory)
            .with_segments(4)
            .with_lease(Duration::from_secs(2))
            .with_batch(100)
            .with_auto_promote(Promotion::new())
            .run(Duration::from_millis(20), async move {
                let _ = halted.await;
            }),
    );
    let by = Instant::now() + Duration::from_secs(60);
    loop {
        let all = versions(&store, "balances")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if all
            .iter()
            .any(|v| v.version == 2 && v.state == VersionState::Live)
        {
            break;
        }
        assert!(
            Instant::now() < by,
            "the segmented version 2 did not promote itself: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut written = 0;
    for writer in writing {
        written += writer.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let at = head(&store).await;
    for name in ["balances", "balances@v2"] {
        wait_until_caught_up(&store, name, at, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let shown = count(
        &store,
        "SELECT COALESCE(sum(events), 0)::int8 FROM \"{s}\".balances",
    )
    .await;
    assert_eq!(
        u64::try_from(shown).unwrap_or(0),
        written,
        "version 2 complete"
    );
    let (by_v1, by_v2) = effects_once(&store).await;
    eprintln!(
        "segmented version 2: {written} events; effects {by_v1} by version 1, {by_v2} by version 2"
    );
    let _ = halt.send(());
    segmented
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("version 2's workers: {e}"));
    let _ = first.stop.send(());
    first
        .task
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("version 1's worker: {e}"));
}
