//! A checkpoint lease that is lost says why: an owner that stalled past its lease is told so, not
//! that another process owns it (which sends an operator looking for a twin that does not
//! exist), and a takeover names the epoch that took it.

mod common;

use std::time::Duration;

use common::{deposit, fresh_store};
use evently_core::Checkpoint;
use evently_core::prelude::*;
use evently_postgres::lease::{Advance, CheckpointLease, LeaseLoss};
use evently_postgres::{PostgresEventStore, control::read_checkpoint};
use sqlx::AssertSqlSafe;

/// Runs `sql` on `store`'s schema (`{s}` is the schema).
async fn run(store: &PostgresEventStore, sql: &str) {
    sqlx::query(AssertSqlSafe(sql.replace("{s}", store.schema())))
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// What the lease row of `name` stores: (owner, epoch).
async fn row(store: &PostgresEventStore, name: &str) -> Option<(String, i64)> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT owner, epoch FROM {}.projection_checkpoints WHERE projection = $1",
        store.schema()
    )))
    .bind(name)
    .fetch_optional(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

async fn advance(lease: &mut CheckpointLease, from: Checkpoint, to: Checkpoint) -> Advance {
    lease
        .advance(from, to)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn a_lost_lease_says_whether_it_expired_was_taken_over_or_is_gone() {
    let store = fresh_store("lease_loss").await;
    let stream = StreamId::new("account", "a-1");
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![deposit(1), deposit(2)],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let events = store
        .read_all(Checkpoint::START, 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (first, second) = (events[0].checkpoint, events[1].checkpoint);
    let expire = "UPDATE {s}.projection_checkpoints \
                  SET lease_until = clock_timestamp() - interval '1 second' WHERE projection = 'relay'";

    // An owner that stalled past its lease: told it expired, and nothing moved.
    let mut a = CheckpointLease::new(store.clone(), "relay", "a", Duration::from_secs(30));
    assert_eq!(
        a.acquire().await.unwrap_or_else(|e| panic!("{e}")),
        Some(Checkpoint::START)
    );
    run(&store, expire).await;
    let lost = advance(&mut a, Checkpoint::START, first).await;
    assert_eq!(lost, Advance::LeaseLost(LeaseLoss::Expired));
    assert!(
        LeaseLoss::Expired
            .to_string()
            .contains("stalled for longer than its lease"),
        "{}",
        LeaseLoss::Expired
    );
    assert_eq!(
        read_checkpoint(&store, "relay")
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Checkpoint::START
    );
    // Having lost it, it holds no epoch until it takes the lease again.
    assert_eq!(
        advance(&mut a, Checkpoint::START, first).await,
        Advance::LeaseLost(LeaseLoss::NotHeld)
    );
    // No one else took it: taking it again works (with a new epoch) and so does the move.
    assert_eq!(
        a.acquire().await.unwrap_or_else(|e| panic!("{e}")),
        Some(Checkpoint::START)
    );
    assert_eq!(row(&store, "relay").await, Some(("a".to_owned(), 2)));
    assert_eq!(
        advance(&mut a, Checkpoint::START, first).await,
        Advance::Done
    );

    // Another owner cannot take a live lease; once it lapses, it can, and the first owner's next
    // move is told it was taken over, with the new epoch.
    let mut b = CheckpointLease::new(store.clone(), "relay", "b", Duration::from_secs(30));
    assert_eq!(b.acquire().await.unwrap_or_else(|e| panic!("{e}")), None);
    run(&store, expire).await;
    assert_eq!(
        b.acquire().await.unwrap_or_else(|e| panic!("{e}")),
        Some(first)
    );
    assert_eq!(row(&store, "relay").await, Some(("b".to_owned(), 3)));
    assert_eq!(
        advance(&mut a, first, second).await,
        Advance::LeaseLost(LeaseLoss::TakenOver { epoch: 3 })
    );
    // A second process under the same owner name takes it with a new epoch too: the first
    // process of that name is told the same.
    let mut b_twin = CheckpointLease::new(store.clone(), "relay", "b", Duration::from_secs(30));
    assert_eq!(
        b_twin.acquire().await.unwrap_or_else(|e| panic!("{e}")),
        Some(first)
    );
    assert_eq!(
        advance(&mut b, first, second).await,
        Advance::LeaseLost(LeaseLoss::TakenOver { epoch: 4 })
    );

    // The row deleted under the owner (an operator's reset): gone, not taken.
    run(
        &store,
        "DELETE FROM {s}.projection_checkpoints WHERE projection = 'relay'",
    )
    .await;
    assert_eq!(
        advance(&mut b_twin, first, second).await,
        Advance::LeaseLost(LeaseLoss::Gone)
    );
}
