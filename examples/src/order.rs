//! The order aggregate: created, confirmed, cancelled.
//!
//! Rules: only a pending order can be confirmed; an order can be cancelled unless it is shipped,
//! delivered or cancelled already.

use evently::prelude::*;
use serde::{Deserialize, Serialize};

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderItem {
    /// The product.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// Price of one, in cents.
    pub unit_price_cents: u64,
}

/// The sum of the lines, in cents; `None` when it does not fit in a `u64`.
#[must_use]
pub fn order_total(items: &[OrderItem]) -> Option<u64> {
    items.iter().try_fold(0u64, |total, item| {
        u64::from(item.quantity)
            .checked_mul(item.unit_price_cents)
            .and_then(|line| total.checked_add(line))
    })
}

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OrderStatus {
    /// Not created yet.
    #[default]
    New,
    /// Created, waiting for confirmation.
    Pending,
    /// Confirmed.
    Confirmed,
    /// Handed to the carrier.
    Shipped,
    /// Received by the customer.
    Delivered,
    /// Cancelled.
    Cancelled,
}

/// The events of an order.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(aggregate = Order)]
pub enum OrderEvent {
    /// An order was placed.
    OrderCreated {
        /// Who ordered.
        customer_id: String,
        /// What.
        items: Vec<OrderItem>,
    },
    /// The order was confirmed.
    OrderConfirmed,
    /// The order was cancelled.
    OrderCancelled {
        /// Why.
        reason: String,
    },
    /// The order left the warehouse.
    OrderShipped {
        /// The carrier's tracking number.
        tracking: String,
    },
    /// The customer received the order.
    OrderDelivered,
}

/// The commands of an order.
#[derive(Debug, Clone, Command)]
#[command(aggregate = Order)]
pub enum OrderCommand {
    /// Place a new order.
    #[command(create, handler = create)]
    CreateOrder {
        /// Who orders.
        customer_id: String,
        /// What.
        items: Vec<OrderItem>,
    },
    /// Confirm a pending order.
    #[command(handler = confirm)]
    ConfirmOrder,
    /// Cancel an order.
    #[command(handler = cancel)]
    CancelOrder {
        /// Why.
        reason: String,
    },
    /// Ship a confirmed order.
    #[command(handler = ship)]
    ShipOrder {
        /// The carrier's tracking number.
        tracking: String,
    },
    /// Record the delivery of a shipped order.
    #[command(handler = deliver)]
    DeliverOrder,
}

/// Why an order command is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// An order needs at least one item.
    #[error("an order needs at least one item")]
    NoItems,
    /// A quantity of zero.
    #[error("item `{0}` has quantity 0")]
    ZeroQuantity(String),
    /// No customer.
    #[error("an order needs a customer_id")]
    NoCustomer,
    /// An item without a product.
    #[error("every item needs a sku")]
    NoSku,
    /// A total that does not fit in 64 bits of cents.
    #[error(
        "the order's total does not fit: {0} items whose prices and quantities multiply past 2^64 cents"
    )]
    TotalTooLarge(usize),
    /// Only pending orders can be confirmed.
    #[error("only a pending order can be confirmed; this one is {0:?}")]
    NotPending(OrderStatus),
    /// Shipped, delivered and cancelled orders cannot be cancelled.
    #[error("a {0:?} order cannot be cancelled")]
    CannotCancel(OrderStatus),
    /// Only confirmed orders can be shipped.
    #[error("only a confirmed order can be shipped; this one is {0:?}")]
    NotConfirmed(OrderStatus),
    /// Only shipped orders can be delivered.
    #[error("only a shipped order can be delivered; this one is {0:?}")]
    NotShipped(OrderStatus),
}

/// An order's state.
#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "order", command = OrderCommand, event = OrderEvent, error = OrderError)]
pub struct Order {
    /// Where it is in its life.
    pub status: OrderStatus,
    /// Who ordered.
    pub customer_id: String,
    /// What.
    pub items: Vec<OrderItem>,
    /// Sum of the lines, in cents.
    pub total_cents: u64,
}

