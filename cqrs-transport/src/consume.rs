//! What every broker's consumer does with a message, written once: decode the envelope, hand
//! the event to the handler, retry a failing handler with the shared backoff, wait out an outage
//! of the handler's database without spending the message's tries, and give the verdict: done
//! (acknowledge it) or dead-letter it (with why and after how many tries).
//!
//! The broker adapters only receive, acknowledge and dead-letter: a message is acknowledged
//! only after its effect committed (or after its dead letter is safely at the broker), so a
//! crash at any point redelivers it and the handler's inbox turns the redelivery into a no-op.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use tracing::Instrument as _;

use evently_core::StoredEvent;
use evently_core::projection::{FailureMode, FailurePolicy};

use crate::envelope::MalformedMessage;
use crate::handler::{HandleError, Handled, MessageHandler};
use crate::{EventSerializer, JsonEnvelope, TransportError};

/// What a consumer does with a message once [`Consumer::process`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Applied, a duplicate, or not for this handler: acknowledge it.
    Done(Handled),
    /// Send it to the dead-letter place with `reason`, then acknowledge it.
    DeadLetter {
        /// Why: the handler's last error, or what is malformed.
        reason: String,
        /// How many times the handler was tried (0 for a malformed message).
        attempts: u32,
    },
}

/// A consumer's counters since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerMetrics {
    /// Messages received.
    pub received: u64,
    /// Events applied.
    pub applied: u64,
    /// Redeliveries the inbox turned into no-ops.
    pub duplicates: u64,
    /// Events the handler does not listen to.
    pub skipped: u64,
    /// Handler attempts that failed and were tried again.
    pub retries: u64,
    /// Messages sent to a dead-letter place.
    pub dead_lettered: u64,
}

/// The broker-independent part of a consumer: a handler, how message values become events, and
/// the retry policy.
pub struct Consumer<H> {
    handler: H,
    name: String,
    serializer: Arc<dyn EventSerializer>,
    attempts: u32,
    backoff: Duration,
    metrics: evently_core::telemetry::MetricsHandle<ConsumerMetrics>,
}

impl<H> std::fmt::Debug for Consumer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.name)
            .field("attempts", &self.attempts)
            .field("backoff", &self.backoff)
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

impl<H: MessageHandler> Consumer<H> {
    /// A consumer named `name` (its consumer group, queue or durable name, for logs) feeding
    /// `handler`: JSON envelopes, 5 tries per message with a backoff from 100 ms (doubling, with
    /// jitter, at most 10 s).
    pub fn new(name: impl Into<String>, mut handler: H) -> Self {
        handler.set_retries(5, Duration::from_millis(100));
        Self {
            handler,
            name: name.into(),
            serializer: Arc::new(JsonEnvelope),
            attempts: 5,
            backoff: Duration::from_millis(100),
            metrics: evently_core::telemetry::MetricsHandle::default(),
        }
    }

    /// How often a failing handler is tried (at least once) and the first backoff.
    pub fn set_retries(&mut self, attempts: u32, backoff: Duration) {
        self.attempts = attempts.max(1);
        self.backoff = backoff;
        self.handler.set_retries(self.attempts, backoff);
    }

    /// How message values become events (the relay's serializer).
    pub fn set_serializer(&mut self, serializer: impl EventSerializer) {
        self.serializer = Arc::new(serializer);
    }

    /// How many times a failing handler is tried.
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The consumer's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The counters.
    #[must_use]
    pub fn metrics(&self) -> ConsumerMetrics {
        self.metrics.get()
    }

