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
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_core::{Checkpoint, EventStore, StoredEvent};
use cqrs_postgres::{CheckpointLease, PostgresEventStore};
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
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
    /// The relay's checkpoint after the step.
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
    producer: FutureProducer,
    lease: CheckpointLease,
    batch: usize,
    metrics: RelayMetrics,
    /// Sent, not yet acknowledged, in the global order.
    in_flight: VecDeque<InFlight>,
    /// The last event sent.
    sent: Option<Checkpoint>,
    /// A step is running (still set at the next step's start when a step was cut).
    stepping: bool,
}

/// A message queued in the producer.
struct InFlight {
    checkpoint: Checkpoint,
    event_id: cqrs_core::EventId,
    stream: cqrs_core::StreamId,
    topic: String,
    future: DeliveryFuture,
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

fn create_producer(config: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    producer_config(config)
        .create()
        .map_err(|e| KafkaError::Config(e.to_string()))
}

impl OutboxRelay {
    /// A relay named `kafka-relay` run by `owner` (unique per process), topics from
    /// [`TopicMap::new`], JSON envelopes, batches of 1,000 and a 30 s lease.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when librdkafka refuses the configuration.
    pub fn new(
        store: PostgresEventStore,
        config: KafkaConfig,
        owner: impl Into<String>,
    ) -> Result<Self, KafkaError> {
        let map = TopicMap::new();
        let (partitions, replication) = map.layout();
        Ok(Self {
            topics: Topics::new(&config, partitions, replication)?,
            producer: create_producer(&config)?,
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
            batch: 1_000,
            metrics: RelayMetrics {
                producers: 1,
                ..RelayMetrics::default()
            },
            in_flight: VecDeque::new(),
            sent: None,
            stepping: false,
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
        let (partitions, replication) = map.layout();
        self.topics = Topics::new(&self.config, partitions, replication)?;
        self.map = map;
        Ok(self)
    }

    /// How events become message values.
    #[must_use]
    pub fn with_serializer(mut self, serializer: impl EventSerializer) -> Self {
        self.serializer = Arc::new(serializer);
        self
    }

    /// How many events one step reads and sends at most.
    #[must_use]
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
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

    /// Events recorded but not yet acknowledged by the broker, in global positions (an upper
    /// bound: positions of rolled-back appends are never used).
    ///
    /// # Errors
    /// [`KafkaError::Store`] when the database fails.
    pub async fn lag(&self) -> Result<u64, KafkaError> {
        let head = self.store.head().await?.unwrap_or(Checkpoint::START);
        let at = self.checkpoint().await?;
        Ok(head.position.saturating_sub(at.position))
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
    }

    async fn pipelined_step(&mut self) -> Result<RelayStep, KafkaError> {
        let Some(stored) = self.lease.acquire().await? else {
            return Err(KafkaError::LeaseLost(self.lease.name().to_owned()));
        };
        let from = match self.sent {
            // Another relay moved the checkpoint past what this one sent: start from there.
            Some(sent) if !self.in_flight.is_empty() && sent >= stored => sent,
            _ => {
                self.in_flight.clear();
                stored
            }
        };
        // At most one batch is in flight here (the last step's), two while this one sends.
        let page = self.store.read_all(from, self.batch).await?;
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
            let (sent, send_failure) = match self.send_page(&page).await {
                Ok(sent) => (sent, None),
                Err(error) => (0, Some(error)),
            };
            let keep = sent;
            let (delivered, checkpoint, failure) = self.acknowledge(keep, stored).await;
            if delivered > 0 && !self.lease.advance(checkpoint).await? {
                return Err(KafkaError::LeaseLost(self.lease.name().to_owned()));
            }
            self.metrics.delivered += delivered as u64;
            tracing::Span::current().record("delivered", delivered);
            let failure = failure.or(send_failure);
            if let Some(error) = failure {
                if matches!(error, KafkaError::Delivery(_)) {
                    // A fatal producer error (fenced epoch, ...) leaves the producer unusable, and
                    // any failure may mean a topic went missing: start afresh.
                    self.metrics.failures += 1;
                    self.producer = create_producer(&self.config)?;
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

    /// Serializes and queues `page` in the producer, behind what is in flight. Returns how many
    /// were queued, or the first failure (those before it stay queued).
    async fn send_page(&mut self, page: &[StoredEvent]) -> Result<usize, KafkaError> {
        if page.is_empty() {
            return Ok(0);
        }
        let topics: Vec<String> = page
            .iter()
            .map(|e| self.map.topic(&e.stream.aggregate_type))
            .collect();
        self.topics
            .ensure(topics.iter().map(String::as_str))
            .await?;
        self.metrics.batches += 1;
        for (event, topic) in page.iter().zip(topics) {
            let value = self
                .serializer
                .serialize(event)
                .map_err(KafkaError::Serialize)?;
            let future = self
                .send(event, &topic, &value)
                .await
                .map_err(|source| delivery_error(event, &topic, source))?;
            self.in_flight.push_back(InFlight {
                checkpoint: event.checkpoint,
                event_id: event.event_id,
                stream: event.stream.clone(),
                topic,
                future,
            });
            self.sent = Some(event.checkpoint);
        }
        Ok(page.len())
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
            let Some(front) = self.in_flight.front_mut() else {
                break;
            };
            let outcome = match (&mut front.future).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((error, _))) => Err(error),
                Err(_) => Err(RdKafkaError::Canceled),
            };
            let Some(done) = self.in_flight.pop_front() else {
                break;
            };
            match outcome {
                Ok(()) => {
                    delivered += 1;
                    checkpoint = done.checkpoint;
                }
                Err(source) => {
                    let error = KafkaError::Delivery(Box::new(crate::DeliveryError {
                        event_id: done.event_id,
                        stream: done.stream,
                        topic: done.topic,
                        source,
                    }));
                    return (delivered, checkpoint, Some(error));
                }
            }
        }
        (delivered, checkpoint, None)
    }

    /// Queues `event` (serialized as `value`) in the producer, waiting while its queue is full.
    async fn send(
        &self,
        event: &StoredEvent,
        topic: &str,
        value: &[u8],
    ) -> Result<DeliveryFuture, RdKafkaError> {
        let mut record = FutureRecord::to(topic)
            .key(event.stream.aggregate_id.as_str())
            .payload(value)
            .headers(headers_of(event, self.serializer.content_type()));
        loop {
            match self.producer.send_result(record) {
                Ok(future) => return Ok(future),
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
    /// logged and retried with a backoff up to 5 s; only an event that cannot be serialized stops
    /// it (nothing after it may be published before it). Returns the counters.
    ///
    /// # Errors
    /// [`KafkaError::Serialize`] for an event the serializer refuses.
    pub async fn run(
        mut self,
        poll: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RelayMetrics, KafkaError> {
        tokio::pin!(shutdown);
        let mut wakeups = None;
        let mut backoff = Duration::from_millis(20);
        loop {
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
                    backoff = Duration::from_millis(20);
                    continue;
                }
                Ok(_) => poll,
                Err(error @ KafkaError::Serialize(_)) => return Err(error),
                Err(error) => {
                    tracing::warn!(relay = self.lease.name(), %error, "relay step failed; retrying");
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    wait
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

fn delivery_error(event: &StoredEvent, topic: &str, source: RdKafkaError) -> KafkaError {
    KafkaError::Delivery(Box::new(crate::DeliveryError {
        event_id: event.event_id,
        stream: event.stream.clone(),
        topic: topic.to_owned(),
        source,
    }))
}
