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

use std::collections::VecDeque;
use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evently_core::Checkpoint;
use evently_postgres::{Advance, CheckpointLease, PostgresEventStore};
use tracing::Instrument;

use crate::sink::{Layout, Outgoing as Message, Sink};
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

/// A read of the page after `from` running on its own task.
struct Prefetch<H> {
    from: Checkpoint,
    page: tokio::task::JoinHandle<Result<Page<H>, evently_core::StoreError>>,
}

/// A page of events made into messages on the reading tasks, in chunks (one per task). The
/// events' payloads and metadata are dropped where they were read.
struct Page<H> {
    chunks: Vec<Chunk<H>>,
    /// Why the page stops after the events above (nothing after it is sent): an event the
    /// serializer refused, or a stored row that cannot be read as an event.
    refused: Option<TransportError>,
}

/// Per event only what the relay needs once its message is queued, the values back to back in
/// one buffer, and the headers.
struct Chunk<H> {
    events: Vec<Outgoing>,
    /// The message values back to back: event `i`'s ends at `ends[i]`.
    values: Vec<u8>,
    ends: Vec<usize>,
    headers: Vec<H>,
}

/// What a delivery report or a failed delivery needs of an event.
struct Outgoing {
    event_id: evently_core::EventId,
    stream: evently_core::StreamId,
    checkpoint: Checkpoint,
}

/// Pages of at least this many events are read in two halves at once.
const SPLIT_FROM: usize = 2_000;

/// Reads up to `batch` events after `from` and makes them messages. With `split` (the page
/// before was full: there is a backlog), a large page is split at the checkpoint of its middle
/// event and both halves are read at once, on two connections and two tasks (everything up to
/// the middle is settled, so the first half is exactly the events up to it; the second half is a
/// gap-safe read of its own).
async fn load<L: Layout>(
    store: PostgresEventStore,
    serializer: Arc<dyn EventSerializer>,
    layout: L,
    from: Checkpoint,
    batch: usize,
    split: bool,
) -> Result<Page<L::Headers>, evently_core::StoreError> {
    let half = batch / 2;
    if split
        && batch >= SPLIT_FROM
        && let Some(middle) = store.checkpoint_after(from, half).await?
    {
        let second = tokio::spawn(load_part(
            store.clone(),
            serializer.clone(),
            layout.clone(),
            middle,
            batch - half,
        ));
        let mut page = load_part(store, serializer, layout, from, half).await?;
        if page.refused.is_some() || page.last().map(|e| e.checkpoint) != Some(middle) {
            // Stopped early (a refused event), or not what the split promised: the first
            // half alone; the next page starts after it.
            second.abort();
            return Ok(page);
        }
        match second
            .await
            .map_err(|e| evently_core::StoreError::backend(format!("relay read task: {e}")))?
        {
            Ok(second) => page.append(second),
            // A row of the second half cannot be read: the first half alone; the next page
            // reads up to that row and then stops at it.
            Err(evently_core::StoreError::Corrupt(_)) => {}
            Err(error) => return Err(error),
        }
        return Ok(page);
    }
    load_part(store, serializer, layout, from, batch).await
}

impl<H> Page<H> {
    /// Adds the events of `next`, which starts where this one ends.
    fn append(&mut self, next: Self) {
        self.chunks.extend(next.chunks);
        self.refused = next.refused;
    }

    /// The last event.
    fn last(&self) -> Option<&Outgoing> {
        self.chunks.iter().rev().find_map(|c| c.events.last())
    }

    /// How many events.
    fn len(&self) -> usize {
        self.chunks.iter().map(|c| c.events.len()).sum()
    }
}

/// The bytes reserved per event for the message values before a part is read: an envelope of a
/// small event is ~350 bytes; growing a buffer of a few thousand values copies it whole.
const VALUE_BYTES: usize = 512;

