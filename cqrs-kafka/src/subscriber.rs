//! Kafka consumers feeding projections and event-started sagas.
//!
//! A [`KafkaSubscriber`] reads its topics in a consumer group and hands each event to a
//! [`MessageHandler`]: [`Transactional`](crate::Transactional) for a projection that writes PostgreSQL
//! (`derive(Projection)` with `context = PgConnection`, the same type a
//! [`ProjectionWorker`](evently_postgres::projection::ProjectionWorker) runs from the store), whose
//! effect commits with an inbox row so a redelivered message has no second effect; [`InProcess`](crate::InProcess)
//! for a projection with `Context = ()`, e.g. a [`SagaStarter`](evently_core::saga::SagaStarter),
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

use evently_transport::{Consumer, EventSerializer, MessageHandler, Verdict};
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tracing::Instrument;
use tracing::instrument::WithSubscriber;

use crate::envelope::{header, text};
use crate::topics::Topics;
use crate::{KafkaConfig, KafkaError};

/// The subscriber's counters since it was created (every broker's consumer counts the same).
pub type SubscriberMetrics = evently_transport::ConsumerMetrics;

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
    core: Consumer<H>,
    group: String,
    report_every: Duration,
    /// The configuration and topics, for the dead-letter alert.
    config: KafkaConfig,
    topics: Vec<String>,
    /// Warn when a dead-letter topic passes this size, checked this often.
    alert: Option<(u64, Duration)>,
}

