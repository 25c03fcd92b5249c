//! The outbox relay: publishes every recorded event to Kafka in the store's gap-safe global order.
//!
//! The event table is the outbox: nothing is written twice in the command path and there is no
//! window between a commit and a publish in which an event can be lost. The relay reads after
//! what it sent, sends a batch through an idempotent producer (`enable.idempotence=true`,
//! `acks=all`, one partition per aggregate id by key) and, while that batch is in flight, awaits
//! the delivery reports of the batch before it and moves the checkpoint to the last event of the
//! delivered prefix (at most two batches are in flight). A failed delivery stops there: the next
//! step starts again at the first undelivered event with a new producer, so nothing is skipped;
//! what was delivered after it is sent again (consumers dedupe on the event id). A relay killed
//! anywhere re-sends at most the batches in flight.

use std::collections::VecDeque;
use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_core::Checkpoint;
use cqrs_postgres::{Advance, CheckpointLease, PostgresEventStore};
use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use tracing::Instrument;

use crate::envelope::headers_of;
use crate::topics::Topics;
use crate::{EventSerializer, JsonEnvelope, KafkaConfig, KafkaError, TopicMap};

/// What one [`OutboxRelay::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayStep {
    /// Events read and queued in the producer (acknowledged during the next step).
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
    /// Producers created (1 + one per failure).
    pub producers: u64,
    /// Events per second of the last batch, send to last acknowledgement.
    pub last_rate: f64,
}

/// Publishes the events of a [`PostgresEventStore`] to Kafka; one per store at a time (a lease
/// with an epoch on the checkpoint named [`with_name`](Self::with_name), `kafka-relay` by default).
pub struct OutboxRelay {
    store: PostgresEventStore,
    config: KafkaConfig,
    map: TopicMap,
    topics: Topics,
    serializer: Arc<dyn EventSerializer>,
    producer: ThreadedProducer<Reports>,
    /// The sequence number of the next message queued (the delivery report's opaque).
    next: usize,
    lease: CheckpointLease,
    batch: usize,
    metrics: RelayMetrics,
    /// Sent, not yet acknowledged, in the global order.
    in_flight: VecDeque<InFlight>,
    /// The last event sent.
    sent: Option<Checkpoint>,
    /// A step is running (still set at the next step's start when a step was cut).
    stepping: bool,
    /// The page after the last one read, being read on another task meanwhile.
    prefetch: Option<Prefetch>,
    /// When this relay last took or renewed its lease (measured before asking) and the stored
    /// checkpoint then: within a third of the lease time a step needs no round trip to know it.
    held: Option<(Instant, Checkpoint)>,
    /// The end of the acknowledged prefix of what was sent (stored or not yet).
    acked: Option<Checkpoint>,
    /// When this relay last stored the checkpoint (never yet: the first acknowledged prefix is stored at once).
    moved: Option<Instant>,
    /// How often [`run`](OutboxRelay::run) reports its counters and lag.
    report_every: Duration,
}

/// How often the checkpoint is stored while the relay publishes.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// A read of the page after `from` running on its own task.
struct Prefetch {
    from: Checkpoint,
    page: tokio::task::JoinHandle<Result<Page, cqrs_core::StoreError>>,
}

/// A page of events made into messages on the reading tasks, in chunks (one per task). The
/// events' payloads and metadata are dropped where they were read.
struct Page {
    chunks: Vec<Chunk>,
    /// Why the page stops after the events above (nothing after it is sent): an event the
    /// serializer refused, or a stored row that cannot be read as an event.
    refused: Option<KafkaError>,
}

/// Whether `error` stops [`OutboxRelay::run`]: an event the serializer refuses, or a stored row
/// that cannot be read as an event. Nothing after either may be published before it, and waiting
/// does not change it: fix the row (or the serializer) and start the relay again.
fn stops(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::Serialize(_) | KafkaError::Store(cqrs_core::StoreError::Corrupt(_))
    )
}

/// Per event only what the relay needs once its message is queued, the values back to back in
/// one buffer, and the headers.
struct Chunk {
    events: Vec<Outgoing>,
    /// The message values back to back: event `i`'s ends at `ends[i]`.
    values: Vec<u8>,
    ends: Vec<usize>,
    headers: Vec<OwnedHeaders>,
}

/// What a delivery report or a failed delivery needs of an event.
struct Outgoing {
    event_id: cqrs_core::EventId,
    stream: cqrs_core::StreamId,
    checkpoint: Checkpoint,
}

/// Pages of at least this many events are read in two halves at once.
const SPLIT_FROM: usize = 2_000;

