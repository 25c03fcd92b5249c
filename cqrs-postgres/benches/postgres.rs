//! The PostgreSQL store against raw sqlx on the same schema and server, in one run: prints a table of
//! medians (min-max) and the ratios the project targets.
//!
//! Run: `cargo bench -p cqrs-postgres --bench postgres` (`-- --quick` for a small smoke run).
//! Needs PostgreSQL at `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`).

use std::sync::Arc;
use std::time::Instant;

use cqrs_core::prelude::*;
use cqrs_core::{EventData, EventStoreExt, RecordedEvent, Snapshot, SnapshotStore};
use cqrs_examples::bank::{Account, AccountCommand, AccountEvent, Deposit};
use cqrs_postgres::{PostgresEventStore, database_url};
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPoolOptions;

struct Sizes {
    runs: usize,
    sequential: u64,
    aggregates: u64,
    per_aggregate: u64,
    same_aggregate: u64,
    stream: u64,
    bulk: u64,
}

const FULL: Sizes = Sizes {
    runs: 3,
    sequential: 10_000,
    aggregates: 1_000,
    per_aggregate: 10,
    same_aggregate: 2_000,
    stream: 10_000,
    bulk: 100_000,
};

const QUICK: Sizes = Sizes {
    runs: 1,
    sequential: 200,
    aggregates: 40,
    per_aggregate: 5,
    same_aggregate: 100,
    stream: 500,
    bulk: 2_000,
};

