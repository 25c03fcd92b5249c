#![doc = include_str!("../README.md")]

mod config;
pub mod consumer;
mod dead_letters;
mod jetstream;
mod sink;

pub use config::{NatsConfig, token};
pub use consumer::NatsConsumer;
pub use dead_letters::NatsDeadLetters;
pub use evently_transport::{
    BrokerDeadLetter, ConsumerMetrics, DeadLetterQueue, HandleError, Handled, InProcess,
    MessageHandler, RelayMetrics, RelayStep, Transactional, TransportError,
};
pub use sink::{NatsLayout, NatsMessage, NatsRelay, NatsSink};

/// The broker's name in errors.
pub(crate) const BROKER: &str = "NATS";

/// The client's error while doing `operation`, as a [`TransportError::Broker`].
pub(crate) fn broker<E>(operation: &'static str) -> impl FnOnce(E) -> TransportError
where
    E: std::error::Error + Send + Sync + 'static,
{
    TransportError::broker(BROKER, operation)
}
