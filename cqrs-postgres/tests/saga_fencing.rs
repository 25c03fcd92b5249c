//! Sagas that nothing can wedge, on PostgreSQL and in memory alike: an instance whose data no
//! longer reads is set aside while the others complete (and completes after a fix), any number of
//! sagas start from one event (each exactly once, however often it is delivered), a step longer
//! than the lease runs once, and an orchestrator that stalled past its lease is fenced out.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fresh_store;
use evently_core::prelude::*;
use evently_core::saga::{
    InMemorySagaStore, Orchestrator, SagaError, SagaStarter, SagaState, SagaStatus, SagaStore,
    StartedBy, StepError, StepKey,
};
use evently_core::{Checkpoint, EventData, EventId, StoredEvent};
use evently_postgres::saga::PostgresSagaStore;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// Counts every execution by step key; the first execution may stall its whole thread.
#[derive(Default, Clone)]
struct Effects {
    by_key: Arc<Mutex<HashMap<String, u32>>>,
    /// How long each step takes (awaited: the heartbeat keeps running).
    step_time: Duration,
    /// How long the first execution blocks its thread (no heartbeat can run meanwhile).
    stall_first: Option<Duration>,
    stalled: Arc<std::sync::atomic::AtomicBool>,
}

impl Effects {
    fn record(&self, key: &StepKey) -> u32 {
        let mut by_key = self
            .by_key
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = by_key.entry(key.to_string()).or_default();
        *n += 1;
        *n
    }

    fn count(&self) -> (usize, u32) {
        let by_key = self
            .by_key
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (by_key.len(), by_key.values().sum())
    }

    async fn work(&self, key: &StepKey) -> Result<(), StepError> {
        if let Some(stall) = self.stall_first
            && !self.stalled.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            std::thread::sleep(stall);
        }
        if !self.step_time.is_zero() {
            tokio::time::sleep(self.step_time).await;
        }
        self.record(key);
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ticket {
    n: u64,
}

/// Version 1 of the saga's code: `n` must be a number.
#[derive(Saga)]
#[saga(name = "wedge", data = Ticket, context = Effects)]
enum Strict {
    Open,
    Close,
}

/// The fixed code: `n` may also be text.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LenientTicket {
    n: serde_json::Value,
}

#[derive(Saga)]
#[saga(name = "wedge", data = LenientTicket, context = Effects)]
enum Lenient {
    Open,
    Close,
}

impl Effects {
    async fn open<D: Send>(&self, _: &mut D, key: &StepKey) -> Result<(), StepError> {
        self.work(key).await
    }

    async fn close<D: Send>(&self, _: &mut D, key: &StepKey) -> Result<(), StepError> {
        self.work(key).await
    }
}

/// The two stores each test runs on.
async fn postgres(name: &str) -> PostgresSagaStore {
    PostgresSagaStore::new(fresh_store(name).await)
}

