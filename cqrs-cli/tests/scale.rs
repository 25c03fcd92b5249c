//! `cqrs projections scale` and the per-segment status against the real PostgreSQL: a projection
//! run by a plain worker is segmented from the command line, two `SegmentedWorker`s in this test
//! process share it, it is split while they run, and what operators see (status, list, JSON) and
//! what they are refused (a bad count, an unknown name, a rebuild without resets) is checked; a
//! rebuild is served by the segmented workers.

use std::time::Duration;

use cqrs_examples::bank::{AccountEvent, Deposit};
use evently_core::prelude::*;
use evently_core::projection::HandlerError;
use evently_core::{EventData, RecordedEvent};
use evently_postgres::PostgresEventStore;
use evently_postgres::projection::{ProjectionWorker, SegmentedWorker};
use sqlx::{AssertSqlSafe, PgConnection};

#[path = "../../cqrs-postgres/tests/common/mod.rs"]
mod pg;

mod common;

/// The schema `pg::fresh_store("cli_scale")` makes.
const SCHEMA: &str = "t_cli_scale";

/// The sum of the deposits per account.
#[derive(Projection)]
#[projection(name = "balances", events(AccountEvent), context = PgConnection)]
struct Balances;

#[async_trait::async_trait]
impl Handles<AccountEvent, PgConnection> for Balances {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        if let AccountEvent::Deposited(deposit) = &event.event {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {SCHEMA}.balances (id, cents) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET cents = balances.cents + EXCLUDED.cents"
            )))
            .bind(event.stream.aggregate_id.as_str())
            .bind(i64::try_from(deposit.amount_cents)?)
            .execute(conn)
            .await?;
        }
        Ok(())
    }
}

/// (exit code, stdout, stderr).
fn cqrs(args: &[&str]) -> (i32, String, String) {
    common::run(&["--schema", SCHEMA], args)
}

async fn deposits(store: &PostgresEventStore, round: u64) {
    for account in 0..20 {
        let data = EventData::from_event(
            &AccountEvent::Deposited(Deposit {
                amount_cents: round,
                reference: String::new(),
            }),
            Metadata::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        store
            .append(
                &StreamId::new("account", format!("a{account}")),
                ExpectedVersion::Any,
                vec![data],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Waits until every account's balance is `cents`.
async fn balances_reach(store: &PostgresEventStore, cents: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let rows: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT id, cents FROM {SCHEMA}.balances"
        )))
        .fetch_all(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        if rows.len() == 20 && rows.iter().all(|(_, c)| *c == cents) {
            return;
        }
        assert!(
            rows.iter().all(|(_, c)| *c <= cents),
            "a deposit applied twice: {rows:?}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "balances never reached {cents}: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

type Running = Vec<(
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
)>;

/// Two `SegmentedWorker`s on tasks, with or without a reset.
fn start_workers(store: &PostgresEventStore, with_reset: bool) -> Running {
    ["node-a", "node-b"]
        .into_iter()
        .map(|owner| {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let mut worker = SegmentedWorker::new(store.clone(), owner, || Balances)
                .with_lease(Duration::from_millis(600));
            if with_reset {
                worker = worker.with_reset(|conn| {
                    Box::pin(async move {
                        sqlx::query(AssertSqlSafe(format!("TRUNCATE {SCHEMA}.balances")))
                            .execute(conn)
                            .await
                            .map(|_| ())
                    })
                });
            }
            let task = tokio::spawn(async move {
                worker
                    .run(Duration::from_millis(100), async {
                        stopped.await.ok();
                    })
                    .await
                    .unwrap_or_else(|e| panic!("{owner}: {e}"));
            });
            (stop, task)
        })
        .collect()
}

async fn stop_workers(workers: Running) {
    for (stop, task) in workers {
        let _ = stop.send(());
        task.await.unwrap_or_else(|e| panic!("{e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projections_are_scaled_and_shown_per_segment_from_the_command_line() {
    let store = pg::fresh_store("cli_scale").await;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {SCHEMA}.balances (id TEXT PRIMARY KEY, cents BIGINT NOT NULL)"
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    deposits(&store, 1).await;
    // A plain worker ran it so far.
    let mut plain = ProjectionWorker::new(store.clone(), Balances, "plain");
    assert!(plain.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    plain.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    balances_reach(&store, 1).await;

    let (code, out, err) = cqrs(&["projections", "scale", "balances", "--segments", "0"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("1 to 1024 segments, not 0"), "{err}");

    let (code, out, err) = cqrs(&["projections", "scale", "balancse", "--segments", "4"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("no projection `balancse` (known: balances)"),
        "{err}"
    );

    let (code, out, err) = cqrs(&["projections", "scale", "balances", "--segments", "4"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("`balances` runs in 4 segments (was 1"),
        "{out}"
    );
    // The plain worker is fenced: it takes nothing any more.
    assert!(!plain.acquire().await.unwrap_or_else(|e| panic!("{e}")));

    let workers = start_workers(&store, false);
    deposits(&store, 2).await;
    balances_reach(&store, 3).await;

    // Both workers hold two segments each once they have balanced.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let (code, out, err) = cqrs(&["projections", "status", "balances"]);
        assert_eq!(code, 0, "{out}{err}");
        if out.contains("4 (4 owned by 2 workers") {
            break out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never balanced:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for segment in ["0/4@", "1/4@", "2/4@", "3/4@"] {
        assert!(status.contains(segment), "{segment} missing:\n{status}");
    }
    assert!(
        status.contains("held by node-a") && status.contains("held by node-b"),
        "{status}"
    );

    let (code, out, _) = cqrs(&["projections", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("  balances#0/4@"),
        "segment rows are listed under it:\n{out}"
    );

    let (code, out, err) = cqrs(&["projections", "status", "balances", "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(json["segments"], 4);
    assert_eq!(json["segment_rows"].as_array().map(Vec::len), Some(4));

    // Workers without a reset refuse a rebuild, saying what to do.
    let (code, out, err) = cqrs(&["projections", "rebuild", "balances", "--timeout", "20"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("has no reset: build every worker"), "{err}");
    stop_workers(workers).await;
    let workers = start_workers(&store, true);
    // With resets, one of them serves it: every segment replays from the first event.
    let (code, out, err) = cqrs(&["projections", "rebuild", "balances", "--timeout", "20"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("rebuilt `balances` up to position 40"),
        "{out}"
    );
    balances_reach(&store, 3).await;

    // A split while both run: every deposit still lands once.
    let (code, out, err) = cqrs(&["projections", "scale", "balances", "--segments", "8"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("runs in 8 segments (was 4"), "{out}");
    deposits(&store, 4).await;
    balances_reach(&store, 7).await;

    stop_workers(workers).await;
    // Stopped workers release their segments at once.
    let layout = evently_postgres::segments::layout(&store, "balances")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("not segmented"));
    assert_eq!(layout.count(), 8);
    assert!(layout.segments.iter().all(|s| !s.leased), "{layout:?}");
    let (_, status, _) = cqrs(&["projections", "status", "balances"]);
    assert!(status.contains("expired (last held by node-"), "{status}");
}