    /// The counters, readable while the consumer runs: take it before calling `run`.
    #[must_use]
    pub fn metrics_handle(&self) -> evently_core::telemetry::MetricsHandle<ConsumerMetrics> {
        self.metrics.clone()
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Counts a message received (call once per delivery, redeliveries included).
    pub fn received(&mut self) {
        self.metrics.update(|m| m.received += 1);
    }

    /// Counts a message whose dead letter the broker now has.
    pub fn dead_lettered(&mut self) {
        self.metrics.update(|m| m.dead_lettered += 1);
    }

    /// The event in a message value (`None`: the message has no value).
    ///
    /// # Errors
    /// [`MalformedMessage`] saying what is wrong with it.
    pub fn decode(&self, value: Option<&[u8]>) -> Result<StoredEvent, MalformedMessage> {
        match value {
            None | Some([]) => Err(MalformedMessage::Empty),
            Some(value) => self.serializer.deserialize(value),
        }
    }

    /// Handles the message with value `value` until there is a verdict. A handler failure is
    /// retried with the backoff; a malformed message or one that failed every try is to be
    /// dead-lettered. While the handler's database is unavailable it waits and tries again
    /// without end (an outage is not the message's fault), so nothing after it is handled first.
    pub async fn process(&mut self, value: Option<&[u8]>) -> Verdict {
        let event = match self.decode(value) {
            Ok(event) => event,
            Err(malformed) => {
                tracing::warn!(consumer = %self.name, error = %malformed, "malformed message");
                evently_core::telemetry::consumed(&self.name, "dead_lettered");
                return Verdict::DeadLetter {
                    reason: malformed.to_string(),
                    attempts: 0,
                };
            }
        };
        self.process_event(&event).await
    }

    /// [`process`](Self::process) for a decoded event: in a `cqrs.consume` span that continues
    /// the event's trace ([`evently_core::trace`]), so what the handler does (a command it sends)
    /// joins the trace of the command that recorded the event.
    pub async fn process_event(&mut self, event: &StoredEvent) -> Verdict {
        let span = tracing::info_span!(
            "cqrs.consume",
            consumer = %self.name,
            event_type = %event.event_type,
            stream = %event.stream,
            version = event.version,
            trace_id = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        // Each message is handled in its own event's trace (or in none).
        let trace = evently_core::trace::TraceContext::of(&event.metadata);
        if let Some(trace) = &trace {
            evently_core::trace::follow(&span, trace);
        }
        let work = self.handle_event(event).instrument(span.clone());
        let verdict = evently_core::trace::scope_if_needed(trace, work).await;
        let outcome = match &verdict {
            Verdict::Done(Handled::Applied) => "applied",
            Verdict::Done(Handled::Duplicate) => "duplicate",
            Verdict::Done(Handled::Skipped) => "skipped",
            Verdict::DeadLetter { .. } => "dead_lettered",
        };
        span.record("outcome", outcome);
        evently_core::telemetry::consumed(&self.name, outcome);
        verdict
    }

    async fn handle_event(&mut self, event: &StoredEvent) -> Verdict {
        // The same retry policy as every projection runtime: tries, backoff with jitter, give up.
        let mut retries = FailurePolicy {
            attempts: self.attempts,
            backoff: self.backoff,
            max_backoff: Duration::from_secs(10),
            mode: FailureMode::Skip,
        }
        .retries();
        let mut outage = evently_core::Backoff::new(self.backoff, Duration::from_secs(10));
        loop {
            // A panicking handler is a failure of this message (retried, then dead-lettered),
            // never the consumer's end.
            let handled = std::panic::AssertUnwindSafe(self.handler.handle(event))
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| {
                    Err(HandleError::Failed(
                        format!(
                            "the handler panicked: {}",
                            evently_core::panic_message(&*panic)
                        )
                        .into(),
                    ))
                });
            let error = match handled {
                Ok(handled) => {
                    match handled {
                        Handled::Applied => self.metrics.update(|m| m.applied += 1),
                        Handled::Duplicate => self.metrics.update(|m| m.duplicates += 1),
                        Handled::Skipped => self.metrics.update(|m| m.skipped += 1),
                    }
                    return Verdict::Done(handled);
                }
                Err(error) => error,
            };
            if let HandleError::Unavailable(_) = &error {
                let reason = error.report();
                // Not the message's fault: wait and try it again, without spending its tries.
                let wait = outage.next_delay();
                tracing::warn!(consumer = %self.name, stream = %event.stream, version = event.version, %reason, retry_in = ?wait, "the handler's database is unavailable; waiting");
                self.metrics.update(|m| m.retries += 1);
                evently_core::telemetry::consumer_retry(&self.name);
                tokio::time::sleep(wait).await;
                continue;
            }
            outage.reset();
            if let HandleError::Parked { reason, attempts } = error {
                // The handler retried and parked it by itself (a projection on the engine).
                self.metrics
                    .update(|m| m.retries += u64::from(attempts.saturating_sub(1)));
                tracing::warn!(
                    consumer = %self.name, stream = %event.stream, version = event.version,
                    attempts, %reason, "dead-lettering the message"
                );
                return Verdict::DeadLetter { reason, attempts };
            }
            let malformed = matches!(error, HandleError::Malformed(_));
            if let Some(failure) = retries.failed_with(&error.report(), malformed).await {
                tracing::warn!(
                    consumer = %self.name, stream = %event.stream, version = event.version,
                    attempts = failure.attempts, %error, "dead-lettering the message"
                );
                return Verdict::DeadLetter {
                    reason: failure.error,
                    attempts: failure.attempts,
                };
            }
            self.metrics.update(|m| m.retries += 1);
            evently_core::telemetry::consumer_retry(&self.name);
        }
    }
}

/// One connection's life of a broker consumer: receive and handle until the connection fails.
/// [`reconnecting`] runs sessions one after another.
pub trait Session {
    /// Connects and consumes until the connection or channel fails (an `Err`) or there is
    /// nothing more to do (`Ok`). `backoff` is reset once connected.
    fn session(
        &mut self,
        backoff: &mut evently_core::Backoff,
    ) -> impl Future<Output = Result<(), TransportError>>;
}

/// Runs `consumer`'s sessions until `shutdown` completes: a session that ends in an error is
/// logged and started again after a backoff up to 10 s (unacknowledged messages come again; the
/// inbox drops what was applied). With `declares` off, a [`TransportError::Topology`] is
/// returned instead: waiting does not create what operators must.
///
/// # Errors
/// [`TransportError::Topology`] when the topology is missing and `declares` is off.
pub async fn reconnecting<C: Session>(
    consumer: &mut C,
    broker: &'static str,
    name: &str,
    declares: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TransportError> {
    tokio::pin!(shutdown);
    let mut backoff =
        evently_core::Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        let session = tokio::select! {
            biased;
            () = &mut shutdown => return Ok(()),
            outcome = consumer.session(&mut backoff) => outcome,
        };
        match session {
            Ok(()) => return Ok(()),
            Err(error @ TransportError::Topology { .. }) if !declares => return Err(error),
            Err(error) => {
                let wait = backoff.next_delay();
                tracing::warn!(broker, consumer = %name, %error, retry_in = ?wait, "consumer session ended; reconnecting");
                tokio::select! {
                    biased;
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evently_core::{EventId, Metadata, StreamId};

    /// Panics on version 2.
    struct Panicky;

    #[async_trait::async_trait]
    impl MessageHandler for Panicky {
        fn name(&self) -> &str {
            "panicky"
        }

        async fn handle(&mut self, event: &StoredEvent) -> Result<Handled, HandleError> {
            assert!(event.version != 2, "bad event {}", event.version);
            Ok(Handled::Applied)
        }
    }

    fn event(version: u64) -> StoredEvent {
        StoredEvent {
            event_id: EventId::new(),
            stream: StreamId::new("note", "n-1"),
            version,
            event_type: "Noted".to_owned(),
            schema_version: 1,
            payload: serde_json::json!({}),
            metadata: Metadata::default(),
            recorded_at: chrono::Utc::now(),
            checkpoint: evently_core::Checkpoint::START,
        }
    }

    #[tokio::test]
    async fn a_panicking_handler_dead_letters_the_message_and_the_consumer_goes_on() {
        let mut consumer = Consumer::new("c", Panicky);
        consumer.set_retries(3, Duration::from_millis(1));
        assert_eq!(
            consumer.process_event(&event(1)).await,
            Verdict::Done(Handled::Applied)
        );
        match consumer.process_event(&event(2)).await {
            Verdict::DeadLetter { reason, attempts } => {
                assert_eq!(attempts, 3);
                assert!(
                    reason.contains("the handler panicked: bad event 2"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            consumer.process_event(&event(3)).await,
            Verdict::Done(Handled::Applied)
        );
        let metrics = consumer.metrics();
        assert_eq!((metrics.applied, metrics.retries), (2, 2));
    }
}
