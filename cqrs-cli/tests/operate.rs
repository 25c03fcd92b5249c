//! Operating a running projection worker from the `cqrs` binary against the real PostgreSQL:
//! `dlq retry`, `dlq retry-all`, `projections rebuild` and `projections status`, answered by a
//! `ProjectionWorker` running in this test process, with their exit codes (0 done, 1 failed,
//! 3 no worker answered).

use std::process::Output;
use std::time::Duration;

use cqrs_examples::bank::{AccountEvent, Deposit};
use evently_core::prelude::*;
use evently_core::projection::HandlerError;
use evently_core::{EventData, RecordedEvent};
use evently_postgres::PostgresEventStore;
use evently_postgres::control::DeadLetters;
use evently_postgres::projection::{FailureMode, FailurePolicy, ProjectionWorker};
use futures::FutureExt;
use sqlx::{AssertSqlSafe, PgConnection};

#[path = "../../cqrs-postgres/tests/common/mod.rs"]
mod pg;

/// The schema `pg::fresh_store("cli_ops")` makes.
const SCHEMA: &str = "t_cli_ops";

/// Balances per account; fails on accounts listed in the `poison` table.
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
        let id = event.stream.aggregate_id.as_str();
        let poisoned: bool = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {SCHEMA}.poison WHERE id = $1)"
        )))
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
        if poisoned {
            return Err(format!("account {id} is poisoned").into());
        }
        if let AccountEvent::Deposited(deposit) = &event.event {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {SCHEMA}.balances (id, cents) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET cents = balances.cents + EXCLUDED.cents"
            )))
            .bind(id)
            .bind(i64::try_from(deposit.amount_cents)?)
            .execute(conn)
            .await?;
        }
        Ok(())
    }
}

fn cqrs(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cqrs"))
        .args(["--schema", SCHEMA])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cqrs {args:?}: {e}"))
}

