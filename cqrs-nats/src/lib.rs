#![doc = include_str!("../README.md")]

mod config;
pub mod consumer;
mod jetstream;
mod sink;

pub use config::{NatsConfig, token};
pub use consumer::NatsConsumer;
pub use cqrs_transport::{
    ConsumerMetrics, HandleError, Handled, InProcess, MessageHandler, RelayMetrics, RelayStep,
    Transactional, TransportError,
};
pub use sink::{NatsLayout, NatsMessage, NatsRelay, NatsSink};

/// The broker's name in errors.
pub(crate) const BROKER: &str = "NATS";