/// Reads up to `batch` events after `from` and makes them messages. With `split` (the page
/// before was full: there is a backlog), a large page is split at the checkpoint of its middle
/// event and both halves are read at once, on two connections and two tasks (everything up to
/// the middle is settled, so the first half is exactly the events up to it; the second half is a
/// gap-safe read of its own).
async fn load(
    store: PostgresEventStore,
    serializer: Arc<dyn EventSerializer>,
    from: Checkpoint,
    batch: usize,
    split: bool,
) -> Result<Page, cqrs_core::StoreError> {
    let half = batch / 2;
    if split
        && batch >= SPLIT_FROM
        && let Some(middle) = store.checkpoint_after(from, half).await?
    {
        let second = tokio::spawn(load_part(
            store.clone(),
            serializer.clone(),
            middle,
            batch - half,
        ));
        let mut page = load_part(store, serializer, from, half).await?;
        if page.refused.is_some() || page.last().map(|e| e.checkpoint) != Some(middle) {
            // Stopped early (a refused event), or not what the split promised: the first
            // half alone; the next page starts after it.
            second.abort();
            return Ok(page);
        }
        match second
            .await
            .map_err(|e| cqrs_core::StoreError::backend(format!("relay read task: {e}")))?
        {
            Ok(second) => page.append(second),
            // A row of the second half cannot be read: the first half alone; the next page
            // reads up to that row and then stops at it.
            Err(cqrs_core::StoreError::Corrupt(_)) => {}
            Err(error) => return Err(error),
        }
        return Ok(page);
    }
    load_part(store, serializer, from, batch).await
}