/// (exit code, stdout, stderr).
fn outcome(args: &[&str]) -> (i32, String, String) {
    let output = cqrs(args);
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn sql(store: &PostgresEventStore, statement: &str) {
    sqlx::query(AssertSqlSafe(statement.to_owned()))
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

async fn balances(store: &PostgresEventStore) -> Vec<(String, i64)> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT id, cents FROM {SCHEMA}.balances ORDER BY id"
    )))
    .fetch_all(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

async fn deposit(store: &PostgresEventStore, account: &str, cents: u64) {
    let data = EventData::from_event(
        &AccountEvent::Deposited(Deposit {
            amount_cents: cents,
            reference: "r".into(),
        }),
        Metadata::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    store
        .append(
            &StreamId::new("account", account),
            ExpectedVersion::Any,
            vec![data],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Waits until `check` holds (the worker is asynchronous).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Starts the worker (with or without a reset) on a task; the sender stops it.
fn start_worker(
    store: &PostgresEventStore,
    with_reset: bool,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let mut worker = ProjectionWorker::new(store.clone(), Balances, "ops-worker")
        .with_failure_policy(FailurePolicy {
            attempts: 2,
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
            mode: FailureMode::BlockStream,
        })
        .with_lease(Duration::from_secs(5));
    if with_reset {
        worker = worker.with_reset(|conn| {
            async move {
                sqlx::query(AssertSqlSafe(format!("TRUNCATE {SCHEMA}.balances")))
                    .execute(conn)
                    .await
                    .map(|_| ())
            }
            .boxed()
        });
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        worker
            .run(Duration::from_millis(200), async {
                stopped.await.ok();
            })
            .await
            .unwrap_or_else(|e| panic!("worker: {e}"));
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_worker_answers_retries_and_rebuilds_from_the_command_line() {
    let store = pg::fresh_store("cli_ops").await;
    sql(
        &store,
        &format!("CREATE TABLE {SCHEMA}.balances (id TEXT PRIMARY KEY, cents BIGINT NOT NULL)"),
    )
    .await;
    sql(
        &store,
        &format!("CREATE TABLE {SCHEMA}.poison (id TEXT PRIMARY KEY)"),
    )
    .await;
    sql(
        &store,
        &format!("INSERT INTO {SCHEMA}.poison VALUES ('a-2'), ('a-3')"),
    )
    .await;

    for (account, cents) in [
        ("a-1", 100),
        ("a-2", 20),
        ("a-2", 22),
        ("a-3", 30),
        ("a-3", 33),
        ("a-1", 5),
    ] {
        deposit(&store, account, cents).await;
    }
    let (stop, worker) = start_worker(&store, true);
    let letters = DeadLetters::new(store.clone());
    eventually("4 dead letters (a-2 and a-3, two each)", || async {
        letters.list("balances").await.map_or(0, |l| l.len()) == 4
    })
    .await;
    eventually("a-1 applied", || async {
        balances(&store).await == [("a-1".to_owned(), 105)]
    })
    .await;
    let listed = letters
        .list("balances")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let first_of_a2 = listed
        .iter()
        .find(|l| l.stream.aggregate_id.as_str() == "a-2" && l.version == 1)
        .map(|l| l.id.to_string())
        .unwrap_or_else(|| panic!("{listed:?}"));

    // Still poisoned: the retry fails again, exit 1 with the handler's error.
    let (code, _, err) = outcome(&["dlq", "retry", &first_of_a2]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("failed again") && err.contains("account a-2 is poisoned"),
        "{err}"
    );

    // Fixed: the retry applies the letter and the one parked behind it (per-stream order).
    sql(
        &store,
        &format!("DELETE FROM {SCHEMA}.poison WHERE id = 'a-2'"),
    )
    .await;
    let (code, out, err) = outcome(&["dlq", "retry", &first_of_a2]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("dead letter #{first_of_a2} of `balances` applied")),
        "{out}"
    );
    assert!(balances(&store).await.contains(&("a-2".to_owned(), 42)));
    assert_eq!(
        outcome(&["dlq", "retry", "999999"]).0,
        1,
        "an unknown letter"
    );

    // retry-all: a-3 still poisoned -> exit 1 naming what is left; fixed -> all applied.
    let (code, _, err) = outcome(&["dlq", "retry-all", "balances"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("0 applied, 2 still dead"), "{err}");
    sql(&store, &format!("DELETE FROM {SCHEMA}.poison")).await;
    let (code, out, err) = outcome(&["dlq", "retry-all", "balances"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("retried 2 dead letters of `balances`: all applied"),
        "{out}"
    );
    let expected = vec![
        ("a-1".to_owned(), 105),
        ("a-2".to_owned(), 42),
        ("a-3".to_owned(), 63),
    ];
    assert_eq!(balances(&store).await, expected);
    assert!(
        outcome(&["dlq", "retry-all", "balances"])
            .1
            .contains("no dead letters")
    );

    // Rebuild: a damaged read model comes back equal to a clean replay, with writes going on.
    sql(&store, &format!("UPDATE {SCHEMA}.balances SET cents = 0")).await;
    for n in 0..200 {
        deposit(&store, &format!("b-{}", n % 10), 1).await;
    }
    let (code, out, err) = outcome(&["projections", "rebuild", "balances"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rebuilt `balances` up to position"), "{out}");
    let mut expected_after = expected.clone();
    expected_after.extend((0..10).map(|n| (format!("b-{n}"), 20)));
    eventually("the rebuilt read model", || async {
        balances(&store).await == expected_after
    })
    .await;
    let (code, out, _) = outcome(&["projections", "status", "balances"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("lease:        held by ops-worker")
            && out.contains("last rebuild:")
            && out.contains("dead letters: 0"),
        "{out}"
    );
    let (code, _, err) = outcome(&["projections", "status", "nope"]);
    assert_eq!(
        (code, err.trim()),
        (1, "cqrs: no projection `nope` (known: balances)")
    );

    // A worker without a reset refuses a rebuild, and says how to allow it.
    stop.send(()).ok();
    worker.await.unwrap_or_else(|e| panic!("{e}"));
    let (stop, worker) = start_worker(&store, false);
    let (code, _, err) = outcome(&["projections", "rebuild", "balances"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("has no reset") && err.contains("with_reset"),
        "{err}"
    );
    stop.send(()).ok();
    worker.await.unwrap_or_else(|e| panic!("{e}"));

    // No worker running: exit 3 after the timeout; the request stands and a worker started later
    // serves it.
    sql(
        &store,
        &format!("INSERT INTO {SCHEMA}.poison VALUES ('c-1')"),
    )
    .await;
    deposit(&store, "c-1", 7).await;
    let (stop, worker) = start_worker(&store, true);
    eventually("a dead letter for c-1", || async {
        letters.list("balances").await.map_or(0, |l| l.len()) == 1
    })
    .await;
    stop.send(()).ok();
    worker.await.unwrap_or_else(|e| panic!("{e}"));
    sql(&store, &format!("DELETE FROM {SCHEMA}.poison")).await;
    let (code, _, err) = outcome(&["dlq", "retry-all", "balances", "--timeout", "1"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("no worker answered within 1 s") && err.contains("the request stands"),
        "{err}"
    );
    let (code, out, _) = outcome(&["projections", "status", "balances"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("retries:      1 dead letters waiting for the worker"),
        "{out}"
    );
    let (stop, worker) = start_worker(&store, true);
    eventually("the standing retry served", || async {
        letters.list("balances").await.is_ok_and(|l| l.is_empty())
    })
    .await;
    assert!(balances(&store).await.contains(&("c-1".to_owned(), 7)));
    stop.send(()).ok();
    worker.await.unwrap_or_else(|e| panic!("{e}"));
}