async fn store(name: &str, connections: u32) -> PostgresEventStore {
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .connect(&database_url())
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {}: {e}", database_url()));
    let schema = format!("bench_{name}");
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let store = PostgresEventStore::new(pool, &schema).unwrap_or_else(|e| panic!("{e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
    store
}

fn deposit(n: u64) -> AccountCommand {
    AccountCommand::Deposit(Deposit {
        amount_cents: n % 1000 + 1,
        reference: "salary 2026-11".into(),
    })
}

fn deposit_event(n: u64) -> EventData {
    let event = AccountEvent::Deposited(Deposit {
        amount_cents: n % 1000 + 1,
        reference: "salary 2026-11".into(),
    });
    EventData::from_event(&event, Metadata::default()).unwrap_or_else(|e| panic!("{e}"))
}

async fn open(gateway: &CommandGateway<Account, PostgresEventStore>, id: &str) {
    gateway
        .execute(
            id,
            AccountCommand::Open {
                owner: "ada".into(),
            },
            CommandMetadata::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// W1: one stream, sequential commands.
async fn w1(s: &Sizes) -> f64 {
    let store = store("w1", 4).await;
    let gateway = CommandGateway::<Account, _>::new(store);
    open(&gateway, "a").await;
    let start = Instant::now();
    for n in 0..s.sequential {
        gateway
            .execute("a", deposit(n), CommandMetadata::new())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    s.sequential as f64 / start.elapsed().as_secs_f64()
}

/// W2: many aggregates, 8 tasks.
async fn w2(s: &Sizes) -> f64 {
    let store = store("w2", 10).await;
    let gateway = Arc::new(CommandGateway::<Account, _>::new(store));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let gateway = Arc::clone(&gateway);
        let (aggregates, per) = (s.aggregates, s.per_aggregate);
        tasks.push(tokio::spawn(async move {
            for a in (t..aggregates).step_by(8) {
                let id = format!("acc-{a}");
                open(&gateway, &id).await;
                for n in 1..per {
                    gateway
                        .execute(id.as_str(), deposit(n), CommandMetadata::new())
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap_or_else(|e| panic!("{e}"));
    }
    (s.aggregates * s.per_aggregate) as f64 / start.elapsed().as_secs_f64()
}

/// W3: 8 tasks on one aggregate (serialized inside the gateway instead of colliding).
async fn w3(s: &Sizes) -> (f64, u64) {
    let store = store("w3", 10).await;
    let gateway = Arc::new(CommandGateway::<Account, _>::new(store.clone()));
    open(&gateway, "hot").await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let gateway = Arc::clone(&gateway);
        let per = s.same_aggregate / 8 + u64::from(t < s.same_aggregate % 8);
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for n in 0..per {
                if gateway
                    .execute("hot", deposit(n), CommandMetadata::new())
                    .await
                    .is_ok()
                {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for task in tasks {
        ok += task.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let rate = s.same_aggregate as f64 / start.elapsed().as_secs_f64();
    let events = store
        .stream_version(&StreamId::new("account", "hot"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(events, ok + 1, "W3: one event per successful command");
    (rate, ok)
}

/// A stream of `len` events (an open and deposits), appended in bulk.
async fn long_stream(store: &PostgresEventStore, id: &str, len: u64) {
    let stream = StreamId::new("account", id);
    let opened = EventData::from_event(
        &AccountEvent::Opened {
            owner: "ada".into(),
        },
        Metadata::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut batch = vec![opened];
    batch.extend((1..len).map(deposit_event));
    for (i, chunk) in batch.chunks(5_000).enumerate() {
        let expected = if i == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(i as u64 * 5_000)
        };
        store
            .append(&stream, expected, chunk.to_vec())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// W4: rehydrate a stream of `len` events, without and with a snapshot (taken 50 events before the
/// end). Returns (seconds without, seconds with).
async fn w4(len: u64) -> (f64, f64) {
    let store = store(&format!("w4_{len}"), 4).await;
    long_stream(&store, "long", len).await;
    let plain = CommandGateway::<Account, _>::new(store.clone()).with_cache_capacity(0);
    let start = Instant::now();
    let (account, version) = plain.load("long").await.unwrap_or_else(|e| panic!("{e}"));
    let without = start.elapsed().as_secs_f64();
    assert_eq!(version, len);

    // A snapshot 50 events before the end, as `snapshot(every = 100)` leaves it at most 99 behind.
    let at = len - 50;
    let mut state = Account::default();
    let events = store
        .load_all(&StreamId::new("account", "long"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for e in events.iter().take(at as usize) {
        state.apply(&e.decode::<AccountEvent>().unwrap_or_else(|e| panic!("{e}")));
    }
    store
        .save_snapshot(Snapshot {
            stream: StreamId::new("account", "long"),
            version: at,
            schema_version: 1,
            state: serde_json::to_value(&state).unwrap_or_else(|e| panic!("{e}")),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let snapshotted = CommandGateway::<Account, _>::new(store.clone())
        .with_cache_capacity(0)
        .with_snapshots(store.clone());
    let start = Instant::now();
    let (from_snapshot, version) = snapshotted
        .load("long")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let with = start.elapsed().as_secs_f64();
    assert_eq!(
        (version, from_snapshot.balance_cents),
        (len, account.balance_cents)
    );
    (without, with)
}

/// W5: bulk append of `bulk` events in appends of 10,000.
async fn w5(s: &Sizes) -> f64 {
    let store = store("w5", 4).await;
    let events: Vec<EventData> = (0..s.bulk).map(deposit_event).collect();
    let batches: Vec<Vec<EventData>> = events.chunks(10_000).map(<[EventData]>::to_vec).collect();
    let start = Instant::now();
    for (i, batch) in batches.into_iter().enumerate() {
        store
            .append(
                &StreamId::new("account", format!("bulk-{i}")),
                ExpectedVersion::NoStream,
                batch,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    s.bulk as f64 / start.elapsed().as_secs_f64()
}

const RAW_INSERT: &str = "INSERT INTO {s}.events (event_id, aggregate_type, aggregate_id, version, event_type, schema_version, payload, metadata) \
     VALUES ($1, 'account', $2, $3, 'MoneyDeposited', 2, $4, '{}')";

/// L1 (`tasks` = 1) and L4 (`tasks` = 8): single-row insert transactions.
async fn raw_inserts(name: &str, tasks: u64, total: u64) -> f64 {
    let store = store(name, tasks as u32 + 1).await;
    let sql: Arc<str> = RAW_INSERT.replace("{s}", store.schema()).into();
    let payload = deposit_event(1).payload;
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (pool, sql, payload) = (store.pool().clone(), Arc::clone(&sql), payload.clone());
        handles.push(tokio::spawn(async move {
            for v in 1..=total / tasks {
                sqlx::query(AssertSqlSafe(Arc::clone(&sql)))
                    .bind(uuid::Uuid::now_v7())
                    .bind(format!("raw-{t}"))
                    .bind(v as i64)
                    .bind(&payload)
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
async fn raw_copy(rows: u64) -> f64 {
    let store = store("l3", 2).await;
    let payload = deposit_event(1).payload.to_string();
    let mut data = String::with_capacity(rows as usize * 150);
    for v in 1..=rows {
        data.push_str(&format!(
            "{}\taccount\tcopy\t{v}\tMoneyDeposited\t2\t{payload}\t{{}}\n",
            uuid::Uuid::now_v7()
        ));
    }
    let mut conn = store
        .pool()
        .acquire()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY {}.events (event_id, aggregate_type, aggregate_id, version, event_type, schema_version, payload, metadata) FROM STDIN",
            store.schema()
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    copy.send(data.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    copy.finish().await.unwrap_or_else(|e| panic!("{e}"));
    rows as f64 / start.elapsed().as_secs_f64()
}

#[derive(serde::Deserialize)]
#[allow(dead_code)] // read to be deserialized, as a raw reader would
struct PayloadRow {
    amount_cents: Option<u64>,
    reference: Option<String>,
    owner: Option<String>,
}

/// L5: select the rows of a `len`-event stream and deserialize them with serde: whole rows (the
/// issue's baseline) or the payload column alone (the stricter one). Returns seconds.
async fn raw_select(len: u64, whole_rows: bool) -> f64 {
    let store = store(&format!("l5_{len}_{whole_rows}"), 2).await;
    long_stream(&store, "long", len).await;
    let columns = if whole_rows { "*" } else { "payload" };
    let sql = format!(
        "SELECT {columns} FROM {}.events WHERE aggregate_type = 'account' AND aggregate_id = 'long' ORDER BY version",
        store.schema()
    );
    let start = Instant::now();
    let rows = sqlx::query(AssertSqlSafe(sql))
        .fetch_all(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for row in &rows {
        use sqlx::Row;
        let payload: sqlx::types::Json<PayloadRow> =
            row.try_get("payload").unwrap_or_else(|e| panic!("{e}"));
        std::hint::black_box(payload);
        if whole_rows {
            let metadata: sqlx::types::Json<Metadata> =
                row.try_get("metadata").unwrap_or_else(|e| panic!("{e}"));
            let event_id: uuid::Uuid = row.try_get("event_id").unwrap_or_else(|e| panic!("{e}"));
            let version: i64 = row.try_get("version").unwrap_or_else(|e| panic!("{e}"));
            let event_type: String = row.try_get("event_type").unwrap_or_else(|e| panic!("{e}"));
            let recorded_at: chrono::DateTime<chrono::Utc> =
                row.try_get("recorded_at").unwrap_or_else(|e| panic!("{e}"));
            std::hint::black_box((metadata, event_id, version, event_type, recorded_at));
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(rows.len() as u64, len);
    elapsed
}

/// Counts deposits in memory: the framework's cost of a catch-up, without the read model's.
#[derive(cqrs_core::Projection)]
#[projection(name = "deposit_count", events(AccountEvent), context = sqlx::PgConnection)]
struct DepositCount {
    deposits: u64,
}

#[async_trait::async_trait]
impl Handles<AccountEvent, sqlx::PgConnection> for DepositCount {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        _: &mut sqlx::PgConnection,
    ) -> Result<(), cqrs_core::projection::HandlerError> {
        if matches!(event.event, AccountEvent::Deposited(_)) {
            self.deposits += 1;
        }
        Ok(())
    }
}

/// P1: a projection catches up over `events` events; and the raw ordered read of the same rows
/// (whole rows, payload and metadata deserialized). Returns (seconds of the catch-up, seconds raw).
async fn p1(events: u64) -> (f64, f64) {
    let store = store("p1", 4).await;
    let all: Vec<EventData> = (0..events).map(deposit_event).collect();
    for (i, chunk) in all.chunks(10_000).enumerate() {
        store
            .append(
                &StreamId::new("account", format!("p1-{i}")),
                ExpectedVersion::NoStream,
                chunk.to_vec(),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut worker = cqrs_postgres::projection::ProjectionWorker::new(
        store.clone(),
        DepositCount { deposits: 0 },
        "bench",
    )
    .with_batch(2_000);
    assert!(worker.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    let start = Instant::now();
    worker.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    let projected = start.elapsed().as_secs_f64();
    assert_eq!(worker.projection().deposits, events);

    let sql = format!(
        "SELECT * FROM {}.events ORDER BY transaction_id, global_position",
        store.schema()
    );
    let start = Instant::now();
    let rows = sqlx::query(AssertSqlSafe(sql))
        .fetch_all(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for row in &rows {
        use sqlx::Row;
        let payload: sqlx::types::Json<PayloadRow> =
            row.try_get("payload").unwrap_or_else(|e| panic!("{e}"));
        let metadata: sqlx::types::Json<Metadata> =
            row.try_get("metadata").unwrap_or_else(|e| panic!("{e}"));
        std::hint::black_box((payload, metadata));
    }
    let raw = start.elapsed().as_secs_f64();
    assert_eq!(rows.len() as u64, events);
    (projected, raw)
}

/// Median and range of `runs` measurements.
struct Figure {
    median: f64,
    min: f64,
    max: f64,
}

async fn measure<F, Fut>(runs: usize, mut f: F) -> Figure
where
    F: FnMut() -> Fut,
    Fut: Future<Output = f64>,
{
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        samples.push(f().await);
    }
    samples.sort_by(f64::total_cmp);
    Figure {
        median: samples[samples.len() / 2],
        min: samples[0],
        max: samples[samples.len() - 1],
    }
}

fn row(name: &str, unit: &str, f: &Figure) {
    println!(
        "| {name} | {:.0} {unit} | {:.0}-{:.0} |",
        f.median, f.min, f.max
    );
}

fn ms(f: &Figure) -> String {
    format!(
        "{:.1} ms | {:.1}-{:.1}",
        f.median * 1e3,
        f.min * 1e3,
        f.max * 1e3
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let quick = std::env::args().any(|a| a == "--quick");
    // `cargo bench -p cqrs-postgres --bench postgres -- W4 L5` runs only those workloads.
    let only = |name: &str| args.is_empty() || args.iter().any(|a| a.eq_ignore_ascii_case(name));
    let s = if quick { &QUICK } else { &FULL };
    let runs = s.runs;
    println!(
        "PostgreSQL store vs raw sqlx, same server and schema (median of {runs} runs, min-max)\n"
    );
    println!("| workload | median | range |");
    println!("|---|---:|---:|");
    let mut l1 = None;
    if only("L1") {
        let f = measure(runs, || raw_inserts("l1", 1, s.sequential)).await;
        row(
            "L1 single-row insert transactions, sequential",
            "rows/s",
            &f,
        );
        l1 = Some(f.median);
    }
    let mut l4 = None;
    if only("L4") {
        let f = measure(runs, || {
            raw_inserts("l4", 8, s.aggregates * s.per_aggregate)
        })
        .await;
        row(
            "L4 single-row insert transactions, 8 connections",
            "rows/s",
            &f,
        );
        l4 = Some(f.median);
    }
    let mut l3 = None;
    if only("L3") {
        let f = measure(runs, || raw_copy(s.bulk)).await;
        row(&format!("L3 COPY {} rows", s.bulk), "rows/s", &f);
        l3 = Some(f.median);
    }
    let mut l5 = None;
    if only("L5") {
        let whole = measure(runs, || raw_select(s.stream, true)).await;
        println!(
            "| L5 select + deserialize {} whole rows | {} |",
            s.stream,
            ms(&whole)
        );
        let payloads = measure(runs, || raw_select(s.stream, false)).await;
        println!(
            "| L5' select + deserialize {} payloads only | {} |",
            s.stream,
            ms(&payloads)
        );
        l5 = Some((whole.median, payloads.median));
    }
    let mut w1_rate = None;
    if only("W1") {
        let f = measure(runs, || w1(s)).await;
        row(
            &format!("W1 one stream, {} sequential commands", s.sequential),
            "cmd/s",
            &f,
        );
        w1_rate = Some(f.median);
    }
    let mut w2_rate = None;
    if only("W2") {
        let f = measure(runs, || w2(s)).await;
        row(
            &format!(
                "W2 {} aggregates x {} commands, 8 tasks",
                s.aggregates, s.per_aggregate
            ),
            "cmd/s",
            &f,
        );
        w2_rate = Some(f.median);
    }
    let mut w3_rate = None;
    if only("W3") {
        let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let f = measure(runs, || {
            let ok = Arc::clone(&ok);
            async move {
                let (rate, n) = w3(s).await;
                ok.store(n, std::sync::atomic::Ordering::Relaxed);
                rate
            }
        })
        .await;
        let ok = ok.load(std::sync::atomic::Ordering::Relaxed);
        row(
            &format!(
                "W3 8 tasks on one aggregate ({ok} of {} succeeded)",
                s.same_aggregate
            ),
            "cmd/s",
            &f,
        );
        w3_rate = Some(f.median);
    }
    let mut w4_times = None;
    if only("W4") {
        let short = s.stream / 10;
        let without = measure(runs, || async { w4(s.stream).await.0 }).await;
        let with = measure(runs, || async { w4(s.stream).await.1 }).await;
        let with_short = measure(runs, || async { w4(short).await.1 }).await;
        println!(
            "| W4 rehydrate {} events, no snapshot | {} |",
            s.stream,
            ms(&without)
        );
        println!(
            "| W4 rehydrate {} events, snapshot | {} |",
            s.stream,
            ms(&with)
        );
        println!(
            "| W4 rehydrate {short} events, snapshot | {} |",
            ms(&with_short)
        );
        w4_times = Some((without.median, with.median, with_short.median));
    }
    let mut p1_ratio = None;
    if only("P1") {
        let mut projected = Vec::new();
        let mut raw = Vec::new();
        for _ in 0..runs {
            let (p, r) = p1(s.bulk).await;
            projected.push(p);
            raw.push(r);
        }
        projected.sort_by(f64::total_cmp);
        raw.sort_by(f64::total_cmp);
        let (p, r) = (projected[projected.len() / 2], raw[raw.len() / 2]);
        println!(
            "| P1 projection catch-up over {} events | {:.0} events/s | |",
            s.bulk,
            s.bulk as f64 / p
        );
        println!(
            "| P1 raw ordered read of the same rows | {:.0} rows/s | |",
            s.bulk as f64 / r
        );
        p1_ratio = Some(r / p);
    }
    let mut w5_rate = None;
    if only("W5") {
        let f = measure(runs, || w5(s)).await;
        row(
            &format!("W5 bulk append {} events (appends of 10,000)", s.bulk),
            "events/s",
            &f,
        );
        w5_rate = Some(f.median);
    }

    println!("\n| ratio | measured | target |");
    println!("|---|---:|---:|");
    let ratio = |name: &str, value: Option<f64>, target: &str| {
        if let Some(value) = value {
            println!("| {name} | {value:.2} | {target} |");
        }
    };
    ratio("W1 / L1", w1_rate.zip(l1).map(|(w, l)| w / l), ">= 0.7");
    ratio("W2 / L4", w2_rate.zip(l4).map(|(w, l)| w / l), ">= 0.7");
    ratio("W3 / L1", w3_rate.zip(l1).map(|(w, l)| w / l), ">= 0.5");
    ratio(
        "W4 time / L5 time (whole rows), no snapshot",
        w4_times.zip(l5).map(|((w, _, _), (l, _))| w / l),
        "<= 0.9",
    );
    ratio(
        "W4 time / L5' time (payloads only), no snapshot",
        w4_times.zip(l5).map(|((w, _, _), (_, l))| w / l),
        "(stricter)",
    );
    ratio(
        &format!(
            "W4 time with snapshot, {} vs {} events",
            s.stream,
            s.stream / 10
        ),
        w4_times.map(|(_, with, short)| with / short),
        "flat (~1)",
    );
    ratio(
        "W5 / L3 (COPY)",
        w5_rate.zip(l3).map(|(w, l)| w / l),
        ">= 0.6",
    );
    ratio("P1 catch-up / raw ordered read", p1_ratio, ">= 0.5");
}
