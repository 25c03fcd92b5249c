//! The order-fulfillment saga: reserve inventory, process the payment, create the shipment, confirm
//! the order; started by `OrderCreated`, compensated in reverse when a step keeps failing.
//!
//! The services are in-process fakes that behave like real ones where it matters: each effect is
//! deduplicated by the step key it is called with, and the payment service declines on demand
//! (any order above [`CARD_LIMIT_CENTS`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use cqrs_core::saga::{StartedBy, StepError, StepKey};
use cqrs_core::{CommandGateway, CommandMetadata, InMemoryEventStore, RecordedEvent, Saga};
use serde::{Deserialize, Serialize};

use crate::order::{Order, OrderCommand, OrderEvent};

/// Payments above this are declined by the fake payment service.
pub const CARD_LIMIT_CENTS: u64 = 50_000;

/// The saga's data: what the steps need, filled in as they go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fulfillment {
    /// The order (the saga is correlated by it).
    pub order_id: String,
    /// What to reserve: sku and quantity.
    pub items: Vec<(String, u32)>,
    /// What to charge.
    pub amount_cents: u64,
    /// The payment, once taken.
    pub payment_id: Option<String>,
    /// The shipment, once created.
    pub shipment_id: Option<String>,
}

/// The steps, in order.
#[derive(Debug, Saga)]
#[saga(name = "order_fulfillment", data = Fulfillment, context = Services)]
pub enum FulfillmentSaga {
    /// Reserve the items; released on compensation.
    #[step(compensate = release_inventory, retry(attempts = 3, backoff_ms = 10, max_delay_ms = 200), timeout_ms = 2000)]
    ReserveInventory,
    /// Charge the customer; refunded on compensation.
    #[step(compensate = refund_payment, retry(attempts = 3, backoff_ms = 10, max_delay_ms = 200), timeout_ms = 2000)]
    ProcessPayment,
    /// Book the carrier; cancelled on compensation.
    #[step(compensate = cancel_shipment, retry(attempts = 3, backoff_ms = 10), timeout_ms = 2000)]
    CreateShipment,
    /// Confirm the order through the command gateway (idempotent by the step key).
    #[step(retry(attempts = 5, backoff_ms = 10, max_delay_ms = 500))]
    ConfirmOrder,
}

impl StartedBy<OrderEvent> for FulfillmentSaga {
    fn start(event: &RecordedEvent<OrderEvent>) -> Option<Fulfillment> {
        let OrderEvent::OrderCreated { items, .. } = &event.event else {
            return None;
        };
        Some(Fulfillment {
            order_id: event.stream.aggregate_id.as_str().to_owned(),
            items: items.iter().map(|i| (i.sku.clone(), i.quantity)).collect(),
            amount_cents: items
                .iter()
                .map(|i| u64::from(i.quantity) * i.unit_price_cents)
                .sum(),
            payment_id: None,
            shipment_id: None,
        })
    }
}

/// What the fake services hold: effects by step key (a repeated key has no second effect).
#[derive(Debug, Default)]
pub struct Ledger {
    /// Reserved units by sku.
    pub reserved: BTreeMap<String, u32>,
    /// Payments taken, by id, with their amount.
    pub payments: BTreeMap<String, u64>,
    /// Shipments booked.
    pub shipments: BTreeSet<String>,
    /// The step keys whose effect happened.
    pub done: BTreeSet<String>,
}

/// The services the steps call.
#[derive(Clone)]
pub struct Services {
    /// The fakes' state.
    pub ledger: Arc<Mutex<Ledger>>,
    /// Confirms orders.
    pub orders: Arc<CommandGateway<Order, InMemoryEventStore>>,
}

impl Services {
    /// Services over `orders`, with an empty ledger.
    #[must_use]
    pub fn new(orders: Arc<CommandGateway<Order, InMemoryEventStore>>) -> Self {
        Self {
            ledger: Arc::default(),
            orders,
        }
    }

    /// Runs `effect` once per step key.
    fn once(&self, key: &StepKey, effect: impl FnOnce(&mut Ledger)) {
        let mut ledger = self
            .ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ledger.done.insert(key.to_string()) {
            effect(&mut ledger);
        }
    }

    async fn reserve_inventory(
        &self,
        data: &mut Fulfillment,
        key: &StepKey,
    ) -> Result<(), StepError> {
        self.once(key, |ledger| {
            for (sku, quantity) in &data.items {
                *ledger.reserved.entry(sku.clone()).or_default() += quantity;
            }
        });
        Ok(())
    }

    async fn release_inventory(
        &self,
        data: &mut Fulfillment,
        key: &StepKey,
    ) -> Result<(), StepError> {
        self.once(key, |ledger| {
            for (sku, quantity) in &data.items {
                let reserved = ledger.reserved.entry(sku.clone()).or_default();
                *reserved = reserved.saturating_sub(*quantity);
            }
        });
        Ok(())
    }

    async fn process_payment(
        &self,
        data: &mut Fulfillment,
        key: &StepKey,
    ) -> Result<(), StepError> {
        if data.amount_cents > CARD_LIMIT_CENTS {
            return Err(format!(
                "card declined: {} cents is above the limit of {CARD_LIMIT_CENTS}",
                data.amount_cents
            )
            .into());
        }
        let payment = format!("pay-{}", data.order_id);
        self.once(key, |ledger| {
            ledger.payments.insert(payment.clone(), data.amount_cents);
        });
        data.payment_id = Some(payment);
        Ok(())
    }

    async fn refund_payment(&self, data: &mut Fulfillment, key: &StepKey) -> Result<(), StepError> {
        if let Some(payment) = &data.payment_id {
            self.once(key, |ledger| {
                ledger.payments.remove(payment);
            });
        }
        Ok(())
    }

    async fn create_shipment(
        &self,
        data: &mut Fulfillment,
        key: &StepKey,
    ) -> Result<(), StepError> {
        let shipment = format!("ship-{}", data.order_id);
        self.once(key, |ledger| {
            ledger.shipments.insert(shipment.clone());
        });
        data.shipment_id = Some(shipment);
        Ok(())
    }

    async fn cancel_shipment(
        &self,
        data: &mut Fulfillment,
        key: &StepKey,
    ) -> Result<(), StepError> {
        if let Some(shipment) = &data.shipment_id {
            self.once(key, |ledger| {
                ledger.shipments.remove(shipment);
            });
        }
        Ok(())
    }

    async fn confirm_order(&self, data: &mut Fulfillment, key: &StepKey) -> Result<(), StepError> {
        // The step key is the command's idempotency key: a retried confirmation returns the
        // first outcome instead of confirming twice.
        self.orders
            .execute_idempotent(
                &key.to_string(),
                data.order_id.as_str(),
                OrderCommand::ConfirmOrder,
                CommandMetadata::new(),
            )
            .await?;
        Ok(())
    }
}
