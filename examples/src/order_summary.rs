//! A read model of orders kept by a projection: one summary per order, in memory.

use std::collections::BTreeMap;

use evently::RecordedEvent;
use evently::prelude::*;
use evently::projection::HandlerError;

use crate::order::{OrderEvent, OrderStatus};

/// What the order list page shows of an order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OrderSummary {
    /// Who ordered.
    pub customer_id: String,
    /// Where it is.
    pub status: OrderStatus,
    /// Sum of the lines, in cents.
    pub total_cents: u64,
    /// The version of the order the summary reflects.
    pub version: u64,
}

/// Every order's summary, by order id.
#[derive(Debug, Default, Projection)]
#[projection(name = "order_summary", events(OrderEvent))]
pub struct OrderSummaries {
    /// The summaries.
    pub orders: BTreeMap<String, OrderSummary>,
}

#[async_trait::async_trait]
impl Handles<OrderEvent> for OrderSummaries {
    async fn handle(
        &mut self,
        event: &RecordedEvent<OrderEvent>,
        (): &mut (),
    ) -> Result<(), HandlerError> {
        apply(&mut self.orders, event)
    }
}

/// Applies `event` to the summaries by order id: the whole logic of the read model, for
/// projections that keep the map elsewhere (behind a lock, in a service).
///
/// # Errors
/// An event of an order whose creation was not seen.
pub fn apply(
    orders: &mut BTreeMap<String, OrderSummary>,
    event: &RecordedEvent<OrderEvent>,
) -> Result<(), HandlerError> {
    let id = event.stream.aggregate_id.to_string();
    if let OrderEvent::OrderCreated { customer_id, items } = &event.event {
        let total_cents = crate::order::order_total(items).unwrap_or(u64::MAX);
        orders.insert(
            id,
            OrderSummary {
                customer_id: customer_id.clone(),
                status: OrderStatus::Pending,
                total_cents,
                version: event.version,
            },
        );
        return Ok(());
    }
    let summary = orders
        .get_mut(&id)
        .ok_or_else(|| format!("event {} of order {id} before its creation", event.version))?;
    summary.status = match event.event {
        OrderEvent::OrderConfirmed => OrderStatus::Confirmed,
        OrderEvent::OrderCancelled { .. } => OrderStatus::Cancelled,
        OrderEvent::OrderShipped { .. } => OrderStatus::Shipped,
        OrderEvent::OrderDelivered => OrderStatus::Delivered,
        OrderEvent::OrderCreated { .. } => summary.status,
    };
    summary.version = event.version;
    Ok(())
}