impl Order {
    fn create(
        &self,
        customer_id: String,
        items: Vec<OrderItem>,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        if items.is_empty() {
            return Err(OrderError::NoItems);
        }
        if customer_id.trim().is_empty() {
            return Err(OrderError::NoCustomer);
        }
        if items.iter().any(|i| i.sku.trim().is_empty()) {
            return Err(OrderError::NoSku);
        }
        if let Some(item) = items.iter().find(|i| i.quantity == 0) {
            return Err(OrderError::ZeroQuantity(item.sku.clone()));
        }
        if order_total(&items).is_none() {
            return Err(OrderError::TotalTooLarge(items.len()));
        }
        Ok(vec![OrderEvent::OrderCreated { customer_id, items }])
    }

    fn confirm(&self) -> Result<Vec<OrderEvent>, OrderError> {
        if self.status != OrderStatus::Pending {
            return Err(OrderError::NotPending(self.status));
        }
        Ok(vec![OrderEvent::OrderConfirmed])
    }

    fn cancel(&self, reason: String) -> Result<Vec<OrderEvent>, OrderError> {
        match self.status {
            OrderStatus::Shipped | OrderStatus::Delivered | OrderStatus::Cancelled => {
                Err(OrderError::CannotCancel(self.status))
            }
            _ => Ok(vec![OrderEvent::OrderCancelled { reason }]),
        }
    }

    fn ship(&self, tracking: String) -> Result<Vec<OrderEvent>, OrderError> {
        if self.status != OrderStatus::Confirmed {
            return Err(OrderError::NotConfirmed(self.status));
        }
        Ok(vec![OrderEvent::OrderShipped { tracking }])
    }

    fn deliver(&self) -> Result<Vec<OrderEvent>, OrderError> {
        if self.status != OrderStatus::Shipped {
            return Err(OrderError::NotShipped(self.status));
        }
        Ok(vec![OrderEvent::OrderDelivered])
    }

    fn apply_order_created(&mut self, customer_id: &str, items: &[OrderItem]) {
        self.status = OrderStatus::Pending;
        customer_id.clone_into(&mut self.customer_id);
        self.items = items.to_vec();
        // Checked when the order was created; an event written otherwise saturates, never panics.
        self.total_cents = order_total(items).unwrap_or(u64::MAX);
    }

    fn apply_order_confirmed(&mut self) {
        self.status = OrderStatus::Confirmed;
    }

    fn apply_order_cancelled(&mut self, _reason: &str) {
        self.status = OrderStatus::Cancelled;
    }

    fn apply_order_shipped(&mut self, _tracking: &str) {
        self.status = OrderStatus::Shipped;
    }

    fn apply_order_delivered(&mut self) {
        self.status = OrderStatus::Delivered;
    }
}

#[cfg(test)]
mod tests {
    use evently::testing::AggregateFixture;

    use super::*;

    fn created() -> OrderEvent {
        OrderEvent::OrderCreated {
            customer_id: "c".into(),
            items: vec![OrderItem {
                sku: "s".into(),
                quantity: 2,
                unit_price_cents: 150,
            }],
        }
    }

    fn shipped() -> OrderEvent {
        OrderEvent::OrderShipped {
            tracking: "t".into(),
        }
    }

    fn cancel() -> OrderCommand {
        OrderCommand::CancelOrder { reason: "r".into() }
    }

    #[test]
    fn a_total_past_u64_is_refused_and_a_stored_one_saturates() {
        let huge = || OrderItem {
            sku: "gold".into(),
            quantity: u32::MAX,
            unit_price_cents: u64::MAX,
        };
        AggregateFixture::<Order>::given_no_previous_events()
            .when(OrderCommand::CreateOrder {
                customer_id: "c".into(),
                items: vec![huge()],
            })
            .then_expect_error(OrderError::TotalTooLarge(1));
        assert_eq!(order_total(&[huge()]), None);
        // Two lines that fit alone but not together.
        let half = OrderItem {
            sku: "h".into(),
            quantity: 1,
            unit_price_cents: u64::MAX / 2 + 1,
        };
        assert_eq!(order_total(&[half.clone(), half]), None);
        // An event written by something else: the state saturates instead of panicking.
        AggregateFixture::<Order>::given([OrderEvent::OrderCreated {
            customer_id: "c".into(),
            items: vec![huge()],
        }])
        .when(OrderCommand::ConfirmOrder)
        .then_state(|o| assert_eq!(o.total_cents, u64::MAX));
    }

