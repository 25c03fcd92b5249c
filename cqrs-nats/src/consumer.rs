//! Durable JetStream consumers feeding projections and event-started sagas.
//!
//! A [`NatsConsumer`] pulls from a durable consumer on the events stream (explicit acks,
//! optionally filtered to one aggregate type's subjects) and hands each event to a
//! [`MessageHandler`] through the one [`Consumer`] core every broker shares. A message is
//! acknowledged only after its effect committed (with its inbox row, for
//! [`Transactional`](evently_transport::Transactional)), or after its dead letter was stored in the
//! dead-letter stream. While a handler runs, the message's ack deadline is extended (in-progress
//! acks every third of `ack_wait`), so a slow handler is not redelivered to another consumer. A
//! message delivered `max_deliver` times without an answer (it keeps killing its consumer) is
//! dead-lettered at its last delivery, not handled again.
//!
//! # Order after lost deliveries
//!
//! The server counts a message as delivered when it sends it, and sends it again only after
//! `ack_wait`. When deliveries are lost in transit (a cut connection; messages the client had
//! pulled ahead when a session ended), the next pull gets newer messages at once and the lost ones
//! later: pulling on would apply an aggregate's later events before its earlier ones (seen in
//! `tests/network_cut.rs`: event 73 applied after 300). Waiting `ack_wait` out is not enough
//! either (tried: the server moves expired deliveries to its redelivery queue on its own timer,
//! and pull requests of before go on filling meanwhile). Every delivery carries the consumer's
//! delivery sequence, one more than the one before, so a consumer that is the only one pulling
//! from its durable sees the gap and **rewinds**: it deletes its durable and creates it again
//! starting right after the last message it answered (the server's ack floor, or the last
//! message this process acknowledged, whichever is later), so that everything after it comes
//! again, in stream order; the inbox drops what had been applied. A create that fails is tried
//! again from the same place by the next session; a process that dies between the delete and
//! the create starts its durable from the stream's first message (the inbox drops what was
//! applied). With declaration off the durable is the operators': the consumer stops
//! with a [`TransportError::Topology`] naming the gap instead of rewinding it. Several processes
//! on one durable each see gaps all the time (deliveries are spread among them, and so is each
//! aggregate's order): declare that with [`NatsConsumer::with_shared_durable`], which turns the
//! check off.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{AckKind, Context, Message};
use evently_core::projection::Projection;
use evently_transport::envelope::header;
use evently_transport::{
    Consumer, ConsumerMetrics, EventSerializer, MessageHandler, TransportError, Verdict,
};
use futures::StreamExt;

use crate::jetstream::{connect, dead_letter_stream, events_stream};
use crate::{BROKER, NatsConfig, broker};

/// Reads a durable JetStream consumer into a [`MessageHandler`].
pub struct NatsConsumer<H> {
    config: NatsConfig,
    durable: String,
    filter: Option<String>,
    max_deliver: i64,
    ack_wait: Duration,
    core: Consumer<H>,
    /// Warn when the dead letters pass this size, checked this often.
    alert: Option<(u64, Duration)>,
    /// Whether other processes pull from the same durable (no gap check).
    shared: bool,
    /// The delivery sequence of the last message received.
    last_delivery: Option<u64>,
    /// The stream sequence of the last message answered (acknowledged or dead-lettered).
    last_answered: Option<u64>,
    /// Where the durable starts when this consumer creates it: after a rewind whose create did
    /// not go through, right after the last message answered (else the stream's first).
    resume_from: Option<u64>,
}

