#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use evently_core::*;

/// The `#[async_trait]` attribute that `Handles` implementations and saga contexts use, so a
/// package needs no `async-trait` dependency of its own.
pub use evently_core::__private::async_trait;

/// The JSON crate of payloads and upcasters (`fn(serde_json::Value) -> Result<Value, _>`).
pub use evently_core::__private::serde_json;

/// The PostgreSQL event store, projection workers, saga store, inbox and dead letters
/// (`evently-postgres`).
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use evently_postgres as postgres;

/// The transport layer every broker crate shares: the outbox relay, the consumer core and
/// delivery (`evently-transport`).
#[cfg(feature = "transport")]
#[cfg_attr(docsrs, doc(cfg(feature = "transport")))]
pub use evently_transport as transport;

/// The outbox relay to Kafka and Kafka consumers (`evently-kafka`).
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use evently_kafka as kafka;

/// The outbox relay to RabbitMQ and its consumers (`evently-rabbitmq`).
#[cfg(feature = "rabbitmq")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
pub use evently_rabbitmq as rabbitmq;

/// The outbox relay to NATS JetStream and its consumers (`evently-nats`).
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub use evently_nats as nats;

/// The outbox relay to Amazon SQS and its consumers (`evently-sqs`).
#[cfg(feature = "sqs")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqs")))]
pub use evently_sqs as sqs;

/// Command idempotency and consumer inboxes in Redis (`evently-redis`).
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use evently_redis as redis;
