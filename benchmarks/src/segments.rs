//! The scaling curve of a segmented projection: catch-up throughput over the same log with 1, 2
//! and 4 worker processes sharing 8 segments (`SegmentedWorker`), beside one plain
//! `ProjectionWorker`. The read model upserts one row per stream for every event (a round trip
//! per event in the batch's transaction, as most read models do).
//!
//! ```text
//! cargo bench -p cqrs-bench --bench segments             # 40,000 events, into benchmarks/results/segments.md
//! cargo bench -p cqrs-bench --bench segments -- --quick  # 4,000 events (the test suite's smoke run)
//! ```
//!
//! The worker processes are this binary run again with `--worker <schema> <owner>`.

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cqrs_examples::bank::{AccountEvent, Deposit};
use evently_core::prelude::*;
use evently_core::projection::{HandlerError, wait_until_caught_up};
use evently_core::{EventData, EventStore, RecordedEvent};
use evently_postgres::projection::{ProjectionWorker, SegmentedWorker};
use evently_postgres::{PostgresEventStore, database_url};
use sqlx::{AssertSqlSafe, PgConnection};

const SEGMENTS: u32 = 8;
const STREAMS: u64 = 1_000;

/// One row per account: the sum of its deposits and how many there were.
#[derive(Projection)]
#[projection(name = "balances", events(AccountEvent), context = PgConnection)]
struct Balances {
    schema: String,
}

#[async_trait::async_trait]
impl Handles<AccountEvent, PgConnection> for Balances {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        if let AccountEvent::Deposited(deposit) = &event.event {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO \"{}\".balances (account, total, deposits) VALUES ($1, $2, 1) \
                 ON CONFLICT (account) DO UPDATE SET total = balances.total + EXCLUDED.total, \
                   deposits = balances.deposits + 1",
                self.schema
            )))
            .bind(event.stream.aggregate_id.as_str())
            .bind(i64::try_from(deposit.amount_cents)?)
            .execute(conn)
            .await?;
        }
        Ok(())
    }
}

async fn store(schema: &str, connections: u32) -> PostgresEventStore {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .connect(&database_url())
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {}: {e}", database_url()));
    PostgresEventStore::new(pool, schema).unwrap_or_else(|e| panic!("{e}"))
}

/// The worker process: runs the segments until stdin closes.
async fn worker(schema: String, owner: String) {
    let store = store(&schema, 12).await;
    let factory = move || Balances {
        schema: schema.clone(),
    };
    SegmentedWorker::new(store, owner, factory)
        .with_segments(SEGMENTS)
        .with_lease(Duration::from_millis(600))
        .run(Duration::from_millis(100), async {
            let _ = tokio::task::spawn_blocking(|| {
                let _ = std::io::stdin().read_to_end(&mut Vec::new());
            })
            .await;
        })
        .await
        .unwrap_or_else(|e| panic!("worker: {e}"));
}

async fn exec(store: &PostgresEventStore, sql: &str) {
    sqlx::query(AssertSqlSafe(sql.replace("{s}", store.schema())))
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Empties the read model and forgets the projection's checkpoints and members.
async fn reset(store: &PostgresEventStore) {
    exec(store, "TRUNCATE \"{s}\".balances").await;
    exec(
        store,
        "DELETE FROM \"{s}\".projection_checkpoints WHERE projection = 'balances' OR segment_of = 'balances'",
    )
    .await;
    exec(store, "DELETE FROM \"{s}\".projection_members").await;
}

async fn check(store: &PostgresEventStore, events: u64) {
    let deposits: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT COALESCE(sum(deposits), 0)::int8 FROM \"{}\".balances",
        store.schema()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        u64::try_from(deposits).unwrap_or(0),
        events,
        "every deposit applied once"
    );
}

fn spawn(schema: &str, owner: &str) -> Child {
    Command::new(std::env::current_exe().unwrap_or_else(|e| panic!("{e}")))
        .args(["--worker", schema, owner])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning a worker: {e}"))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, schema, owner] = args.as_slice()
        && flag == "--worker"
    {
        worker(schema.clone(), owner.clone()).await;
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    if let Some(other) = args
        .iter()
        .find(|a| !matches!(a.as_str(), "--quick" | "--bench"))
    {
        eprintln!("unknown argument `{other}`: --quick");
        std::process::exit(2);
    }
    let events: u64 = if quick { 4_000 } else { 40_000 };
    let schema = "bench_segments";
    let store = store(schema, 8).await;
    exec(&store, "DROP SCHEMA IF EXISTS \"{s}\" CASCADE").await;
    store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
    exec(
        &store,
        "CREATE TABLE \"{s}\".balances (account TEXT PRIMARY KEY, total BIGINT NOT NULL, deposits BIGINT NOT NULL)",
    )
    .await;
    let per_stream = events / STREAMS;
    for stream in 0..STREAMS {
        let batch = (0..per_stream)
            .map(|n| {
                EventData::from_event(
                    &AccountEvent::Deposited(Deposit {
                        amount_cents: n + 1,
                        reference: String::new(),
                    }),
                    Metadata::default(),
                )
                .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        store
            .append(
                &StreamId::new("account", format!("a{stream}")),
                ExpectedVersion::NoStream,
                batch,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let head = store
        .head()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("nothing written"));
    tokio::time::sleep(Duration::from_millis(50)).await;

    // The baseline: one plain worker in this process.
    reset(&store).await;
    let mut plain = ProjectionWorker::new(
        store.clone(),
        Balances {
            schema: schema.to_owned(),
        },
        "plain",
    );
    assert!(plain.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    let started = Instant::now();
    plain.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    let baseline = events as f64 / started.elapsed().as_secs_f64();
    check(&store, events).await;
    drop(plain);

    let mut rows = vec![("1 `ProjectionWorker` (no segments)".to_owned(), baseline)];
    for processes in [1usize, 2, 4] {
        reset(&store).await;
        evently_postgres::segments::scale(&store, "balances", SEGMENTS)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let started = Instant::now();
        let mut children: Vec<Child> = (0..processes)
            .map(|i| spawn(schema, &format!("p{i}")))
            .collect();
        wait_until_caught_up(&store, "balances", head, Duration::from_secs(600))
            .await
            .unwrap_or_else(|e| panic!("{processes} processes did not catch up: {e}"));
        let rate = events as f64 / started.elapsed().as_secs_f64();
        for child in &mut children {
            drop(child.stdin.take());
        }
        for mut child in children {
            let _ = child.wait();
        }
        check(&store, events).await;
        rows.push((
            format!("{processes} `SegmentedWorker` process(es), {SEGMENTS} segments"),
            rate,
        ));
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut table = format!(
        "# Segmented projection catch-up ({events} events over {STREAMS} streams, an upsert per event; {cores} cores, PostgreSQL on the same machine)\n\n\
         | workers | events/s | vs 1 segmented process |\n|---|---:|---:|\n"
    );
    let one = rows[1].1;
    for (name, rate) in &rows {
        table.push_str(&format!("| {name} | {rate:.0} | {:.2} |\n", rate / one));
    }
    println!("{table}");
    if !quick {
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results/segments.md");
        std::fs::write(&out, &table).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        println!("written to {}", out.display());
    }
}
