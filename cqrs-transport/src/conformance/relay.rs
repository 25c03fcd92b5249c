//! The relay under attack: cut at random points and restarted at once, and two relays under one
//! name.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use evently_postgres::PostgresEventStore;
use rand::Rng;

use crate::{ConsumerMetrics, Relay, Sink, TransportError};

use super::*;

/// What [`relay_killed_at_random_points`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KillReport {
    /// Events appended.
    pub events: u64,
    /// Relay steps cut.
    pub cuts: u32,
    /// Events the consumer never applied.
    pub missing: u64,
    /// Events applied more than once.
    pub doubled: u64,
    /// Pairs of an aggregate's events applied out of version order.
    pub inversions: u64,
    /// Redeliveries the inbox dropped.
    pub duplicates: u64,
    /// Messages the consumer received (the events and the resends of cut relays).
    pub received: u64,
}
/// Four writers append to 12 aggregates while a relay is cut at a random point `cuts`
/// times (a step dropped after 2 to 60 ms, a new relay made at once, as a restarted process
/// would), then the last relay drains. The consumer must apply every event once, in each
/// aggregate's order.
///
/// # Panics
/// When a guarantee does not hold (with the figures).
pub async fn relay_killed_at_random_points<B: Broker>(
    broker: &B,
    ns: &str,
    cuts: u32,
) -> KillReport {
    relay_killed(broker, ns, cuts, true).await
}
/// [`relay_killed_at_random_points`] for a destination that keeps no order (an SQS standard
/// queue): every event applied once, in any order (the inversions are counted, not refused).
///
/// # Panics
/// When an event is missing or applied twice (with the figures).
pub async fn relay_killed_at_random_points_unordered<B: Broker>(
    broker: &B,
    ns: &str,
    cuts: u32,
) -> KillReport {
    relay_killed(broker, ns, cuts, false).await
}
async fn relay_killed<B: Broker>(broker: &B, ns: &str, cuts: u32, ordered: bool) -> KillReport {
    let store = fresh_store(&format!("{ns}_kill")).await;
    let consumer = "kill-consumer";
    broker
        .declare(ns, consumer)
        .await
        .unwrap_or_else(|e| panic!("declare: {e}"));
    let (stop, running) = start_consumer(broker, ns, consumer, Recorder::new(&store, consumer));
    // Writers append until the cuts are over, so that every relay has new events to send.
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = store.clone();
            let writing = writing.clone();
            tokio::spawn(async move {
                let mut rounds = 0u64;
                while writing.load(std::sync::atomic::Ordering::SeqCst) || rounds == 0 {
                    for a in 0..3 {
                        append(&store, &format!("w{w}-a{a}"), 5, &[]).await;
                    }
                    rounds += 1;
                    tokio::time::sleep(Duration::from_millis(60)).await;
                }
                (w, rounds * 5)
            })
        })
        .collect();
    for cut in 0..cuts {
        let mut relay = Relay::new(store.clone(), broker.sink(ns), "killed")
            .with_batch(1 + (cut as usize % 7) * 10)
            .with_lease(Duration::from_secs(5));
        // Connecting to the broker takes a few milliseconds: cut anywhere from before the first
        // send to after several pages.
        let after = Duration::from_micros(rand::rng().random_range(2_000..60_000));
        let _ = tokio::time::timeout(after, async {
            loop {
                if relay.step().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
        .await;
        // Dropped mid-flight: whatever it sent and did not checkpoint is sent again by the next.
    }
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut expected = BTreeMap::new();
    for writer in writers {
        let (w, per_aggregate) = writer.await.unwrap_or_else(|e| panic!("{e}"));
        for a in 0..3 {
            expected.insert(format!("w{w}-a{a}"), per_aggregate);
        }
    }
    let relay = Relay::new(store.clone(), broker.sink(ns), "killed");
    let (events, metrics, (missing, doubled, inversions)) =
        drain_and_tally(relay, &store, consumer, &expected, stop, running).await;
    let report = KillReport {
        events,
        cuts,
        missing,
        doubled,
        inversions,
        duplicates: metrics.duplicates,
        received: metrics.received,
    };
    assert_eq!(
        (missing, doubled, if ordered { inversions } else { 0 }),
        (0, 0, 0),
        "the relay cut {cuts} times: {report:?}"
    );
    report
}
/// Writers appending `per_append` events at a time to aggregates `<prefix>0..<prefix>2`, each
/// pausing `pause` between appends, until [`Writers::stop`].
pub(super) struct Writers {
    writing: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(String, u64)>>,
}

impl Writers {
    pub(super) fn start(
        store: &PostgresEventStore,
        prefix: &str,
        per_append: u64,
        pause: Duration,
    ) -> Self {
        let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let tasks = (0..3)
            .map(|a| {
                let store = store.clone();
                let writing = writing.clone();
                let id = format!("{prefix}{a}");
                tokio::spawn(async move {
                    let mut written = 0u64;
                    while writing.load(std::sync::atomic::Ordering::SeqCst) || written == 0 {
                        append(&store, &id, per_append, &[]).await;
                        written += per_append;
                        tokio::time::sleep(pause).await;
                    }
                    (id, written)
                })
            })
            .collect();
        Self { writing, tasks }
    }

    /// Stops them; each aggregate with how many events it was given.
    pub(super) async fn stop(self) -> BTreeMap<String, u64> {
        self.writing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let mut expected = BTreeMap::new();
        for task in self.tasks {
            let (id, written) = task.await.unwrap_or_else(|e| panic!("{e}"));
            expected.insert(id, written);
        }
        expected
    }
}

/// Drains what is left through `relay`, waits until the consumer applied all of `expected`
/// (and a moment more for redeliveries on their way, which must all be dropped), stops it, and
/// tallies what it applied: (events, its counters, (missing, applied twice, inversions)).
async fn drain_and_tally<S: Sink>(
    mut relay: Relay<S>,
    store: &PostgresEventStore,
    consumer: &str,
    expected: &BTreeMap<String, u64>,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<Result<ConsumerMetrics, TransportError>>,
) -> (u64, ConsumerMetrics, (u64, u64, u64)) {
    drain(&mut relay).await;
    let events: u64 = expected.values().sum();
    let pool = store.pool().clone();
    wait_applied(
        &pool,
        store.schema(),
        consumer,
        i64::try_from(events).unwrap_or(i64::MAX),
        Duration::from_secs(120),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop.send(());
    let metrics = running
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("the consumer failed: {e}"));
    let by_id = applied(&pool, store.schema(), consumer).await;
    (events, metrics, tally(expected, &by_id))
}
/// Per aggregate of `expected` (id -> events written), against what was applied in order:
/// (missing, applied twice, inversions).
fn tally(expected: &BTreeMap<String, u64>, by_id: &BTreeMap<String, Vec<i64>>) -> (u64, u64, u64) {
    let (mut missing, mut doubled, mut inversions) = (0, 0, 0);
    for (id, count) in expected {
        let versions = by_id.get(id).cloned().unwrap_or_default();
        let mut unique = versions.clone();
        unique.sort_unstable();
        unique.dedup();
        doubled += (versions.len() - unique.len()) as u64;
        missing += count.saturating_sub(unique.len() as u64);
        inversions += versions.windows(2).filter(|p| p[1] < p[0]).count() as u64;
    }
    (missing, doubled, inversions)
}
/// Two relays run at once under one name and one owner (a process started twice by mistake, or
/// an old one still running beside its replacement) while writers append, with a lease short
/// enough that it changes hands: the consumer applies every event once, in each aggregate's
/// order. Returns (events, steps that found the lease held by the other).
///
/// # Panics
/// When a guarantee does not hold (with the figures).
pub async fn two_relays_under_one_name<B: Broker>(broker: &B, ns: &str) -> (u64, u64) {
    let store = fresh_store(&format!("{ns}_twins")).await;
    let consumer = "twins-consumer";
    broker
        .declare(ns, consumer)
        .await
        .unwrap_or_else(|e| panic!("declare: {e}"));
    let (stop, running) = start_consumer(broker, ns, consumer, Recorder::new(&store, consumer));
    let writers = Writers::start(&store, "t", 3, Duration::from_millis(15));
    let relaying = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let twins: Vec<_> = (0..2)
        .map(|_| {
            let mut relay = Relay::new(store.clone(), broker.sink(ns), "twin")
                .with_name("twins")
                .with_batch(20)
                .with_lease(Duration::from_millis(600));
            let relaying = relaying.clone();
            tokio::spawn(async move {
                let mut refused = 0u64;
                while relaying.load(std::sync::atomic::Ordering::SeqCst) {
                    match relay.step().await {
                        Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                        Err(TransportError::LeaseLost { .. }) => {
                            refused += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                refused
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let expected = writers.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    relaying.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut refused = 0;
    for twin in twins {
        refused += twin.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let relay = Relay::new(store.clone(), broker.sink(ns), "twin").with_name("twins");
    let (events, metrics, (missing, doubled, inversions)) =
        drain_and_tally(relay, &store, consumer, &expected, stop, running).await;
    assert_eq!(
        (missing, doubled, inversions),
        (0, 0, 0),
        "two relays under one name: {events} events, {refused} steps refused the lease, \
         consumer {metrics:?}"
    );
    (events, refused)
}
