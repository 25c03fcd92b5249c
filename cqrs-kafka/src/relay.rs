//! The outbox relay: publishes every recorded event to Kafka in the store's gap-safe global order.
//!
//! The event table is the outbox: nothing is written twice in the command path and there is no
//! window between a commit and a publish in which an event can be lost. The relay reads after
//! its checkpoint, sends a batch through an idempotent producer (`enable.idempotence=true`,
//! `acks=all`, one partition per aggregate id by key), awaits every delivery report and moves the
//! checkpoint to the last event of the delivered prefix. A failed delivery stops the batch there:
//! the next step starts again at the first undelivered event with a new producer, so nothing is
//! skipped; what was delivered after it is sent again (consumers dedupe on the event id). A relay
//! killed anywhere re-sends at most the batch in flight.

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
    /// Events read and acknowledged by the broker.
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

    /// Sends the next batch after the checkpoint and moves the checkpoint past what the broker
    /// acknowledged.
    ///
    /// # Errors
    /// [`KafkaError::LeaseLost`] when another relay holds the lease, [`KafkaError::Delivery`] when
    /// a message was not delivered (the checkpoint stops before it; the producer is replaced),
    /// [`KafkaError::Serialize`], [`KafkaError::Store`], [`KafkaError::CreateTopic`].
    pub async fn step(&mut self) -> Result<RelayStep, KafkaError> {
        let Some(from) = self.lease.acquire().await? else {
            return Err(KafkaError::LeaseLost(self.lease.name().to_owned()));
        };
        let page = self.store.read_all(from, self.batch).await?;
        if page.is_empty() {
            return Ok(RelayStep {
                delivered: 0,
                checkpoint: from,
            });
        }
        let span = tracing::debug_span!(
            "cqrs.kafka.relay.batch",
            relay = self.lease.name(),
            events = page.len(),
            delivered = tracing::field::Empty,
        );
        self.send_batch(from, &page).instrument(span).await
    }

    async fn send_batch(
        &mut self,
        from: Checkpoint,
        page: &[StoredEvent],
    ) -> Result<RelayStep, KafkaError> {
        let topics: Vec<String> = page
            .iter()
            .map(|e| self.map.topic(&e.stream.aggregate_type))
            .collect();
        self.topics
            .ensure(topics.iter().map(String::as_str))
            .await?;
        let started = Instant::now();
        self.metrics.batches += 1;
        let mut pending: Vec<DeliveryFuture> = Vec::with_capacity(page.len());
        // The first event that failed, and how.
        let mut failure: Option<(usize, KafkaError)> = None;
        for (i, (event, topic)) in page.iter().zip(&topics).enumerate() {
            let value = match self.serializer.serialize(event) {
                Ok(value) => value,
                Err(error) => {
                    failure = Some((i, KafkaError::Serialize(error)));
                    break;
                }
            };
            match self.send(event, topic, &value).await {
                Ok(future) => pending.push(future),
                Err(source) => {
                    failure = Some((i, delivery_error(event, topic, source)));
                    break;
                }
            }
        }
        // The delivered prefix: the checkpoint may pass an event only once it and all before it
        // are acknowledged.
        let mut delivered = 0;
        for (i, future) in pending.into_iter().enumerate() {
            let outcome = match future.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((error, _))) => Err(error),
                Err(_) => Err(RdKafkaError::Canceled),
            };
            match outcome {
                Ok(()) if failure.is_none() => delivered = i + 1,
                Ok(()) => {}
                Err(source) => {
                    if failure.as_ref().is_none_or(|(at, _)| *at > i) {
                        failure = Some((i, delivery_error(&page[i], &topics[i], source)));
                    }
                }
            }
        }
        let checkpoint = match delivered {
            0 => from,
            n => page[n - 1].checkpoint,
        };
        if delivered > 0 && !self.lease.advance(checkpoint).await? {
            return Err(KafkaError::LeaseLost(self.lease.name().to_owned()));
        }
        self.metrics.delivered += delivered as u64;
        tracing::Span::current().record("delivered", delivered);
        if let Some((at, error)) = failure {
            let event = &page[at];
            tracing::warn!(
                relay = self.lease.name(), stream = %event.stream, version = event.version,
                %error, "publishing stopped before this event; the next step starts again from it"
            );
            if matches!(error, KafkaError::Delivery(_)) {
                // A fatal producer error (fenced epoch, ...) leaves the producer unusable, and any
                // failure may mean a topic went missing: start afresh.
                self.metrics.failures += 1;
                self.producer = create_producer(&self.config)?;
                self.metrics.producers += 1;
                self.topics.forget();
            }
            return Err(error);
        }
        let elapsed = started.elapsed().as_secs_f64();
        if elapsed > 0.0 {
            #[allow(clippy::cast_precision_loss)]
            let rate = delivered as f64 / elapsed;
            self.metrics.last_rate = rate;
        }
        Ok(RelayStep {
            delivered,
            checkpoint,
        })
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
                Ok(step) if step.delivered > 0 => {
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
