//! A subscriber's dead-letter topic (`<topic>.dlq`), for operators: count, list, retry one,
//! retry all, purge.
//!
//! A Kafka topic is an append-only log: nothing can be taken out of its middle. What has been
//! dealt with (retried or purged) is kept as the committed offsets of a consumer group of the
//! tool's own (`cqrs-dlq.<dead-letter topic>` by default): every dead letter before a
//! partition's committed offset is done. A dead letter retried ahead of older ones is recorded
//! in a topic beside it, `<dead-letter topic>.done` (compacted, keyed `<partition>:<offset>`),
//! until the committed offset passes it. (Kafka can keep such a set in the commit's metadata,
//! but not every Kafka-protocol broker keeps that metadata: tansu drops it.) The dead-letter
//! topic itself is never written to, so other readers of it see what the subscriber wrote and
//! nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use evently_transport::envelope::header;
use evently_transport::{BrokerDeadLetter, DeadLetterQueue, TransportError};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::{BROKER, KafkaConfig, kafka};

/// How long a call to the broker may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The dead letters of a [`KafkaSubscriber`](crate::KafkaSubscriber) in topic `<topic>.dlq`.
/// Retrying one sends it back to the topic it was consumed from (`cqrs-dlq-topic`), with its key,
/// payload and headers (without the `cqrs-dlq-*` ones), and waits until the broker has it; only
/// then is it marked done. Listing reads the topic from the oldest dead letter not done.
///
/// One operator at a time: two tools marking dead letters done at once keep the last commit. A
/// failure after a dead letter was sent back but before it was marked done leaves it listed:
/// retrying it again sends it twice, which the consumer's inbox absorbs.
#[derive(Debug, Clone)]
pub struct KafkaDeadLetters {
    config: KafkaConfig,
    topic: String,
    group: String,
}

/// One partition of the dead-letter topic: from where dead letters are not done, which ones
/// further on are, and where it ends.
#[derive(Debug)]
struct PartitionState {
    partition: i32,
    start: i64,
    done: BTreeSet<i64>,
    end: i64,
}

impl PartitionState {
    fn pending(&self) -> u64 {
        let beyond = self.done.range(self.start..self.end).count();
        u64::try_from(self.end - self.start).unwrap_or(0) - beyond as u64
    }

    /// Marks `offset` done, moving the start over the done ones that follow it.
    fn mark(&mut self, offset: i64) {
        self.done.insert(offset);
        while self.done.remove(&self.start) {
            self.start += 1;
        }
        let start = self.start;
        self.done.retain(|o| *o >= start);
    }
}

impl KafkaDeadLetters {
    /// The dead letters in `dead_letter_topic` (a subscriber of topic `orders` writes them to
    /// `orders.dlq`), tracked by consumer group `cqrs-dlq.<dead_letter_topic>`.
    pub fn new(config: &KafkaConfig, dead_letter_topic: impl Into<String>) -> Self {
        let topic = dead_letter_topic.into();
        Self {
            config: config.clone(),
            group: format!("cqrs-dlq.{topic}"),
            topic,
        }
    }

    /// The consumer group that records which dead letters are done.
    #[must_use]
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// The dead-letter topic.
    #[must_use]
    pub fn topic(&self) -> &str {
        &self.topic
    }

    fn consumer(&self) -> Result<BaseConsumer, TransportError> {
        self.config
            .client(
                "-dlq-tool",
                &[
                    ("group.id", self.group.as_str()),
                    ("enable.auto.commit", "false"),
                    ("enable.auto.offset.store", "false"),
                    ("auto.offset.reset", "earliest"),
                ],
            )
            .create()
            .map_err(kafka("create a dead-letter reader"))
    }

    fn missing(&self, reason: impl std::fmt::Display) -> TransportError {
        TransportError::Topology {
            broker: BROKER,
            destination: format!("topic {}", self.topic),
            reason: reason.to_string(),
        }
    }

