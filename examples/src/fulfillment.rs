//! The order-fulfillment saga: accept the order, reserve inventory, process the payment, create the
//! shipment, confirm the order; started by `OrderCreated`, compensated in reverse when a step keeps
//! failing, down to cancelling the order.
//!
//! The seed sketch cancelled the order in the compensation of its *last* step (confirm), which
//! never runs: only executed steps are compensated, and a saga that fails never executed its last
//! step. Here the first step, [`FulfillmentSaga::AcceptOrder`], carries the cancellation, so any
//! failure after it ends with the order cancelled.
//!
//! The services are in-process fakes that behave like real ones where it matters: each effect is
//! deduplicated by the step key it is called with, and the payment service declines on demand
//! (any order above [`CARD_LIMIT_CENTS`], or one placed with the [`DECLINE_HEADER`] metadata
//! header, which the order service's HTTP API sets for `"decline_payment": true`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use evently::saga::{StartedBy, StepError, StepKey};
use evently::{CommandGateway, CommandMetadata, EventStore, RecordedEvent, Saga};
use serde::{Deserialize, Serialize};

use crate::order::{Order, OrderCommand, OrderEvent};

/// Payments above this are declined by the fake payment service.
pub const CARD_LIMIT_CENTS: u64 = 50_000;

/// An `OrderCreated` whose metadata has this header set to `true` has its payment declined.
pub const DECLINE_HEADER: &str = "demo-decline-payment";

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
    /// The fake payment service declines this order (see [`DECLINE_HEADER`]).
    #[serde(default)]
    pub decline_payment: bool,
}

/// The steps, in order.
#[derive(Debug, Saga)]
#[saga(name = "order_fulfillment", data = Fulfillment, context = Services)]
pub enum FulfillmentSaga {
    /// Nothing to do going forward; cancels the order on compensation.
    #[step(compensate = cancel_order, retry(attempts = 5, backoff_ms = 10, max_delay_ms = 500))]
    AcceptOrder,
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
            amount_cents: crate::order::order_total(items).unwrap_or(u64::MAX),
            payment_id: None,
            shipment_id: None,
            decline_payment: event
                .metadata
                .headers
                .get(DECLINE_HEADER)
                .is_some_and(|v| v == "true"),
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

/// Sends the saga's commands to orders, whatever store they live in.
#[async_trait::async_trait]
pub trait Orders: Send + Sync {
    /// Executes `command` on order `id` at most once per idempotency `key`.
    async fn execute_once(
        &self,
        key: &str,
        id: &str,
        command: OrderCommand,
    ) -> Result<(), StepError>;
}

#[async_trait::async_trait]
impl<S: EventStore> Orders for CommandGateway<Order, S> {
    async fn execute_once(
        &self,
        key: &str,
        id: &str,
        command: OrderCommand,
    ) -> Result<(), StepError> {
        self.execute_idempotent(key, id, command, CommandMetadata::new())
            .await?;
        Ok(())
    }
}

/// The services the steps call.
#[derive(Clone)]
pub struct Services {
    /// The fakes' state.
    pub ledger: Arc<Mutex<Ledger>>,
    /// Confirms and cancels orders.
    pub orders: Arc<dyn Orders>,
}

impl Services {
    /// Services over `orders`, with an empty ledger.
    #[must_use]
    pub fn new(orders: Arc<dyn Orders>) -> Self {
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

    async fn accept_order(&self, _: &mut Fulfillment, _: &StepKey) -> Result<(), StepError> {
        Ok(())
    }

    async fn cancel_order(&self, data: &mut Fulfillment, key: &StepKey) -> Result<(), StepError> {
        let reason = "fulfillment failed".to_owned();
        self.orders
            .execute_once(
                &key.to_string(),
                &data.order_id,
                OrderCommand::CancelOrder { reason },
            )
            .await
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
        if data.decline_payment {
            return Err("card declined: the order asked for a declined payment".into());
        }
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
            .execute_once(&key.to_string(), &data.order_id, OrderCommand::ConfirmOrder)
            .await
    }
}