    #[test]
    fn an_order_is_created_pending_with_its_total() {
        AggregateFixture::<Order>::given_no_previous_events()
            .when(OrderCommand::CreateOrder {
                customer_id: "c".into(),
                items: vec![OrderItem {
                    sku: "s".into(),
                    quantity: 2,
                    unit_price_cents: 150,
                }],
            })
            .then_expect_events([created()])
            .then_state(|o| assert_eq!((o.status, o.total_cents), (OrderStatus::Pending, 300)));
    }

    #[test]
    fn an_order_needs_items_with_a_quantity() {
        AggregateFixture::<Order>::given_no_previous_events()
            .when(OrderCommand::CreateOrder {
                customer_id: "c".into(),
                items: Vec::new(),
            })
            .then_expect_error(OrderError::NoItems);
        AggregateFixture::<Order>::given_no_previous_events()
            .when(OrderCommand::CreateOrder {
                customer_id: "c".into(),
                items: vec![OrderItem {
                    sku: "zero".into(),
                    quantity: 0,
                    unit_price_cents: 1,
                }],
            })
            .then_expect_error(OrderError::ZeroQuantity("zero".into()));
    }

    #[test]
    fn only_a_pending_order_can_be_confirmed() {
        AggregateFixture::<Order>::given([created()])
            .when(OrderCommand::ConfirmOrder)
            .then_expect_events([OrderEvent::OrderConfirmed]);
        AggregateFixture::<Order>::given([created(), OrderEvent::OrderConfirmed])
            .when(OrderCommand::ConfirmOrder)
            .then_expect_error(OrderError::NotPending(OrderStatus::Confirmed));
        AggregateFixture::<Order>::given([
            created(),
            OrderEvent::OrderCancelled { reason: "r".into() },
        ])
        .when(OrderCommand::ConfirmOrder)
        .then_expect_error(OrderError::NotPending(OrderStatus::Cancelled));
    }

    #[test]
    fn pending_and_confirmed_orders_can_be_cancelled() {
        for history in [vec![created()], vec![created(), OrderEvent::OrderConfirmed]] {
            AggregateFixture::<Order>::given(history)
                .when(cancel())
                .then_expect_events([OrderEvent::OrderCancelled { reason: "r".into() }]);
        }
    }

    #[test]
    fn shipped_delivered_and_cancelled_orders_cannot_be_cancelled() {
        let cases = [
            (
                vec![created(), OrderEvent::OrderConfirmed, shipped()],
                OrderStatus::Shipped,
            ),
            (
                vec![
                    created(),
                    OrderEvent::OrderConfirmed,
                    shipped(),
                    OrderEvent::OrderDelivered,
                ],
                OrderStatus::Delivered,
            ),
            (
                vec![created(), OrderEvent::OrderCancelled { reason: "r".into() }],
                OrderStatus::Cancelled,
            ),
        ];
        for (history, status) in cases {
            AggregateFixture::<Order>::given(history)
                .when(cancel())
                .then_expect_error(OrderError::CannotCancel(status));
        }
    }

    #[test]
    fn a_confirmed_order_ships_and_then_is_delivered() {
        AggregateFixture::<Order>::given([created(), OrderEvent::OrderConfirmed])
            .when(OrderCommand::ShipOrder {
                tracking: "t".into(),
            })
            .then_expect_events([shipped()]);
        AggregateFixture::<Order>::given([created(), OrderEvent::OrderConfirmed, shipped()])
            .when(OrderCommand::DeliverOrder)
            .then_expect_events([OrderEvent::OrderDelivered])
            .then_state(|o| assert_eq!(o.status, OrderStatus::Delivered));
        AggregateFixture::<Order>::given([created()])
            .when(OrderCommand::DeliverOrder)
            .then_expect_error(OrderError::NotShipped(OrderStatus::Pending));
    }
}