/// An instance of `wedge` whose data the strict code cannot read, started before `others`.
async fn bad_instance<St: SagaStore>(store: &St) -> SagaState {
    let mut bad = SagaState::start::<Lenient>(
        evently_core::saga::SagaId::new(),
        &LenientTicket {
            n: serde_json::json!("seven"),
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    bad.started_at -= chrono::Duration::hours(1);
    assert!(
        store
            .create(&bad, "nobody", Duration::ZERO)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    bad
}

async fn unreadable_is_set_aside<St: SagaStore + Clone + 'static>(store: St) -> usize {
    let effects = Effects::default();
    let strict = Orchestrator::<Strict, _>::new(store.clone(), effects.clone(), "o1");
    let bad = bad_instance(&store).await;
    let mut good = Vec::new();
    for n in 0..5 {
        good.push(
            strict
                .submit(Ticket { n })
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    // Before: the bad instance, claimed first, failed the whole run. Now it is set aside.
    let ended = strict.run_due(10).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ended.len(), 5);
    assert!(ended.iter().all(|s| s.status == SagaStatus::Completed));
    let unreadable = store
        .list(Some("wedge"), Some(SagaStatus::Unreadable))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        unreadable.iter().map(|s| s.id).collect::<Vec<_>>(),
        [bad.id]
    );
    let reason = unreadable[0].error.clone().unwrap_or_default();
    assert!(reason.contains("does not fit"), "{reason}");
    let quarantined = store
        .quarantined(Some("wedge"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(quarantined.len(), 1);
    // Claims skip it: a second run has nothing to do.
    assert!(
        strict
            .run_due(10)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty()
    );
    // The code is fixed and the instance retried: it completes.
    assert!(store.retry(bad.id).await.unwrap_or_else(|e| panic!("{e}")));
    let lenient = Orchestrator::<Lenient, _>::new(store.clone(), effects.clone(), "o2");
    let ended = lenient.run_due(10).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ended.iter().map(|s| (s.id, s.status)).collect::<Vec<_>>(),
        [(bad.id, SagaStatus::Completed)]
    );
    assert_eq!(
        effects.count(),
        (12, 12),
        "each step of the 6 instances ran once"
    );
    // Abandoning: only an unfinished instance.
    assert!(
        !store
            .abandon(bad.id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    good.len()
}

#[tokio::test]
async fn an_unreadable_instance_is_set_aside_and_the_others_complete_in_memory() {
    assert_eq!(unreadable_is_set_aside(InMemorySagaStore::new()).await, 5);
}

#[tokio::test]
async fn an_unreadable_instance_is_set_aside_and_the_others_complete_on_postgres() {
    let store = postgres("saga_unreadable").await;
    assert_eq!(unreadable_is_set_aside(store.clone()).await, 5);
}

/// A row edited by hand so that its state does not read at all: claims set it aside (listed from
/// its columns), the others run; abandoning ends it.
#[tokio::test]
async fn a_row_whose_state_does_not_read_is_set_aside_on_postgres() {
    let events = fresh_store("saga_garbage_row").await;
    let store = PostgresSagaStore::new(events.clone());
    let effects = Effects::default();
    let strict = Orchestrator::<Strict, _>::new(store.clone(), effects.clone(), "o1");
    let garbage = uuid::Uuid::now_v7();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO \"{}\".saga_instances (id, saga, status, state, version, started_at, updated_at) \
         VALUES ($1, 'wedge', 'running', '{{\"not\": \"a saga\"}}', 1, now() - interval '1 hour', now())",
        events.schema()
    )))
    .bind(garbage)
    .execute(events.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let id = strict
        .submit(Ticket { n: 1 })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ended = strict.run_due(10).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ended.iter().map(|s| s.id).collect::<Vec<_>>(), [id]);
    let quarantined = store
        .quarantined(None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        quarantined.iter().map(|q| q.id.0).collect::<Vec<_>>(),
        [garbage]
    );
    assert!(
        quarantined[0].error.contains("does not read"),
        "{}",
        quarantined[0].error
    );
    // Retried while still broken: the next claim sets it aside again, the run goes on.
    assert!(
        store
            .retry(quarantined[0].id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    assert!(
        strict
            .run_due(10)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty()
    );
    assert_eq!(
        store
            .quarantined(None)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .len(),
        1
    );
    assert!(
        store
            .abandon(quarantined[0].id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    assert!(
        store
            .quarantined(None)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty()
    );
}

// ---- several sagas started by one event ----

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum Signup {
    SignedUp { email: String },
}

macro_rules! started_sagas {
    ($($saga:ident = $name:literal),* $(,)?) => {$(
        #[derive(Saga)]
        #[saga(name = $name, data = Ticket, context = Effects)]
        enum $saga {
            Open,
        }

        impl StartedBy<Signup> for $saga {
            fn start(_: &RecordedEvent<Signup>) -> Option<Ticket> {
                Some(Ticket { n: 1 })
            }
        }
    )*};
}

started_sagas!(
    Welcome = "welcome",
    Verify = "verify",
    Profile = "profile",
    Newsletter = "newsletter",
    Trial = "trial",
);

/// A stored `SignedUp` event with id `event_id` as the first event of `signup/<id>`.
fn signed_up(event_id: EventId, id: &str) -> StoredEvent {
    let data = EventData::from_event(
        &Signup::SignedUp {
            email: format!("{id}@example.org"),
        },
        Metadata::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    StoredEvent {
        event_id,
        stream: StreamId::new("signup", id),
        version: 1,
        checkpoint: Checkpoint::new(1, 1),
        recorded_at: chrono::Utc::now(),
        event_type: data.event_type,
        schema_version: data.schema_version,
        payload: data.payload,
        metadata: data.metadata,
    }
}

/// Delivers `event` to the starter of saga `S` three times.
async fn deliver<S, St>(store: &St, event: &StoredEvent)
where
    S: StartedBy<Signup>,
    St: SagaStore + Clone,
{
    for delivery in 0..3 {
        let mut starter = SagaStarter::<S, Signup, St>::new(store.clone(), format!("d{delivery}"));
        starter
            .apply(event, &mut ())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

async fn one_instance_per_saga_and_event<St: SagaStore + Clone>(store: St) {
    let event = signed_up(EventId::new(), "s1");
    // Two sagas first, then all five.
    deliver::<Welcome, _>(&store, &event).await;
    deliver::<Verify, _>(&store, &event).await;
    let count = |name: &'static str| {
        let store = store.clone();
        async move {
            store
                .list(Some(name), None)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .len()
        }
    };
    assert_eq!((count("welcome").await, count("verify").await), (1, 1));
    deliver::<Profile, _>(&store, &event).await;
    deliver::<Newsletter, _>(&store, &event).await;
    deliver::<Trial, _>(&store, &event).await;
    deliver::<Welcome, _>(&store, &event).await;
    for name in ["welcome", "verify", "profile", "newsletter", "trial"] {
        let instances = store
            .list(Some(name), None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(instances.len(), 1, "{name}");
        assert_eq!(instances[0].started_by, Some(event.event_id.0));
        assert_eq!(
            instances[0].id,
            evently_core::saga::started_id(name, &event)
        );
    }
    assert_eq!(
        store
            .list(None, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .len(),
        5
    );
}

#[tokio::test]
async fn any_number_of_sagas_start_from_one_event_each_once_in_memory() {
    one_instance_per_saga_and_event(InMemorySagaStore::new()).await;
}

#[tokio::test]
async fn any_number_of_sagas_start_from_one_event_each_once_on_postgres() {
    one_instance_per_saga_and_event(postgres("saga_one_event").await).await;
}

/// An instance started under the old scheme (its id was the event's id) is not started again by
/// a redelivery of its event after migration 0010.
#[tokio::test]
async fn an_instance_started_before_the_migration_is_not_started_again() {
    let events = fresh_store("saga_before_0010").await;
    let store = PostgresSagaStore::new(events.clone());
    let event_id = EventId::new();
    // As the old starter stored it: id = event id, no started_by in the state.
    let old = SagaState::start::<Welcome>(evently_core::saga::SagaId(event_id.0), &Ticket { n: 1 })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        store
            .create(&old, "old", Duration::ZERO)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    // What the migration's backfill does for rows it finds.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE \"{}\".saga_instances SET started_by = id",
        events.schema()
    )))
    .execute(events.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let event = signed_up(event_id, "s2");
    deliver::<Welcome, _>(&store, &event).await;
    deliver::<Verify, _>(&store, &event).await;
    assert_eq!(
        store
            .list(Some("welcome"), None)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .len(),
        1
    );
    assert_eq!(
        store
            .list(Some("verify"), None)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .len(),
        1
    );
}

// ---- fencing ----

#[derive(Saga)]
#[saga(name = "slow", data = Ticket, context = Effects)]
enum Slow {
    Open,
}

/// A step of 2.5 s under a 1 s lease while a second orchestrator polls every 50 ms: the first
/// keeps its lease through the heartbeat, the step runs once, the saga completes.
async fn a_long_step_runs_once<St: SagaStore + Clone + 'static>(store: St) {
    let effects = Effects {
        step_time: Duration::from_millis(2_500),
        ..Effects::default()
    };
    let lease = Duration::from_secs(1);
    let first =
        Orchestrator::<Slow, _>::new(store.clone(), effects.clone(), "first").with_lease(lease);
    let second =
        Orchestrator::<Slow, _>::new(store.clone(), effects.clone(), "second").with_lease(lease);
    let id = first
        .submit(Ticket { n: 1 })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let running = tokio::spawn(async move { first.run_due(1).await });
    // The first claims it; from then on the second polls.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let until = Instant::now() + Duration::from_millis(3_500);
    let mut claimed_by_second = 0;
    while Instant::now() < until {
        claimed_by_second += second
            .run_due(1)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .len();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ended = running
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ended.iter().map(|s| (s.id, s.status)).collect::<Vec<_>>(),
        [(id, SagaStatus::Completed)]
    );
    assert_eq!(claimed_by_second, 0);
    assert_eq!(effects.count(), (1, 1), "the step ran exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_longer_than_the_lease_runs_once_in_memory() {
    a_long_step_runs_once(InMemorySagaStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_longer_than_the_lease_runs_once_on_postgres() {
    a_long_step_runs_once(postgres("saga_long_step").await).await;
}

/// A maker of the store for another runtime (a PostgreSQL pool belongs to the runtime it was
/// made on).
type MakeStore<St> = Arc<dyn Fn() -> BoxFuture<'static, St> + Send + Sync>;

/// The first orchestrator stalls (its thread blocked for 2.5 s: no heartbeat) under a 1 s lease;
/// the second takes the instance over and completes it; the first's late save is refused, so
/// it ends nothing. The step's side effect ran on both, with one `StepKey`: what steps dedupe on.
async fn a_stalled_orchestrator_is_fenced_out<St: SagaStore + Clone + 'static>(
    make: MakeStore<St>,
) {
    let store = make().await;
    let effects = Effects {
        stall_first: Some(Duration::from_millis(2_500)),
        ..Effects::default()
    };
    let lease = Duration::from_secs(1);
    let id = Orchestrator::<Slow, _>::new(store.clone(), effects.clone(), "submitter")
        .submit(Ticket { n: 1 })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let stalled = {
        let (make, effects) = (Arc::clone(&make), effects.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            runtime.block_on(async move {
                let store = make().await;
                Orchestrator::<Slow, _>::new(store, effects, "stalled")
                    .with_lease(lease)
                    .run_due(1)
                    .await
            })
        })
    };
    // Let the stalled one claim first, then poll until its lease has run out.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second =
        Orchestrator::<Slow, _>::new(store.clone(), effects.clone(), "second").with_lease(lease);
    let deadline = Instant::now() + Duration::from_secs(10);
    let finished = loop {
        let ended = second.run_due(1).await.unwrap_or_else(|e| panic!("{e}"));
        if !ended.is_empty() {
            break ended;
        }
        assert!(
            Instant::now() < deadline,
            "the second orchestrator never took over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        finished
            .iter()
            .map(|s| (s.id, s.status))
            .collect::<Vec<_>>(),
        [(id, SagaStatus::Completed)]
    );
    let late = stalled
        .join()
        .unwrap_or_else(|_| panic!("the stalled thread panicked"));
    let late = late.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        late.is_empty(),
        "the stalled orchestrator's late save must be refused: {late:?}"
    );
    let stored = store
        .load(id)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("stored"));
    assert_eq!(stored.status, SagaStatus::Completed);
    assert_eq!(
        stored.version, finished[0].version,
        "nothing saved after the second's completion"
    );
    assert_eq!(
        effects.count(),
        (1, 2),
        "one StepKey, run by both: the key is what dedupes"
    );
    // A fenced save under the old epoch is refused with a typed error.
    let mut stale = stored.clone();
    stale.lease_epoch = 1;
    stale.version += 1;
    assert!(matches!(
        store.save(&stale, Some("stalled")).await,
        Err(SagaError::LeaseLost { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_orchestrator_is_fenced_out_in_memory() {
    let store = InMemorySagaStore::new();
    a_stalled_orchestrator_is_fenced_out::<InMemorySagaStore>(Arc::new(move || {
        let store = store.clone();
        Box::pin(async move { store })
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_orchestrator_is_fenced_out_on_postgres() {
    let schema = fresh_store("saga_stalled").await.schema().to_owned();
    a_stalled_orchestrator_is_fenced_out::<PostgresSagaStore>(Arc::new(move || {
        let schema = schema.clone();
        Box::pin(async move {
            let pool = common::pool(4).await;
            PostgresSagaStore::new(
                evently_postgres::PostgresEventStore::new(pool, &schema)
                    .unwrap_or_else(|e| panic!("{e}")),
            )
        })
    }))
    .await;
}

/// Durations at their extremes are clamped, never a panic.
#[tokio::test]
async fn extreme_durations_never_panic() {
    let store = InMemorySagaStore::new();
    let orchestrator = Orchestrator::<Strict, _>::new(store.clone(), Effects::default(), "x")
        .with_deadline(Duration::MAX)
        .with_lease(Duration::MAX)
        .with_compensation_retry(Duration::MAX);
    let (_, status) = orchestrator
        .start(Ticket { n: 1 })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, SagaStatus::Completed);
    let zero = Orchestrator::<Strict, _>::new(store, Effects::default(), "y")
        .with_deadline(Duration::ZERO)
        .with_lease(Duration::ZERO);
    let (_, status) = zero
        .start(Ticket { n: 2 })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status,
        SagaStatus::Compensated,
        "a deadline of zero has passed at once"
    );
    let pg = postgres("saga_extremes").await;
    let (_, status) = Orchestrator::<Strict, _>::new(pg, Effects::default(), "z")
        .with_deadline(Duration::MAX)
        .with_lease(Duration::MAX)
        .start(Ticket { n: 3 })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, SagaStatus::Completed);
}

#[derive(Saga)]
#[saga(name = "panicky", data = Ticket, context = Effects)]
enum Panicky {
    #[step(compensate = undo)]
    Open,
    Boom,
}

impl Effects {
    async fn boom(&self, ticket: &mut Ticket, key: &StepKey) -> Result<(), StepError> {
        assert_ne!(ticket.n, 0, "the step's own bug");
        self.work(key).await
    }

    async fn undo(&self, _: &mut Ticket, key: &StepKey) -> Result<(), StepError> {
        self.work(key).await
    }
}

/// A step that panics is that instance's failure (it compensates, with the panic as its error),
/// never the orchestrator's: the other instances of the run complete.
#[tokio::test]
async fn a_panicking_step_fails_its_instance_only() {
    let store = InMemorySagaStore::new();
    let orchestrator = Orchestrator::<Panicky, _>::new(store.clone(), Effects::default(), "o");
    let bad = orchestrator
        .submit(Ticket { n: 0 })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let good = orchestrator
        .submit(Ticket { n: 1 })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ended = orchestrator
        .run_due(10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let outcome: HashMap<_, _> = ended
        .iter()
        .map(|s| (s.id, (s.status, s.error.clone())))
        .collect();
    assert_eq!(outcome[&good].0, SagaStatus::Completed);
    assert_eq!(outcome[&bad].0, SagaStatus::Compensated);
    let error = outcome[&bad].1.clone().unwrap_or_default();
    assert!(
        error.contains("panicked") && error.contains("the step's own bug"),
        "{error}"
    );
}
