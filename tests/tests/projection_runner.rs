//! The in-process `ProjectionRunner` on the in-memory store, beyond the engine conformance suite
//! (`projection_conformance_memory.rs`: delivery, resumption, dead letters per stream or skipped,
//! redrive, rebuild): live delivery woken by the commit signal, purge, rebuild during writes, a
//! shutdown that never splits state from checkpoint, and slow lag counts spaced out.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_examples::bank::{AccountEvent, Deposit};
use evently_core::prelude::*;
use evently_core::projection::{
    CheckpointStore, FailureMode, FailurePolicy, HandlerError, InMemoryCheckpoints,
    InMemoryDeadLetters, ProjectionRunner,
};
use evently_core::{Checkpoint, EventData};

/// Per account: the sum and the count of its deposits. Not idempotent: a double or lost
/// application shows. The state is shared so tests can read it while the runner runs.
#[derive(Clone, Default, Projection)]
#[projection(name = "account_totals", events(AccountEvent))]
struct Totals {
    state: Arc<Mutex<BTreeMap<String, (u64, u64)>>>,
    /// Deposits whose amount is a multiple of 13 fail while set.
    poison: bool,
}

impl Totals {
    fn all(&self) -> (u64, u64) {
        self.state
            .lock()
            .unwrap()
            .values()
            .fold((0, 0), |(t, c), (total, count)| (t + total, c + count))
    }
}

#[async_trait::async_trait]
impl Handles<AccountEvent> for Totals {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        (): &mut (),
    ) -> Result<(), HandlerError> {
        if let AccountEvent::Deposited(deposit) = &event.event {
            if self.poison && deposit.amount_cents % 13 == 0 {
                return Err(format!("poison deposit of {}", deposit.amount_cents).into());
            }
            let mut state = self.state.lock().unwrap();
            let entry = state
                .entry(event.stream.aggregate_id.as_str().to_owned())
                .or_default();
            entry.0 += deposit.amount_cents;
            entry.1 += 1;
        }
        Ok(())
    }
}

/// Deposits `from..=to` of `n` cents into `a{n % 7}`.
async fn deposit(store: &InMemoryEventStore, from: u64, to: u64) {
    for n in from..=to {
        let event = AccountEvent::Deposited(Deposit {
            amount_cents: n,
            reference: String::new(),
        });
        store
            .append(
                &StreamId::new("account", format!("a{}", n % 7)),
                ExpectedVersion::Any,
                vec![EventData::from_event(&event, Metadata::default()).unwrap()],
            )
            .await
            .unwrap();
    }
}

fn sum(n: u64) -> u64 {
    n * (n + 1) / 2
}

fn policy(mode: FailureMode) -> FailurePolicy {
    FailurePolicy {
        attempts: 3,
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
        mode,
    }
}