/// Reads up to `batch` events after `from` and makes them messages, each as its row arrives (so
/// the serialization overlaps the database sending the rest of the page).
async fn load_part<L: Layout>(
    store: PostgresEventStore,
    serializer: Arc<dyn EventSerializer>,
    layout: L,
    from: Checkpoint,
    batch: usize,
) -> Result<Page<L::Headers>, evently_core::StoreError> {
    let mut chunk = Chunk {
        events: Vec::new(),
        values: Vec::new(),
        ends: Vec::new(),
        headers: Vec::new(),
    };
    let mut refused = None;
    let content_type = serializer.content_type();
    store
        .read_all_raw_each(from, batch, |event| {
            if chunk.events.is_empty() {
                // Reserved at the first event, so that a caught-up relay's empty reads allocate
                // nothing.
                let expected = batch.min(10_000);
                chunk.events.reserve(expected);
                chunk.values.reserve(expected * VALUE_BYTES);
                chunk.ends.reserve(expected);
                chunk.headers.reserve(expected);
            }
            if let Err(error) = serializer.serialize_raw_into(&event, &mut chunk.values) {
                refused = Some(TransportError::Serialize(error));
                return ControlFlow::Break(());
            }
            chunk.ends.push(chunk.values.len());
            chunk.headers.push(layout.headers(&event, content_type));
            chunk.events.push(Outgoing {
                event_id: event.event_id,
                checkpoint: event.checkpoint,
                stream: event.stream,
            });
            ControlFlow::Continue(())
        })
        .await?;
    Ok(Page {
        chunks: vec![chunk],
        refused,
    })
}

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
    /// [`TransportError::LeaseLost`] when another relay holds the lease,
    /// [`TransportError::Delivery`] when a message was not confirmed (the checkpoint stops
    /// before it; the sink is restarted), [`TransportError::Serialize`],
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

    async fn pipelined_step(&mut self) -> Result<RelayStep, TransportError> {
        let stored = match self.held {
            // Renewed recently by this relay: no other owner can have taken it since (a live
            // twin under the same owner name can, with a new epoch: this relay then publishes for
            // at most a third of the lease before its next move is refused; what it sent twice
            // is dropped by the broker's dedup or the consumer's inbox, and its order holds:
            // `conformance::two_relays_under_one_name`).
            Some((at, checkpoint))
                if self.lease.epoch().is_some() && at.elapsed() < self.lease.duration() / 3 =>
            {
                checkpoint
            }
            _ => {
                let asked = Instant::now();
                let Some(stored) = self.lease.acquire().await? else {
                    return Err(TransportError::LeaseLost(self.lease.name().to_owned()));
                };
                self.held = Some((asked, stored));
                stored
            }
        };
        let from = match self.sent {
            Some(sent) if sent >= stored => sent,
            // Nothing sent yet, or another relay moved the checkpoint past what this one sent
            // (it lost the lease meanwhile): start from the stored checkpoint.
            _ => {
                // What is in flight is forgotten on both sides: the relay's list and the sink's
                // confirms must stay one for one, or a confirm is taken for the wrong message and
                // the relay ends up waiting for one that was never sent. The sink also learns
                // that the next message does not follow the last one it sent.
                self.in_flight.clear();
                self.sink.forget();
                self.acked = None;
                stored
            }
        };
        // The lease is renewed while the step runs: a page that takes longer than the lease to
        // send and confirm (a slow broker, a large page) does not hand the relay over mid-step.
        let heartbeat = self.lease.heartbeat();
        // At most one batch is in flight here (the last step's), two while this one sends.
        let page = self.read(from).await?;
        let span = tracing::debug_span!(
            "cqrs.relay.batch",
            broker = S::BROKER,
            relay = self.lease.name(),
            read = page.len(),
            in_flight = self.in_flight.len(),
            delivered = tracing::field::Empty,
        );
        let work = async {
            let started = Instant::now();
            // Wait for what earlier steps sent; all of it when this one sent nothing or failed.
            let (sent, send_failure) = match self.send_page(page).await {
                Ok(sent) => (sent, None),
                Err(error) => (0, Some(error)),
            };
            let keep = sent;
            let base = self.acked.map_or(stored, |acked| acked.max(stored));
            let (delivered, acked, failure) = self.acknowledge(keep, base).await;
            self.acked = Some(acked);
            self.metrics.update(|m| m.delivered += delivered as u64);
            tracing::Span::current().record("delivered", delivered);
            let failure = failure.or(send_failure);
            // The checkpoint is stored at most every CHECKPOINT_EVERY while publishing (a stored
            // move costs a commit; one lost to a crash costs only duplicates), and at once when
            // the relay catches up or stops on a failure.
            let due = sent == 0
                || failure.is_some()
                || self.moved.is_none_or(|at| at.elapsed() >= CHECKPOINT_EVERY);
            let checkpoint = if acked > stored && due {
                let asked = Instant::now();
                match self.lease.advance(stored, acked).await? {
                    Advance::Done => {
                        self.held = Some((asked, acked));
                        self.moved = Some(asked);
                        acked
                    }
                    Advance::LeaseLost => {
                        return Err(TransportError::LeaseLost(self.lease.name().to_owned()));
                    }
                    // An earlier move whose outcome was in doubt went through: the next move
                    // starts from what is stored.
                    Advance::Moved { stored } => {
                        self.held = Some((asked, stored));
                        stored
                    }
                }
            } else {
                stored
            };
            if let Some(error) = failure {
                if matches!(error, TransportError::Delivery(_)) {
                    // A fatal client error (a fenced producer, a closed channel) leaves the
                    // client unusable, and any failure may mean a destination went missing:
                    // start afresh.
                    self.metrics.update(|m| m.failures += 1);
                    evently_core::telemetry::relay_failure(self.lease.name(), S::BROKER);
                    self.sink.restart().await?;
                    self.metrics.update(|m| m.producers += 1);
                }
                tracing::warn!(
                    relay = self.lease.name(), %error,
                    "publishing stopped; the next step starts again from the checkpoint"
                );
                return Err(error);
            }
            let elapsed = started.elapsed().as_secs_f64();
            let mut rate = None;
            if delivered > 0 && elapsed > 0.0 {
                #[allow(clippy::cast_precision_loss)]
                let per_second = delivered as f64 / elapsed;
                self.metrics.update(|m| m.last_rate = per_second);
                rate = Some(per_second);
            }
            evently_core::telemetry::relay_delivered(self.lease.name(), S::BROKER, delivered, rate);
            Ok(RelayStep {
                sent,
                delivered,
                checkpoint,
            })
        }
        .instrument(span);
        tokio::select! {
            outcome = work => outcome,
            never = heartbeat => match never {},
        }
    }

    /// The page after `from`: the one prefetched during the last step if it starts there, else
    /// read now. A non-empty page starts the read of the next one, so the database read overlaps
    /// the serialization and sending of this one.
    async fn read(&mut self, from: Checkpoint) -> Result<Page<HeadersOf<S>>, TransportError> {
        let now = || {
            load(
                self.store.clone(),
                self.serializer.clone(),
                self.sink.layout(),
                from,
                self.batch,
                false,
            )
        };
        let prefetched = match self.prefetch.take() {
            Some(prefetch) if prefetch.from == from => prefetch
                .page
                .await
                .map_err(|e| evently_core::StoreError::backend(format!("relay read task: {e}")))?,
            Some(stale) => {
                stale.page.abort();
                now().await
            }
            None => now().await,
        };
        let page = match prefetched {
            // The first row after `from` cannot be read as an event: nothing is sent past it (the
            // step acknowledges and checkpoints what is in flight, then stops with it).
            Err(corrupt @ evently_core::StoreError::Corrupt(_)) => Page {
                chunks: Vec::new(),
                refused: Some(TransportError::Store(corrupt)),
            },
            other => other?,
        };
        if let (Some(last), None) = (page.last(), &page.refused) {
            // A full page means a backlog: the next one is worth reading in two halves.
            let next = load(
                self.store.clone(),
                self.serializer.clone(),
                self.sink.layout(),
                last.checkpoint,
                self.batch,
                page.len() >= self.batch,
            );
            self.prefetch = Some(Prefetch {
                from: last.checkpoint,
                page: tokio::spawn(next),
            });
        }
        Ok(page)
    }

    /// Queues the messages of `page` in the sink, behind what is in flight. Returns how many
    /// were queued, or the first failure (those before it stay queued).
    async fn send_page(&mut self, page: Page<HeadersOf<S>>) -> Result<usize, TransportError> {
        let sent = page.len();
        let Page { chunks, refused } = page;
        // The aggregate types of the page (rarely more than a few).
        let mut kinds: Vec<&str> = Vec::new();
        for event in chunks.iter().flat_map(|c| &c.events) {
            let kind = event.stream.aggregate_type.as_str();
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        self.sink.prepare(&kinds).await?;
        if sent > 0 {
            self.metrics.update(|m| m.batches += 1);
        }
        for chunk in chunks {
            let Chunk {
                events,
                values,
                ends,
                headers,
            } = chunk;
            let mut start = 0;
            for ((event, end), headers) in events.into_iter().zip(ends).zip(headers) {
                let value = &values[start..end];
                start = end;
                let message = Message {
                    event_id: event.event_id,
                    stream: &event.stream,
                    value,
                    headers,
                };
                if let Err(source) = self.sink.send(message).await {
                    return Err(delivery_error(&self.sink, &event, source));
                }
                self.sent = Some(event.checkpoint);
                self.in_flight.push_back(event);
            }
        }
        match refused {
            Some(error) => Err(error),
            None => Ok(sent),
        }
    }

    /// Awaits the confirms of everything in flight but the last `keep`, in order: the confirmed
    /// prefix, the checkpoint after it (`stored` when nothing was confirmed) and the first
    /// failure. Cancel-safe: the sink gives up a confirm only once it has arrived.
    async fn acknowledge(
        &mut self,
        keep: usize,
        stored: Checkpoint,
    ) -> (usize, Checkpoint, Option<TransportError>) {
        let mut delivered = 0;
        let mut checkpoint = stored;
        while self.in_flight.len() > keep {
            let outcome = self.sink.confirmed().await;
            let Some(done) = self.in_flight.pop_front() else {
                break;
            };
            match outcome {
                Ok(()) => {
                    delivered += 1;
                    checkpoint = done.checkpoint;
                }
                Err(source) => {
                    let error = delivery_error(&self.sink, &done, source);
                    return (delivered, checkpoint, Some(error));
                }
            }
        }
        (delivered, checkpoint, None)
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