impl Page {
    /// Adds the events of `next`, which starts where this one ends.
    fn append(&mut self, next: Page) {
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
async fn load_part(
    store: PostgresEventStore,
    serializer: Arc<dyn EventSerializer>,
    from: Checkpoint,
    batch: usize,
) -> Result<Page, cqrs_core::StoreError> {
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
                refused = Some(KafkaError::Serialize(error));
                return ControlFlow::Break(());
            }
            chunk.ends.push(chunk.values.len());
            chunk.headers.push(headers_of(&event, content_type));
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

/// A message queued in the producer.
struct InFlight {
    event: Outgoing,
    topic: Arc<str>,
    /// Its sequence number.
    seq: usize,
}

/// The producer's context: delivery reports by sequence number, for the relay to take in order.
/// (Cheaper than a future per message: no channel or box is allocated per message.)
struct Reports {
    state: std::sync::Mutex<ReportState>,
    arrived: tokio::sync::Notify,
}

struct ReportState {
    /// The sequence number of `outcomes[0]`: reports of earlier messages are ignored.
    first: usize,
    outcomes: VecDeque<Option<Result<(), RdKafkaError>>>,
}

impl Reports {
    fn state(&self) -> std::sync::MutexGuard<'_, ReportState> {
        // A poisoned lock only means a panic elsewhere while holding it; the state is still whole.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the report of message `seq` if it has arrived; reports are taken in sequence.
    fn take(&self, seq: usize) -> Option<Result<(), RdKafkaError>> {
        let mut state = self.state();
        if state.first != seq {
            // The reports before `seq` belong to messages the relay dropped.
            let skip = seq.saturating_sub(state.first).min(state.outcomes.len());
            state.outcomes.drain(..skip);
            state.first = seq;
        }
        let outcome = state.outcomes.front_mut()?.take()?;
        state.outcomes.pop_front();
        state.first += 1;
        Some(outcome)
    }
}

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let outcome = result.as_ref().map(|_| ()).map_err(|(e, _)| e.clone());
        {
            let mut state = self.state();
            let Some(index) = seq.checked_sub(state.first) else {
                return;
            };
            if state.outcomes.len() <= index {
                state.outcomes.resize(index + 1, None);
            }
            state.outcomes[index] = Some(outcome);
        }
        self.arrived.notify_one();
    }
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay")
            .field("name", &self.lease.name())
            .field("owner", &self.lease.owner())
            .field("config", &self.config)
            .field("topics", &self.map)
            .field("batch", &self.batch)
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

/// The producer's configuration: sane defaults, the user's properties, then what the relay's
/// guarantees need.
fn producer_config(config: &KafkaConfig) -> ClientConfig {
    // A delivery not acknowledged within 30 s fails (librdkafka's default is 5 minutes): the relay
    // then starts again from it with a new producer, which also recovers from a broker that lost
    // the producer's state.
    let mut client = config.client(
        "-relay",
        &[
            ("linger.ms", "5"),
            ("compression.type", "none"),
            ("message.timeout.ms", "30000"),
        ],
    );
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5");
    client
}

/// A producer whose first message will have sequence number `first`.
fn create_producer(
    config: &KafkaConfig,
    first: usize,
) -> Result<ThreadedProducer<Reports>, KafkaError> {
    let reports = Reports {
        state: std::sync::Mutex::new(ReportState {
            first,
            outcomes: VecDeque::new(),
        }),
        arrived: tokio::sync::Notify::new(),
    };
    producer_config(config)
        .create_with_context(reports)
        .map_err(|e| KafkaError::Config(e.to_string()))
}

impl OutboxRelay {
    /// A relay named `kafka-relay` run by `owner` (unique per process), topics from
    /// [`TopicMap::new`], JSON envelopes, batches of 5,000 and a 30 s lease.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when librdkafka refuses the configuration.
    pub fn new(
        store: PostgresEventStore,
        config: KafkaConfig,
        owner: impl Into<String>,
    ) -> Result<Self, KafkaError> {
        let map = TopicMap::new();
        Ok(Self {
            topics: Topics::of(&config, &map)?,
            producer: create_producer(&config, 0)?,
            next: 0,
            lease: CheckpointLease::new(
                store.clone(),
                "kafka-relay",
                owner,
                Duration::from_secs(30),
            ),
            store,
            config,
            map,
            serializer: Arc::new(JsonEnvelope),
            batch: 5_000,
            metrics: RelayMetrics {
                producers: 1,
                ..RelayMetrics::default()
            },
            in_flight: VecDeque::new(),
            prefetch: None,
            held: None,
            acked: None,
            moved: None,
            sent: None,
            stepping: false,
            report_every: crate::REPORT_EVERY,
        })
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

    /// Which topic each aggregate type goes to, and how missing topics are created.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when librdkafka refuses the configuration.
    pub fn with_topics(mut self, map: TopicMap) -> Result<Self, KafkaError> {
        self.topics = Topics::of(&self.config, &map)?;
        self.map = map;
        Ok(self)
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
    /// (target `cqrs_kafka::metrics`, message `relay report`; 10 s by default, never with
    /// `Duration::ZERO`).
    #[must_use]
    pub fn with_report_every(mut self, every: Duration) -> Self {
        self.report_every = every;
        self
    }

    /// Emits the `relay report` event: lag, delivered, failures, producers, the last rate.
    async fn report(&self) {
        let m = self.metrics;
        match self.lag().await {
            Ok(lag) => tracing::info!(
                target: crate::METRICS_TARGET,
                relay = self.lease.name(), lag, delivered = m.delivered, failures = m.failures,
                producers = m.producers, rate = m.last_rate, "relay report"
            ),
            Err(error) => tracing::warn!(
                target: crate::METRICS_TARGET,
                relay = self.lease.name(), %error, "relay report: the lag is unknown"
            ),
        }
    }

    /// How long the lease lasts without a step.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = self.lease.with_lease(lease);
        self
    }

    /// Creates the topics of these aggregate types now if they are missing (the relay creates a
    /// topic before its first event otherwise): a consumer that subscribes before anything was
    /// published needs its topics to exist.
    ///
    /// # Errors
    /// [`KafkaError::CreateTopic`] when the broker refuses.
    pub async fn create_topics(&mut self, aggregate_types: &[&str]) -> Result<(), KafkaError> {
        let topics: Vec<String> = aggregate_types.iter().map(|t| self.map.topic(t)).collect();
        self.topics.ensure(topics.iter().map(String::as_str)).await
    }

    /// The relay's counters.
    #[must_use]
    pub fn metrics(&self) -> RelayMetrics {
        self.metrics
    }

    /// The checkpoint: every event up to it was acknowledged by the broker.
    ///
    /// # Errors
    /// [`KafkaError::Store`] when the database fails.
    pub async fn checkpoint(&self) -> Result<Checkpoint, KafkaError> {
        Ok(self.lease.checkpoint().await?)
    }

    /// Events committed but not yet acknowledged by the broker (an exact count).
    ///
    /// # Errors
    /// [`KafkaError::Store`] when the database fails.
    pub async fn lag(&self) -> Result<u64, KafkaError> {
        let at = self.checkpoint().await?;
        Ok(self.store.lag_after(at).await?.events)
    }

    /// Reads the next batch after what was sent, sends it, then waits for the delivery reports
    /// of the batches sent before it and moves the checkpoint over their delivered prefix.
    ///
    /// Steps are pipelined: the batch a step sends is acknowledged during the next step, while
    /// that one reads and sends its own, so the producer never runs dry between batches. A step
    /// that finds nothing new waits for everything in flight. A step cut midway, a lost lease
    /// or a failure drops what is in flight and starts again from the stored checkpoint (the
    /// messages already queued may still arrive: duplicates, never gaps).
    ///
    /// # Errors
    /// [`KafkaError::LeaseLost`] when another relay holds the lease, [`KafkaError::Delivery`] when
    /// a message was not delivered (the checkpoint stops before it; the producer is replaced),
    /// [`KafkaError::Serialize`], [`KafkaError::Store`], [`KafkaError::CreateTopic`].
    pub async fn step(&mut self) -> Result<RelayStep, KafkaError> {
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
        if let Some(prefetch) = self.prefetch.take() {
            prefetch.page.abort();
        }
    }

    async fn pipelined_step(&mut self) -> Result<RelayStep, KafkaError> {
        let stored = match self.held {
            // Renewed recently by this relay: no other can have taken it since.
            Some((at, checkpoint))
                if self.lease.epoch().is_some() && at.elapsed() < self.lease.duration() / 3 =>
            {
                checkpoint
            }
            _ => {
                let asked = Instant::now();
                let Some(stored) = self.lease.acquire().await? else {
                    return Err(KafkaError::LeaseLost(self.lease.name().to_owned()));
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
                self.in_flight.clear();
                self.acked = None;
                stored
            }
        };
        // At most one batch is in flight here (the last step's), two while this one sends.
        let page = self.read(from).await?;
        let span = tracing::debug_span!(
            "cqrs.kafka.relay.batch",
            relay = self.lease.name(),
            read = page.len(),
            in_flight = self.in_flight.len(),
            delivered = tracing::field::Empty,
        );
        async {
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
            self.metrics.delivered += delivered as u64;
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
                        return Err(KafkaError::LeaseLost(self.lease.name().to_owned()));
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
                if matches!(error, KafkaError::Delivery(_)) {
                    // A fatal producer error (fenced epoch, ...) leaves the producer unusable, and
                    // any failure may mean a topic went missing: start afresh.
                    self.metrics.failures += 1;
                    self.producer = create_producer(&self.config, self.next)?;
                    self.metrics.producers += 1;
                    self.topics.forget();
                }
                tracing::warn!(
                    relay = self.lease.name(), %error,
                    "publishing stopped; the next step starts again from the checkpoint"
                );
                return Err(error);
            }
            let elapsed = started.elapsed().as_secs_f64();
            if delivered > 0 && elapsed > 0.0 {
                #[allow(clippy::cast_precision_loss)]
                let rate = delivered as f64 / elapsed;
                self.metrics.last_rate = rate;
            }
            Ok(RelayStep {
                sent,
                delivered,
                checkpoint,
            })
        }
        .instrument(span)
        .await
    }

    /// The page after `from`: the one prefetched during the last step if it starts there, else
    /// read now. A non-empty page starts the read of the next one, so the database read overlaps
    /// the serialization and sending of this one.
    async fn read(&mut self, from: Checkpoint) -> Result<Page, KafkaError> {
        let now = || {
            load(
                self.store.clone(),
                self.serializer.clone(),
                from,
                self.batch,
                false,
            )
        };
        let prefetched = match self.prefetch.take() {
            Some(prefetch) if prefetch.from == from => prefetch
                .page
                .await
                .map_err(|e| cqrs_core::StoreError::backend(format!("relay read task: {e}")))?,
            Some(stale) => {
                stale.page.abort();
                now().await
            }
            None => now().await,
        };
        let page = match prefetched {
            // The first row after `from` cannot be read as an event: nothing is sent past it (the
            // step acknowledges and checkpoints what is in flight, then stops with it).
            Err(corrupt @ cqrs_core::StoreError::Corrupt(_)) => Page {
                chunks: Vec::new(),
                refused: Some(KafkaError::Store(corrupt)),
            },
            other => other?,
        };
        if let (Some(last), None) = (page.last(), &page.refused) {
            // A full page means a backlog: the next one is worth reading in two halves.
            let next = load(
                self.store.clone(),
                self.serializer.clone(),
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

    /// Queues the messages of `page` in the producer, behind what is in flight. Returns how many
    /// were queued, or the first failure (those before it stay queued).
    async fn send_page(&mut self, page: Page) -> Result<usize, KafkaError> {
        let sent = page.len();
        let Page { chunks, refused } = page;
        // One topic name per aggregate type of the page (rarely more than a few), shared by its
        // messages.
        let mut topics: Vec<(&str, Arc<str>)> = Vec::new();
        for event in chunks.iter().flat_map(|c| &c.events) {
            let kind = event.stream.aggregate_type.as_str();
            if !topics.iter().any(|(k, _)| *k == kind) {
                topics.push((kind, self.map.topic(kind).into()));
            }
        }
        let topics: Vec<(String, Arc<str>)> = topics
            .into_iter()
            .map(|(kind, topic)| (kind.to_owned(), topic))
            .collect();
        self.topics.ensure(topics.iter().map(|(_, t)| &**t)).await?;
        if sent > 0 {
            self.metrics.batches += 1;
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
                let topic = match topics.as_slice() {
                    [(_, only)] => only.clone(),
                    _ => topics
                        .iter()
                        .find(|(kind, _)| *kind == event.stream.aggregate_type)
                        .map(|(_, topic)| topic.clone())
                        .unwrap_or_else(|| self.map.topic(&event.stream.aggregate_type).into()),
                };
                let value = &values[start..end];
                start = end;
                let seq = self
                    .send(&event, &topic, value, headers)
                    .await
                    .map_err(|source| delivery_error(&event, &topic, source))?;
                self.sent = Some(event.checkpoint);
                self.in_flight.push_back(InFlight { event, topic, seq });
            }
        }
        match refused {
            Some(error) => Err(error),
            None => Ok(sent),
        }
    }

    /// Awaits the delivery reports of everything in flight but the last `keep`, in order: the
    /// delivered prefix, the checkpoint after it (`stored` when nothing was delivered) and the
    /// first failure. Cancel-safe: a report is taken off the queue only once it has arrived.
    async fn acknowledge(
        &mut self,
        keep: usize,
        stored: Checkpoint,
    ) -> (usize, Checkpoint, Option<KafkaError>) {
        let mut delivered = 0;
        let mut checkpoint = stored;
        while self.in_flight.len() > keep {
            let Some(seq) = self.in_flight.front().map(|f| f.seq) else {
                break;
            };
            let reports = self.producer.context();
            let outcome = loop {
                // Registered before looking, so a report arriving in between still wakes it.
                let arrived = reports.arrived.notified();
                if let Some(outcome) = reports.take(seq) {
                    break outcome;
                }
                arrived.await;
            };
            let Some(done) = self.in_flight.pop_front() else {
                break;
            };
            match outcome {
                Ok(()) => {
                    delivered += 1;
                    checkpoint = done.event.checkpoint;
                }
                Err(source) => {
                    let error = delivery_error(&done.event, &done.topic, source);
                    return (delivered, checkpoint, Some(error));
                }
            }
        }
        (delivered, checkpoint, None)
    }

    /// Queues `event` (serialized as `value`, with `headers`) in the producer, waiting while its
    /// queue is full. Returns the message's sequence number.
    async fn send(
        &mut self,
        event: &Outgoing,
        topic: &str,
        value: &[u8],
        headers: OwnedHeaders,
    ) -> Result<usize, RdKafkaError> {
        let seq = self.next;
        let mut record = BaseRecord::with_opaque_to(topic, seq)
            .key(event.stream.aggregate_id.as_str())
            .payload(value)
            .headers(headers);
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    self.next += 1;
                    return Ok(seq);
                }
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((error, _)) => return Err(error),
            }
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
    /// [`KafkaError::Serialize`] for an event the serializer refuses, [`KafkaError::Store`] with
    /// [`StoreError::Corrupt`](cqrs_core::StoreError::Corrupt) for a row that cannot be read.
    pub async fn run(
        mut self,
        poll: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RelayMetrics, KafkaError> {
        tokio::pin!(shutdown);
        let mut wakeups = None;
        let mut backoff =
            cqrs_core::Backoff::new(Duration::from_millis(20), Duration::from_secs(5));
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
                () = &mut shutdown => return Ok(self.metrics),
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
                Err(error) if stops(&error) => return Err(error),
                Err(error) => {
                    tracing::warn!(relay = self.lease.name(), %error, "relay step failed; retrying");
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
                () = &mut shutdown => return Ok(self.metrics),
                () = woken => {}
            }
        }
    }
}

fn delivery_error(event: &Outgoing, topic: &str, source: RdKafkaError) -> KafkaError {
    KafkaError::Delivery(Box::new(crate::DeliveryError {
        event_id: event.event_id,
        stream: event.stream.clone(),
        topic: topic.to_owned(),
        source,
    }))
}
