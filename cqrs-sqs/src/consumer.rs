//! SQS consumers feeding projections and event-started sagas.
//!
//! An [`SqsConsumer`] long-polls one FIFO queue and hands each event to a [`MessageHandler`]
//! through the one [`Consumer`] core every broker shares. A message is deleted only after its
//! effect committed (with its inbox row, for [`Transactional`]) or after its dead letter is in
//! the dead-letter queue; while its handler runs, the visibility timeout of the messages received
//! with it is extended, so no other consumer gets them. A handler failure is retried with the
//! shared backoff, then the message goes to `<queue>-dlq.fifo` with the error and the attempts as
//! message attributes; a malformed message goes there at once. A message that keeps killing its
//! consumer is moved there by the service itself after `maxReceiveCount` receives (the queue's
//! redrive policy), without the error.
//!
//! Order: on a FIFO queue the service hands out a message group (one aggregate) to one consumer
//! at a time, in order, so several consumers on one queue keep each aggregate's order. A
//! standard queue keeps no order and may deliver twice: the inbox drops the second delivery,
//! nothing restores the order.
//!
//! [`Transactional`]: evently_transport::Transactional

use std::future::Future;
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use evently_transport::envelope::header;
use evently_transport::{
    Consumer, ConsumerMetrics, EventSerializer, MessageHandler, TransportError, Verdict,
};

use crate::config::dead_letter_queue;
use crate::queues::{queue_url, sdk, send_copy, text, truncate};
use crate::{BROKER, SqsConfig};

/// How many message attributes SQS takes per message.
const MAX_ATTRIBUTES: usize = 10;

/// Long-polls a queue into a [`MessageHandler`].
pub struct SqsConsumer<H> {
    config: SqsConfig,
    queue: String,
    core: Consumer<H>,
    wait: Duration,
    batch: i32,
    alert: Option<(u64, Duration)>,
}

impl<H> std::fmt::Debug for SqsConsumer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsConsumer")
            .field("queue", &self.queue)
            .field("wait", &self.wait)
            .field("batch", &self.batch)
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl<H: MessageHandler> SqsConsumer<H> {
    /// A consumer of queue `queue` (the relay's [`SqsConfig::queue`], or one a relay of its
    /// own feeds) into `handler`: 10 messages per receive, long polls of 2 s. A FIFO queue,
    /// unless `config` is for standard queues ([`SqsConfig::with_standard_queue`]).
    ///
    /// # Errors
    /// [`TransportError::Config`] when `queue` is not a queue name of that kind.
    pub fn new(
        config: &SqsConfig,
        queue: impl Into<String>,
        handler: H,
    ) -> Result<Self, TransportError> {
        let queue = queue.into();
        crate::config::check_queue_name(&queue, config.is_fifo())?;
        Ok(Self {
            config: config.clone(),
            core: Consumer::new(queue.clone(), handler),
            queue,
            wait: Duration::from_secs(2),
            batch: 10,
            alert: None,
        })
    }

    /// How long a receive waits for messages (long polling), 0 to 20 s.
    #[must_use]
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait.min(Duration::from_secs(20));
        self
    }

    /// How many messages one receive takes, 1 to 10.
    #[must_use]
    pub fn with_batch(mut self, batch: u8) -> Self {
        self.batch = i32::from(batch.clamp(1, 10));
        self
    }

    /// While running, checks the size of the dead-letter queue every `every` and logs a `warn`
    /// event (target `cqrs::metrics`, message `dead letters over threshold`) when it is over
    /// `threshold`.
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

    /// How message bodies become events (the relay's serializer).
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

    /// The queue.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Its dead-letter queue (`<queue>-dlq.fifo`, or `<queue>-dlq` for a standard queue).
    #[must_use]
    pub fn dead_letter_queue(&self) -> String {
        dead_letter_queue(&self.queue)
    }

    /// Declares the queue and its dead-letter queue now (idempotent; with declaration off,
    /// checks that they exist).
    ///
    /// # Errors
    /// [`TransportError::Broker`] when the service cannot be reached,
    /// [`TransportError::Topology`] naming what is missing or refused.
    pub async fn declare(&self) -> Result<(), TransportError> {
        let client = self.config.client().await;
        queue_url(&client, &self.config, &self.queue).await?;
        crate::queues::existing(&client, &self.dead_letter_queue()).await?;
        Ok(())
    }

    /// Consumes until `shutdown` completes: resolves (or declares) the queues, then receives,
    /// handles and deletes. A failing service is logged and tried again with a backoff up to
    /// 10 s (messages not deleted come again after their visibility timeout; the inbox drops
    /// what was applied). Returns the counters.
    ///
    /// # Errors
    /// [`TransportError::Topology`] when declaration is off and a queue is missing.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<ConsumerMetrics, TransportError> {
        let _alerts = self.alert.map(|(threshold, every)| {
            evently_transport::dead_letters::AlertTask::spawn(
                Box::new(crate::SqsDeadLetters::new(
                    &self.config,
                    self.dead_letter_queue(),
                )),
                threshold,
                every,
            )
        });
        let name = self.queue.clone();
        let declares = self.config.declares();
        evently_transport::consume::reconnecting(&mut self, BROKER, &name, declares, shutdown)
            .await?;
        Ok(self.core.metrics())
    }

    /// One session: receive and handle until the service fails.
    async fn consume(&mut self, backoff: &mut evently_core::Backoff) -> Result<(), TransportError> {
        let client = self.config.client().await;
        let url = queue_url(&client, &self.config, &self.queue).await?;
        let dlq = dead_letter_queue(&self.queue);
        let dlq_url = crate::queues::existing(&client, &dlq).await?;
        let wait = i32::try_from(self.wait.as_secs()).unwrap_or(20);
        let visibility = self.config.visibility();
        let visibility_secs = i32::try_from(visibility.as_secs()).unwrap_or(43_200);
        loop {
            let received = client
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(self.batch)
                .wait_time_seconds(wait)
                .visibility_timeout(visibility_secs)
                .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .message_attribute_names("All")
                .send()
                .await
                .map_err(sdk("receive"))?;
            backoff.reset();
            let messages = received.messages.unwrap_or_default();
            for (index, message) in messages.iter().enumerate() {
                self.core.received();
                // Keep this message and the ones received after it invisible while it runs.
                let held: Vec<String> = messages[index..]
                    .iter()
                    .filter_map(|m| m.receipt_handle.clone())
                    .collect();
                let verdict = {
                    let process = self
                        .core
                        .process(message.body.as_deref().map(str::as_bytes));
                    tokio::pin!(process);
                    // Not `interval`: its first tick waits for the timer wheel's next
                    // millisecond, which would cost every message a millisecond.
                    let every = visibility / 3;
                    let mut extend =
                        tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                    loop {
                        tokio::select! {
                            verdict = &mut process => break verdict,
                            _ = extend.tick() => {
                                extend_visibility(&client, &url, &held, visibility_secs).await;
                            }
                        }
                    }
                };
                if let Verdict::DeadLetter { reason, attempts } = verdict {
                    dead_letter(&client, &dlq_url, &self.queue, message, &reason, attempts).await?;
                    self.core.dead_lettered();
                }
                if let Some(receipt) = &message.receipt_handle {
                    client
                        .delete_message()
                        .queue_url(&url)
                        .receipt_handle(receipt)
                        .send()
                        .await
                        .map_err(sdk("delete"))?;
                }
            }
        }
    }
}

