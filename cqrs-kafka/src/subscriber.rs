//! Kafka consumers feeding projections and event-started sagas.
//!
//! A [`KafkaSubscriber`] reads its topics in a consumer group and hands each event to a
//! [`MessageHandler`]: [`Transactional`] for a projection that writes PostgreSQL
//! (`derive(Projection)` with `context = PgConnection`, the same type a
//! [`ProjectionWorker`](cqrs_postgres::projection::ProjectionWorker) runs from the store), whose
//! effect commits with an inbox row so a redelivered message has no second effect; [`InProcess`]
//! for a projection with `Context = ()`, e.g. a [`SagaStarter`](cqrs_core::saga::SagaStarter),
//! which is idempotent by itself (an instance is keyed by its starting event's id).
//!
//! The offset of a message is stored after it was handled or dead-lettered and committed in the
//! background (and on shutdown): a crash re-delivers at most the messages since the last commit,
//! and the inbox turns them into no-ops. A handler failure is retried with a backoff; after the
//! last attempt the message goes to the dead-letter topic (`<topic>.dlq`) with the error, the
//! attempts and its original coordinates in headers. A malformed message (not an envelope, an
//! unknown event type, bad JSON) goes there at once: no crash loop, and the partition moves on.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cqrs_core::StoredEvent;
use cqrs_core::projection::{Projection, ProjectionError};
use cqrs_postgres::{Inbox, PostgresEventStore, Transaction};
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgConnection;
use tracing::Instrument;
use tracing::instrument::WithSubscriber;

use crate::envelope::{header, text};
use crate::topics::Topics;
use crate::{EventSerializer, JsonEnvelope, KafkaConfig, KafkaError};

/// What a handler did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The effect happened.
    Applied,
    /// The event was handled before (the inbox has it): no effect.
    Duplicate,
    /// The handler does not listen to this event type.
    Skipped,
}

/// Why a handler did not handle an event.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The event cannot be handled however often it is tried (an unknown type, a payload that
    /// does not decode): dead-lettered at once.
    #[error("{0}")]
    Malformed(String),
    /// The handler failed (retried with a backoff, then dead-lettered).
    #[error("{0}")]
    Failed(String),
    /// What the handler needs is down (the database unreachable, its connections terminated, the
    /// pool exhausted): not the message's fault, so it is not dead-lettered however long it
    /// lasts. The subscriber waits (backoff up to 10 s) and tries the same message again, and
    /// nothing after it is handled meanwhile, so an outage never reorders an aggregate's events.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl From<ProjectionError> for HandleError {
    fn from(error: ProjectionError) -> Self {
        match error {
            ProjectionError::Decode(e) => Self::Malformed(e.to_string()),
            ProjectionError::Handler { ref source, .. } if is_outage(&**source) => {
                Self::Unavailable(error.to_string())
            }
            e @ ProjectionError::Handler { .. } => Self::Failed(e.to_string()),
        }
    }
}

impl HandleError {
    /// A database error as a handler error: [`HandleError::Unavailable`] when the database is
    /// unreachable or dropped the connection, else [`HandleError::Failed`].
    #[must_use]
    pub fn from_database(error: &sqlx::Error) -> Self {
        if is_outage(error) {
            Self::Unavailable(error.to_string())
        } else {
            Self::Failed(error.to_string())
        }
    }
}

/// Whether `error` (or an error it wraps) says the database is out of reach rather than that
/// this event cannot be applied: a broken or refused connection, an exhausted or closed pool, a
/// server shutting down or terminating connections, too many connections.
#[must_use]
pub fn is_outage(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(sqlx) = error.downcast_ref::<sqlx::Error>() {
            return match sqlx {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                // connection_exception (08xxx), admin/crash shutdown, cannot connect now,
                // too many connections.
                sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                    code.starts_with("08")
                        || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
                }),
                _ => false,
            };
        }
        if error.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        next = error.source();
    }
    false
}

/// Applies events read from Kafka.
#[async_trait::async_trait]
pub trait MessageHandler: Send {
    /// The consumer's name (its inbox rows are kept under it).
    fn name(&self) -> &str;

    /// Handles one event.
    ///
    /// # Errors
    /// [`HandleError`]: whether trying again can help.
    async fn handle(&mut self, event: &StoredEvent) -> Result<Handled, HandleError>;
}

