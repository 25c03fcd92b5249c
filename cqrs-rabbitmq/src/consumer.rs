//! RabbitMQ consumers feeding projections and event-started sagas.
//!
//! A [`RabbitConsumer`] reads one quorum queue bound to the events exchange and hands each event
//! to a [`MessageHandler`] through the one [`Consumer`] core every broker shares: a message is
//! acknowledged only after its effect committed (with its inbox row, for [`Transactional`]), or
//! after its dead letter was confirmed by the broker. A handler failure is retried with the
//! shared backoff, then the message goes to the queue's dead-letter queue (`<queue>.dlq`, through
//! the `<exchange>.dlx` exchange) with the error and the attempts in headers; a malformed message
//! goes there at once. A message that keeps killing its consumer (redelivered past the queue's
//! `x-delivery-limit`) is dead-lettered by the broker itself, at least once.
//!
//! Order: RabbitMQ delivers a queue's messages in order to one consumer, but with several
//! consumers on one queue (or a requeue) two events of one aggregate can be handled at once or
//! out of order. For ordered consumption run one consumer per queue, or let the broker pick one
//! of several with [`with_single_active_consumer`](RabbitConsumer::with_single_active_consumer)
//! (the others wait as hot standbys).
//!
//! [`Transactional`]: evently_transport::Transactional

use std::future::Future;
use std::time::Duration;

use evently_transport::envelope::header;
use evently_transport::{
    Consumer, ConsumerMetrics, EventSerializer, MessageHandler, TransportError, Verdict,
};
use futures::StreamExt;
use lapin::Confirmation;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};

use crate::topology::{QueueSpec, connect, declare_queue};
use crate::{RabbitConfig, broker};

/// Reads a quorum queue into a [`MessageHandler`].
pub struct RabbitConsumer<H> {
    config: RabbitConfig,
    spec: QueueSpec,
    prefetch: u16,
    core: Consumer<H>,
    /// Warn when the dead letters pass this size, checked this often.
    alert: Option<(u64, Duration)>,
}

