//! The order aggregate on the embedded in-memory store: create, confirm, a rejected command, and the
//! recorded events with their metadata.
//!
//! Run: `cargo run -p cqrs-examples --bin order`

use cqrs_examples::order::{Order, OrderCommand, OrderItem};
use evently::prelude::*;
use evently::{CorrelationId, EventStoreExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = InMemoryEventStore::new();
    let orders = CommandGateway::<Order, _>::new(store.clone());
    let correlation = CorrelationId::new();
    let meta = || {
        CommandMetadata::new()
            .correlated(correlation)
            .by_user("alice")
    };

    let id = AggregateId::generate();
    let items = vec![
        OrderItem {
            sku: "book-42".into(),
            quantity: 2,
            unit_price_cents: 1_250,
        },
        OrderItem {
            sku: "pen-7".into(),
            quantity: 1,
            unit_price_cents: 300,
        },
    ];
    let created = orders
        .execute(
            &id,
            OrderCommand::CreateOrder {
                customer_id: "c-17".into(),
                items,
            },
            meta(),
        )
        .await?;
    println!("created order {id} -> version {}", created.version);

    let confirmed = orders
        .execute(&id, OrderCommand::ConfirmOrder, meta())
        .await?;
    println!("confirmed -> version {}", confirmed.version);

    match orders
        .execute(&id, OrderCommand::ConfirmOrder, meta())
        .await
    {
        Err(CommandError::Rejected(error)) => println!("confirm again is rejected: {error}"),
        other => println!("unexpected: {other:?}"),
    }
    match orders
        .execute(AggregateId::generate(), OrderCommand::ConfirmOrder, meta())
        .await
    {
        Err(error @ CommandError::NotFound { .. }) => println!("confirm an unknown order: {error}"),
        other => println!("unexpected: {other:?}"),
    }

    let cancelled = orders
        .execute(
            &id,
            OrderCommand::CancelOrder {
                reason: "changed my mind".into(),
            },
            meta(),
        )
        .await?;
    println!("cancelled -> version {}", cancelled.version);

    let (order, version) = orders.load(&id).await?;
    println!(
        "state at version {version}: {:?}, total {} cents, {} lines",
        order.status,
        order.total_cents,
        order.items.len()
    );

    println!("\nthe stream {}:", created.stream);
    for event in store.load_all(&created.stream).await? {
        println!(
            "  v{} {:<15} {} correlation={} causation={}",
            event.version,
            event.event_type,
            event.payload,
            event
                .metadata
                .correlation_id
                .map(|c| c.to_string())
                .unwrap_or_default(),
            event
                .metadata
                .causation_id
                .map(|c| c.to_string())
                .unwrap_or_default(),
        );
    }
    Ok(())
}
