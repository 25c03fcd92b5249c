//! The projection fixture (given events -> read model, through the runners' engine) and
//! read-your-writes: `wait_until_caught_up` with the checkpoint a command returns, on the
//! in-memory store. The PostgreSQL side is in `cqrs-postgres/tests/freshness.rs`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_examples::bank::{AccountEvent, Deposit};
use cqrs_examples::order::{Order, OrderCommand, OrderEvent, OrderItem, OrderStatus};
use cqrs_examples::order_summary::{OrderSummaries, OrderSummary, apply};
use evently_core::prelude::*;
use evently_core::projection::{
    CheckpointStore, FixtureError, HandlerError, InMemoryCheckpoints, NotCaughtUp,
    ProjectionFixture, ProjectionRunner, wait_until_caught_up,
};
use evently_core::{Checkpoint, CommandGateway, StoreError};

fn created(customer: &str, cents: u64) -> OrderEvent {
    OrderEvent::OrderCreated {
        customer_id: customer.to_owned(),
        items: vec![OrderItem {
            sku: "sku".to_owned(),
            quantity: 1,
            unit_price_cents: cents,
        }],
    }
}

#[tokio::test]
async fn the_fixture_feeds_given_events_through_the_engine() {
    let done = ProjectionFixture::new(OrderSummaries::default())
        .given("o-1", [created("ann", 300), OrderEvent::OrderConfirmed])
        .given("o-2", [created("bob", 50)])
        // Not an event the projection subscribes to: read past, not applied.
        .given(
            "acc-1",
            [AccountEvent::Deposited(Deposit {
                amount_cents: 5,
                reference: String::new(),
            })],
        )
        .given(
            "o-2",
            [OrderEvent::OrderCancelled {
                reason: "late".into(),
            }],
        )
        .caught_up()
        .await
        .unwrap()
        .then(|summaries| {
            assert_eq!(
                summaries.orders["o-1"],
                OrderSummary {
                    customer_id: "ann".into(),
                    status: OrderStatus::Confirmed,
                    total_cents: 300,
                    version: 2,
                }
            );
            // The second batch of o-2 continued its stream at version 2.
            assert_eq!(summaries.orders["o-2"].status, OrderStatus::Cancelled);
            assert_eq!(summaries.orders["o-2"].version, 2);
        })
        .then_no_dead_letters();
    assert_eq!(done.applied(), 4);
    // The checkpoint is past the last event (the deposit is read past too).
    assert_eq!(done.checkpoint().position, 5);
}

#[tokio::test]
async fn a_failing_handler_shows_as_a_dead_letter_not_as_a_fixture_error() {
    let done = ProjectionFixture::new(OrderSummaries::default())
        .given("o-1", [OrderEvent::OrderConfirmed])
        .given("o-2", [created("bob", 50)])
        .caught_up()
        .await
        .unwrap()
        .then_dead_letters(|letters| {
            assert_eq!(letters.len(), 1);
            assert_eq!(letters[0].stream, StreamId::new("order", "o-1"));
            assert!(
                letters[0].error.contains("before its creation"),
                "{}",
                letters[0].error
            );
        })
        .then(|summaries| assert_eq!(summaries.orders.len(), 1));
    assert_eq!(done.applied(), 1);
}

#[tokio::test]
#[should_panic(
    expected = "projection `order_summary` parked 1 event(s) as dead letters:\n  event 1 of order/o-9: "
)]
async fn then_no_dead_letters_names_the_parked_event() {
    let _ = ProjectionFixture::new(OrderSummaries::default())
        .given("o-9", [OrderEvent::OrderDelivered])
        .caught_up()
        .await
        .unwrap()
        .then_no_dead_letters();
}

/// An event enum of no aggregate.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum Audit {
    Noted { text: String },
}

#[derive(Default, Projection)]
#[projection(name = "audit_log", events(Audit))]
struct AuditLog {
    lines: Vec<String>,
}

