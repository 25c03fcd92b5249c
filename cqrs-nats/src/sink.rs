//! The relay's NATS side: JetStream publishes with the event id as `Nats-Msg-Id`, their acks
//! awaited in order while the next ones are in flight.
//!
//! # Order across reconnects
//!
//! The NATS client reconnects by itself and sends what was queued meanwhile on the new
//! connection, while what was written to the dying one is lost: without a guard, event 149 is
//! lost, 150 is stored, the relay restarts from its checkpoint and sends 149 again, and the
//! stream holds 150 before 149 (a consumer applies them out of order; seen in 1 of 5 CI runs of
//! the server-restart test). So each message but the first of a run carries
//! `Nats-Expected-Last-Msg-Id` = the previous event's id: the server stores it only right after
//! its predecessor, and refuses it otherwise (`wrong last message id`); the relay then starts
//! again from its checkpoint. The server checks duplicates first, so a resend of what is
//! already stored is acknowledged as a duplicate, not refused, and the chain goes on from it.
//! A message from another publisher in the stream costs one restart (the first message of a
//! run carries no expectation), never a stall.

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;

use async_nats::HeaderMap;
use async_nats::jetstream::Context;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::publish::PublishAck;
use evently_core::RawStoredEvent;
use evently_transport::envelope::headers_of;
use evently_transport::{BrokerError, Layout, Outgoing, Sink, TransportError};

use crate::jetstream::{connect, events_stream};
use crate::{BROKER, NatsConfig};

/// The relay publishing to NATS JetStream: `NatsRelay::new(store, NatsSink::new(config), owner)`.
pub type NatsRelay = evently_transport::Relay<NatsSink>;

type PendingAck = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

/// An ack awaited, or already in (taken early to keep the acks in flight under the client's
/// limit).
enum Ack {
    Pending(PendingAck),
    Done(Result<PublishAck, PublishError>),
}

/// At most this many acks are left in flight: the client stops publishing (waits for a permit)
/// at its limit, [`crate::jetstream::MAX_ACKS_IN_FLIGHT`], and the relay has two pages in
/// flight, so older acks are awaited in place before the limit is reached.
const WINDOW: usize = 4_096;

/// Publishes the relay's messages to the events stream: subject
/// `<prefix>.<aggregate type>.<aggregate id>.<event type>`, `Nats-Msg-Id` = the event id (the
/// server drops a resend within its duplicate window), the framework's headers. A message counts
/// as sent once the stream acknowledged it (stored on its replicas).
pub struct NatsSink {
    config: NatsConfig,
    js: Option<Context>,
    /// Acks awaited in order. Behind a mutex only so the sink is `Sync` (the futures are only
    /// `Send`); it is reached through `get_mut`, never locked. The answered ones (taken early)
    /// are always a prefix: acks are taken oldest first.
    pending: std::sync::Mutex<VecDeque<Ack>>,
    /// How many of `pending`, from the front, are answered.
    answered: usize,
    /// Acks of resends the server dropped as duplicates.
    duplicates: u64,
    /// The message id of the last message sent in this run: the next one must be stored right
    /// after it.
    previous: Option<String>,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("config", &self.config)
            .field("connected", &self.js.is_some())
            .field("pending", &self.in_flight())
            .field("duplicates", &self.duplicates)
            .finish_non_exhaustive()
    }
}

impl NatsSink {
    /// A sink to the server of `config` (connected at the first page).
    #[must_use]
    pub fn new(config: NatsConfig) -> Self {
        Self {
            config,
            js: None,
            pending: std::sync::Mutex::default(),
            answered: 0,
            duplicates: 0,
            previous: None,
        }
    }

    /// How many resends the server acknowledged as duplicates (dropped within its window).
    #[must_use]
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// The acks awaited.
    fn acks(&mut self) -> &mut VecDeque<Ack> {
        self.pending
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets every ack.
    fn clear(&mut self) {
        self.acks().clear();
        self.answered = 0;
    }

    fn in_flight(&self) -> usize {
        self.pending.lock().map_or(0, |p| p.len())
    }

    async fn context(&mut self) -> Result<&Context, TransportError> {
        if self.js.is_none() {
            self.clear();
            let js = connect(&self.config).await?;
            events_stream(&js, &self.config).await?;
            self.js = Some(js);
        }
        self.js
            .as_ref()
            .ok_or_else(|| TransportError::config(BROKER, "not connected"))
    }
}

/// The subjects and headers of the relay's messages.
#[derive(Clone)]
pub struct NatsLayout {
    config: NatsConfig,
}

impl std::fmt::Debug for NatsLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsLayout").finish_non_exhaustive()
    }
}