impl<H> std::fmt::Debug for KafkaSubscriber<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSubscriber")
            .field("group", &self.group)
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl<H: MessageHandler> KafkaSubscriber<H> {
    /// A subscriber in consumer group `group` reading `topics` from the earliest offset (unless
    /// the group has committed ones), 5 attempts per message with a backoff from 100 ms,
    /// dead letters to `<topic>.dlq`.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when librdkafka refuses the configuration, [`KafkaError::Broker`]
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
            .map_err(|e| KafkaError::config(crate::BROKER, e))?;
        consumer
            .subscribe(topics)
            .map_err(crate::kafka("subscribe"))?;
        let dlq = config
            .client("-dlq", &[])
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(|e| KafkaError::config(crate::BROKER, e))?;
        Ok(Self {
            consumer: Arc::new(consumer),
            dlq,
            dlq_topics: Topics::new(config, 1, 1)?,
            dlq_suffix: ".dlq".to_owned(),
            core: Consumer::new(group.clone(), handler),
            group,
            report_every: evently_transport::REPORT_EVERY,
            config: config.clone(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            alert: None,
        })
    }

    /// How often a failing handler is tried (at least once) and the first backoff (doubling, at
    /// most 10 s).
    #[must_use]
    pub fn with_retries(mut self, attempts: u32, backoff: Duration) -> Self {
        self.core.set_retries(attempts, backoff);
        self
    }

    /// While running, checks the size of each dead-letter topic (what
    /// [`KafkaDeadLetters`](crate::KafkaDeadLetters) counts: not yet retried or purged) every
    /// `every` and logs a `warn` event (target `cqrs::metrics`, message `dead letters over
    /// threshold`) when it is over `threshold` (an `info` event with the count otherwise).
    #[must_use]
    pub fn with_dead_letter_alert(mut self, threshold: u64, every: Duration) -> Self {
        self.alert = Some((threshold, every));
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
    /// (target `cqrs::metrics`, message `consumer lag`; 10 s by default, never with
    /// `Duration::ZERO`).
    #[must_use]
    pub fn with_report_every(mut self, every: Duration) -> Self {
        self.report_every = every;
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
    pub fn metrics(&self) -> SubscriberMetrics {
        self.core.metrics()
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        self.core.handler()
    }

    /// Handles the next message (waiting for one): the event is applied, found a duplicate,
    /// skipped, or dead-lettered; then its offset is stored for the next commit.
    ///
    /// # Errors
    /// [`KafkaError::Broker`] when receiving fails or the dead-letter topic cannot be written: the
    /// offset is then not stored and the partition is moved back to the message, so the next
    /// poll gets the same message again (nothing after it is handled, or committed, before it).
    pub async fn poll(&mut self) -> Result<(), KafkaError> {
        let consumer = Arc::clone(&self.consumer);
        let message = consumer.recv().await.map_err(crate::kafka("receive"))?;
        self.core.received();
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
                return Err(crate::kafka("seek back to a failed message")(seek));
            }
            return Err(error);
        }
        consumer
            .store_offset_from_message(&message)
            .map_err(crate::kafka("store offset"))
    }

    async fn process(&mut self, message: &BorrowedMessage<'_>) -> Result<(), KafkaError> {
        match self.core.process(message.payload()).await {
            Verdict::Done(_) => Ok(()),
            Verdict::DeadLetter { reason, attempts } => {
                self.dead_letter(message, &reason, attempts).await
            }
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
            .map_err(|(source, _)| crate::kafka("send to the dead-letter topic")(source))?;
        self.core.dead_lettered();
        Ok(())
    }

    /// Handles messages until `shutdown` completes, then commits the stored offsets. Receive and
    /// dead-letter failures are logged and retried after a pause (the message is not lost: its
    /// offset was not stored). Reports the lag per partition every
    /// [`with_report_every`](Self::with_report_every). Returns the counters.
    ///
    /// # Errors
    /// [`KafkaError::Broker`] when the final commit fails.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<SubscriberMetrics, KafkaError> {
        tokio::pin!(shutdown);
        let dead_letter_topics: Vec<String> = self
            .topics
            .iter()
            .map(|topic| format!("{topic}{}", self.dlq_suffix))
            .collect();
        if self.alert.is_some() {
            // Watched from the start: a dead-letter topic that does not exist yet (it is made at
            // the first dead letter) would be reported as unknown at every check.
            if let Err(error) = self
                .dlq_topics
                .ensure(dead_letter_topics.iter().map(String::as_str))
                .await
            {
                tracing::warn!(consumer = %self.group, %error, "dead-letter topics not created");
            }
        }
        let _alerts: Vec<_> = self
            .alert
            .map(|(threshold, every)| {
                dead_letter_topics
                    .iter()
                    .map(|topic| {
                        evently_transport::dead_letters::AlertTask::spawn(
                            Box::new(crate::KafkaDeadLetters::new(&self.config, topic.clone())),
                            threshold,
                            every,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
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
        Ok(self.core.metrics())
    }

    /// Commits the offsets of the messages handled so far (they are also committed every
    /// second in the background).
    ///
    /// # Errors
    /// [`KafkaError::Broker`] when the commit fails (nothing handled is lost: those messages come
    /// again and the inbox skips them).
    pub fn commit(&self) -> Result<(), KafkaError> {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored since the last commit.
            Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => Ok(()),
            other => other.map_err(crate::kafka("commit")),
        }
    }

    /// How far this consumer is behind in each partition assigned to it.
    ///
    /// # Errors
    /// [`KafkaError::Broker`] when the broker does not answer.
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
    /// [`KafkaError::Broker`] when the broker does not answer.
    pub async fn lag(&self) -> Result<Vec<PartitionLag>, KafkaError> {
        let consumer = Arc::clone(&self.consumer);
        tokio::task::spawn_blocking(move || partition_lag(&consumer))
            .await
            .map_err(|e| {
                KafkaError::config(crate::BROKER, format_args!("the lag query panicked: {e}"))
            })?
    }

    /// Every `every`, emits a `consumer lag` event per assigned partition (target
    /// `cqrs::metrics`), until dropped.
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
    let positions = consumer.position().map_err(crate::kafka("position"))?;
    let mut lags = Vec::new();
    for element in positions.elements() {
        let (low, high) = consumer
            .fetch_watermarks(element.topic(), element.partition(), Duration::from_secs(5))
            .map_err(crate::kafka("fetch watermarks"))?;
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
