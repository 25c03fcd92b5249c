//! The outbox relay: publishes every recorded event to a broker in the store's gap-safe global
//! order, written once for every [`Sink`].
//!
//! The event table is the outbox: nothing is written twice in the command path and there is no
//! window between a commit and a publish in which an event can be lost. The relay reads after
//! what it sent, sends a page through the sink (one key per aggregate id, so the broker keeps an
//! aggregate's order) and, while that page is in flight, awaits the confirms of the page before
//! it and moves the checkpoint to the last event of the confirmed prefix (at most two pages are
//! in flight). A failed delivery stops there: the next step starts again at the first
//! unconfirmed event with a restarted sink, so nothing is skipped; what was delivered after it is
//! sent again (consumers dedupe on the event id). A relay killed anywhere re-sends at most the
//! pages in flight.

mod pipeline;

use pipeline::{Outgoing, Prefetch};

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evently_core::Checkpoint;
use evently_postgres::{CheckpointLease, PostgresEventStore};

use crate::sink::{Layout, Sink};
use crate::{BrokerError, DeliveryError, EventSerializer, JsonEnvelope, TransportError};

/// Headers of a sink's messages.
type HeadersOf<S> = <<S as Sink>::Layout as Layout>::Headers;
/// What one [`Relay::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayStep {
    /// Events read and queued in the sink (confirmed during the next step).
    pub sent: usize,
    /// Events acknowledged by the broker (sent by earlier steps, or by this one when it found
    /// nothing new).
    pub delivered: usize,
    /// The stored checkpoint after the step: every event up to it was acknowledged. While the
    /// relay publishes it is stored at most every 100 ms, at once when a step finds nothing new
    /// or stops on a failure.
    pub checkpoint: Checkpoint,
}
/// The relay's counters since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RelayMetrics {
    /// Batches sent.
    pub batches: u64,
    /// Events acknowledged by the broker.
    pub delivered: u64,
    /// Deliveries that failed (each made the relay start again from the first undelivered event).
    pub failures: u64,
    /// Sinks started (1 + one restart per failure: a new producer, channel or connection).
    pub producers: u64,
    /// Events per second of the last batch, send to last acknowledgement.
    pub last_rate: f64,
}
/// Publishes the events of a [`PostgresEventStore`] to a broker through sink `S`; one per store
/// and name at a time (a lease with an epoch on the checkpoint named
/// [`with_name`](Self::with_name), the sink's [`DEFAULT_NAME`](Sink::DEFAULT_NAME) by default).
pub struct Relay<S: Sink> {
    store: PostgresEventStore,
    sink: S,
    serializer: Arc<dyn EventSerializer>,
    lease: CheckpointLease,
    batch: usize,
    metrics: evently_core::telemetry::MetricsHandle<RelayMetrics>,
    /// Sent, not yet confirmed, in the global order.
    in_flight: VecDeque<Outgoing>,
    /// The last event sent.
    sent: Option<Checkpoint>,
    /// A step is running (still set at the next step's start when a step was cut).
    stepping: bool,
    /// The page after the last one read, being read on another task meanwhile.
    prefetch: Option<Prefetch<HeadersOf<S>>>,
    /// When this relay last took or renewed its lease (measured before asking) and the stored
    /// checkpoint then: within a third of the lease time a step needs no round trip to know it.
    held: Option<(Instant, Checkpoint)>,
    /// The end of the acknowledged prefix of what was sent (stored or not yet).
    acked: Option<Checkpoint>,
    /// When this relay last stored the checkpoint (never yet: the first acknowledged prefix is stored at once).
    moved: Option<Instant>,
    /// How often [`run`](Relay::run) reports its counters and lag.
    report_every: Duration,
}
/// How often the checkpoint is stored while the relay publishes.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
impl<S: Sink> std::fmt::Debug for Relay<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("broker", &S::BROKER)
            .field("name", &self.lease.name())
            .field("owner", &self.lease.owner())
            .field("batch", &self.batch)
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