#[async_trait::async_trait]
impl Handles<Audit> for AuditLog {
    async fn handle(
        &mut self,
        event: &RecordedEvent<Audit>,
        (): &mut (),
    ) -> Result<(), HandlerError> {
        let Audit::Noted { text } = &event.event;
        self.lines.push(format!("{}: {text}", event.stream));
        Ok(())
    }
}

#[tokio::test]
async fn events_of_no_aggregate_need_their_stream_named() {
    let error = ProjectionFixture::new(AuditLog::default())
        .given("x", [Audit::Noted { text: "a".into() }])
        .caught_up()
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        FixtureError::NoAggregateType {
            event_type: "Noted"
        }
    ));
    assert!(
        error.to_string().contains("given_in(StreamId::new("),
        "{error}"
    );

    ProjectionFixture::new(AuditLog::default())
        .given_in(
            StreamId::new("audit", "1"),
            [Audit::Noted { text: "a".into() }],
        )
        .caught_up()
        .await
        .unwrap()
        .then(|log| assert_eq!(log.lines, ["audit/1: a"]));
}

/// Order summaries behind a lock, readable while the runner runs on its own task.
#[derive(Clone, Default, Projection)]
#[projection(name = "shared_summaries", events(OrderEvent))]
struct Shared(Arc<Mutex<BTreeMap<String, OrderSummary>>>);

#[async_trait::async_trait]
impl Handles<OrderEvent> for Shared {
    async fn handle(
        &mut self,
        event: &RecordedEvent<OrderEvent>,
        (): &mut (),
    ) -> Result<(), HandlerError> {
        apply(&mut self.0.lock().unwrap(), event)
    }
}

fn create(customer: &str) -> OrderCommand {
    OrderCommand::CreateOrder {
        customer_id: customer.to_owned(),
        items: vec![OrderItem {
            sku: "sku".to_owned(),
            quantity: 2,
            unit_price_cents: 10,
        }],
    }
}

/// 8 tasks x 50 commands, each reading the read model right after its wait: every read sees its
/// own write (never a 404 after a 202), with the runner on another task in small batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_reads_its_own_write_after_the_wait() {
    let store = InMemoryEventStore::new();
    let gateway = Arc::new(CommandGateway::<Order, _>::new(store.clone()));
    let model = Shared::default();
    let runner = ProjectionRunner::new(store.clone(), model.clone(), ()).with_batch(3);
    let checkpoints = runner.checkpoints();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(runner.run(Duration::from_secs(3_600), async {
        let _ = stopped.await;
    }));
    let mut tasks = Vec::new();
    for task in 0..8 {
        let (gateway, checkpoints, model) = (gateway.clone(), checkpoints.clone(), model.clone());
        tasks.push(tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            for n in 0..50 {
                let id = format!("t{task}-{n}");
                let executed = gateway
                    .execute(id.as_str(), create(&id), CommandMetadata::new())
                    .await
                    .unwrap();
                let written = executed.checkpoint().unwrap();
                let started = std::time::Instant::now();
                let reached = wait_until_caught_up(
                    checkpoints.as_ref(),
                    "shared_summaries",
                    written,
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
                slowest = slowest.max(started.elapsed());
                assert!(reached >= written);
                let summary = model.0.lock().unwrap().get(&id).cloned();
                assert_eq!(summary.map(|s| s.customer_id), Some(id));
            }
            slowest
        }));
    }
    let mut slowest = Duration::ZERO;
    for task in tasks {
        slowest = slowest.max(task.await.unwrap());
    }
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    assert_eq!(model.0.lock().unwrap().len(), 400);
    // Woken by the checkpoint store, not by polling: far under the 10 s timeout.
    assert!(slowest < Duration::from_secs(2), "slowest wait {slowest:?}");
}