impl<H> std::fmt::Debug for RabbitConsumer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitConsumer")
            .field("queue", &self.spec.name)
            .field("bindings", &self.spec.bindings)
            .field("prefetch", &self.prefetch)
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl<H: MessageHandler> RabbitConsumer<H> {
    /// A consumer of queue `queue`, bound to every event (`#`), 32 messages prefetched, a
    /// delivery limit of 10, 5 tries per message with a backoff from 100 ms.
    pub fn new(config: &RabbitConfig, queue: impl Into<String>, handler: H) -> Self {
        let name = queue.into();
        Self {
            config: config.clone(),
            core: Consumer::new(name.clone(), handler),
            alert: None,
            spec: QueueSpec {
                name,
                bindings: vec!["#".to_owned()],
                delivery_limit: 10,
                single_active: false,
            },
            prefetch: 32,
        }
    }

    /// The routing-key patterns the queue is bound with (`order.#`, `#.OrderPlaced`).
    #[must_use]
    pub fn with_bindings<I, S>(mut self, bindings: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.spec.bindings = bindings.into_iter().map(Into::into).collect();
        self
    }

    /// How many unacknowledged messages the broker sends ahead (32 by default; at least 1).
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// How many deliveries of one message the queue allows before the broker dead-letters it
    /// (the queue's `x-delivery-limit`; 10 by default). It catches messages that kill the
    /// consumer before it can answer; failures it sees are dead-lettered by the consumer itself.
    #[must_use]
    pub fn with_delivery_limit(mut self, limit: u32) -> Self {
        self.spec.delivery_limit = limit.max(1);
        self
    }

    /// Whether the queue delivers to one consumer at a time (`x-single-active-consumer`), the
    /// others standing by: ordered consumption with failover.
    #[must_use]
    pub fn with_single_active_consumer(mut self, single: bool) -> Self {
        self.spec.single_active = single;
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

    /// The queue's name.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.spec.name
    }

    /// The queue's dead-letter queue (`<queue>.dlq`).
    #[must_use]
    pub fn dead_letter_queue(&self) -> String {
        self.spec.dead_letter_queue()
    }

    /// Declares the consumer's topology now (idempotent; with declaration off, checks it): the
    /// events exchange, the dead-letter exchange and queue, the queue and its bindings. Do it
    /// before the relay publishes what the queue must see: RabbitMQ drops a message no queue is
    /// bound for.
    ///
    /// # Errors
    /// [`TransportError::Broker`] when the broker cannot be reached,
    /// [`TransportError::Topology`] naming what is missing or refused.
    pub async fn declare(&self) -> Result<(), TransportError> {
        let connection = connect(&self.config).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(broker("open a channel"))?;
        let declared = declare_queue(&channel, &self.config, &self.spec).await;
        let _ = connection.close(200, "declared".into()).await;
        declared
    }

    /// How many messages wait in the queue and in its dead-letter queue.
    ///
    /// # Errors
    /// [`TransportError::Broker`] or [`TransportError::Topology`] (a queue is missing).
    pub async fn depth(&self) -> Result<(u32, u32), TransportError> {
        let connection = connect(&self.config).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(broker("open a channel"))?;
        let count = |queue: String| {
            let channel = channel.clone();
            async move {
                channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map(|q| q.message_count())
                    .map_err(|e| TransportError::Topology {
                        broker: crate::BROKER,
                        destination: format!("queue {queue}"),
                        reason: e.to_string(),
                    })
            }
        };
        let queued = count(self.spec.name.clone()).await?;
        let dead = count(self.spec.dead_letter_queue()).await?;
        let _ = connection.close(200, "counted".into()).await;
        Ok((queued, dead))
    }

    /// Consumes until `shutdown` completes: declares the topology (or checks it), then hands
    /// each message to the handler and acknowledges it after its effect (or its dead letter).
    /// A lost connection or channel is logged and re-established with a backoff up to 10 s
    /// (unacknowledged messages come again; the inbox drops what was applied). Returns the
    /// counters.
    ///
    /// # Errors
    /// [`TransportError::Topology`] when declaration is off and the topology is missing: waiting
    /// does not create it.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<ConsumerMetrics, TransportError> {
        let _alerts = self.alert.map(|(threshold, every)| {
            evently_transport::dead_letters::AlertTask::spawn(
                Box::new(crate::RabbitDeadLetters::new(
                    &self.config,
                    self.spec.name.clone(),
                )),
                threshold,
                every,
            )
        });
        let name = self.spec.name.clone();
        let declares = self.config.declares();
        evently_transport::consume::reconnecting(
            &mut self,
            crate::BROKER,
            &name,
            declares,
            shutdown,
        )
        .await?;
        Ok(self.core.metrics())
    }

    /// One connection's life: consume until the connection or channel fails. Cut at any point
    /// (shutdown), nothing is lost: what was not acknowledged comes again.
    async fn consume(&mut self, backoff: &mut evently_core::Backoff) -> Result<(), TransportError> {
        let connection = connect(&self.config).await?;
        // Every step of the setup is bounded like the acks: a connection cut while it runs may
        // leave lapin never answering, and a session stuck here would hold the queue's messages
        // back for good.
        let channel = answered("open a channel", connection.create_channel()).await?;
        tokio::time::timeout(
            ANSWER_WITHIN,
            declare_queue(&channel, &self.config, &self.spec),
        )
        .await
        .map_err(|_| TransportError::Broker {
            broker: crate::BROKER,
            operation: "declare the queue",
            source: format!(
                "no answer within {} s (the connection is gone)",
                ANSWER_WITHIN.as_secs()
            )
            .into(),
        })??;
        let dead_letters =
            answered("open the dead-letter channel", connection.create_channel()).await?;
        answered(
            "enable publisher confirms",
            dead_letters.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        answered(
            "set the prefetch",
            channel.basic_qos(self.prefetch, BasicQosOptions::default()),
        )
        .await?;
        let mut deliveries = answered(
            "consume",
            channel.basic_consume(
                self.spec.name.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        backoff.reset();
        loop {
            // lapin may never end the delivery stream of a connection that died: its state is
            // watched, and a dead connection ends the session (what was not acknowledged comes
            // again to the next one).
            let next = loop {
                tokio::select! {
                    next = deliveries.next() => break next,
                    () = tokio::time::sleep(crate::sink::WATCH_EVERY) => {
                        if !connection.status().connected() || !channel.status().connected() {
                            return Err(TransportError::Broker {
                                broker: crate::BROKER,
                                operation: "receive",
                                source: "the connection or channel closed".into(),
                            });
                        }
                    }
                }
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => return Err(broker("receive")(error)),
                None => {
                    return Err(TransportError::Broker {
                        broker: crate::BROKER,
                        operation: "receive",
                        source: "the broker cancelled the consumer".into(),
                    });
                }
            };
            self.core.received();
            match self.core.process(Some(&delivery.data)).await {
                Verdict::Done(_) => {}
                Verdict::DeadLetter { reason, attempts } => {
                    self.dead_letter(&dead_letters, &delivery, &reason, attempts)
                        .await?;
                    self.core.dead_lettered();
                }
            }
            // The session ends on no answer (the message comes again; the inbox drops it).
            answered("acknowledge", delivery.ack(BasicAckOptions::default())).await?;
        }
    }

    /// Publishes `delivery` to the dead-letter exchange (routed to `<queue>.dlq`) with why, and
    /// waits for the broker's confirm.
    async fn dead_letter(
        &self,
        channel: &Channel,
        delivery: &Delivery,
        reason: &str,
        attempts: u32,
    ) -> Result<(), TransportError> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let text = |value: &str| AMQPValue::LongString(LongString::from(value.as_bytes()));
        headers.insert(header::DLQ_ERROR.into(), text(reason));
        headers.insert(header::DLQ_ATTEMPTS.into(), text(&attempts.to_string()));
        headers.insert(header::DLQ_CONSUMER.into(), text(&self.spec.name));
        headers.insert(
            header::DLQ_TOPIC.into(),
            text(&delivery.routing_key.to_string()),
        );
        let properties: BasicProperties = delivery.properties.clone().with_headers(headers);
        const OPERATION: &str = "send to the dead-letter exchange";
        let confirm = answered(OPERATION, async {
            channel
                .basic_publish(
                    self.config.dead_letter_exchange().into(),
                    self.spec.name.as_str().into(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    properties.with_delivery_mode(2),
                )
                .await?
                .await
        })
        .await?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            other => Err(TransportError::Broker {
                broker: crate::BROKER,
                operation: "send to the dead-letter exchange",
                source: format!("not confirmed: {other:?}").into(),
            }),
        }
    }
}

/// How long the consumer waits for the broker to answer an ack or a dead letter's publish.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// `request`'s answer, or a broker error naming `operation` when there is none within
/// [`ANSWER_WITHIN`]: lapin may never answer a request sent on a connection that died meanwhile.
async fn answered<T>(
    operation: &'static str,
    request: impl Future<Output = lapin::Result<T>>,
) -> Result<T, TransportError> {
    tokio::time::timeout(ANSWER_WITHIN, request)
        .await
        .map_err(|_| TransportError::Broker {
            broker: crate::BROKER,
            operation,
            source: format!(
                "no answer within {} s (the connection is gone)",
                ANSWER_WITHIN.as_secs()
            )
            .into(),
        })?
        .map_err(broker(operation))
}

impl<H: MessageHandler> evently_transport::consume::Session for RabbitConsumer<H> {
    fn session(
        &mut self,
        backoff: &mut evently_core::Backoff,
    ) -> impl Future<Output = Result<(), TransportError>> {
        self.consume(backoff)
    }
}