/// A projection writing PostgreSQL, fed from Kafka: each event's effect and its inbox row commit
/// in one transaction, so a redelivery finds the row and does nothing.
pub struct Transactional<P> {
    store: PostgresEventStore,
    inbox: Inbox,
    projection: P,
}

impl<P> std::fmt::Debug for Transactional<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transactional").finish_non_exhaustive()
    }
}

impl<P: Projection<Context = PgConnection>> Transactional<P> {
    /// `projection`, writing in `store`'s database (whose schema holds the inbox).
    pub fn new(store: PostgresEventStore, projection: P) -> Self {
        Self {
            inbox: Inbox::new(&store),
            store,
            projection,
        }
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    async fn handle_in(
        &mut self,
        tx: &mut PgConnection,
        event: &StoredEvent,
    ) -> Result<Handled, HandleError> {
        if !self
            .inbox
            .claim(tx, P::NAME, event.event_id)
            .await
            .map_err(|e| match e {
                cqrs_core::StoreError::Backend(source) if is_outage(&*source) => {
                    HandleError::Unavailable(source.to_string())
                }
                other => HandleError::Failed(other.to_string()),
            })?
        {
            return Ok(Handled::Duplicate);
        }
        self.projection.apply(event, tx).await?;
        Ok(Handled::Applied)
    }
}

#[async_trait::async_trait]
impl<P> MessageHandler for Transactional<P>
where
    P: Projection<Context = PgConnection> + Sync,
{
    fn name(&self) -> &str {
        P::NAME
    }

    async fn handle(&mut self, event: &StoredEvent) -> Result<Handled, HandleError> {
        if !P::subscribes_to(event) {
            return unknown_type::<P>(event);
        }
        let failed = |e: sqlx::Error| HandleError::from_database(&e);
        let mut tx = Transaction::begin(self.store.pool())
            .await
            .map_err(failed)?;
        let outcome = self.handle_in(&mut tx, event).await;
        tx.end(outcome, failed).await
    }
}

/// A projection with `Context = ()` fed from Kafka, e.g. a
/// [`SagaStarter`](cqrs_core::saga::SagaStarter). It has no inbox: it must be idempotent by
/// itself (a saga starter is: an instance is stored under its starting event's id).
#[derive(Debug)]
pub struct InProcess<P>(pub P);

#[async_trait::async_trait]
impl<P> MessageHandler for InProcess<P>
where
    P: Projection<Context = ()> + Sync,
{
    fn name(&self) -> &str {
        P::NAME
    }

    async fn handle(&mut self, event: &StoredEvent) -> Result<Handled, HandleError> {
        if !P::subscribes_to(event) {
            return unknown_type::<P>(event);
        }
        self.0.apply(event, &mut ()).await?;
        Ok(Handled::Applied)
    }
}

/// What an event `P` does not subscribe to is: skipped when its aggregate type is not one of
/// `P`'s, malformed when it is (the aggregate's event enum does not know this type: a producer
/// newer than this consumer, or a bad message).
fn unknown_type<P: Projection>(event: &StoredEvent) -> Result<Handled, HandleError> {
    let ours = P::SUBSCRIPTIONS
        .iter()
        .find(|s| s.aggregate_type == Some(event.stream.aggregate_type.as_str()));
    match ours {
        None => Ok(Handled::Skipped),
        Some(subscription) => Err(HandleError::Malformed(format!(
            "unknown event type `{}` of aggregate type `{}` (known: {})",
            event.event_type,
            event.stream.aggregate_type,
            subscription.event_types.join(", ")
        ))),
    }
}

/// The subscriber's counters since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscriberMetrics {
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
    /// Messages sent to a dead-letter topic.
    pub dead_lettered: u64,
}

/// How far a consumer is behind in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The next offset this consumer reads (`None` before its first message there).
    pub position: Option<i64>,
    /// The partition's high watermark (the offset the next message will get).
    pub high_watermark: i64,
    /// Messages not read yet.
    pub lag: i64,
}

/// Reads topics in a consumer group into a [`MessageHandler`].
pub struct KafkaSubscriber<H> {
    consumer: Arc<StreamConsumer>,
    dlq: FutureProducer,
    dlq_topics: Topics,
    dlq_suffix: String,
    handler: H,
    group: String,
    serializer: Arc<dyn EventSerializer>,
    attempts: u32,
    backoff: Duration,
    metrics: SubscriberMetrics,
    report_every: Duration,
}