    /// The partitions of the topic with their committed offsets, done sets and ends.
    fn state(&self, consumer: &BaseConsumer) -> Result<Vec<PartitionState>, TransportError> {
        let mut done = self.read_done()?;
        let metadata = consumer
            .fetch_metadata(Some(&self.topic), TIMEOUT)
            .map_err(kafka("read the dead-letter topic's metadata"))?;
        let topic = metadata
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .ok_or_else(|| self.missing("no such topic"))?;
        if let Some(error) = topic.error() {
            return Err(self.missing(RDKafkaErrorCode::from(error)));
        }
        if topic.partitions().is_empty() {
            return Err(self.missing("no such topic (no partitions)"));
        }
        let mut asked = TopicPartitionList::new();
        for partition in topic.partitions() {
            asked.add_partition(&self.topic, partition.id());
        }
        let committed = consumer
            .committed_offsets(asked, TIMEOUT)
            .map_err(kafka("read the dead-letter group's offsets"))?;
        let mut states = Vec::new();
        for element in committed.elements() {
            let (low, end) = consumer
                .fetch_watermarks(&self.topic, element.partition(), TIMEOUT)
                .map_err(kafka("read the dead-letter topic's offsets"))?;
            let start = match element.offset() {
                Offset::Offset(offset) => offset,
                _ => low,
            };
            // Dead letters deleted by retention are gone, done or not.
            let start = start.max(low);
            let done = done
                .remove(&element.partition())
                .unwrap_or_default()
                .into_iter()
                .filter(|o| *o >= start)
                .collect();
            states.push(PartitionState {
                partition: element.partition(),
                start,
                done,
                end,
            });
        }
        Ok(states)
    }

    /// The topic recording dead letters retried ahead of older ones.
    fn done_topic(&self) -> String {
        format!("{}.done", self.topic)
    }

