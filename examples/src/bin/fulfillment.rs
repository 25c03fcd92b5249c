//! The order-fulfillment saga on the embedded default: orders are created through the command
//! gateway, `OrderCreated` starts one saga per order (a projection runner feeding the saga
//! starter), and the orchestrator runs them: the order within the card limit completes (reserved,
//! paid, shipped, confirmed), the one above it is compensated (inventory released, order
//! cancelled).
//!
//! `cargo run -p cqrs-examples --bin fulfillment`

use cqrs_examples::fulfillment::{FulfillmentSaga, Services};
use cqrs_examples::order::{Order, OrderCommand, OrderEvent, OrderItem, OrderStatus};
use evently::projection::ProjectionRunner;
use evently::saga::{InMemorySagaStore, Orchestrator, SagaStarter, SagaStatus, SagaStore};
use evently::{CommandGateway, CommandMetadata, InMemoryEventStore};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let events = InMemoryEventStore::new();
    let orders = std::sync::Arc::new(CommandGateway::<Order, _>::new(events.clone()));
    for (id, unit_price_cents) in [("order-small", 1_250), ("order-large", 40_000)] {
        orders
            .execute(
                id,
                OrderCommand::CreateOrder {
                    customer_id: "ada".into(),
                    items: vec![OrderItem {
                        sku: "keyboard".into(),
                        quantity: 2,
                        unit_price_cents,
                    }],
                },
                CommandMetadata::new(),
            )
            .await?;
    }

    // OrderCreated starts the sagas (one per event, however often it is delivered).
    let sagas = InMemorySagaStore::new();
    let mut starter = ProjectionRunner::new(
        events.clone(),
        SagaStarter::<FulfillmentSaga, OrderEvent, _>::new(sagas.clone(), "starter"),
        (),
    );
    starter.catch_up().await?;
    println!("sagas started: {}", starter.projection().started());

    let services = Services::new(orders.clone());
    let orchestrator =
        Orchestrator::<FulfillmentSaga, _>::new(sagas.clone(), services.clone(), "main");
    for saga in orchestrator.run_due(100).await? {
        let order_id = saga.data["order_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let status = orders.load(order_id.as_str()).await?.0.status;
        println!("{order_id}: saga {:?}, order {status:?}", saga.status);
        for (step, outcome) in &saga.steps {
            println!("    {step}: {outcome:?}");
        }
        let expected = if order_id == "order-small" {
            (SagaStatus::Completed, OrderStatus::Confirmed)
        } else {
            (SagaStatus::Compensated, OrderStatus::Cancelled)
        };
        if (saga.status, status) != expected {
            return Err(format!("{order_id}: expected {expected:?}").into());
        }
    }
    let stored = sagas.list(None, None).await?.len();
    let ledger = services.ledger.lock().map_err(|e| e.to_string())?;
    println!(
        "inventory reserved: {:?}; payments: {:?}; shipments: {:?}",
        ledger.reserved, ledger.payments, ledger.shipments
    );
    if ledger.reserved.get("keyboard") != Some(&2) || ledger.payments.len() != 1 {
        return Err("the compensated order left an effect behind".into());
    }
    println!("sagas stored: {stored}");
    Ok(())
}