impl<H> std::fmt::Debug for KafkaSubscriber<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSubscriber")
            .field("group", &self.group)
            .field("attempts", &self.attempts)
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

impl<H: MessageHandler> KafkaSubscriber<H> {
    /// A subscriber in consumer group `group` reading `topics` from the earliest offset (unless
    /// the group has committed ones), 5 attempts per message with a backoff from 100 ms,
    /// dead letters to `<topic>.dlq`.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when librdkafka refuses the configuration, [`KafkaError::Kafka`]
    /// when the subscription fails.
    pub fn new(
        config: &KafkaConfig,
        group: impl Into<String>,
        topics: &[&str],
        handler: H,
    ) -> Result<Self, KafkaError> {
        let group = group.into();
        let mut client = config.client(
            "-consumer",
            &[
                ("auto.offset.reset", "earliest"),
                ("auto.commit.interval.ms", "1000"),
            ],
        );
        let consumer: StreamConsumer = client
            .set("group.id", &group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .create()
            .map_err(|e| KafkaError::Config(e.to_string()))?;
        consumer
            .subscribe(topics)
            .map_err(KafkaError::kafka("subscribe"))?;
        let dlq = config
            .client("-dlq", &[])
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(|e| KafkaError::Config(e.to_string()))?;
        Ok(Self {
            consumer: Arc::new(consumer),
            dlq,
            dlq_topics: Topics::new(config, 1, 1)?,
            dlq_suffix: ".dlq".to_owned(),
            handler,
            group,
            serializer: Arc::new(JsonEnvelope),
            attempts: 5,
            backoff: Duration::from_millis(100),
            metrics: SubscriberMetrics::default(),
            report_every: crate::REPORT_EVERY,
        })
    }

    /// How often a failing handler is tried (at least once) and the first backoff (doubling, at
    /// most 10 s).
    #[must_use]
    pub fn with_retries(mut self, attempts: u32, backoff: Duration) -> Self {
        self.attempts = attempts.max(1);
        self.backoff = backoff;
        self
    }

    /// The suffix of the dead-letter topics (`.dlq` by default).
    #[must_use]
    pub fn with_dlq_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.dlq_suffix = suffix.into();
        self
    }

    /// Whether missing dead-letter topics are created (the default; 1 partition, replication 1)
    /// or expected to exist (topics managed outside the application): a dead letter to a topic
    /// that does not exist then fails, and the message stays uncommitted until it can be sent.
    #[must_use]
    pub fn with_dlq_topic_creation(mut self, create: bool) -> Self {
        self.dlq_topics.set_creation(create);
        self
    }

    /// How often [`run`](Self::run) reports the lag of each assigned partition as tracing events
    /// (target `cqrs_kafka::metrics`, message `consumer lag`; 10 s by default, never with
    /// `Duration::ZERO`).
    #[must_use]
    pub fn with_report_every(mut self, every: Duration) -> Self {
        self.report_every = every;
        self
    }

    /// How message values become events (the relay's serializer).
    #[must_use]
    pub fn with_serializer(mut self, serializer: impl EventSerializer) -> Self {
        self.serializer = Arc::new(serializer);
        self
    }