    /// The dead letters recorded done in the `.done` topic, by partition (none when it does not
    /// exist yet).
    fn read_done(&self) -> Result<BTreeMap<i32, BTreeSet<i64>>, TransportError> {
        let topic = self.done_topic();
        let consumer: BaseConsumer = self
            .config
            .client("-dlq-tool", &[("enable.auto.commit", "false")])
            .set("group.id", format!("{}.reader", self.group))
            .create()
            .map_err(kafka("create a dead-letter reader"))?;
        let metadata = consumer
            .fetch_metadata(Some(&topic), TIMEOUT)
            .map_err(kafka("read the done dead letters' metadata"))?;
        let exists = metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
        let mut done: BTreeMap<i32, BTreeSet<i64>> = BTreeMap::new();
        if !exists {
            return Ok(done);
        }
        let (low, end) = consumer
            .fetch_watermarks(&topic, 0, TIMEOUT)
            .map_err(kafka("read the done dead letters' offsets"))?;
        if end <= low {
            return Ok(done);
        }
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&topic, 0, Offset::Offset(low))
            .map_err(kafka("read the done dead letters"))?;
        consumer
            .assign(&assignment)
            .map_err(kafka("read the done dead letters"))?;
        let deadline = std::time::Instant::now() + TIMEOUT * 3;
        loop {
            if std::time::Instant::now() > deadline {
                return Err(TransportError::Broker {
                    broker: BROKER,
                    operation: "read the done dead letters",
                    source: format!(
                        "topic {topic} was not read to its end within {:?}",
                        TIMEOUT * 3
                    )
                    .into(),
                });
            }
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message.map_err(kafka("read the done dead letters"))?;
            if let Some((partition, offset)) = message
                .key()
                .and_then(|k| std::str::from_utf8(k).ok())
                .and_then(Self::parse_id)
            {
                done.entry(partition).or_default().insert(offset);
            }
            if message.offset() + 1 >= end {
                return Ok(done);
            }
        }
    }

    /// Records dead letter `partition:offset` done in the `.done` topic (created when missing).
    async fn record_done(
        &self,
        producer: &FutureProducer,
        partition: i32,
        offset: i64,
    ) -> Result<(), TransportError> {
        let topic = self.done_topic();
        let admin: AdminClient<DefaultClientContext> = self
            .config
            .client("-dlq-tool", &[])
            .create()
            .map_err(kafka("create an admin client"))?;
        let new =
            NewTopic::new(&topic, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "compact");
        let options = AdminOptions::new().operation_timeout(Some(TIMEOUT));
        for result in admin
            .create_topics([&new], &options)
            .await
            .map_err(kafka("create the done dead letters' topic"))?
        {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(TransportError::Topology {
                        broker: BROKER,
                        destination: topic,
                        reason: code.to_string(),
                    });
                }
            }
        }
        let key = format!("{partition}:{offset}");
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload("retried"),
                TIMEOUT,
            )
            .await
            .map_err(|(source, _)| kafka("record a dead letter done")(source))?;
        Ok(())
    }

    /// Stores where each partition's pending dead letters start.
    fn commit(
        &self,
        consumer: &BaseConsumer,
        states: &[PartitionState],
    ) -> Result<(), TransportError> {
        let mut list = TopicPartitionList::new();
        for state in states {
            list.add_partition_offset(&self.topic, state.partition, Offset::Offset(state.start))
                .map_err(kafka("mark dead letters done"))?;
        }
        consumer
            .commit(&list, CommitMode::Sync)
            .map_err(kafka("mark dead letters done"))
    }

    /// Reads the pending dead letters of `states`, oldest first (by timestamp across
    /// partitions), at most `limit`.
    fn read(
        &self,
        consumer: &BaseConsumer,
        states: &[PartitionState],
        limit: usize,
    ) -> Result<Vec<OwnedMessage>, TransportError> {
        let mut assignment = TopicPartitionList::new();
        let mut remaining = 0;
        for state in states.iter().filter(|s| s.pending() > 0) {
            assignment
                .add_partition_offset(&self.topic, state.partition, Offset::Offset(state.start))
                .map_err(kafka("read the dead-letter topic"))?;
            remaining += 1;
        }
        if remaining == 0 {
            return Ok(Vec::new());
        }
        consumer
            .assign(&assignment)
            .map_err(kafka("read the dead-letter topic"))?;
        let mut messages = Vec::new();
        let mut finished = BTreeSet::new();
        let deadline = std::time::Instant::now() + TIMEOUT * 3;
        while finished.len() < remaining {
            if std::time::Instant::now() > deadline {
                return Err(TransportError::Broker {
                    broker: BROKER,
                    operation: "read the dead-letter topic",
                    source: format!(
                        "the dead letters up to the topic's end did not arrive within {:?}",
                        TIMEOUT * 3
                    )
                    .into(),
                });
            }
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message.map_err(kafka("read the dead-letter topic"))?;
            let Some(state) = states.iter().find(|s| s.partition == message.partition()) else {
                continue;
            };
            if message.offset() + 1 >= state.end {
                finished.insert(state.partition);
            }
            if message.offset() < state.end && !state.done.contains(&message.offset()) {
                messages.push(message.detach());
            }
        }
        messages.sort_by_key(|m| {
            (
                m.timestamp().to_millis().unwrap_or(0),
                m.partition(),
                m.offset(),
            )
        });
        messages.truncate(limit);
        Ok(messages)
    }

    /// The dead letter at `partition:offset`, when it is pending.
    fn find(
        &self,
        consumer: &BaseConsumer,
        states: &[PartitionState],
        partition: i32,
        offset: i64,
    ) -> Result<Option<OwnedMessage>, TransportError> {
        let Some(state) = states.iter().find(|s| s.partition == partition) else {
            return Ok(None);
        };
        if offset < state.start || offset >= state.end || state.done.contains(&offset) {
            return Ok(None);
        }
        let one = [PartitionState {
            partition,
            start: offset,
            done: BTreeSet::new(),
            end: offset + 1,
        }];
        Ok(self
            .read(consumer, &one, 1)?
            .into_iter()
            .find(|m| m.offset() == offset))
    }

    /// Sends `message` back to the topic it was consumed from and waits for the broker.
    async fn send_back(
        &self,
        producer: &FutureProducer,
        message: &OwnedMessage,
    ) -> Result<(), TransportError> {
        let mut source = None;
        let mut headers = OwnedHeaders::new();
        if let Some(all) = message.headers() {
            for h in all.iter() {
                if h.key == header::DLQ_TOPIC {
                    source = h.value.and_then(|v| std::str::from_utf8(v).ok());
                } else if !h.key.starts_with("cqrs-dlq-") {
                    headers = headers.insert(Header {
                        key: h.key,
                        value: h.value,
                    });
                }
            }
        }
        let Some(source) = source else {
            return Err(TransportError::Topology {
                broker: BROKER,
                destination: format!(
                    "{} at {}:{}",
                    self.topic,
                    message.partition(),
                    message.offset()
                ),
                reason: format!(
                    "the dead letter has no `{}` header: where it came from is unknown",
                    header::DLQ_TOPIC
                ),
            });
        };
        let mut record = FutureRecord::to(source).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        producer
            .send(record, TIMEOUT)
            .await
            .map_err(|(source, _)| kafka("send a dead letter back")(source))?;
        Ok(())
    }

    fn producer(&self) -> Result<FutureProducer, TransportError> {
        self.config
            .client(
                "-dlq-tool",
                &[("enable.idempotence", "true"), ("acks", "all")],
            )
            .create()
            .map_err(kafka("create a producer"))
    }

    fn parse_id(id: &str) -> Option<(i32, i64)> {
        let (partition, offset) = id.split_once(':')?;
        Some((partition.parse().ok()?, offset.parse().ok()?))
    }
}

/// Runs blocking librdkafka calls off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TransportError> + Send + 'static,
) -> Result<T, TransportError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TransportError::Broker {
            broker: BROKER,
            operation: "talk to the broker",
            source: e.to_string().into(),
        })?
}

