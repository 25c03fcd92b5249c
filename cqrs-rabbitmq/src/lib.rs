#![doc = include_str!("../README.md")]

mod config;
pub mod consumer;
mod dead_letters;
mod sink;
mod topology;

pub use config::{RabbitConfig, RoutingKey, default_routing_key};
pub use consumer::RabbitConsumer;
pub use dead_letters::RabbitDeadLetters;
pub use evently_transport::{
    BrokerDeadLetter, ConsumerMetrics, DeadLetterQueue, HandleError, Handled, InProcess,
    MessageHandler, RelayMetrics, RelayStep, Transactional, TransportError,
};
pub use sink::{RabbitLayout, RabbitMessage, RabbitRelay, RabbitSink};

/// The broker's name in errors.
pub(crate) const BROKER: &str = "RabbitMQ";

/// lapin's error while doing `operation`, as a [`TransportError::Broker`].
pub(crate) fn broker(operation: &'static str) -> impl FnOnce(lapin::Error) -> TransportError {
    TransportError::broker(BROKER, operation)
}