#[tokio::test]
async fn a_stopped_projection_times_out_saying_where_it_is() {
    let store = InMemoryEventStore::new();
    let gateway = CommandGateway::<Order, _>::new(store.clone());
    let checkpoints = Arc::new(InMemoryCheckpoints::new());
    let mut runner = ProjectionRunner::new(store.clone(), Shared::default(), ())
        .with_checkpoints(checkpoints.clone());
    let first = gateway
        .execute("a", create("ann"), CommandMetadata::new())
        .await
        .unwrap();
    runner.catch_up().await.unwrap();
    // Not run again: the second command's event is never reached.
    let second = gateway
        .execute("b", create("bob"), CommandMetadata::new())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let error = wait_until_caught_up(
        checkpoints.as_ref(),
        "shared_summaries",
        second.checkpoint().unwrap(),
        Duration::from_millis(200),
    )
    .await
    .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(200));
    let NotCaughtUp::TimedOut {
        reached, target, ..
    } = &error
    else {
        panic!("{error}");
    };
    assert_eq!(*reached, first.checkpoint().unwrap());
    assert_eq!(*target, second.checkpoint().unwrap());
    assert!(
        error
            .to_string()
            .starts_with("projection `shared_summaries` did not reach"),
        "{error}"
    );
    // A target already passed returns at once, and so does a command that recorded nothing.
    let reached = wait_until_caught_up(
        checkpoints.as_ref(),
        "shared_summaries",
        first.checkpoint().unwrap(),
        Duration::ZERO,
    )
    .await
    .unwrap();
    assert_eq!(reached, first.checkpoint().unwrap());
}

/// A checkpoint store that fails its first `failures` reads.
struct Flaky {
    inner: InMemoryCheckpoints,
    failures: Mutex<u32>,
}

#[async_trait::async_trait]
impl CheckpointStore for Flaky {
    async fn load(&self, projection: &str) -> Result<Checkpoint, StoreError> {
        let failed = {
            let mut failures = self.failures.lock().unwrap();
            let failed = *failures > 0;
            *failures = failures.saturating_sub(1);
            failed
        };
        if failed {
            return Err(StoreError::backend("connection reset"));
        }
        self.inner.load(projection).await
    }

    async fn save(&self, projection: &str, checkpoint: Checkpoint) -> Result<(), StoreError> {
        self.inner.save(projection, checkpoint).await
    }
}

#[tokio::test]
async fn failing_reads_are_retried_until_the_timeout_and_then_named() {
    let inner = InMemoryCheckpoints::new();
    inner.save("p", Checkpoint::new(3, 7)).await.unwrap();
    let flaky = Flaky {
        inner: inner.clone(),
        failures: Mutex::new(3),
    };
    let reached = wait_until_caught_up(&flaky, "p", Checkpoint::new(3, 7), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(reached, Checkpoint::new(3, 7));

    let down = Flaky {
        inner,
        failures: Mutex::new(u32::MAX),
    };
    let error = wait_until_caught_up(&down, "p", Checkpoint::new(3, 7), Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(error, NotCaughtUp::Store { .. }), "{error}");
    assert_eq!(
        error.to_string(),
        "reading the checkpoint of projection `p`: event store backend failed: connection reset"
    );
}

#[test]
fn checkpoints_travel_as_text() {
    let checkpoint = Checkpoint::new(981_234, 17);
    assert_eq!(checkpoint.to_string().parse::<Checkpoint>(), Ok(checkpoint));
    assert_eq!("0:0".parse::<Checkpoint>(), Ok(Checkpoint::START));
    for bad in [
        "",
        "1",
        "1:",
        ":1",
        "a:1",
        "+1:2",
        "1:-2",
        "1:2:3",
        " 1:2",
        "18446744073709551616:1",
    ] {
        let error = bad.parse::<Checkpoint>().unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "`{bad}` is not a checkpoint: expected `<transaction>:<position>`, two unsigned integers"
            )
        );
    }
}