    /// The counters.
    #[must_use]
    pub fn metrics(&self) -> SubscriberMetrics {
        self.metrics
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Handles the next message (waiting for one): the event is applied, found a duplicate,
    /// skipped, or dead-lettered; then its offset is stored for the next commit.
    ///
    /// # Errors
    /// [`KafkaError::Kafka`] when receiving fails or the dead-letter topic cannot be written: the
    /// offset is then not stored and the partition is moved back to the message, so the next
    /// poll gets the same message again (nothing after it is handled, or committed, before it).
    pub async fn poll(&mut self) -> Result<(), KafkaError> {
        let consumer = Arc::clone(&self.consumer);
        let message = consumer
            .recv()
            .await
            .map_err(KafkaError::kafka("receive"))?;
        self.metrics.received += 1;
        let span = tracing::debug_span!(
            "cqrs.kafka.consume",
            consumer = %self.group,
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
        );
        if let Err(error) = self.process(&message).instrument(span).await {
            // Not handled and not dead-lettered (the dead-letter topic missing or unreachable):
            // its offset is not stored, and the partition goes back to it, so the next poll gets
            // this message again instead of the one after it, whose stored offset would commit
            // past it.
            if let Err(seek) = consumer.seek(
                message.topic(),
                message.partition(),
                rdkafka::Offset::Offset(message.offset()),
                Duration::from_secs(10),
            ) {
                tracing::warn!(consumer = %self.group, topic = message.topic(), partition = message.partition(), offset = message.offset(), error = %seek, "cannot go back to a message that failed; it is not committed, and the consumer restarts from it");
                return Err(KafkaError::Kafka {
                    operation: "seek back to a failed message",
                    source: seek,
                });
            }
            return Err(error);
        }
        consumer
            .store_offset_from_message(&message)
            .map_err(KafkaError::kafka("store offset"))
    }

    async fn process(&mut self, message: &BorrowedMessage<'_>) -> Result<(), KafkaError> {
        let event = match message.payload() {
            None => Err(crate::MalformedMessage::Empty),
            Some(value) => self.serializer.deserialize(value),
        };
        let event = match event {
            Ok(event) => event,
            Err(malformed) => {
                tracing::warn!(consumer = %self.group, error = %malformed, "malformed message");
                return self.dead_letter(message, &malformed.to_string(), 0).await;
            }
        };
        // The same retry policy as every projection runtime: tries, backoff with jitter, give up.
        let mut retries = cqrs_core::projection::FailurePolicy {
            attempts: self.attempts,
            backoff: self.backoff,
            max_backoff: Duration::from_secs(10),
            mode: cqrs_core::projection::FailureMode::Skip,
        }
        .retries();
        let mut outage = cqrs_core::Backoff::new(self.backoff, Duration::from_secs(10));
        loop {
            let error = match self.handler.handle(&event).await {
                Ok(Handled::Applied) => {
                    self.metrics.applied += 1;
                    return Ok(());
                }
                Ok(Handled::Duplicate) => {
                    self.metrics.duplicates += 1;
                    return Ok(());
                }
                Ok(Handled::Skipped) => {
                    self.metrics.skipped += 1;
                    return Ok(());
                }
                Err(error) => error,
            };
            if let HandleError::Unavailable(reason) = &error {
                // Not the message's fault: wait and try it again, without spending its tries.
                let wait = outage.next_delay();
                tracing::warn!(consumer = %self.group, stream = %event.stream, version = event.version, %reason, retry_in = ?wait, "the handler's database is unavailable; waiting");
                self.metrics.retries += 1;
                tokio::time::sleep(wait).await;
                continue;
            }
            outage.reset();
            let malformed = matches!(error, HandleError::Malformed(_));
            if let Some(failure) = retries.failed_with(&error, malformed).await {
                tracing::warn!(
                    consumer = %self.group, stream = %event.stream, version = event.version,
                    attempts = failure.attempts, %error, "dead-lettering the message"
                );
                return self
                    .dead_letter(message, &failure.error, failure.attempts)
                    .await;
            }
            self.metrics.retries += 1;
        }
    }

    /// Sends `message` to its dead-letter topic, waiting until the broker has it.
    async fn dead_letter(
        &mut self,
        message: &BorrowedMessage<'_>,
        error: &str,
        attempts: u32,
    ) -> Result<(), KafkaError> {
        let topic = format!("{}{}", message.topic(), self.dlq_suffix);
        self.dlq_topics.ensure([topic.as_str()]).await?;
        let attempts = attempts.to_string();
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let mut headers = message
            .headers()
            .map_or_else(OwnedHeaders::new, rdkafka::message::BorrowedHeaders::detach);
        for (key, value) in [
            (header::DLQ_ERROR, error),
            (header::DLQ_ATTEMPTS, attempts.as_str()),
            (header::DLQ_CONSUMER, self.group.as_str()),
            (header::DLQ_TOPIC, message.topic()),
            (header::DLQ_PARTITION, partition.as_str()),
            (header::DLQ_OFFSET, offset.as_str()),
        ] {
            headers = headers.insert(text(key, value));
        }
        let mut record = FutureRecord::to(&topic).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(value) = message.payload() {
            record = record.payload(value);
        }
        self.dlq
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(source, _)| KafkaError::Kafka {
                operation: "send to the dead-letter topic",
                source,
            })?;
        self.metrics.dead_lettered += 1;
        Ok(())
    }

