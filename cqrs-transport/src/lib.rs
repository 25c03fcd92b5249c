#![doc = include_str!("../README.md")]

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod consume;
pub mod dead_letters;
pub mod envelope;
mod error;
pub mod handler;
pub mod relay;
pub mod sink;

pub use consume::{Consumer, ConsumerMetrics, Verdict};
pub use dead_letters::{BrokerDeadLetter, DeadLetterQueue};
pub use envelope::{EventSerializer, JsonEnvelope, MalformedMessage, SerializeError};
pub use error::{BrokerError, DeliveryError, TransportError, masked_url};
pub use handler::{
    HandleError, Handled, InProcess, MessageHandler, Opening, Transactional, is_outage,
};
pub use relay::{Relay, RelayMetrics, RelayStep};
pub use sink::{Layout, Outgoing, Sink};

/// The tracing target of the periodic reports of every broker: the relay's `relay report` (lag,
/// delivered, failures, producers, rate) and the consumers' lag reports.
pub const METRICS_TARGET: &str = "cqrs::metrics";

/// How often `run` reports by default.
pub const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
