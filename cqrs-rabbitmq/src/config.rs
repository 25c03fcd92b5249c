//! Where the broker is and how the framework's topology is named.

use std::fmt;

/// How an event's routing key is made from its aggregate type and event type.
pub type RoutingKey = fn(aggregate_type: &str, event_type: &str) -> String;

/// The default routing key: `<aggregate type>.<event type>` (`order.OrderPlaced`), so a queue
/// binds `order.#` for one aggregate's events or `#.OrderPlaced` for one type.
#[must_use]
pub fn default_routing_key(aggregate_type: &str, event_type: &str) -> String {
    format!("{aggregate_type}.{event_type}")
}

/// The broker's address and the names of the exchange events are published to.
///
/// `Debug` masks the password in the URL, so a config can be logged.
#[derive(Clone)]
pub struct RabbitConfig {
    url: String,
    exchange: String,
    routing: RoutingKey,
    declare: bool,
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &evently_transport::masked_url(&self.url))
            .field("exchange", &self.exchange)
            .field("declare", &self.declare)
            .finish_non_exhaustive()
    }
}

impl RabbitConfig {
    /// The broker at `url` (`amqp://user:password@host:5672/%2f`), events to the topic exchange
    /// `cqrs.events`, routing keys `<aggregate type>.<event type>`, topology declared by this
    /// crate.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            exchange: "cqrs.events".to_owned(),
            routing: default_routing_key,
            declare: true,
        }
    }

    /// The broker at `AMQP_URL`, or `amqp://guest:guest@127.0.0.1:5672/%2f`.
    #[must_use]
    pub fn from_env() -> Self {
        Self::new(
            std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
        )
    }

    /// The topic exchange the relay publishes to (`cqrs.events` by default).
    #[must_use]
    pub fn with_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// How routing keys are made ([`default_routing_key`] by default).
    #[must_use]
    pub fn with_routing_key(mut self, routing: RoutingKey) -> Self {
        self.routing = routing;
        self
    }

    /// Whether this crate declares the exchanges and queues it uses (the default; declaring is
    /// idempotent) or only checks that they exist (topology managed by operators): a missing one
    /// is then a [`TransportError::Topology`](evently_transport::TransportError::Topology) naming it.
    #[must_use]
    pub fn with_declare(mut self, declare: bool) -> Self {
        self.declare = declare;
        self
    }

    /// The broker's URL.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The exchange events are published to.
    #[must_use]
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The exchange dead letters go through: `<exchange>.dlx` (direct, routed by queue name).
    #[must_use]
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.exchange)
    }

    /// Whether this crate declares the topology.
    #[must_use]
    pub fn declares(&self) -> bool {
        self.declare
    }

    /// The routing key of an event.
    #[must_use]
    pub fn routing_key(&self, aggregate_type: &str, event_type: &str) -> String {
        (self.routing)(aggregate_type, event_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_masks_the_password() {
        let config = RabbitConfig::new("amqp://app:s3cret@rabbit:5672/%2f");
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("app:***@rabbit"), "{shown}");
    }

    #[test]
    fn routing_keys_name_aggregate_and_event_type() {
        let config = RabbitConfig::new("amqp://localhost");
        assert_eq!(
            config.routing_key("order", "OrderPlaced"),
            "order.OrderPlaced"
        );
        let config = config.with_routing_key(|a, _| a.to_owned());
        assert_eq!(config.routing_key("order", "OrderPlaced"), "order");
    }
}