/// What the layout builds for one message.
#[derive(Debug)]
pub struct NatsMessage {
    subject: String,
    headers: HeaderMap,
    /// The event id, also the `Nats-Msg-Id` header.
    id: String,
}

impl Layout for NatsLayout {
    type Headers = NatsMessage;

    fn headers(&self, event: &RawStoredEvent, content_type: &'static str) -> NatsMessage {
        let id = event.event_id.to_string();
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        headers_of(event, content_type, |key, value| {
            headers.insert(key, value);
        });
        NatsMessage {
            subject: self.config.subject(
                &event.stream.aggregate_type,
                event.stream.aggregate_id.as_str(),
                &event.event_type,
            ),
            headers,
            id,
        }
    }
}

impl Sink for NatsSink {
    const BROKER: &'static str = BROKER;
    const DEFAULT_NAME: &'static str = "nats-relay";
    type Layout = NatsLayout;

    fn layout(&self) -> NatsLayout {
        NatsLayout {
            config: self.config.clone(),
        }
    }

    fn destination(&self, aggregate_type: &str) -> String {
        format!(
            "stream {}, subjects {}",
            self.config.stream(),
            self.config.subjects_of(aggregate_type)
        )
    }

    async fn prepare(&mut self, _aggregate_types: &[&str]) -> Result<(), TransportError> {
        self.context().await.map(|_| ())
    }

    async fn send(&mut self, message: Outgoing<'_, NatsMessage>) -> Result<(), BrokerError> {
        // Keep the acks in flight under the client's limit: take the oldest one in place (the
        // answered ones are a prefix, so it is the first after them).
        let answered = self.answered;
        let acks = self.acks();
        if acks.len() - answered >= WINDOW
            && let Some(ack) = acks.get_mut(answered)
        {
            if let Ack::Pending(future) = ack {
                *ack = Ack::Done(future.as_mut().await);
            }
            self.answered += 1;
        }
        let NatsMessage {
            subject,
            mut headers,
            id,
        } = message.headers;
        if let Some(previous) = self.previous.replace(id) {
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_MESSAGE_ID,
                previous.as_str(),
            );
        }
        let js = self.context().await.map_err(Box::new)?;
        let ack = js
            .publish_with_headers(
                subject,
                headers,
                bytes::Bytes::copy_from_slice(message.value),
            )
            .await?;
        self.acks().push_back(Ack::Pending(ack.into_future()));
        Ok(())
    }

    async fn confirmed(&mut self) -> Result<(), BrokerError> {
        let pending = self.acks();
        let Some(front) = pending.front_mut() else {
            return Err("no message is waiting for an ack".into());
        };
        // Awaited in place, and taken off the queue only once answered: cancel-safe.
        let answer = match front {
            Ack::Pending(future) => future.as_mut().await,
            Ack::Done(answer) => std::mem::replace(
                answer,
                Err(PublishError::new(
                    async_nats::jetstream::context::PublishErrorKind::Other,
                )),
            ),
        };
        if matches!(pending.pop_front(), Some(Ack::Done(_))) {
            self.answered -= 1;
        }
        let ack = answer.map_err(|error| -> BrokerError {
            if error.kind() == async_nats::jetstream::context::PublishErrorKind::WrongLastMessageId
            {
                "refused: the stream's last message is not the event before this one (a message \
                 sent before it was lost, e.g. in a reconnect); sending again from the checkpoint"
                    .into()
            } else {
                Box::new(error)
            }
        })?;
        if ack.duplicate {
            self.duplicates += 1;
        }
        Ok(())
    }

    fn forget(&mut self) {
        self.clear();
        self.previous = None;
    }

    async fn restart(&mut self) -> Result<(), TransportError> {
        self.clear();
        self.previous = None;
        self.js = None;
        Ok(())
    }
}