impl<H> std::fmt::Debug for NatsConsumer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConsumer")
            .field("durable", &self.durable)
            .field("filter", &self.filter)
            .field("max_deliver", &self.max_deliver)
            .field("ack_wait", &self.ack_wait)
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl<H: MessageHandler> NatsConsumer<H> {
    /// A durable consumer named `durable` of every event in the stream, `max_deliver` 10, a
    /// 30 s ack wait, 5 tries per message with a backoff from 100 ms.
    ///
    /// # Errors
    /// [`TransportError::Config`] when `durable` is not a consumer name (empty, or with `.`,
    /// `*`, `>` or whitespace).
    pub fn new(
        config: &NatsConfig,
        durable: impl Into<String>,
        handler: H,
    ) -> Result<Self, TransportError> {
        let durable = durable.into();
        if durable.is_empty()
            || durable
                .chars()
                .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace())
        {
            return Err(TransportError::config(
                BROKER,
                format_args!("`{durable}` is not a consumer name (no `.`, `*`, `>` or whitespace)"),
            ));
        }
        Ok(Self {
            config: config.clone(),
            core: Consumer::new(durable.clone(), handler),
            alert: None,
            durable,
            filter: None,
            max_deliver: 10,
            ack_wait: Duration::from_secs(30),
            shared: false,
            last_delivery: None,
            last_answered: None,
            resume_from: None,
        })
    }

    /// Only the events of `aggregate_type` (filter subject `<prefix>.<aggregate type>.>`).
    #[must_use]
    pub fn with_aggregate_type(mut self, aggregate_type: &str) -> Self {
        self.filter = Some(self.config.subjects_of(aggregate_type));
        self
    }

    /// The subjects of projection `P`'s subscription table: its aggregate type's subjects when
    /// it subscribes to one aggregate type's events, else the whole stream (a server before 2.10
    /// takes one filter subject per consumer; the handler skips what it does not listen to).
    #[must_use]
    pub fn with_subscriptions_of<P: Projection>(self) -> Self {
        let mut types: Vec<&str> = P::SUBSCRIPTIONS
            .iter()
            .filter_map(|s| s.aggregate_type)
            .collect();
        types.sort_unstable();
        types.dedup();
        let all_typed = P::SUBSCRIPTIONS.iter().all(|s| s.aggregate_type.is_some());
        match types.as_slice() {
            [only] if all_typed => self.with_aggregate_type(only),
            _ => self,
        }
    }

    /// Deliveries of one message before it is dead-lettered without being handled again (10 by
    /// default, at least 2): catches messages that kill the consumer before it can answer.
    #[must_use]
    pub fn with_max_deliver(mut self, max: u32) -> Self {
        self.max_deliver = i64::from(max.max(2));
        self
    }

    /// How long the server waits for an answer before redelivering (30 s by default); a running
    /// handler extends it every third of it.
    #[must_use]
    pub fn with_ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait.max(Duration::from_millis(100));
        self
    }

    /// Several processes pull from this durable (to spread the load): deliveries are shared
    /// among them, so a gap in the delivery sequence is normal and not waited for, and an
    /// aggregate's events may be applied out of order across them. Off by default: one process
    /// per durable, each aggregate's events applied in order.
    #[must_use]
    pub fn with_shared_durable(mut self, shared: bool) -> Self {
        self.shared = shared;
        self
    }

    /// While running, checks the size of this consumer's dead letters every `every` and logs a
    /// `warn` event (target `cqrs::metrics`, message `dead letters over threshold`) when it is
    /// over `threshold` (an `info` event with the count otherwise).
    #[must_use]
    pub fn with_dead_letter_alert(mut self, threshold: u64, every: Duration) -> Self {
        self.alert = Some((threshold, every));
        self
    }

    /// How often a failing handler is tried (at least once) and the first backoff.
    #[must_use]
    pub fn with_retries(mut self, attempts: u32, backoff: Duration) -> Self {
        self.core.set_retries(attempts, backoff);
        self
    }

    /// How message values become events (the relay's serializer).
    #[must_use]
    pub fn with_serializer(mut self, serializer: impl EventSerializer) -> Self {
        self.core.set_serializer(serializer);
        self
    }

    /// The counters.
    #[must_use]
    pub fn metrics(&self) -> ConsumerMetrics {
        self.core.metrics()
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        self.core.handler()
    }

    /// The dead-letter subject of this consumer.
    #[must_use]
    pub fn dead_letter_subject(&self) -> String {
        self.config.dead_letter_subject(&self.durable)
    }

    /// Creates (or, with declaration off, checks) the events stream, the dead-letter stream and
    /// the durable consumer now. Idempotent.
    ///
    /// # Errors
    /// [`TransportError::Broker`] when the server cannot be reached,
    /// [`TransportError::Topology`] naming what is missing or refused.
    pub async fn declare(&self) -> Result<(), TransportError> {
        let js = connect(&self.config).await?;
        self.consumer(&js).await.map(|_| ())
    }

    async fn consumer(
        &self,
        js: &Context,
    ) -> Result<async_nats::jetstream::consumer::Consumer<pull::Config>, TransportError> {
        let stream = events_stream(js, &self.config).await?;
        dead_letter_stream(js, &self.config).await?;
        let config = self.durable_config(match self.resume_from {
            Some(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
            None => DeliverPolicy::All,
        });
        let topology = |reason: String| TransportError::Topology {
            broker: BROKER,
            destination: format!("consumer {} on {}", self.durable, self.config.stream()),
            reason,
        };
        if self.config.declares() {
            stream
                .get_or_create_consumer(&self.durable, config)
                .await
                .map_err(|e| topology(e.to_string()))
        } else {
            stream
                .get_consumer(&self.durable)
                .await
                .map_err(|e| topology(e.to_string()))
        }
    }

    /// The durable's configuration, delivering from `from`.
    fn durable_config(&self, from: DeliverPolicy) -> pull::Config {
        pull::Config {
            durable_name: Some(self.durable.clone()),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: from,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            filter_subject: self
                .filter
                .clone()
                .unwrap_or_else(|| format!("{}.>", self.config.prefix())),
            ..pull::Config::default()
        }
    }

    /// Deliveries were lost: deletes the durable and creates it again from right after the last
    /// message answered, so that everything after it comes again in stream order.
    async fn rewind(&mut self, js: &Context, lost: u64) -> Result<(), TransportError> {
        let topology = |reason: String| TransportError::Topology {
            broker: BROKER,
            destination: format!("consumer {} on {}", self.durable, self.config.stream()),
            reason,
        };
        if !self.config.declares() {
            return Err(topology(format!(
                "{lost} deliveries were lost in transit; with declaration off the consumer does \
                 not rewind the operators' durable, and going on would apply newer events first"
            )));
        }
        let stream = events_stream(js, &self.config).await?;
        let floor = stream
            .consumer_info(&self.durable)
            .await
            .map_err(broker("read the consumer's position"))?
            .ack_floor
            .stream_sequence;
        let from = floor.max(self.last_answered.unwrap_or(0)) + 1;
        tracing::warn!(
            consumer = %self.durable, lost, from,
            "deliveries lost in transit; starting the durable again from the last message answered"
        );
        // Kept until the durable is created again, also by a later session if this one fails.
        self.resume_from = Some(from);
        self.last_delivery = None;
        stream
            .delete_consumer(&self.durable)
            .await
            .map_err(broker("delete the consumer to rewind it"))?;
        self.consumer(js).await?;
        self.resume_from = None;
        Ok(())
    }

    /// Consumes until `shutdown` completes. A lost connection is logged and re-established with
    /// a backoff up to 10 s (unacknowledged messages come again; the inbox drops what was
    /// applied). Returns the counters.
    ///
    /// # Errors
    /// [`TransportError::Topology`] when declaration is off and a stream or the consumer is
    /// missing: waiting does not create it.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<ConsumerMetrics, TransportError> {
        let _alerts = self.alert.map(|(threshold, every)| {
            evently_transport::dead_letters::AlertTask::spawn(
                Box::new(crate::NatsDeadLetters::new(
                    &self.config,
                    self.durable.clone(),
                )),
                threshold,
                every,
            )
        });
        let name = self.durable.clone();
        let declares = self.config.declares();
        evently_transport::consume::reconnecting(&mut self, BROKER, &name, declares, shutdown)
            .await?;
        Ok(self.core.metrics())
    }

    async fn consume(&mut self, backoff: &mut evently_core::Backoff) -> Result<(), TransportError> {
        let js = connect(&self.config).await?;
        loop {
            let consumer = self.consumer(&js).await?;
            self.resume_from = None;
            let mut messages = consumer.messages().await.map_err(broker("pull"))?;
            backoff.reset();
            let lost = loop {
                let message = match messages.next().await {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => return Err(broker("receive")(error)),
                    None => {
                        return Err(TransportError::Broker {
                            broker: BROKER,
                            operation: "receive",
                            source: "the message stream ended".into(),
                        });
                    }
                };
                if let Some(lost) = self.lost_before(&message) {
                    break lost;
                }
                self.handle(&js, &message).await?;
                if let Ok(info) = message.info() {
                    self.last_answered = self.last_answered.max(Some(info.stream_sequence));
                }
            };
            // Deliveries were lost: stop pulling (what was pulled ahead is dropped, unanswered)
            // and start again right after the last message answered.
            drop(messages);
            self.rewind(&js, lost).await?;
        }
    }

    /// How many deliveries before `message` were lost (its delivery sequence is more than one
    /// past the last one received), when some were; `message` is then left unanswered.
    fn lost_before(&mut self, message: &Message) -> Option<u64> {
        let info = message.info().ok()?;
        let delivery = info.consumer_sequence;
        let last = self.last_delivery.replace(delivery);
        match last {
            Some(last) if !self.shared && delivery > last + 1 => Some(delivery - last - 1),
            _ => None,
        }
    }

    /// Handles one message and answers it: ack after the effect, term after the dead letter.
    async fn handle(&mut self, js: &Context, message: &Message) -> Result<(), TransportError> {
        self.core.received();
        let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
        let verdict = if delivered >= self.max_deliver {
            Verdict::DeadLetter {
                reason: format!(
                    "delivered {delivered} times without an answer (the consumer crashed or \
                     timed out handling it)"
                ),
                attempts: 0,
            }
        } else {
            let every = self.ack_wait / 3;
            let keepalive = async {
                loop {
                    tokio::time::sleep(every).await;
                    // A lost progress ack only risks a redelivery, which the inbox absorbs.
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            };
            tokio::select! {
                verdict = self.core.process(Some(&message.payload)) => verdict,
                () = keepalive => unreachable_verdict(),
            }
        };
        match verdict {
            Verdict::Done(_) => message.ack().await.map_err(|e| TransportError::Broker {
                broker: BROKER,
                operation: "acknowledge",
                source: e,
            }),
            Verdict::DeadLetter { reason, attempts } => {
                self.dead_letter(js, message, &reason, attempts).await?;
                self.core.dead_lettered();
                message
                    .ack_with(AckKind::Term)
                    .await
                    .map_err(|e| TransportError::Broker {
                        broker: BROKER,
                        operation: "terminate a dead-lettered message",
                        source: e,
                    })
            }
        }
    }

    /// Stores `message` in the dead-letter stream with why, waiting for the stream's ack.
    async fn dead_letter(
        &self,
        js: &Context,
        message: &Message,
        reason: &str,
        attempts: u32,
    ) -> Result<(), TransportError> {
        // The event's headers without the server's expectations of the events stream (the
        // relay's `Nats-Expected-Last-Msg-Id` would be refused by the dead-letter stream).
        let mut headers = async_nats::HeaderMap::new();
        if let Some(original) = &message.headers {
            for (name, values) in original.iter() {
                let key: &str = name.as_ref();
                if key.starts_with("Nats-") {
                    continue;
                }
                for value in values {
                    headers.append(key, value.as_str());
                }
            }
            // The dead letter keeps the message id of the event for the stream's dedup,
            // suffixed so the dead-letter stream holds one per consumer.
            if let Some(id) = original.get(async_nats::header::NATS_MESSAGE_ID) {
                headers.insert(
                    async_nats::header::NATS_MESSAGE_ID,
                    format!("{}-dlq-{}", id.as_str(), self.durable).as_str(),
                );
            }
        }
        headers.insert(header::DLQ_ERROR, reason);
        headers.insert(header::DLQ_ATTEMPTS, attempts.to_string().as_str());
        headers.insert(header::DLQ_CONSUMER, self.durable.as_str());
        headers.insert(header::DLQ_TOPIC, message.subject.as_str());
        if let Ok(info) = message.info() {
            headers.insert(
                header::DLQ_OFFSET,
                info.stream_sequence.to_string().as_str(),
            );
        }
        js.publish_with_headers(self.dead_letter_subject(), headers, message.payload.clone())
            .await
            .map_err(broker("send to the dead-letter stream"))?
            .await
            .map_err(broker("send to the dead-letter stream"))?;
        Ok(())
    }
}

/// The keepalive loop never ends; this is its (unreachable) value.
fn unreachable_verdict() -> Verdict {
    Verdict::DeadLetter {
        reason: "the ack keepalive stopped".to_owned(),
        attempts: 0,
    }
}

impl<H: MessageHandler> evently_transport::consume::Session for NatsConsumer<H> {
    fn session(
        &mut self,
        backoff: &mut evently_core::Backoff,
    ) -> impl Future<Output = Result<(), TransportError>> {
        self.consume(backoff)
    }
}
