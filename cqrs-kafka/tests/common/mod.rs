//! What the Kafka test files share: appending deposits, reading the store and the topics back,
//! and auditing what was read against what was stored.
#![allow(dead_code, reason = "each test file uses its own subset")]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::support::unique;
use cqrs_examples::bank::{AccountEvent, Deposit};
use evently_core::EventData;
use evently_core::prelude::*;
use evently_kafka::{EventSerializer, JsonEnvelope, OutboxRelay, TopicMap};
use evently_postgres::PostgresEventStore;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Appends `count` deposits spread over `accounts` accounts, with amounts from `first`.
pub(crate) async fn deposit(store: &PostgresEventStore, first: u64, count: u64, accounts: u64) {
    for n in first..first + count {
        let event = AccountEvent::Deposited(Deposit {
            amount_cents: n,
            reference: String::new(),
        });
        let metadata = Metadata::default().with_correlation_id(evently_core::CorrelationId::new());
        let data = EventData::from_event(&event, metadata).unwrap_or_else(|e| panic!("{e}"));
        store
            .append(
                &StreamId::new("account", format!("a{}", n % accounts)),
                ExpectedVersion::Any,
                vec![data],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Every event in the store, in the global order.
pub(crate) async fn all_events(store: &PostgresEventStore) -> Vec<evently_core::StoredEvent> {
    let mut events = Vec::new();
    let mut at = evently_core::Checkpoint::START;
    loop {
        let page = store
            .read_all(at, 1_000)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let Some(last) = page.last() else {
            return events;
        };
        at = last.checkpoint;
        events.extend(page);
    }
}

/// Steps `relay` until it has delivered everything committed so far.
pub(crate) async fn drain(relay: &mut OutboxRelay, store: &PostgresEventStore) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let head = store.head().await.unwrap_or_else(|e| panic!("{e}"));
    loop {
        match relay.step().await {
            Ok(step) if step.delivered == 0 && Some(step.checkpoint) >= head => return,
            Ok(_) => {}
            Err(error) => eprintln!("relay step failed (retrying): {error}"),
        }
        assert!(Instant::now() < deadline, "the relay did not catch up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A message read back from a topic.
#[derive(Debug, Clone)]
pub(crate) struct Read {
    pub(crate) key: String,
    pub(crate) event: evently_core::StoredEvent,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) partition: i32,
}

/// A consumer outside any group, reading `topics` of `brokers` from their beginnings.
pub(crate) fn reader(brokers: &str, topics: &[String]) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
        for t in metadata.topics() {
            for p in t.partitions() {
                assignment
                    .add_partition_offset(topic, p.id(), Offset::Beginning)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
    consumer
        .assign(&assignment)
        .unwrap_or_else(|e| panic!("{e}"));
    consumer
}

/// Reads `topics` of `brokers` until `done` says so (or a minute passes).
pub(crate) async fn read_until(
    brokers: &str,
    topics: &[String],
    done: impl Fn(&[Read]) -> bool,
) -> Vec<Read> {
    let consumer = reader(brokers, topics);
    let mut read = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(&read) {
        assert!(
            Instant::now() < deadline,
            "read {} messages from {topics:?} in a minute, not all expected",
            read.len()
        );
        let Ok(Ok(message)) =
            tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
        else {
            continue;
        };
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let event = JsonEnvelope
            .deserialize(message.payload().unwrap_or_default())
            .unwrap_or_else(|e| panic!("the relay wrote a malformed message: {e}"));
        read.push(Read {
            key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
            event,
            headers,
            partition: message.partition(),
        });
    }
    read
}

/// Checks what was read against what the store has: (missing, duplicates, order inversions).
/// An inversion is an event read for the first time after a later event of its stream.
pub(crate) fn audit(stored: &[evently_core::StoredEvent], read: &[Read]) -> (usize, usize, usize) {
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    let mut last_version: HashMap<&StreamId, u64> = HashMap::new();
    let mut inversions = 0;
    for r in read {
        if !seen.insert(r.event.event_id) {
            duplicates += 1;
            continue;
        }
        let last = last_version.entry(&r.event.stream).or_insert(0);
        if r.event.version < *last {
            inversions += 1;
        }
        *last = (*last).max(r.event.version);
    }
    let missing = stored
        .iter()
        .filter(|e| !seen.contains(&e.event_id))
        .count();
    (missing, duplicates, inversions)
}

/// Topics named as no earlier run named them, with `partitions` partitions, and the name of the
/// `account` topic among them.
pub(crate) fn account_topics(name: &str, partitions: i32) -> (TopicMap, String) {
    let prefix = format!("{}.", unique(name));
    let map = TopicMap::new()
        .with_prefix(prefix.clone())
        .and_then(|m| m.with_layout(partitions, 1))
        .unwrap_or_else(|e| panic!("{e}"));
    (map, format!("{prefix}account"))
}

pub(crate) fn distinct(read: &[Read]) -> usize {
    read.iter()
        .map(|r| r.event.event_id)
        .collect::<HashSet<_>>()
        .len()
}
