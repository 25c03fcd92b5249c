//! The dead letters a broker holds for a consumer (a Kafka DLQ topic, a RabbitMQ dead-letter
//! queue, a NATS dead-letter stream), behind one port for operators: count, list, retry one,
//! retry all, purge. The `cqrs dlq` command drives it for every broker.

use crate::TransportError;
use crate::envelope::header;

/// A message in a consumer's dead-letter place, as the consumer left it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerDeadLetter {
    /// Its id in the dead-letter place: what [`DeadLetterQueue::retry`] takes (RabbitMQ: the
    /// message id, which is the event id; NATS: the dead-letter stream's sequence number).
    pub id: String,
    /// The event's id (`cqrs-event-id`), when the message is one of ours.
    pub event_id: Option<String>,
    /// The event type (`cqrs-event-type`).
    pub event_type: Option<String>,
    /// The aggregate type (`cqrs-aggregate-type`).
    pub aggregate_type: Option<String>,
    /// Why the consumer gave up (`cqrs-dlq-error`; the broker's reason when the broker
    /// dead-lettered it itself).
    pub error: Option<String>,
    /// How many times the handler was tried (`cqrs-dlq-attempts`).
    pub attempts: Option<String>,
    /// Where it was consumed from (`cqrs-dlq-topic`: a topic, routing key or subject).
    pub source: Option<String>,
}

impl BrokerDeadLetter {
    /// A dead letter with id `id`, its fields read from its headers by `get`.
    pub fn from_headers(id: impl Into<String>, get: impl Fn(&str) -> Option<String>) -> Self {
        Self {
            id: id.into(),
            event_id: get(header::EVENT_ID),
            event_type: get(header::EVENT_TYPE),
            aggregate_type: get(header::AGGREGATE_TYPE),
            error: get(header::DLQ_ERROR),
            attempts: get(header::DLQ_ATTEMPTS),
            source: get(header::DLQ_TOPIC),
        }
    }
}

impl std::fmt::Display for BrokerDeadLetter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "?".to_owned());
        write!(
            f,
            "#{} {} {} event {} from {} attempts {}: {}",
            self.id,
            or(&self.aggregate_type),
            or(&self.event_type),
            or(&self.event_id),
            or(&self.source),
            or(&self.attempts),
            or(&self.error)
        )
    }
}

/// A consumer's dead letters at a broker.
#[async_trait::async_trait]
pub trait DeadLetterQueue: Send + Sync {
    /// Where they are (for messages and logs).
    fn describe(&self) -> String;

    /// How many there are.
    ///
    /// # Errors
    /// [`TransportError`] when the broker cannot be reached or the place does not exist.
    async fn count(&self) -> Result<u64, TransportError>;

    /// Up to `limit` of them, oldest first, left in place.
    ///
    /// # Errors
    /// As [`count`](Self::count).
    async fn list(&self, limit: usize) -> Result<Vec<BrokerDeadLetter>, TransportError>;

    /// Sends dead letter `id` back to where the consumer reads it (confirmed by the broker),
    /// then removes it. `false` when there is no such dead letter.
    ///
    /// # Errors
    /// As [`count`](Self::count); the dead letter stays when it could not be sent back.
    async fn retry(&self, id: &str) -> Result<bool, TransportError>;

    /// Sends every dead letter there is now back, as [`retry`](Self::retry) does. Returns how
    /// many.
    ///
    /// # Errors
    /// As [`retry`](Self::retry); those sent back before the failure stay sent.
    async fn retry_all(&self) -> Result<u64, TransportError>;

    /// Drops them all. Returns how many.
    ///
    /// # Errors
    /// As [`count`](Self::count).
    async fn purge(&self) -> Result<u64, TransportError>;
}

/// Logs a `warn` event (target [`METRICS_TARGET`](crate::METRICS_TARGET), message `dead letters
/// over threshold`, fields `place`, `count`, `threshold`) when `queue` holds more than
/// `threshold` dead letters, and returns the count: call it periodically (the consumers' `run`
/// does with `with_dead_letter_alert`).
///
/// # Errors
/// As [`DeadLetterQueue::count`].
pub async fn alert_over(
    queue: &(dyn DeadLetterQueue + '_),
    threshold: u64,
) -> Result<u64, TransportError> {
    let count = queue.count().await?;
    if count > threshold {
        tracing::warn!(
            target: crate::METRICS_TARGET,
            place = %queue.describe(), count, threshold, "dead letters over threshold"
        );
    } else {
        tracing::info!(
            target: crate::METRICS_TARGET,
            place = %queue.describe(), count, "dead letters"
        );
    }
    Ok(count)
}

/// Checks `queue` every `every` with [`alert_over`] until dropped (a consumer's `run` holds one
/// when an alert size is set).
#[derive(Debug)]
pub struct AlertTask(tokio::task::JoinHandle<()>);

impl AlertTask {
    /// Starts checking `queue` against `threshold` every `every` (at least a second).
    #[must_use]
    pub fn spawn(
        queue: Box<dyn DeadLetterQueue>,
        threshold: u64,
        every: std::time::Duration,
    ) -> Self {
        use tracing::instrument::WithSubscriber;
        let every = every.max(std::time::Duration::from_secs(1));
        // On the caller's subscriber, as the consumer's other reports are.
        Self(tokio::spawn(
            async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(error) = alert_over(&*queue, threshold).await {
                        tracing::warn!(
                            target: crate::METRICS_TARGET,
                            place = %queue.describe(), %error, "dead letters: unknown"
                        );
                    }
                }
            }
            .with_current_subscriber(),
        ))
    }
}

impl Drop for AlertTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}