    /// Handles messages until `shutdown` completes, then commits the stored offsets. Receive and
    /// dead-letter failures are logged and retried after a pause (the message is not lost: its
    /// offset was not stored). Reports the lag per partition every
    /// [`with_report_every`](Self::with_report_every). Returns the counters.
    ///
    /// # Errors
    /// [`KafkaError::Kafka`] when the final commit fails.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<SubscriberMetrics, KafkaError> {
        tokio::pin!(shutdown);
        // On a task of its own, so that a long poll (a handler retrying) does not hold it up.
        let _stop_reports = (!self.report_every.is_zero()).then(|| {
            AbortOnDrop(tokio::spawn(
                self.lag_probe()
                    .report(self.report_every)
                    .with_current_subscriber(),
            ))
        });
        loop {
            let outcome = tokio::select! {
                biased;
                () = &mut shutdown => break,
                outcome = self.poll() => outcome,
            };
            if let Err(error) = outcome {
                tracing::warn!(consumer = %self.group, %error, "consumer step failed; retrying");
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
        self.commit()?;
        Ok(self.metrics)
    }

    /// Commits the offsets of the messages handled so far (they are also committed every
    /// second in the background).
    ///
    /// # Errors
    /// [`KafkaError::Kafka`] when the commit fails (nothing handled is lost: those messages come
    /// again and the inbox skips them).
    pub fn commit(&self) -> Result<(), KafkaError> {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored since the last commit.
            Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => Ok(()),
            other => other.map_err(KafkaError::kafka("commit")),
        }
    }

    /// How far this consumer is behind in each partition assigned to it.
    ///
    /// # Errors
    /// [`KafkaError::Kafka`] when the broker does not answer.
    pub async fn lag(&self) -> Result<Vec<PartitionLag>, KafkaError> {
        self.lag_probe().lag().await
    }

    /// A handle that reads this consumer's lag while [`run`](Self::run) owns it (for a metrics
    /// endpoint or a periodic report).
    #[must_use]
    pub fn lag_probe(&self) -> LagProbe {
        LagProbe {
            consumer: Arc::clone(&self.consumer),
            group: self.group.clone(),
        }
    }
}

/// Reads a [`KafkaSubscriber`]'s lag per partition from another task while it runs.
#[derive(Clone)]
pub struct LagProbe {
    consumer: Arc<StreamConsumer>,
    group: String,
}

impl std::fmt::Debug for LagProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LagProbe")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl LagProbe {
    /// How far the consumer is behind in each partition assigned to it: the high watermark less
    /// the offset after the last message it handed out (all of the partition before its first).
    ///
    /// # Errors
    /// [`KafkaError::Kafka`] when the broker does not answer.
    pub async fn lag(&self) -> Result<Vec<PartitionLag>, KafkaError> {
        let consumer = Arc::clone(&self.consumer);
        tokio::task::spawn_blocking(move || partition_lag(&consumer))
            .await
            .map_err(|e| KafkaError::Config(format!("the lag query panicked: {e}")))?
    }

    /// Every `every`, emits a `consumer lag` event per assigned partition (target
    /// `cqrs_kafka::metrics`), until dropped.
    async fn report(self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.lag().await {
                Ok(lags) => {
                    for lag in lags {
                        tracing::info!(
                            target: crate::METRICS_TARGET,
                            consumer = %self.group, topic = %lag.topic, partition = lag.partition,
                            lag = lag.lag, high_watermark = lag.high_watermark, "consumer lag"
                        );
                    }
                }
                Err(error) => tracing::warn!(
                    target: crate::METRICS_TARGET,
                    consumer = %self.group, %error, "consumer lag: unknown"
                ),
            }
        }
    }
}

/// Aborts the task when dropped (however the owner returns).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn partition_lag(consumer: &StreamConsumer) -> Result<Vec<PartitionLag>, KafkaError> {
    let positions = consumer.position().map_err(KafkaError::kafka("position"))?;
    let mut lags = Vec::new();
    for element in positions.elements() {
        let (low, high) = consumer
            .fetch_watermarks(element.topic(), element.partition(), Duration::from_secs(5))
            .map_err(KafkaError::kafka("fetch watermarks"))?;
        let position = element.offset().to_raw().filter(|o| *o >= 0);
        lags.push(PartitionLag {
            topic: element.topic().to_owned(),
            partition: element.partition(),
            position,
            high_watermark: high,
            lag: (high - position.unwrap_or(low)).max(0),
        });
    }
    Ok(lags)
}
