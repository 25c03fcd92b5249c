//! The port a broker implements for the relay: send a message, confirm them in order.

use std::future::Future;

use evently_core::{EventId, RawStoredEvent, StreamId};

use crate::{BrokerError, TransportError};

/// How a broker lays out the message of an event: its headers (and anything else that depends
/// only on the event, like a routing key or a subject), built on the relay's reading tasks while
/// the database sends the rest of the page. Cloned into each reading task.
pub trait Layout: Clone + Send + Sync + 'static {
    /// The per-message part the sink sends with the value.
    type Headers: Send + 'static;

    /// The headers of `event`'s message (the serializer's `content_type`).
    fn headers(&self, event: &RawStoredEvent, content_type: &'static str) -> Self::Headers;
}

/// One message for a [`Sink`], in the store's global order.
#[derive(Debug)]
pub struct Outgoing<'a, H> {
    /// The event's id (the message id where the broker has one, so that it can drop resends).
    pub event_id: EventId,
    /// Its stream: the aggregate type picks the destination, the aggregate id is the key that
    /// keeps an aggregate's events in order.
    pub stream: &'a StreamId,
    /// The message value as the serializer wrote it.
    pub value: &'a [u8],
    /// What the sink's [`Layout`] built for this event.
    pub headers: H,
}

/// A broker the relay publishes to (`Sync` so a running relay can be reported on from its own
/// future): messages are sent in order and confirmed in the order they
/// were sent. Everything about the broker (its client, destinations, confirms) lives here; the
/// relay around it keeps the guarantees (lease, checkpoint behind confirmed messages only,
/// restart from the checkpoint after any failure).
pub trait Sink: Send + Sync + 'static {
    /// The broker's name in errors and logs (`Kafka`, `RabbitMQ`, `NATS`).
    const BROKER: &'static str;
    /// The relay's checkpoint name unless one is given (`kafka-relay`, ...).
    const DEFAULT_NAME: &'static str;

    /// How messages are laid out.
    type Layout: Layout;

    /// The layout, for the reading tasks.
    fn layout(&self) -> Self::Layout;

    /// Where an aggregate type's messages go (a topic, an exchange and routing-key prefix, a
    /// subject prefix), for errors and logs.
    fn destination(&self, aggregate_type: &str) -> String;

    /// Makes sure the destinations of these aggregate types exist before their messages are sent
    /// (creates them where the sink is allowed to; nothing when they are managed elsewhere).
    ///
    /// # Errors
    /// [`TransportError::Topology`] or [`TransportError::Broker`].
    fn prepare(
        &mut self,
        aggregate_types: &[&str],
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Queues `message` behind the ones in flight (waiting while the client's queue is full).
    ///
    /// # Errors
    /// The client's error: nothing after this message is sent in this attempt.
    fn send(
        &mut self,
        message: Outgoing<'_, <Self::Layout as Layout>::Headers>,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// The broker's answer for the oldest message sent and not yet confirmed: `Ok` once the
    /// broker has it durably (as the sink's settings define durably). Cancel-safe: an answer is
    /// taken only once it arrived, so a cut call loses nothing.
    ///
    /// # Errors
    /// The client's error for that message (not delivered).
    fn confirmed(&mut self) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Forgets what is in flight: the relay starts again from its checkpoint (a step was cut,
    /// or it starts from the stored checkpoint). Answers still arriving for forgotten messages
    /// are ignored, and the next message sent does not follow the last one sent (a sink that
    /// chains its messages, as the NATS one does, starts a new chain).
    fn forget(&mut self);

    /// Starts afresh after a failed delivery (a new producer, channel or connection), forgetting
    /// what is in flight.
    ///
    /// # Errors
    /// When the client cannot be made again (the relay retries later).
    fn restart(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;
}