/// Extends the visibility of the messages with these receipt handles (best effort: a failure
/// means the message may come again, which the inbox drops).
async fn extend_visibility(client: &Client, url: &str, receipts: &[String], seconds: i32) {
    for receipt in receipts {
        if let Err(error) = client
            .change_message_visibility()
            .queue_url(url)
            .receipt_handle(receipt)
            .visibility_timeout(seconds)
            .send()
            .await
        {
            tracing::warn!(broker = BROKER, error = %aws_sdk_sqs::error::DisplayErrorContext(&error), "cannot extend a message's visibility; it may be handled twice (the inbox drops the second)");
        }
    }
}

/// Sends `message` to the dead-letter queue with why, in its message group. Its deduplication id
/// is new for every dead-lettering (`<message id>-dlq`), so a letter sent back and failing again
/// lands there again.
pub(crate) async fn dead_letter(
    client: &Client,
    dlq_url: &str,
    queue: &str,
    message: &Message,
    reason: &str,
    attempts: u32,
) -> Result<(), TransportError> {
    let mut attributes = message.message_attributes.clone().unwrap_or_default();
    // SQS takes 10 attributes: the dead letter's own four come first, then the event id and the
    // tenant.
    attributes.remove(header::CONTENT_TYPE);
    let own: [(&str, String); 4] = [
        (header::DLQ_ERROR, truncate(reason, 8_000)),
        (header::DLQ_ATTEMPTS, attempts.to_string()),
        (header::DLQ_CONSUMER, queue.to_owned()),
        (header::DLQ_TOPIC, queue.to_owned()),
    ];
    while attributes.len() + own.len() > MAX_ATTRIBUTES {
        let Some(key) = attributes
            .keys()
            .find(|k| k.as_str() != header::EVENT_ID && k.as_str() != header::TENANT)
            .cloned()
        else {
            break;
        };
        attributes.remove(&key);
    }
    for (key, value) in own {
        attributes.insert(key.to_owned(), text(&value)?);
    }
    send_copy(
        client,
        dlq_url,
        message,
        attributes,
        "dlq",
        "send to the dead-letter queue",
    )
    .await
}

impl<H: MessageHandler> evently_transport::consume::Session for SqsConsumer<H> {
    fn session(
        &mut self,
        backoff: &mut evently_core::Backoff,
    ) -> impl Future<Output = Result<(), TransportError>> {
        self.consume(backoff)
    }
}
