#![doc = include_str!("../README.md")]

mod config;
pub mod envelope;
pub mod relay;
pub mod subscriber;
mod topics;

pub use config::{KafkaConfig, TopicMap};
pub use envelope::{EventSerializer, JsonEnvelope, MalformedMessage, SerializeError};
pub use relay::{OutboxRelay, RelayMetrics, RelayStep};
pub use subscriber::{
    HandleError, Handled, InProcess, KafkaSubscriber, LagProbe, MessageHandler, PartitionLag,
    SubscriberMetrics, Transactional,
};

/// The tracing target of the periodic reports: the relay's `relay report` (lag, delivered,
/// failures, producers, rate) and the subscriber's `consumer lag` (per partition).
pub const METRICS_TARGET: &str = "cqrs_kafka::metrics";

/// How often `run` reports by default.
pub(crate) const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// What went wrong talking to Kafka or the store.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// A setting is invalid (a topic name, a librdkafka property the client refuses).
    #[error("invalid Kafka configuration: {0}")]
    Config(String),
    /// librdkafka failed (the broker is unreachable, a delivery failed, ...).
    #[error("Kafka {operation} failed: {source}")]
    Kafka {
        /// What was being done.
        operation: &'static str,
        /// librdkafka's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// A message was not delivered: the relay's checkpoint stays before this event.
    #[error(transparent)]
    Delivery(Box<DeliveryError>),
    /// Creating a topic failed.
    #[error("creating topic `{topic}` failed: {reason}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's error code.
        reason: String,
    },
    /// An event does not serialize.
    #[error(transparent)]
    Serialize(#[from] SerializeError),
    /// The event store (or the inbox, checkpoint, lease) failed.
    #[error(transparent)]
    Store(#[from] cqrs_core::StoreError),
    /// Another relay holds the lease (its lease is live), or took it over from this one.
    #[error("the relay `{0}` is owned by another process")]
    LeaseLost(String),
}

impl KafkaError {
    /// librdkafka's error, as a [`KafkaError::Kafka`] for `operation`.
    pub(crate) fn kafka(
        operation: &'static str,
    ) -> impl FnOnce(rdkafka::error::KafkaError) -> Self {
        move |source| Self::Kafka { operation, source }
    }
}

/// An event the broker did not acknowledge.
#[derive(Debug, thiserror::Error)]
#[error("event {event_id} of {stream} was not delivered to `{topic}`: {source}")]
pub struct DeliveryError {
    /// The event.
    pub event_id: cqrs_core::EventId,
    /// Its stream.
    pub stream: cqrs_core::StreamId,
    /// The topic.
    pub topic: String,
    /// librdkafka's error.
    #[source]
    pub source: rdkafka::error::KafkaError,
}
