//! `cqrs projections versions | promote | retire` against the real PostgreSQL: version 2 of a
//! projection is refused promotion until it has caught up, then promoted (the readers' view
//! switches), the live version cannot be retired, the old one is, and an unknown name is refused.

use cqrs_examples::bank::AccountEvent;
use evently_core::RecordedEvent;
use evently_core::prelude::*;
use evently_core::projection::{HandlerError, Projection};
use evently_postgres::projection::ProjectionWorker;
use sqlx::{AssertSqlSafe, PgConnection};

#[path = "../../cqrs-postgres/tests/common/mod.rs"]
mod pg;

mod common;

/// The schema `pg::fresh_store("cli_versions")` makes.
const SCHEMA: &str = "t_cli_versions";

/// Counts events per account, in the table of its version.
async fn count<P: Projection>(
    event: &RecordedEvent<AccountEvent>,
    conn: &mut PgConnection,
) -> Result<(), HandlerError> {
    let table = P::table("balances");
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {SCHEMA}.{table} (id, events, version) VALUES ($1, 1, $2) \
         ON CONFLICT (id) DO UPDATE SET events = {table}.events + 1"
    )))
    .bind(event.stream.aggregate_id.as_str())
    .bind(i32::try_from(P::VERSION)?)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(Projection)]
#[projection(name = "balances", version = 1, tables("balances"), events(AccountEvent), context = PgConnection)]
struct V1;

#[async_trait::async_trait]
impl Handles<AccountEvent, PgConnection> for V1 {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        count::<Self>(event, conn).await
    }
}

#[derive(Projection)]
#[projection(name = "balances", version = 2, tables("balances"), events(AccountEvent), context = PgConnection)]
struct V2;

#[async_trait::async_trait]
impl Handles<AccountEvent, PgConnection> for V2 {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        count::<Self>(event, conn).await
    }
}

/// (exit code, stdout, stderr).
fn cqrs(args: &[&str]) -> (i32, String, String) {
    common::run(&["--schema", SCHEMA], args)
}

#[tokio::test]
async fn promote_and_retire_from_the_command_line() {
    let store = pg::fresh_store("cli_versions").await;
    for v in [1, 2] {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {SCHEMA}.balances_v{v} (id TEXT PRIMARY KEY, events BIGINT NOT NULL, version INT NOT NULL)"
        )))
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    for i in 0..30u64 {
        store
            .append(
                &StreamId::new("account", format!("a{}", i % 5)),
                ExpectedVersion::Any,
                vec![pg::deposit(i + 1)],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut v1 = ProjectionWorker::new(store.clone(), V1, "v1");
    assert!(v1.acquire().await.unwrap_or_else(|e| panic!("{e}")));
    v1.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    let mut v2 = ProjectionWorker::new(store.clone(), V2, "v2");
    assert!(v2.acquire().await.unwrap_or_else(|e| panic!("{e}")));

    let (code, out, err) = cqrs(&["projections", "versions", "balances"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().filter(|l| l.contains("balances")).collect();
    assert!(
        rows.iter()
            .any(|r| r.starts_with("1 ") && r.contains("live")),
        "{out}"
    );
    assert!(
        rows.iter()
            .any(|r| r.contains("catching_up") && r.contains("balances@v2")),
        "{out}"
    );

    // Version 2 has applied nothing yet: refused, saying where it stands.
    let (code, _, err) = cqrs(&["projections", "promote", "balances", "--wait", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("has not caught up"), "{err}");

    v2.catch_up().await.unwrap_or_else(|e| panic!("{e}"));
    let (code, out, err) = cqrs(&["projections", "promote", "balances", "--wait", "5"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("version 2 of `balances` is live"), "{out}");
    let version: i32 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT max(version) FROM {SCHEMA}.balances"
    )))
    .fetch_one(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(version, 2, "readers read version 2");

    let (code, _, err) = cqrs(&["projections", "retire", "balances", "--version", "2"]);
    assert_ne!(code, 0);
    assert!(err.contains("is live"), "{err}");
    let (code, out, err) = cqrs(&["projections", "retire", "balances", "--version", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("retired"), "{out}");

    let (code, out, err) = cqrs(&["projections", "versions", "balances", "--json"]);
    assert_eq!(code, 0, "{err}");
    let states: Vec<(u64, String)> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{l}: {e}"))
        })
        .map(|v| {
            (
                v["version"].as_u64().unwrap_or(0),
                v["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![(1, "retired".to_owned()), (2, "live".to_owned())]
    );

    let (code, _, err) = cqrs(&["projections", "promote", "balanse", "--wait", "0"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("`balanse` has no versions registered"),
        "{err}"
    );
}
