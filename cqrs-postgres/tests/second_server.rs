//! A store moved for real: `pg_dump` of its schema on the first server, `pg_restore` into a
//! fresh database on a second PostgreSQL server (its own transaction counter, far lower, and its
//! own system identifier; `scripts/postgres-second-up.sh` starts one at SECOND_DATABASE_URL).
//! On the second server every global read and append is refused until `rebase`; after it, the
//! events read in the order they had, the checkpoint resumes after the same event, new appends
//! come after the restored events, and nothing is lost or read twice.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{deposit, fresh_store, global_order, read_after};
use evently_core::prelude::*;
use evently_core::{Checkpoint, EventStore, ExpectedVersion, MoveEvidence, StoreError};
use evently_postgres::{CheckpointLease, PostgresEventStore, database_url};
use sqlx::AssertSqlSafe;

fn second_url() -> String {
    std::env::var("SECOND_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5433/postgres".to_owned())
}

/// `url` with its database replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let base = base.rsplit_once('/').map_or(base, |(server, _)| server);
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

async fn next_xid(pool: &sqlx::PgPool) -> u64 {
    let next: String = sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    next.parse().unwrap_or_else(|e| panic!("{e}"))
}

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e} (is the PostgreSQL client installed?)"));
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn a_store_dumped_and_restored_into_another_server_is_refused_then_rebased_exactly() {
    let second = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&second_url())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no second PostgreSQL server at {} (run scripts/postgres-second-up.sh or set SECOND_DATABASE_URL): {e}",
                second_url()
            )
        });
    let store = fresh_store("moved_for_real").await;
    let schema = store.schema().to_owned();

    // More events than the second server's counter, so that the rebase must make room: one bulk
    // append, then 100 from writers at once.
    let bulk = (next_xid(&second).await + 400).max(900);
    let total = usize::try_from(bulk + 100).unwrap_or(usize::MAX);
    store
        .append(
            &StreamId::new("account", "bulk"),
            ExpectedVersion::NoStream,
            (1..=bulk).map(deposit).collect(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 1..=25 {
                    store
                        .append(
                            &StreamId::new("account", format!("w-{w}")),
                            ExpectedVersion::Any,
                            vec![deposit(n)],
                        )
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap_or_else(|e| panic!("{e}"));
    }
    // Stamped as if every event had committed in the reverse order of its insertion (the hardest
    // order to keep: no two events can share an id after the rebase), with ids well past the
    // second server's counter, still below this one's.
    let room = next_xid(&second).await + 10_000;
    let needed = room + 2 * bulk;
    if next_xid(store.pool()).await < needed {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DO $$ BEGIN FOR i IN 1..{needed} LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$"
        )))
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{schema}\".events SET transaction_id = ({room} + {bulk} + 100 - global_position)::text::xid8"
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let written = global_order(store.pool(), &schema).await;
    assert_eq!(written.len(), total);
    // A reader's checkpoint at the 600th event of that order.
    let mut reader = CheckpointLease::new(store.clone(), "reader", "r", Duration::from_secs(30));
    reader.acquire().await.unwrap_or_else(|e| panic!("{e}"));
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{schema}\".projection_checkpoints c SET transaction_id = e.transaction_id, \
           global_position = e.global_position \
         FROM (SELECT transaction_id, global_position FROM \"{schema}\".events \
               ORDER BY transaction_id, global_position OFFSET 599 LIMIT 1) e"
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // pg_dump on the first server, pg_restore into a new database on the second.
    let dump = std::env::temp_dir().join(format!("cqrs-moved-{}.dump", uuid::Uuid::now_v7()));
    run(Command::new("pg_dump")
        .arg(format!("--dbname={}", database_url()))
        .arg(format!("--schema={schema}"))
        .arg("--format=custom")
        .arg(format!("--file={}", dump.display())));
    let database = format!("restored_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&second)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let restored_url = with_database(&second_url(), &database);
    run(Command::new("pg_restore")
        .arg(format!("--dbname={restored_url}"))
        .arg("--no-owner")
        .arg(dump.as_os_str()));
    let _ = std::fs::remove_file(&dump);

    let restored = PostgresEventStore::connect(&restored_url, &schema)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(global_order(restored.pool(), &schema).await, written);
    let refused = restored
        .append(
            &StreamId::new("account", "w-0"),
            ExpectedVersion::Exact(25),
            vec![deposit(26)],
        )
        .await
        .expect_err("an append on the restored copy");
    let StoreError::Moved(moved) = refused else {
        panic!("expected a moved store: {refused}");
    };
    assert!(
        matches!(moved.evidence, MoveEvidence::TransactionIdsAhead { .. }),
        "{moved}"
    );
    assert!(
        moved
            .to_string()
            .contains(&format!("cqrs store rebase --schema {schema}")),
        "{moved}"
    );
    assert!(matches!(
        restored.read_all(Checkpoint::START, 10).await,
        Err(StoreError::Moved(_))
    ));

    let started = std::time::Instant::now();
    let rebased = restored.rebase().await.unwrap_or_else(|e| panic!("{e}"));
    eprintln!("rebased in {:?}: {rebased:?}", started.elapsed());
    assert!(rebased.restamped, "{rebased:?}");
    assert_eq!(
        (rebased.events, rebased.transactions, rebased.checkpoints),
        (bulk + 100, bulk + 100, 1),
        "{rebased:?}"
    );
    assert!(
        rebased.burned > 0,
        "the second server's counter was too low: {rebased:?}"
    );
    assert_ne!(rebased.previous_server, rebased.server, "{rebased:?}");

    // Another process on the second server: the same events in the same order, the checkpoint
    // after the same event, new appends after the restored ones.
    let process = PostgresEventStore::connect(&restored_url, &schema)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        process
            .check_server()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none()
    );
    assert_eq!(read_after(&process, Checkpoint::START, 500).await, written);
    let resumed = evently_postgres::control::read_checkpoint(&process, "reader")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_after(&process, resumed, 500).await, written[600..]);
    let appended = process
        .append(
            &StreamId::new("account", "w-0"),
            ExpectedVersion::Exact(25),
            vec![deposit(26)],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let after = read_after(&process, resumed, 500).await;
    assert_eq!(after.len(), total - 600 + 1);
    assert_eq!(after[..total - 600], written[600..]);
    assert_eq!(after[total - 600], appended.events[0].event_id.0);

    drop((restored, process));
    second.close().await;
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&second_url())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
}
