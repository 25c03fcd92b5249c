#![doc = include_str!("../README.md")]

mod config;
pub mod consumer;
mod dead_letters;
mod queues;
mod sink;

pub use config::{SqsConfig, dead_letter_queue};
pub use consumer::SqsConsumer;
pub use dead_letters::SqsDeadLetters;
pub use evently_transport::{
    BrokerDeadLetter, ConsumerMetrics, DeadLetterQueue, HandleError, Handled, InProcess,
    MessageHandler, RelayMetrics, RelayStep, Transactional, TransportError,
};
pub use queues::group_id;
pub use sink::{SqsLayout, SqsMessage, SqsRelay, SqsSink};

/// The broker's name in errors.
pub(crate) const BROKER: &str = "SQS";
