//! The saga orchestrator on the in-memory saga store: completion, compensation in reverse order,
//! retries, timeouts, a compensation that keeps failing (failed, then retried later, never
//! dropped), resumption after a crash at chosen points without repeating recorded steps, and
//! start-once by id.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use cqrs_examples::order::OrderEvent;
use evently_core::Saga;
use evently_core::saga::{
    InMemorySagaStore, Orchestrator, Saga, SagaId, SagaStatus, SagaStore, StepError, StepKey,
    StepOutcome,
};
use serde::{Deserialize, Serialize};

/// Fake services: effects are recorded by step key (so a repeated call with the same key has no
/// second effect, as a deduping service would do), and calls fail on demand.
#[derive(Default)]
struct Services {
    /// Every call, in order: "execute reserve", "compensate reserve", ...
    calls: Mutex<Vec<String>>,
    /// The keys whose effect happened: a service dedupes by key, so a repeated call with the same
    /// key has no second effect (and a key that changed between tries would show as two).
    effects: Mutex<BTreeSet<String>>,
    /// How many more times a call fails, by "execute reserve" / "compensate reserve".
    failures: Mutex<HashMap<String, u32>>,
    /// Calls that hang (for timeouts), by the same names.
    hang: Mutex<Vec<String>>,
}

impl Services {
    fn fail(&self, call: &str, times: u32) {
        self.failures.lock().unwrap().insert(call.to_owned(), times);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    async fn call(&self, what: &str, key: &StepKey) -> Result<(), StepError> {
        let name = format!("{what} {}", key.step);
        self.calls.lock().unwrap().push(name.clone());
        // A real service call awaits the network: the crash test cuts the saga between polls.
        tokio::task::yield_now().await;
        if self.hang.lock().unwrap().contains(&name) {
            tokio::time::sleep(Duration::from_secs(3_600)).await;
        }
        if let Some(left) = self.failures.lock().unwrap().get_mut(&name)
            && *left > 0
        {
            *left -= 1;
            return Err(format!("{name} refused").into());
        }
        self.effects.lock().unwrap().insert(key.to_string());
        Ok(())
    }

    /// How many effects of `step` (`execute` or `compensate`) happened, over every key.
    fn effects_of(&self, step: &str, what: &str) -> usize {
        let suffix = format!("/{step}/{what}");
        self.effects
            .lock()
            .unwrap()
            .iter()
            .filter(|k| k.ends_with(&suffix))
            .count()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    order_id: String,
    amount_cents: u64,
    /// Set by the payment step: kept in the saga's data between steps.
    payment_id: Option<String>,
}

/// The order-fulfillment saga: its step table is the enum, in order.
#[derive(Debug, Saga)]
#[saga(name = "order_fulfillment", data = Order, context = Services)]
enum Fulfillment {
    #[step(
        compensate,
        retry(attempts = 3, backoff_ms = 1, max_delay_ms = 4),
        timeout_ms = 200
    )]
    Reserve,
    #[step(execute = charge, compensate = refund, retry(attempts = 3, backoff_ms = 1, max_delay_ms = 4), timeout_ms = 200)]
    Pay,
    #[step(
        compensate,
        retry(attempts = 3, backoff_ms = 1, max_delay_ms = 4),
        timeout_ms = 200
    )]
    Ship,
    Confirm,
}

impl Services {
    async fn reserve(&self, _: &mut Order, key: &StepKey) -> Result<(), StepError> {
        self.call("execute", key).await
    }

    async fn compensate_reserve(&self, _: &mut Order, key: &StepKey) -> Result<(), StepError> {
        self.call("compensate", key).await
    }

    async fn charge(&self, order: &mut Order, key: &StepKey) -> Result<(), StepError> {
        self.call("execute", key).await?;
        order.payment_id = Some(format!("pay-{}", order.order_id));
        Ok(())
    }

