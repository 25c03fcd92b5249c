//! `#[derive(Projection)]`: subscriptions, routing, decoding, and catching up from the global order.

use cqrs_examples::bank::{Account, AccountCommand};
use cqrs_examples::order::{Order, OrderCommand, OrderEvent, OrderItem, OrderStatus};
use cqrs_examples::order_summary::OrderSummaries;
use evently_core::prelude::*;
use evently_core::projection::{ProjectionError, Subscription, catch_up};
use evently_core::{Checkpoint, EventData, EventId};

fn create() -> OrderCommand {
    OrderCommand::CreateOrder {
        customer_id: "c".into(),
        items: vec![OrderItem {
            sku: "s".into(),
            quantity: 2,
            unit_price_cents: 250,
        }],
    }
}

#[test]
fn the_subscription_table_names_aggregate_and_event_types() {
    assert_eq!(<OrderSummaries as Projection>::NAME, "order_summary");
    assert_eq!(
        <OrderSummaries as Projection>::SUBSCRIPTIONS,
        [Subscription {
            aggregate_type: Some("order"),
            event_types: &[
                "OrderCreated",
                "OrderConfirmed",
                "OrderCancelled",
                "OrderShipped",
                "OrderDelivered"
            ],
        }]
    );
    assert_eq!(<OrderEvent as DomainEvent>::AGGREGATE_TYPE, Some("order"));
}

#[tokio::test]
async fn a_projection_catches_up_and_resumes_from_its_checkpoint() {
    let store = InMemoryEventStore::new();
    let orders = CommandGateway::<Order, _>::new(store.clone());
    let accounts = CommandGateway::<Account, _>::new(store.clone());
    orders
        .execute("o-1", create(), CommandMetadata::new())
        .await
        .unwrap();
    accounts
        .execute(
            "a-1",
            AccountCommand::Open { owner: "x".into() },
            CommandMetadata::new(),
        )
        .await
        .unwrap();
    orders
        .execute("o-2", create(), CommandMetadata::new())
        .await
        .unwrap();
    orders
        .execute("o-1", OrderCommand::ConfirmOrder, CommandMetadata::new())
        .await
        .unwrap();

    let mut summaries = OrderSummaries::default();
    let checkpoint = catch_up(&store, &mut summaries, &mut (), Checkpoint::START, 2)
        .await
        .unwrap();
    assert_eq!(summaries.orders.len(), 2);
    assert_eq!(summaries.orders["o-1"].status, OrderStatus::Confirmed);
    assert_eq!(summaries.orders["o-1"].total_cents, 500);
    assert_eq!(summaries.orders["o-2"].status, OrderStatus::Pending);

    orders
        .execute(
            "o-2",
            OrderCommand::CancelOrder { reason: "r".into() },
            CommandMetadata::new(),
        )
        .await
        .unwrap();
    let next = catch_up(&store, &mut summaries, &mut (), checkpoint, 100)
        .await
        .unwrap();
    assert!(next > checkpoint);
    assert_eq!(summaries.orders["o-2"].status, OrderStatus::Cancelled);
    assert_eq!(summaries.orders["o-2"].version, 2);
    // Caught up: nothing more.
    assert_eq!(
        catch_up(&store, &mut summaries, &mut (), next, 100)
            .await
            .unwrap(),
        next
    );
}

#[tokio::test]
async fn events_of_other_aggregates_with_the_same_type_name_are_not_routed() {
    let store = InMemoryEventStore::new();
    let impostor = EventData {
        event_id: EventId::new(),
        event_type: "OrderConfirmed".into(),
        schema_version: 1,
        payload: serde_json::json!({}),
        metadata: Metadata::default(),
    };
    store
        .append(
            &StreamId::new("not-an-order", "x"),
            ExpectedVersion::Any,
            vec![impostor],
        )
        .await
        .unwrap();
    let mut summaries = OrderSummaries::default();
    catch_up(&store, &mut summaries, &mut (), Checkpoint::START, 10)
        .await
        .unwrap();
    assert!(summaries.orders.is_empty());
}

#[tokio::test]
async fn an_undecodable_event_or_a_failing_handler_stops_at_a_named_event() {
    let store = InMemoryEventStore::new();
    let orders = CommandGateway::<Order, _>::new(store.clone());
    orders
        .execute("ok", create(), CommandMetadata::new())
        .await
        .unwrap();
    let corrupt = EventData {
        event_id: EventId::new(),
        event_type: "OrderCancelled".into(),
        schema_version: 1,
        payload: serde_json::json!({ "reason": 42 }),
        metadata: Metadata::default(),
    };
    store
        .append(
            &StreamId::new("order", "ok"),
            ExpectedVersion::Exact(1),
            vec![corrupt],
        )
        .await
        .unwrap();
    let mut summaries = OrderSummaries::default();
    let error = catch_up(&store, &mut summaries, &mut (), Checkpoint::START, 10)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error.error,
            ProjectionError::Decode(evently_core::StoreError::Decode { version: 2, .. })
        ),
        "{error}"
    );
    assert_eq!(summaries.orders.len(), 1, "the event before it was applied");
    let first = store.read_all(Checkpoint::START, 1).await.unwrap();
    assert_eq!(
        error.checkpoint, first[0].checkpoint,
        "the checkpoint stops before the bad event"
    );

    // A handler failure: a confirmation of an order the read model never saw created.
    let store = InMemoryEventStore::new();
    let confirm = EventData::from_event(&OrderEvent::OrderConfirmed, Metadata::default()).unwrap();
    store
        .append(
            &StreamId::new("order", "ghost"),
            ExpectedVersion::Any,
            vec![confirm],
        )
        .await
        .unwrap();
    let error = catch_up(
        &store,
        &mut OrderSummaries::default(),
        &mut (),
        Checkpoint::START,
        10,
    )
    .await
    .unwrap_err();
    match error.error {
        ProjectionError::Handler {
            projection,
            stream,
            version,
            source,
        } => {
            assert_eq!((projection, version), ("order_summary", 1));
            assert_eq!(stream, StreamId::new("order", "ghost"));
            assert!(
                source.to_string().contains("before its creation"),
                "{source}"
            );
        }
        other => panic!("expected a handler error, got {other}"),
    }
    assert_eq!(error.checkpoint, Checkpoint::START);
}