impl<S: Sink> Relay<S> {
    /// A relay publishing through `sink`, named [`S::DEFAULT_NAME`](Sink::DEFAULT_NAME), run by
    /// `owner` (unique per process), JSON envelopes, pages of 5,000 and a 30 s lease.
    pub fn new(store: PostgresEventStore, sink: S, owner: impl Into<String>) -> Self {
        Self {
            lease: CheckpointLease::new(
                store.clone(),
                S::DEFAULT_NAME,
                owner,
                Duration::from_secs(30),
            ),
            store,
            sink,
            serializer: Arc::new(JsonEnvelope),
            batch: 5_000,
            metrics: evently_core::telemetry::MetricsHandle::new(RelayMetrics {
                producers: 1,
                ..RelayMetrics::default()
            }),
            in_flight: VecDeque::new(),
            prefetch: None,
            held: None,
            acked: None,
            moved: None,
            sent: None,
            stepping: false,
            report_every: crate::REPORT_EVERY,
        }
    }

    /// The sink (to create destinations ahead of the first event, say).
    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    /// The sink.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// The checkpoint name (one relay of that name runs at a time; two names publish twice).
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.lease = CheckpointLease::new(
            self.store.clone(),
            name,
            self.lease.owner(),
            self.lease.duration(),
        );
        self
    }

    /// How events become message values.
    #[must_use]
    pub fn with_serializer(mut self, serializer: impl EventSerializer) -> Self {
        self.serializer = Arc::new(serializer);
        self
    }

    /// How many events one step reads and sends at most: 5,000 by default (a page is only as
    /// large as what is there to send; after a full page the next is read in two halves at once).
    #[must_use]
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// How often [`run`](Self::run) reports the relay's lag and counters as a tracing event
    /// (target `cqrs::metrics`, message `relay report`; 10 s by default, never with
    /// `Duration::ZERO`).
    #[must_use]
    pub fn with_report_every(mut self, every: Duration) -> Self {
        self.report_every = every;
        self
    }

    /// Emits the `relay report` event: lag, delivered, failures, producers, the last rate.
    async fn report(&self) {
        let m = self.metrics.get();
        match self.lag().await {
            Ok(lag) => tracing::info!(
                target: crate::METRICS_TARGET,
                broker = S::BROKER, relay = self.lease.name(), lag, delivered = m.delivered, failures = m.failures,
                producers = m.producers, rate = m.last_rate, "relay report"
            ),
            Err(error) => tracing::warn!(
                target: crate::METRICS_TARGET,
                broker = S::BROKER, relay = self.lease.name(), %error, "relay report: the lag is unknown"
            ),
        }
    }

    /// How long the lease lasts without a step.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = self.lease.with_lease(lease);
        self
    }

    /// The relay's counters.
    #[must_use]
    pub fn metrics(&self) -> RelayMetrics {
        self.metrics.get()
    }

    /// The counters, readable while the relay runs: take it before calling `run`.
    #[must_use]
    pub fn metrics_handle(&self) -> evently_core::telemetry::MetricsHandle<RelayMetrics> {
        self.metrics.clone()
    }

    /// The checkpoint: every event up to it was confirmed by the broker.
    ///
    /// # Errors
    /// [`TransportError::Store`] when the database fails.
    pub async fn checkpoint(&self) -> Result<Checkpoint, TransportError> {
        Ok(self.lease.checkpoint().await?)
    }

    /// Events committed but not yet confirmed by the broker (an exact count).
    ///
    /// # Errors
    /// [`TransportError::Store`] when the database fails.
    pub async fn lag(&self) -> Result<u64, TransportError> {
        let at = self.checkpoint().await?;
        Ok(self.store.lag_after(at).await?.events)
    }

    /// Reads the next page after what was sent, sends it, then waits for the confirms of the
    /// pages sent before it and moves the checkpoint over their confirmed prefix.
    ///
    /// Steps are pipelined: the batch a step sends is acknowledged during the next step, while
    /// that one reads and sends its own, so the sink never runs dry between pages. A step
    /// that finds nothing new waits for everything in flight. A step cut midway, a lost lease
    /// or a failure drops what is in flight and starts again from the stored checkpoint (the
    /// messages already queued may still arrive: duplicates, never gaps).
    ///
    /// # Errors
    /// [`TransportError::LeaseLost`] when another relay holds the lease or this one stalled
    /// past it, [`TransportError::Delivery`] when a message was not confirmed (the checkpoint
    /// stops before it; the sink is restarted), [`TransportError::Serialize`],
    /// [`TransportError::Store`], [`TransportError::Topology`], [`TransportError::Broker`].
    pub async fn step(&mut self) -> Result<RelayStep, TransportError> {
        if std::mem::replace(&mut self.stepping, true) {
            // The last step was cut: what it had in flight is unknown.
            self.reset();
        }
        let outcome = self.pipelined_step().await;
        if outcome.is_err() {
            self.reset();
        }
        self.stepping = false;
        outcome
    }

    /// Forgets what is in flight: the next step reads from the stored checkpoint.
    fn reset(&mut self) {
        self.in_flight.clear();
        self.sent = None;
        self.held = None;
        self.acked = None;
        self.sink.forget();
        if let Some(prefetch) = self.prefetch.take() {
            prefetch.page.abort();
        }
    }

    /// Publishes until `shutdown` completes: steps while there is work, then waits for a commit
    /// notification or `poll`. Failures (broker down, lease held elsewhere, database errors) are
    /// logged and retried with a backoff up to 5 s; only an event that cannot be serialized, or a
    /// stored row that cannot be read as an event (written around the store), stops it: nothing
    /// after it may be published before it, so it stops after delivering and checkpointing
    /// everything before it, naming the event or the row and its checkpoint. Reports its lag and
    /// counters every [`with_report_every`](Self::with_report_every). Returns the counters.
    ///
    /// # Errors
    /// [`TransportError::Serialize`] for an event the serializer refuses, [`TransportError::Store`] with
    /// [`StoreError::Corrupt`](evently_core::StoreError::Corrupt) for a row that cannot be read.
    pub async fn run(
        mut self,
        poll: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RelayMetrics, TransportError> {
        tokio::pin!(shutdown);
        let mut wakeups = None;
        let mut backoff =
            evently_core::Backoff::new(Duration::from_millis(20), Duration::from_secs(5));
        let mut reported = Instant::now();
        loop {
            if !self.report_every.is_zero() && reported.elapsed() >= self.report_every {
                reported = Instant::now();
                self.report().await;
            }
            if wakeups.is_none() {
                wakeups = self.store.listen().await.ok();
            }
            let outcome = tokio::select! {
                biased;
                () = &mut shutdown => return Ok(self.metrics.get()),
                outcome = self.step() => outcome,
            };
            let wait = match outcome {
                Ok(step) if step.sent > 0 || step.delivered > 0 => {
                    backoff.reset();
                    continue;
                }
                Ok(_) => {
                    backoff.reset();
                    poll
                }
                Err(error) if error.stops_relay() => return Err(error),
                Err(error) => {
                    tracing::warn!(broker = S::BROKER, relay = self.lease.name(), %error, "relay step failed; retrying");
                    backoff.next_delay()
                }
            };
            let woken = async {
                match wakeups.as_mut() {
                    Some(w) => {
                        if w.next_within(wait).await.is_err() {
                            wakeups = None;
                        }
                    }
                    None => tokio::time::sleep(wait).await,
                }
            };
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(self.metrics.get()),
                () = woken => {}
            }
        }
    }
}

fn delivery_error<S: Sink>(sink: &S, event: &Outgoing, source: BrokerError) -> TransportError {
    TransportError::Delivery(Box::new(DeliveryError {
        event_id: event.event_id,
        destination: sink.destination(&event.stream.aggregate_type),
        stream: event.stream.clone(),
        source,
    }))
}