fn dead_letter(message: &OwnedMessage) -> BrokerDeadLetter {
    BrokerDeadLetter::from_headers(
        format!("{}:{}", message.partition(), message.offset()),
        |key| {
            message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key == key)
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .map(ToOwned::to_owned)
            })
        },
    )
}

#[async_trait::async_trait]
impl DeadLetterQueue for KafkaDeadLetters {
    fn describe(&self) -> String {
        format!("Kafka topic {}", self.topic)
    }

    async fn count(&self) -> Result<u64, TransportError> {
        let this = self.clone();
        blocking(move || {
            let consumer = this.consumer()?;
            Ok(this
                .state(&consumer)?
                .iter()
                .map(PartitionState::pending)
                .sum())
        })
        .await
    }

    async fn list(&self, limit: usize) -> Result<Vec<BrokerDeadLetter>, TransportError> {
        let this = self.clone();
        blocking(move || {
            let consumer = this.consumer()?;
            let states = this.state(&consumer)?;
            Ok(this
                .read(&consumer, &states, limit)?
                .iter()
                .map(dead_letter)
                .collect())
        })
        .await
    }

    async fn retry(&self, id: &str) -> Result<bool, TransportError> {
        // Ids are `<partition>:<offset>`, as listed: anything else names no dead letter.
        let Some((partition, offset)) = Self::parse_id(id) else {
            return Ok(false);
        };
        let this = self.clone();
        let found = blocking(move || {
            let consumer = this.consumer()?;
            let states = this.state(&consumer)?;
            let message = this.find(&consumer, &states, partition, offset)?;
            Ok((consumer, states, message))
        })
        .await?;
        let (consumer, mut states, Some(message)) = found else {
            return Ok(false);
        };
        let state = states
            .iter_mut()
            .find(|s| s.partition == partition)
            .ok_or_else(|| self.missing(format_args!("no partition {partition}")))?;
        let ahead = offset != state.start;
        state.mark(offset);
        let producer = self.producer()?;
        self.send_back(&producer, &message).await?;
        // Sent back: from here on it must not be listed again. Ahead of older ones it is
        // recorded beside the topic; the committed offset then moves over what is done.
        if ahead {
            self.record_done(&producer, partition, offset).await?;
        }
        let this = self.clone();
        blocking(move || this.commit(&consumer, &states)).await?;
        Ok(true)
    }

    async fn retry_all(&self) -> Result<u64, TransportError> {
        let this = self.clone();
        let (consumer, mut states, messages) = blocking(move || {
            let consumer = this.consumer()?;
            let states = this.state(&consumer)?;
            let messages = this.read(&consumer, &states, usize::MAX)?;
            Ok((consumer, states, messages))
        })
        .await?;
        let producer = self.producer()?;
        let mut sent = 0;
        let mut failure = None;
        for message in &messages {
            if let Err(error) = self.send_back(&producer, message).await {
                failure = Some(error);
                break;
            }
            if let Some(state) = states
                .iter_mut()
                .find(|s| s.partition == message.partition())
            {
                state.mark(message.offset());
            }
            sent += 1;
        }
        if sent > 0 {
            let this = self.clone();
            blocking(move || this.commit(&consumer, &states)).await?;
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(sent),
        }
    }

    async fn purge(&self) -> Result<u64, TransportError> {
        let this = self.clone();
        blocking(move || {
            let consumer = this.consumer()?;
            let mut states = this.state(&consumer)?;
            let purged = states.iter().map(PartitionState::pending).sum();
            for state in &mut states {
                state.start = state.end;
                state.done.clear();
            }
            this.commit(&consumer, &states)?;
            Ok(purged)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(start: i64, end: i64) -> PartitionState {
        PartitionState {
            partition: 0,
            start,
            done: BTreeSet::new(),
            end,
        }
    }

    #[test]
    fn retried_out_of_order_then_the_gap_closes() {
        let mut s = state(10, 20);
        assert_eq!(s.pending(), 10);
        s.mark(12);
        s.mark(13);
        assert_eq!((s.start, s.done.len(), s.pending()), (10, 2, 8));
        s.mark(11);
        assert_eq!((s.start, s.done.len()), (10, 3));
        s.mark(10);
        assert_eq!((s.start, s.done.len(), s.pending()), (14, 0, 6));
    }

    #[test]
    fn ids_are_partition_and_offset() {
        assert_eq!(KafkaDeadLetters::parse_id("2:41"), Some((2, 41)));
        assert_eq!(KafkaDeadLetters::parse_id("41"), None);
        assert_eq!(KafkaDeadLetters::parse_id("a:1"), None);
    }
}
