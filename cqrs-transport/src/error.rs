//! What goes wrong between the store and a broker.

use evently_core::{EventId, StoreError, StreamId};

use crate::envelope::SerializeError;

/// A broker client's error, boxed so that one error type serves every broker.
pub type BrokerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong talking to a broker or the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A setting is invalid (a name the broker cannot take, a property the client refuses).
    #[error("invalid {broker} configuration: {reason}")]
    Config {
        /// The broker (`Kafka`, `RabbitMQ`, `NATS`, ...).
        broker: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The broker failed or could not be reached while doing `operation`.
    #[error("{broker} {operation} failed: {source}")]
    Broker {
        /// The broker.
        broker: &'static str,
        /// What was being done.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: BrokerError,
    },
    /// A message was not confirmed: the relay's checkpoint stays before this event.
    #[error(transparent)]
    Delivery(Box<DeliveryError>),
    /// A topic, exchange, queue or stream is missing and cannot be (or may not be) created.
    #[error("{broker}: `{destination}` is missing or cannot be declared: {reason}")]
    Topology {
        /// The broker.
        broker: &'static str,
        /// The topic, exchange, queue or stream.
        destination: String,
        /// The broker's answer.
        reason: String,
    },
    /// An event does not serialize.
    #[error(transparent)]
    Serialize(#[from] SerializeError),
    /// The event store (or the inbox, checkpoint, lease) failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The relay does not hold its lease: another relay holds it (live), took it over from this
    /// one, or this one stalled past it (`loss` says which).
    #[error("the relay `{relay}` lost its lease: {loss}")]
    LeaseLost {
        /// The relay's (checkpoint's) name.
        relay: String,
        /// Why.
        loss: evently_postgres::LeaseLoss,
    },
}

impl TransportError {
    /// `broker`'s error while doing `operation`, as a [`TransportError::Broker`].
    pub fn broker<E>(broker: &'static str, operation: &'static str) -> impl FnOnce(E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        move |source| Self::Broker {
            broker,
            operation,
            source: Box::new(source),
        }
    }

    /// An invalid setting of `broker`.
    pub fn config(broker: &'static str, reason: impl std::fmt::Display) -> Self {
        Self::Config {
            broker,
            reason: reason.to_string(),
        }
    }

    /// Whether this error stops a relay's `run`: an event the serializer refuses, or a stored
    /// row that cannot be read as an event. Nothing after either may be published before it,
    /// and waiting does not change it: fix the row (or the serializer) and start again.
    #[must_use]
    pub fn stops_relay(&self) -> bool {
        matches!(
            self,
            Self::Serialize(_) | Self::Store(StoreError::Corrupt(_))
        )
    }
}

/// An event the broker did not confirm.
#[derive(Debug, thiserror::Error)]
#[error("event {event_id} of {stream} was not delivered to `{destination}`: {source}")]
pub struct DeliveryError {
    /// The event.
    pub event_id: EventId,
    /// Its stream.
    pub stream: StreamId,
    /// Where it was sent (a topic, an exchange and routing key, a subject).
    pub destination: String,
    /// The client's error.
    #[source]
    pub source: BrokerError,
}

/// `url` with the secret of its user info replaced by `***` (`scheme://user:***@host`, or
/// `scheme://***@host` for a token alone), so a broker's address can be logged.
#[must_use]
pub fn masked_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
        None => url.to_owned(),
    }
}
