//! The projection-engine conformance suite: one set of checks that every backend of the delivery
//! [`Engine`](crate::projection::Engine) must pass (the in-memory runner, the PostgreSQL worker),
//! so they cannot drift apart.
//!
//! The checks drive a [`LedgerRuntime`]: the backend's runtime of a ledger projection (one entry
//! per application of a credit, no deduplication, so a double or a missing application shows)
//! that the implementer writes with `#[derive(Projection)]` for its context, over an event enum of
//! its own with one variant carrying an amount (the suite's events are the implementer's, so that
//! enabling this feature adds no event type to anyone's build), and a second enum for noise.
//! [`projection_conformance_tests!`](crate::projection_conformance_tests) turns them into one
//! `#[tokio::test]` each.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::envelope::{EventData, StreamId};
use crate::projection::{Batch, DeadLetter, DeliveryError, FailureMode, FailurePolicy, Redrive};
use crate::store::{EventStore, ExpectedVersion};

/// Whether the ledger's handler fails on `amount`: while poisoned, on multiples of 13.
#[must_use]
pub fn is_poison(amount: u64) -> bool {
    amount.is_multiple_of(13)
}

/// A runtime of the ledger projection on one backend, as the suite drives it.
#[async_trait::async_trait]
pub trait LedgerRuntime: Send + Sized {
    /// The store it reads.
    type Store: EventStore + Clone + 'static;

    /// The store.
    fn store(&self) -> &Self::Store;

    /// The credit of `amount`, as the ledger's event enum encodes it.
    fn credit(amount: u64) -> EventData;

    /// An event of another enum that the ledger does not listen to.
    fn noise() -> EventData;

    /// A second runtime of the same ledger: the same checkpoint, dead letters and read model (a
    /// restarted process).
    async fn reopen(&self) -> Self;

    /// Makes the handler fail on poison amounts ([`is_poison`]) or not.
    fn set_poisoned(&mut self, poisoned: bool);

    /// The failure policy (a runtime whose builder takes it may start anew, keeping the
    /// checkpoint, dead letters and read model).
    async fn set_policy(&mut self, policy: FailurePolicy);

    /// One step.
    async fn step(&mut self) -> Result<Batch, DeliveryError>;

    /// Catch up.
    async fn catch_up(&mut self) -> Result<usize, DeliveryError>;

    /// Redrive every stream.
    async fn retry_all(&mut self) -> Result<Redrive, DeliveryError>;

    /// Rebuild from the first event, emptying the ledger.
    async fn rebuild(&mut self) -> Result<usize, DeliveryError>;

    /// Every application so far: (stream, amount), in application order.
    async fn applications(&self) -> Vec<(StreamId, u64)>;

    /// The dead letters, by stream and version.
    async fn dead_letters(&self) -> Vec<DeadLetter>;
}

/// Generates one `#[tokio::test]` per check. `$make` takes the test's name and returns a future of
/// a fresh runtime over an empty store.
#[macro_export]
macro_rules! projection_conformance_tests {
    ($make:expr) => {
        $crate::projection_conformance_tests!(@tests $make;
            applies_every_subscribed_event_once_in_stream_order,
            a_reopened_runtime_resumes_from_the_checkpoint,
            poison_events_block_their_stream_until_a_redrive,
            a_late_dead_letter_blocks_later_batches,
            skip_mode_parks_only_the_failing_events,
            a_rebuild_equals_a_clean_replay,
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let runtime = ($make)(stringify!($name)).await;
                $crate::projection_conformance::$name(runtime).await;
            }
        )*
    };
}