    async fn refund(&self, _: &mut Order, key: &StepKey) -> Result<(), StepError> {
        self.call("compensate", key).await
    }

    async fn ship(&self, _: &mut Order, key: &StepKey) -> Result<(), StepError> {
        self.call("execute", key).await
    }

    async fn compensate_ship(&self, _: &mut Order, key: &StepKey) -> Result<(), StepError> {
        self.call("compensate", key).await
    }

    /// A step may fail with any error type that converts into a `StepError`.
    async fn confirm(&self, _: &mut Order, key: &StepKey) -> Result<(), std::io::Error> {
        self.call("execute", key)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

#[test]
fn the_derive_builds_the_step_table_in_declaration_order() {
    assert_eq!(<Fulfillment as Saga>::NAME, "order_fulfillment");
    let table: Vec<_> = <Fulfillment as Saga>::STEPS
        .iter()
        .map(|s| (s.name, s.compensable, s.retry.attempts, s.timeout))
        .collect();
    let timeout = Some(Duration::from_millis(200));
    assert_eq!(
        table,
        [
            ("reserve", true, 3, timeout),
            ("pay", true, 3, timeout),
            ("ship", true, 3, timeout),
            ("confirm", false, 1, None)
        ]
    );
    assert_eq!(
        <Fulfillment as Saga>::STEPS[0].retry.max_delay,
        Duration::from_millis(4)
    );
}

fn order() -> Order {
    Order {
        order_id: "o-1".into(),
        amount_cents: 1_000,
        payment_id: None,
    }
}

fn orchestrator(store: &InMemorySagaStore) -> Orchestrator<Fulfillment, InMemorySagaStore> {
    Orchestrator::new(store.clone(), Services::default(), "o1")
        .with_compensation_retry(Duration::ZERO)
}

#[tokio::test]
async fn every_step_runs_in_order_and_the_data_flows_between_them() {
    let store = InMemorySagaStore::new();
    let saga = orchestrator(&store);
    let (id, status) = saga.start(order()).await.unwrap();
    assert_eq!(status, SagaStatus::Completed);
    assert_eq!(
        saga.context().calls(),
        [
            "execute reserve",
            "execute pay",
            "execute ship",
            "execute confirm"
        ]
    );
    let state = store.load(id).await.unwrap().unwrap();
    assert!(state.steps.iter().all(|(_, o)| *o == StepOutcome::Executed));
    assert_eq!(state.data["payment_id"], "pay-o-1");
    assert_eq!(
        state.version, 6,
        "created, 4 steps and the completion: one save each"
    );
}

#[tokio::test]
async fn a_failing_step_compensates_the_completed_ones_in_reverse_order() {
    let store = InMemorySagaStore::new();
    let saga = orchestrator(&store);
    saga.context().fail("execute ship", 3);
    let (id, status) = saga.start(order()).await.unwrap();
    assert_eq!(status, SagaStatus::Compensated);
    assert_eq!(
        saga.context().calls(),
        [
            "execute reserve",
            "execute pay",
            "execute ship",
            "execute ship",
            "execute ship",
            "compensate pay",
            "compensate reserve"
        ]
    );
    let state = store.load(id).await.unwrap().unwrap();
    assert_eq!(
        state.steps[2].1,
        StepOutcome::Failed {
            error: "execute ship refused".into()
        }
    );
    assert_eq!(state.steps[0].1, StepOutcome::Compensated);
    assert_eq!(state.steps[3].1, StepOutcome::Pending);
    assert_eq!(state.error.as_deref(), Some("execute ship refused"));
}

#[tokio::test]
async fn retries_absorb_transient_failures() {
    let store = InMemorySagaStore::new();
    let saga = orchestrator(&store);
    saga.context().fail("execute pay", 2);
    let (_, status) = saga.start(order()).await.unwrap();
    assert_eq!(status, SagaStatus::Completed);
    assert_eq!(
        saga.context()
            .calls()
            .iter()
            .filter(|c| *c == "execute pay")
            .count(),
        3
    );
}

#[tokio::test]
async fn a_step_that_hangs_times_out_and_compensates() {
    let store = InMemorySagaStore::new();
    let saga = orchestrator(&store);
    saga.context()
        .hang
        .lock()
        .unwrap()
        .push("execute ship".into());
    let (id, status) = saga.start(order()).await.unwrap();
    assert_eq!(status, SagaStatus::Compensated);
    let state = store.load(id).await.unwrap().unwrap();
    assert_eq!(
        state.steps[2].1,
        StepOutcome::Failed {
            error: "timed out after 200ms".into()
        }
    );
}

#[tokio::test]
async fn a_compensation_that_keeps_failing_is_failed_then_retried_never_dropped() {
    let store = InMemorySagaStore::new();
    let saga = orchestrator(&store);
    saga.context().fail("execute ship", 3);
    saga.context().fail("compensate reserve", 3 + 3);
    let (id, status) = saga.start(order()).await.unwrap();
    assert_eq!(status, SagaStatus::Failed);
    let state = store.load(id).await.unwrap().unwrap();
    assert_eq!(
        state.steps[1].1,
        StepOutcome::Compensated,
        "pay was compensated"
    );
    assert_eq!(
        state.steps[0].1,
        StepOutcome::Executed,
        "reserve still to compensate"
    );
    assert!(
        state
            .error
            .as_deref()
            .is_some_and(|e| e.contains("compensation of `reserve` failed")),
        "{:?}",
        state.error
    );
    assert_eq!(
        store
            .list(None, Some(SagaStatus::Failed))
            .await
            .unwrap()
            .len(),
        1
    );

    // Tried again later: fails once more (3 tries), then the service recovers.
    let again = saga.run_due(10).await.unwrap();
    assert_eq!(again[0].status, SagaStatus::Failed);
    let done = saga.run_due(10).await.unwrap();
    assert_eq!(done[0].status, SagaStatus::Compensated);
    let compensations = saga
        .context()
        .calls()
        .iter()
        .filter(|c| *c == "compensate pay")
        .count();
    assert_eq!(compensations, 1, "a recorded compensation never runs again");
    assert_eq!(saga.context().effects_of("reserve", "compensate"), 1);
    assert_eq!(saga.context().effects_of("pay", "compensate"), 1);
}

/// The orchestrator crashes (its future dropped) at every poll of a run, between a step's effect
/// and its save, between compensations, 200 times; a restarted orchestrator resumes: every saga
/// ends completed or compensated, no step whose completion was saved runs again, and each step's
/// effect happens at most once (the services dedupe by step key).
#[tokio::test]
async fn sagas_cut_at_every_point_resume_to_an_end() {
    let store = InMemorySagaStore::new();
    let mut ended = BTreeMap::new();
    for run in 0..200usize {
        let services = Services::default();
        match run % 4 {
            1 => services.fail("execute ship", 3),
            2 => services.fail("execute pay", 3),
            3 => {
                services.fail("execute ship", 3);
                services.fail("compensate pay", 2);
            }
            _ => {}
        }
        let first = Orchestrator::<Fulfillment, _>::new(store.clone(), services, "crashing")
            .with_lease(Duration::from_millis(1))
            .with_compensation_retry(Duration::ZERO);
        let id = SagaId::new();
        let cut = run / 4 % 25;
        let _ = evently_core::testing::cut_after(cut, first.start_with_id(id, order())).await;
        let recorded: Vec<(String, StepOutcome)> = store
            .load(id)
            .await
            .unwrap()
            .map(|s| s.steps)
            .unwrap_or_default();
        tokio::time::sleep(Duration::from_millis(2)).await; // the crashed owner's lease ends
        let restarted =
            Orchestrator::<Fulfillment, _>::new(store.clone(), first.into_context(), "restarted")
                .with_compensation_retry(Duration::ZERO);
        let mut state = store.load(id).await.unwrap();
        while state.as_ref().is_some_and(|s| !s.status.is_final()) {
            restarted.run_due(1_000).await.unwrap();
            state = store.load(id).await.unwrap();
        }
        let Some(state) = state else {
            // Cut before the instance was stored: nothing started, nothing to resume.
            assert!(restarted.context().calls().is_empty(), "run {run}");
            continue;
        };
        let services = restarted.context();
        let calls = services.calls();
        for (name, outcome) in &recorded {
            if *outcome == StepOutcome::Executed {
                let executions = calls
                    .iter()
                    .filter(|c| **c == format!("execute {name}"))
                    .count();
                assert_eq!(
                    executions, 1,
                    "run {run}: `{name}` ran again after its completion was saved"
                );
            }
        }
        for step in ["reserve", "pay", "ship", "confirm"] {
            assert!(services.effects_of(step, "execute") <= 1, "run {run}");
            assert!(services.effects_of(step, "compensate") <= 1, "run {run}");
        }
        *ended.entry(format!("{:?}", state.status)).or_insert(0) += 1;
    }
    assert!(
        ended.get("Completed").copied().unwrap_or(0) > 20,
        "{ended:?}"
    );
    assert!(
        ended.get("Compensated").copied().unwrap_or(0) > 20,
        "{ended:?}"
    );
    eprintln!("200 runs cut at polls 0-24 and resumed: {ended:?}");
}

#[tokio::test]
async fn a_saga_started_twice_under_one_id_runs_once() {
    let store = InMemorySagaStore::new();
    let saga = orchestrator(&store);
    let id = SagaId::new();
    let first = saga.start_with_id(id, order()).await.unwrap();
    let second = saga.start_with_id(id, order()).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(saga.context().calls().len(), 4);
}

impl evently_core::saga::StartedBy<OrderEvent> for Fulfillment {
    fn start(event: &evently_core::RecordedEvent<OrderEvent>) -> Option<Order> {
        match &event.event {
            OrderEvent::OrderCreated { items, .. } => Some(Order {
                // Correlated by the order: the aggregate the event belongs to.
                order_id: event.stream.aggregate_id.as_str().to_owned(),
                amount_cents: items
                    .iter()
                    .map(|i| u64::from(i.quantity) * i.unit_price_cents)
                    .sum(),
                payment_id: None,
            }),
            _ => None,
        }
    }
}

/// OrderCreated starts one fulfillment per order, also when every event is delivered twice (two
/// starters reading the log from the start); the orchestrator then runs them to the end.
#[tokio::test]
async fn order_created_starts_one_saga_per_event_even_when_delivered_twice() {
    use cqrs_examples::order::{Order as OrderAggregate, OrderCommand, OrderItem};
    use evently_core::projection::ProjectionRunner;
    use evently_core::saga::SagaStarter;
    use evently_core::{CommandGateway, CommandMetadata, InMemoryEventStore};

    let events = InMemoryEventStore::new();
    let orders = CommandGateway::<OrderAggregate, _>::new(events.clone());
    for n in 1..=5 {
        let id = format!("order-{n}");
        let items = vec![OrderItem {
            sku: "sku".into(),
            quantity: 2,
            unit_price_cents: 100 * n,
        }];
        orders
            .execute(
                id.as_str(),
                OrderCommand::CreateOrder {
                    customer_id: "c".into(),
                    items,
                },
                CommandMetadata::new(),
            )
            .await
            .unwrap();
        orders
            .execute(
                id.as_str(),
                OrderCommand::ConfirmOrder,
                CommandMetadata::new(),
            )
            .await
            .unwrap();
    }
    let sagas = InMemorySagaStore::new();
    let mut started = 0;
    for delivery in ["first", "again"] {
        let mut runner = ProjectionRunner::new(
            events.clone(),
            SagaStarter::<Fulfillment, OrderEvent, _>::new(sagas.clone(), delivery),
            (),
        );
        runner.catch_up().await.unwrap();
        started += runner.projection().started();
    }
    assert_eq!(
        started, 5,
        "one start per OrderCreated, none for the redelivery"
    );
    assert_eq!(sagas.list(None, None).await.unwrap().len(), 5);

    let orchestrator = orchestrator(&sagas);
    let ran = orchestrator.run_due(100).await.unwrap();
    assert_eq!(ran.len(), 5);
    assert!(ran.iter().all(|s| s.status == SagaStatus::Completed));
    let amounts: BTreeSet<u64> = ran
        .iter()
        .map(|s| s.data["amount_cents"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(amounts, BTreeSet::from([200, 400, 600, 800, 1_000]));
}

#[tokio::test]
async fn the_saga_fixture_gives_the_sequence_of_steps_and_compensations() {
    use evently_core::saga::SagaFixture;
    let run = SagaFixture::<Fulfillment>::new(Services::default())
        .failing("ship", 3)
        .failing_compensation("reserve", 4)
        .run(order())
        .await
        .unwrap();
    assert_eq!(run.status, SagaStatus::Compensated);
    assert_eq!(
        run.calls,
        [
            "execute reserve",
            "execute pay",
            "execute ship",
            "execute ship",
            "execute ship",
            "compensate pay",
            // 3 tries fail (the saga is failed), then it is tried again: 1 more fails, 1 succeeds.
            "compensate reserve",
            "compensate reserve",
            "compensate reserve",
            "compensate reserve",
            "compensate reserve"
        ]
    );
    let happy = SagaFixture::<Fulfillment>::new(Services::default())
        .failing("pay", 2)
        .run(order())
        .await
        .unwrap();
    assert_eq!(happy.status, SagaStatus::Completed);
    assert_eq!(
        happy.calls,
        [
            "execute reserve",
            "execute pay",
            "execute pay",
            "execute pay",
            "execute ship",
            "execute confirm"
        ]
    );
}

/// 20 sagas with a 30 ms deadline are stored, 7 deadlines cancelled, and the orchestrator goes
/// down before running any; after the deadline a restarted orchestrator runs them: the deadline
/// fires for exactly the 13 not cancelled (they compensate), the 7 complete.
#[tokio::test]
async fn deadlines_fire_after_a_restart_and_cancelled_ones_never_do() {
    let store = InMemorySagaStore::new();
    let first = Orchestrator::<Fulfillment, _>::new(store.clone(), Services::default(), "first")
        .with_deadline(Duration::from_millis(30));
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(first.submit(order()).await.unwrap());
    }
    for id in &ids[..7] {
        assert!(first.cancel_deadline(*id).await.unwrap());
        assert!(
            !first.cancel_deadline(*id).await.unwrap(),
            "nothing left to cancel"
        );
    }
    drop(first);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let restarted = orchestrator(&store);
    let ended = restarted.run_due(100).await.unwrap();
    assert_eq!(ended.len(), 20);
    let fired: Vec<_> = ended.iter().filter(|s| s.deadline_fired).collect();
    assert_eq!(fired.len(), 20 - 7, "fired = scheduled - cancelled");
    assert!(
        fired
            .iter()
            .all(|s| s.status == SagaStatus::Compensated && !ids[..7].contains(&s.id))
    );
    assert!(
        ended
            .iter()
            .filter(|s| !s.deadline_fired)
            .all(|s| s.status == SagaStatus::Completed)
    );

    // A saga that completes in time never sees its deadline.
    let in_time = Orchestrator::<Fulfillment, _>::new(store.clone(), Services::default(), "o")
        .with_deadline(Duration::from_secs(3_600));
    let (id, status) = in_time.start(order()).await.unwrap();
    assert_eq!(status, SagaStatus::Completed);
    assert!(!store.load(id).await.unwrap().unwrap().deadline_fired);
}
