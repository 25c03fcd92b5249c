//! The relay's Kafka side: an idempotent producer whose delivery reports are taken in order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use evently_core::RawStoredEvent;
use evently_transport::{BrokerError, Layout, Outgoing, Sink};
use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;

use crate::envelope::text;
use crate::topics::Topics;
use crate::{KafkaConfig, KafkaError, TopicMap};

/// The relay publishing to Kafka: `OutboxRelay::new(store, KafkaSink::new(&config)?, owner)`.
pub type OutboxRelay = evently_transport::Relay<KafkaSink>;

/// Publishes the relay's messages to Kafka: one topic per aggregate type ([`TopicMap`]), the
/// aggregate id as the key (one partition per aggregate, so its order holds), an idempotent
/// producer (`enable.idempotence=true`, `acks=all`) whose delivery reports are taken in the
/// order the messages were queued.
pub struct KafkaSink {
    config: KafkaConfig,
    map: TopicMap,
    topics: Topics,
    producer: ThreadedProducer<Reports>,
    /// The sequence number of the next message queued (the delivery report's opaque).
    next: usize,
    /// The sequence number of the oldest message not yet confirmed.
    oldest: usize,
    /// One topic name per aggregate type seen, shared by its messages.
    names: Vec<(String, Arc<str>)>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("config", &self.config)
            .field("topics", &self.map)
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// A sink to the brokers of `config`, topics from [`TopicMap::new`].
    ///
    /// # Errors
    /// [`KafkaError::Config`] when librdkafka refuses the configuration.
    pub fn new(config: &KafkaConfig) -> Result<Self, KafkaError> {
        let map = TopicMap::new();
        Ok(Self {
            topics: Topics::of(config, &map)?,
            producer: create_producer(config, 0)?,
            config: config.clone(),
            map,
            next: 0,
            oldest: 0,
            names: Vec::new(),
        })
    }

    /// Which topic each aggregate type goes to, and how missing topics are created.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when librdkafka refuses the configuration.
    pub fn with_topics(mut self, map: TopicMap) -> Result<Self, KafkaError> {
        self.topics = Topics::of(&self.config, &map)?;
        self.map = map;
        self.names.clear();
        Ok(self)
    }

    /// The topic map.
    #[must_use]
    pub fn topic_map(&self) -> &TopicMap {
        &self.map
    }

    /// Creates the topics of these aggregate types now if they are missing (the relay creates a
    /// topic before its first event otherwise): a consumer that subscribes before anything was
    /// published needs its topics to exist.
    ///
    /// # Errors
    /// [`KafkaError::Topology`] when the broker refuses.
    pub async fn create_topics(&mut self, aggregate_types: &[&str]) -> Result<(), KafkaError> {
        let topics: Vec<String> = aggregate_types.iter().map(|t| self.map.topic(t)).collect();
        self.topics.ensure(topics.iter().map(String::as_str)).await
    }

    /// The topic of `aggregate_type`, named once.
    fn topic_of(&mut self, aggregate_type: &str) -> Arc<str> {
        if let Some((_, topic)) = self.names.iter().find(|(k, _)| k == aggregate_type) {
            return topic.clone();
        }
        let topic: Arc<str> = self.map.topic(aggregate_type).into();
        self.names.push((aggregate_type.to_owned(), topic.clone()));
        topic
    }
}

/// Kafka headers of the relay's messages.
#[derive(Debug, Clone, Copy, Default)]
pub struct KafkaLayout;

impl Layout for KafkaLayout {
    type Headers = OwnedHeaders;

    fn headers(&self, event: &RawStoredEvent, content_type: &'static str) -> OwnedHeaders {
        let mut headers = Some(OwnedHeaders::new_with_capacity(7));
        evently_transport::envelope::headers_of(event, content_type, |key, value| {
            headers = headers.take().map(|h| h.insert(text(key, value)));
        });
        headers.unwrap_or_default()
    }
}

impl Sink for KafkaSink {
    const BROKER: &'static str = "Kafka";
    const DEFAULT_NAME: &'static str = "kafka-relay";
    type Layout = KafkaLayout;

    fn layout(&self) -> KafkaLayout {
        KafkaLayout
    }

    fn destination(&self, aggregate_type: &str) -> String {
        self.map.topic(aggregate_type)
    }

    async fn prepare(&mut self, aggregate_types: &[&str]) -> Result<(), KafkaError> {
        let topics: Vec<Arc<str>> = aggregate_types.iter().map(|t| self.topic_of(t)).collect();
        self.topics.ensure(topics.iter().map(|t| &**t)).await
    }

    async fn send(&mut self, message: Outgoing<'_, OwnedHeaders>) -> Result<(), BrokerError> {
        let topic = self.topic_of(&message.stream.aggregate_type);
        let seq = self.next;
        let mut record = BaseRecord::with_opaque_to(&topic, seq)
            .key(message.stream.aggregate_id.as_str())
            .payload(message.value)
            .headers(message.headers);
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    self.next += 1;
                    return Ok(());
                }
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((error, _)) => return Err(Box::new(error)),
            }
        }
    }

    async fn confirmed(&mut self) -> Result<(), BrokerError> {
        let seq = self.oldest;
        let reports = self.producer.context();
        let outcome = loop {
            // Registered before looking, so a report arriving in between still wakes it.
            let arrived = reports.arrived.notified();
            if let Some(outcome) = reports.take(seq) {
                break outcome;
            }
            arrived.await;
        };
        self.oldest += 1;
        outcome.map_err(|e| Box::new(e) as BrokerError)
    }

    fn forget(&mut self) {
        self.oldest = self.next;
    }

    async fn restart(&mut self) -> Result<(), KafkaError> {
        // A fatal producer error (fenced epoch, ...) leaves the producer unusable, and any failure
        // may mean a topic went missing.
        self.producer = create_producer(&self.config, self.next)?;
        self.oldest = self.next;
        self.topics.forget();
        Ok(())
    }
}

/// The producer's context: delivery reports by sequence number, for the sink to take in order.
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
            // The reports before `seq` belong to messages the relay forgot.
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
        .map_err(|e| KafkaError::config(crate::BROKER, e))
}