/// Appends credits `from..to` over 5 streams (`ledger-0` .. `ledger-4`), with a noise event after
/// every tenth, one event per append.
pub async fn append_credits<R: LedgerRuntime>(store: &R::Store, from: u64, to: u64) {
    for amount in from..to {
        let stream = StreamId::new("ledger", format!("ledger-{}", amount % 5));
        store
            .append(&stream, ExpectedVersion::Any, vec![R::credit(amount)])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if amount % 10 == 9 {
            store
                .append(
                    &StreamId::new("noise", "n"),
                    ExpectedVersion::Any,
                    vec![R::noise()],
                )
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// Catches up, waiting out a store that holds the newest events back a moment.
async fn caught_up<R: LedgerRuntime>(runtime: &mut R) {
    tokio::time::timeout(Duration::from_secs(60), runtime.catch_up())
        .await
        .unwrap_or_else(|_| panic!("catch_up did not finish in 60 s"))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The applications per stream, in order.
fn by_stream(applications: &[(StreamId, u64)]) -> BTreeMap<String, Vec<u64>> {
    let mut streams: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (stream, amount) in applications {
        streams
            .entry(stream.aggregate_id.to_string())
            .or_default()
            .push(*amount);
    }
    streams
}

/// What a clean replay of credits `0..to` gives per stream.
fn replay(to: u64) -> BTreeMap<String, Vec<u64>> {
    let mut streams: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for amount in 0..to {
        streams
            .entry(format!("ledger-{}", amount % 5))
            .or_default()
            .push(amount);
    }
    streams
}

fn policy(mode: FailureMode) -> FailurePolicy {
    FailurePolicy {
        attempts: 2,
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
        mode,
    }
}

/// 300 credits among 30 noise events: each credit applied once, each stream in version order,
/// the noise passed by.
pub async fn applies_every_subscribed_event_once_in_stream_order<R: LedgerRuntime>(mut runtime: R) {
    append_credits::<R>(runtime.store(), 0, 300).await;
    caught_up(&mut runtime).await;
    assert_eq!(by_stream(&runtime.applications().await), replay(300));
    assert!(runtime.dead_letters().await.is_empty());
    // Caught up: a step reads nothing.
    let step = runtime.step().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((step.read, step.applied), (0, 0));
}

/// A few steps, then a second runtime of the same ledger (a restart) goes on from the stored
/// checkpoint: nothing twice, nothing missed.
pub async fn a_reopened_runtime_resumes_from_the_checkpoint<R: LedgerRuntime>(mut runtime: R) {
    append_credits::<R>(runtime.store(), 0, 120).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut applied = 0;
    while applied < 50 {
        applied += runtime
            .step()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .applied;
        assert!(
            std::time::Instant::now() < deadline,
            "steps applied nothing"
        );
    }
    let mut reopened = runtime.reopen().await;
    drop(runtime);
    append_credits::<R>(reopened.store(), 120, 200).await;
    caught_up(&mut reopened).await;
    assert_eq!(by_stream(&reopened.applications().await), replay(200));
}

/// Poison credits (multiples of 13) fail their tries and are parked; the later events of their
/// streams wait behind them while the other streams go on; after the fix a redrive applies them
/// all, in order, once.
pub async fn poison_events_block_their_stream_until_a_redrive<R: LedgerRuntime>(mut runtime: R) {
    runtime.set_policy(policy(FailureMode::BlockStream)).await;
    runtime.set_poisoned(true);
    // Credits 0..40: poison 0, 13, 26, 39 (streams 0, 3, 1, 4); stream 2 has none.
    append_credits::<R>(runtime.store(), 0, 40).await;
    caught_up(&mut runtime).await;
    let applied = by_stream(&runtime.applications().await);
    let letters = runtime.dead_letters().await;
    // Each stream stops at its first poison credit; stream 2 is whole.
    let expected: BTreeMap<String, Vec<u64>> = replay(40)
        .into_iter()
        .map(|(stream, amounts)| {
            let kept = amounts.into_iter().take_while(|a| !is_poison(*a)).collect();
            (stream, kept)
        })
        .filter(|(_, kept): &(String, Vec<u64>)| !kept.is_empty())
        .collect();
    assert_eq!(applied, expected);
    let parked = 40 - expected.values().map(Vec::len).sum::<usize>();
    assert_eq!(letters.len(), parked, "{letters:#?}");
    let first_failures: Vec<(String, u32)> = letters
        .iter()
        .filter(|l| l.attempts > 0)
        .map(|l| (l.stream.aggregate_id.to_string(), l.attempts))
        .collect();
    assert_eq!(
        first_failures,
        [
            ("ledger-0".to_owned(), 2),
            ("ledger-1".to_owned(), 2),
            ("ledger-3".to_owned(), 2),
            ("ledger-4".to_owned(), 2),
        ]
    );
    // Still poisoned: a redrive fails again at the first letter of each stream and keeps them.
    let again = runtime.retry_all().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((again.applied, again.failed), (0, 4));
    assert_eq!(runtime.dead_letters().await.len(), parked);
    // Fixed: everything applies, in order, once.
    runtime.set_poisoned(false);
    let redrive = runtime.retry_all().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((redrive.applied, redrive.failed), (parked, 0));
    assert!(runtime.dead_letters().await.is_empty());
    // New events of the unblocked streams flow again.
    append_credits::<R>(runtime.store(), 40, 60).await;
    caught_up(&mut runtime).await;
    assert_eq!(by_stream(&runtime.applications().await), replay(60));
}

/// Clean batches first (no dead letters, so the engine stops asking for blocked streams), then a
/// poison credit: the events of its stream in the same batch and in every later batch wait
/// behind it, the other streams go on.
pub async fn a_late_dead_letter_blocks_later_batches<R: LedgerRuntime>(mut runtime: R) {
    runtime.set_policy(policy(FailureMode::BlockStream)).await;
    runtime.set_poisoned(true);
    for (from, to) in [(1, 5), (5, 9), (9, 13)] {
        append_credits::<R>(runtime.store(), from, to).await;
        caught_up(&mut runtime).await;
    }
    assert!(runtime.dead_letters().await.is_empty());
    // 13 is poison (ledger-3); 18 follows it in the same batch, 23 and 28 in later ones. 26 is
    // poison too (ledger-1), the last of its stream here.
    for (from, to) in [(13, 20), (20, 25), (25, 30)] {
        append_credits::<R>(runtime.store(), from, to).await;
        caught_up(&mut runtime).await;
    }
    let mut expected = replay(30);
    expected.insert("ledger-3".to_owned(), vec![3, 8]);
    expected.insert("ledger-1".to_owned(), vec![1, 6, 11, 16, 21]);
    // Credit 0 (poison) was never appended.
    expected.remove("ledger-0");
    let mut applied = by_stream(&runtime.applications().await);
    applied.remove("ledger-0");
    assert_eq!(applied, expected);
    let parked: Vec<u64> = runtime
        .dead_letters()
        .await
        .iter()
        .filter(|l| l.stream.aggregate_id.to_string() == "ledger-3")
        .map(|l| l.version)
        .collect();
    assert_eq!(
        parked.len(),
        4,
        "13, then 18, 23 and 28 behind it: {parked:?}"
    );
}

/// In skip mode only the failing credits are parked; the rest of their streams is applied.
pub async fn skip_mode_parks_only_the_failing_events<R: LedgerRuntime>(mut runtime: R) {
    runtime.set_policy(policy(FailureMode::Skip)).await;
    runtime.set_poisoned(true);
    append_credits::<R>(runtime.store(), 0, 40).await;
    caught_up(&mut runtime).await;
    let applied: Vec<u64> = runtime
        .applications()
        .await
        .into_iter()
        .map(|(_, amount)| amount)
        .collect();
    let mut sorted = applied.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..40).filter(|a| !is_poison(*a)).collect::<Vec<_>>()
    );
    let letters = runtime.dead_letters().await;
    assert_eq!(letters.len(), 4);
    assert!(letters.iter().all(|l| l.attempts == 2), "{letters:#?}");
}

/// A rebuild empties the ledger and replays: the result equals a clean replay, also with events
/// appended after the first catch-up.
pub async fn a_rebuild_equals_a_clean_replay<R: LedgerRuntime>(mut runtime: R) {
    append_credits::<R>(runtime.store(), 0, 100).await;
    caught_up(&mut runtime).await;
    append_credits::<R>(runtime.store(), 100, 150).await;
    tokio::time::timeout(Duration::from_secs(60), runtime.rebuild())
        .await
        .unwrap_or_else(|_| panic!("rebuild did not finish in 60 s"))
        .unwrap_or_else(|e| panic!("{e}"));
    caught_up(&mut runtime).await;
    assert_eq!(by_stream(&runtime.applications().await), replay(150));
}