#[tokio::test]
async fn a_live_runner_is_woken_by_commits_not_by_its_poll() {
    let store = InMemoryEventStore::new();
    deposit(&store, 1, 10).await;
    let totals = Totals::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // A poll interval far longer than the test: only the commit signal can deliver in time.
    let runner = tokio::spawn(
        ProjectionRunner::new(store.clone(), totals.clone(), ())
            .with_batch(4)
            .run(Duration::from_secs(3_600), async {
                let _ = stopped.await;
            }),
    );
    for round in 1..=5u64 {
        deposit(&store, 10 * round + 1, 10 * round + 10).await;
        let expected = (sum(10 * round + 10), 10 * round + 10);
        let started = std::time::Instant::now();
        while totals.all() != expected {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "round {round}: {:?} != {expected:?}",
                totals.all()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    stop.send(()).unwrap();
    let mut runner = runner.await.unwrap().unwrap();
    assert_eq!(
        runner.checkpoint().await.unwrap(),
        store.head().await.unwrap().unwrap()
    );
    assert_eq!(runner.lag().await.unwrap(), 0);
    assert_eq!(runner.metrics().applied, 60);
}

#[tokio::test]
async fn skip_mode_parks_only_the_failures_and_purge_drops_them() {
    let store = InMemoryEventStore::new();
    deposit(&store, 1, 30).await;
    let totals = Totals {
        poison: true,
        ..Totals::default()
    };
    let letters = InMemoryDeadLetters::new();
    let mut runner = ProjectionRunner::new(store.clone(), totals.clone(), ())
        .with_dead_letters(letters.clone())
        .with_failure_policy(policy(FailureMode::Skip));
    runner.catch_up().await.unwrap();
    let listed = letters.list("account_totals");
    let mut amounts: Vec<_> = listed
        .iter()
        .map(|l| (l.stream.to_string(), l.attempts))
        .collect();
    amounts.sort();
    assert_eq!(
        amounts,
        [("account/a5".to_owned(), 3), ("account/a6".to_owned(), 3)],
        "the deposits of 13 (a6) and 26 (a5) only"
    );
    assert_eq!(totals.all(), (sum(30) - 13 - 26, 28));
    assert_eq!(
        letters.purge(
            "account_totals",
            Some(chrono::Utc::now() - chrono::Duration::hours(1))
        ),
        0
    );
    assert_eq!(letters.purge("other_projection", None), 0);
    assert_eq!(letters.purge("account_totals", None), 2);
    assert!(letters.list("account_totals").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_during_writes_equals_a_clean_replay() {
    const M: u64 = 2_000;
    let store = InMemoryEventStore::new();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for n in (1..=M).step_by(10) {
                deposit(&store, n, n + 9).await;
                tokio::task::yield_now().await;
            }
        })
    };
    while store.len() < 200 {
        tokio::task::yield_now().await;
    }
    let totals = Totals::default();
    let mut runner = ProjectionRunner::new(store.clone(), totals.clone(), ()).with_batch(64);
    runner.catch_up().await.unwrap();
    let replayed = runner
        .rebuild(|totals, ()| totals.state.lock().unwrap().clear())
        .await
        .unwrap();
    writer.await.unwrap();
    runner.catch_up().await.unwrap();
    assert_eq!(totals.all(), (sum(M), M));
    assert!(replayed > 0);

    let clean = Totals::default();
    ProjectionRunner::new(store.clone(), clean.clone(), ())
        .catch_up()
        .await
        .unwrap();
    assert_eq!(*clean.state.lock().unwrap(), *totals.state.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_mid_catch_up_keeps_state_and_checkpoint_together() {
    let store = InMemoryEventStore::new();
    deposit(&store, 1, 5_000).await;
    for stop_after in [0u64, 1, 2, 5] {
        let totals = Totals::default();
        let checkpoints = Arc::new(InMemoryCheckpoints::new());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runner = tokio::spawn(
            ProjectionRunner::new(store.clone(), totals.clone(), ())
                .with_checkpoints(checkpoints.clone())
                .with_batch(50)
                .run(Duration::from_secs(60), async {
                    let _ = stopped.await;
                }),
        );
        tokio::time::sleep(Duration::from_millis(stop_after)).await;
        stop.send(()).unwrap();
        let mut runner = runner.await.unwrap().unwrap();
        let checkpoint = runner.checkpoint().await.unwrap();
        let read = store.read_all(Checkpoint::START, usize::MAX).await.unwrap();
        let up_to = read.iter().filter(|e| e.checkpoint <= checkpoint).count() as u64;
        assert_eq!(
            totals.all().1,
            up_to,
            "stopped after {stop_after} ms: the state holds exactly the events up to the checkpoint"
        );
        assert_eq!(
            checkpoints.load("account_totals").await.unwrap(),
            checkpoint
        );
    }
}

/// An in-memory store rigged for a test. With `bad`, its global reads cannot read that event (as
/// a PostgreSQL row written around the store would be): they return the events before it, then
/// `StoreError::Corrupt` naming it. Its lag count takes `count_takes` (a scan of a long backlog),
/// and `counts` says how many were asked for.
#[derive(Clone)]
struct Rigged {
    inner: InMemoryEventStore,
    bad: Option<evently_core::EventId>,
    count_takes: Duration,
    counts: Arc<std::sync::atomic::AtomicUsize>,
}

impl Rigged {
    fn new(inner: InMemoryEventStore) -> Self {
        Self {
            inner,
            bad: None,
            count_takes: Duration::ZERO,
            counts: Arc::default(),
        }
    }
}

#[async_trait::async_trait]
impl EventStore for Rigged {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<evently_core::store::AppendResult, evently_core::StoreError> {
        self.inner.append(stream, expected, events).await
    }

    fn load<'a>(
        &'a self,
        stream: &'a StreamId,
        after_version: u64,
    ) -> futures::stream::BoxStream<'a, Result<evently_core::StoredEvent, evently_core::StoreError>>
    {
        use futures::StreamExt as _;
        let bad = self.bad;
        self.inner
            .load(stream, after_version)
            .map(move |event| match event {
                Ok(event) if Some(event.event_id) == bad => Err(corrupt(&event)),
                other => other,
            })
            .boxed()
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64, evently_core::StoreError> {
        self.inner.stream_version(stream).await
    }

    async fn append_with_key(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
        key: &str,
    ) -> Result<evently_core::store::AppendResult, evently_core::StoreError> {
        self.inner
            .append_with_key(stream, expected, events, key)
            .await
    }

    async fn find_key(
        &self,
        key: &str,
    ) -> Result<Option<evently_core::KeyRecord>, evently_core::StoreError> {
        self.inner.find_key(key).await
    }

    async fn read_all(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<evently_core::StoredEvent>, evently_core::StoreError> {
        let mut page = self.inner.read_all(after, limit).await?;
        if let Some(at) = page.iter().position(|e| Some(e.event_id) == self.bad) {
            if at == 0 {
                return Err(corrupt(&page[0]));
            }
            page.truncate(at);
        }
        Ok(page)
    }

    async fn head(&self) -> Result<Option<Checkpoint>, evently_core::StoreError> {
        self.inner.head().await
    }

    async fn lag(
        &self,
        after: Checkpoint,
    ) -> Result<Option<evently_core::store::Lag>, evently_core::StoreError> {
        self.counts
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(self.count_takes).await;
        self.inner.lag(after).await
    }
}

/// The error a store gives for a row it cannot read as an event.
fn corrupt(row: &evently_core::StoredEvent) -> evently_core::StoreError {
    evently_core::StoreError::Corrupt(Box::new(evently_core::store::CorruptEvent {
        stream: row.stream.clone(),
        version: row.version,
        event_id: row.event_id,
        event_type: row.event_type.clone(),
        checkpoint: row.checkpoint,
        message: "metadata: invalid type".into(),
    }))
}

/// The in-process runner gets past a row the store cannot read, as the PostgreSQL worker does
/// (`exactly_once.rs`): parked as a dead letter naming it, the later events of its stream behind
/// it, everything else applied; a redrive of it fails again with the reason.
#[tokio::test]
async fn an_unreadable_row_is_parked_and_passed() {
    let inner = InMemoryEventStore::new();
    deposit(&inner, 1, 30).await;
    let bad = inner
        .read_all(Checkpoint::START, 100)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.stream.aggregate_id.as_str() == "a3")
        .unwrap();
    let store = Rigged {
        bad: Some(bad.event_id),
        ..Rigged::new(inner)
    };
    let totals = Totals::default();
    let mut runner = ProjectionRunner::new(store.clone(), totals.clone(), ()).with_batch(8);
    runner.catch_up().await.unwrap();
    let letters = runner.dead_letters().list(Totals::NAME);
    // a3 holds deposits 3, 10, 17, 24: the first is unreadable, the rest wait behind it.
    assert_eq!(
        letters
            .iter()
            .map(|l| (l.stream.aggregate_id.to_string(), l.version))
            .collect::<Vec<_>>(),
        [
            ("a3".to_owned(), 1),
            ("a3".to_owned(), 2),
            ("a3".to_owned(), 3),
            ("a3".to_owned(), 4)
        ]
    );
    assert!(letters[0].error.contains("corrupt"), "{}", letters[0].error);
    assert_eq!(totals.all(), (sum(30) - (3 + 10 + 17 + 24), 26));
    let redrive = runner.retry_all().await;
    assert_eq!((redrive.applied, redrive.failed), (0, 1));
}

/// Deposits per tenant, across every tenant.
#[derive(Default, Projection)]
#[projection(name = "deposits_per_tenant", events(AccountEvent), tenants = "all")]
struct PerTenant {
    deposits: BTreeMap<String, u64>,
}

#[async_trait::async_trait]
impl Handles<AccountEvent> for PerTenant {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        (): &mut (),
    ) -> Result<(), HandlerError> {
        let tenant = event.metadata.tenant.as_ref().map_or("-", |t| t.as_str());
        *self.deposits.entry(tenant.to_owned()).or_default() += 1;
        Ok(())
    }
}

/// The in-process runner runs a projection only where its declared tenants are: a per-tenant one
/// on the all-tenants view and an all-tenants one on a tenant's view are refused before any
/// event; an all-tenants one on the all-tenants view sees every tenant's events.
#[tokio::test]
async fn the_runner_checks_the_tenants_a_projection_declares() {
    let store = InMemoryEventStore::new();
    for (tenant, n) in [("acme", 3), ("globex", 2)] {
        let id = evently_core::TenantId::new(tenant).unwrap();
        deposit(&store.for_tenant(id), 1, n).await;
    }
    let mut each = ProjectionRunner::new(store.all_tenants(), Totals::default(), ());
    let refused = each.catch_up().await.map_err(|e| e.to_string());
    assert!(
        refused
            .as_ref()
            .is_err_and(|m| m.contains("tenants = \"each\"")),
        "{refused:?}"
    );
    let acme = store.for_tenant(evently_core::TenantId::new("acme").unwrap());
    let mut narrow = ProjectionRunner::new(acme, PerTenant::default(), ());
    let refused = narrow.catch_up().await.map_err(|e| e.to_string());
    assert!(
        refused
            .as_ref()
            .is_err_and(|m| m.contains("view of tenant `acme`")),
        "{refused:?}"
    );
    let mut all = ProjectionRunner::new(store.all_tenants(), PerTenant::default(), ());
    all.catch_up().await.unwrap();
    let seen: Vec<_> = all
        .projection()
        .deposits
        .iter()
        .map(|(t, n)| (t.as_str(), *n))
        .collect();
    assert_eq!(seen, [("acme", 3), ("globex", 2)]);
}

#[tokio::test]
async fn a_runner_behind_reads_larger_windows_up_to_its_maximum_and_back() {
    let store = InMemoryEventStore::new();
    deposit(&store, 1, 500).await;
    let totals = Totals::default();
    let mut runner = ProjectionRunner::new(store.clone(), totals.clone(), ())
        .with_batch(10)
        .with_max_batch(100);
    // Each window that moved the checkpoint doubles the next, up to the maximum.
    let mut reads = Vec::new();
    loop {
        let step = runner.step().await.unwrap();
        if step.read == 0 {
            break;
        }
        reads.push(step.read);
    }
    assert_eq!(reads, [10, 20, 40, 80, 100, 100, 100, 50]);
    assert_eq!(totals.all(), (sum(500), 500));
    // Caught up: the next window is the batch again, whatever came before.
    deposit(&store, 501, 530).await;
    assert_eq!(runner.step().await.unwrap().read, 10);
    assert_eq!(runner.step().await.unwrap().read, 20);
    // The growth can be turned off: the batch as the maximum.
    let fresh = Totals::default();
    let mut flat = ProjectionRunner::new(store.clone(), fresh.clone(), ())
        .with_batch(25)
        .with_max_batch(1);
    let mut reads = Vec::new();
    while let Ok(step) = flat.step().await
        && step.read > 0
    {
        reads.push(step.read);
    }
    assert_eq!(
        reads,
        [25; 530 / 25]
            .iter()
            .copied()
            .chain([5])
            .collect::<Vec<_>>()
    );
    // A catch-up grows its windows the same way and still applies every event once.
    let caught = Totals::default();
    let mut catching = ProjectionRunner::new(store.clone(), caught.clone(), ())
        .with_batch(3)
        .with_max_batch(64);
    assert_eq!(catching.catch_up().await.unwrap(), 530);
    assert_eq!(caught.all(), (sum(530), 530));
}

/// A step driven outside a tokio runtime (another executor) applies its window; the lag, which
/// is counted on a task of the runtime, is only known once caught up.
#[test]
fn a_step_outside_a_tokio_runtime_applies_and_never_panics() {
    let store = InMemoryEventStore::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(deposit(&store, 1, 30));
    drop(runtime);
    let totals = Totals::default();
    let mut runner = ProjectionRunner::new(store, totals.clone(), ()).with_batch(10);
    let first = futures::executor::block_on(runner.step()).unwrap();
    assert_eq!(first.read, 10);
    assert_eq!(runner.metrics().lag, None);
    while futures::executor::block_on(runner.step()).unwrap().read > 0 {}
    assert_eq!(totals.all(), (sum(30), 30));
    assert_eq!(runner.metrics().lag.map(|lag| lag.events), Some(0));
}

/// Far behind, a lag count scans a long backlog: the engine starts the next one no sooner than
/// ten times as long as the last took (not every ten seconds, which would keep the server
/// counting for the whole catch-up), and still reports the count. Simulated time: a step every
/// 5 s for 500 s, each count taking 30 s.
#[tokio::test(start_paused = true)]
async fn a_slow_lag_count_is_spaced_by_ten_times_its_duration() {
    let inner = InMemoryEventStore::new();
    deposit(&inner, 1, 200).await;
    let store = Rigged {
        count_takes: Duration::from_secs(30),
        ..Rigged::new(inner)
    };
    let totals = Totals::default();
    let mut runner = ProjectionRunner::new(store.clone(), totals.clone(), ())
        .with_batch(1)
        .with_max_batch(1);
    let mut lags = Vec::new();
    for _ in 0..100 {
        assert_eq!(runner.step().await.unwrap().read, 1);
        lags.extend(runner.metrics().lag.map(|lag| lag.events));
        tokio::time::advance(Duration::from_secs(5)).await;
    }
    // At 0 s (30 s long, so the next no sooner than 300 s after it started), at 300-350 s (the
    // clock moves in 5 s steps, so the count is seen to take 30-35 s); the third would be at
    // 600 s or later. Every ten seconds it would have been 13 or more.
    assert_eq!(
        store.counts.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "counts started in 500 s"
    );
    // Both were taken: the first said 199 behind (counted after the first step), the second
    // counted after step 61-71.
    assert_eq!(lags.first(), Some(&199), "{lags:?}");
    let second = lags.iter().find(|&&events| events != 199);
    assert!(
        second.is_some_and(|events| (129..=139).contains(events)),
        "{lags:?}"
    );
    assert_eq!(totals.all().1, 100);
}
