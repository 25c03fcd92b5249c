#![doc = include_str!("../README.md")]

mod config;
mod dead_letters;
pub mod envelope;
mod sink;
pub mod subscriber;
mod topics;

pub use config::{KafkaConfig, TopicMap};
pub use dead_letters::KafkaDeadLetters;
pub use envelope::{EventSerializer, JsonEnvelope, MalformedMessage, SerializeError};
pub use evently_transport::{
    BrokerDeadLetter, DeadLetterQueue, DeliveryError, HandleError, Handled, InProcess,
    METRICS_TARGET, MessageHandler, RelayMetrics, RelayStep, Transactional, is_outage,
};
pub use sink::{KafkaLayout, KafkaSink, OutboxRelay};
pub use subscriber::{KafkaSubscriber, LagProbe, PartitionLag, SubscriberMetrics};

/// What went wrong talking to Kafka or the store: the error of every broker crate.
pub type KafkaError = evently_transport::TransportError;

/// The broker's name in errors.
pub(crate) const BROKER: &str = "Kafka";

/// librdkafka's error while doing `operation`, as a [`KafkaError::Broker`].
pub(crate) fn kafka(
    operation: &'static str,
) -> impl FnOnce(rdkafka::error::KafkaError) -> KafkaError {
    KafkaError::broker(BROKER, operation)
}
