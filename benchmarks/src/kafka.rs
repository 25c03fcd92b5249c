//! K1: the outbox relay against a raw rdkafka producer sending the same payloads (same envelope
//! bytes, headers, keys, producer settings) to the same broker in the same run; the read and the
//! serialization alone; and the end-to-end latency from an append to a consumer receiving the
//! event. Needs a broker at `KAFKA_BROKERS` (`scripts/kafka-up.sh`).

#[path = "../../cqrs-kafka/tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use cqrs_examples::bank::{AccountEvent, Deposit};
use evently_core::prelude::*;
use evently_core::{Checkpoint, EventData, StoredEvent};
use evently_kafka::{EventSerializer, JsonEnvelope, KafkaConfig, KafkaSink, OutboxRelay, TopicMap};
use evently_postgres::{PostgresEventStore, database_url};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::{brokers, unique};

pub(crate) async fn store() -> PostgresEventStore {
    let store = PostgresEventStore::connect(&database_url(), "bench_kafka")
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {}: {e}", database_url()));
    sqlx::query("DROP SCHEMA IF EXISTS bench_kafka CASCADE")
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
    store
}

pub(crate) fn deposit(n: u64) -> EventData {
    EventData::from_event(
        &AccountEvent::Deposited(Deposit {
            amount_cents: n,
            reference: format!("payment {n}"),
        }),
        Metadata::default().with_correlation_id(evently_core::CorrelationId::new()),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Appends `count` deposits over 100 accounts, 1,000 per append.
pub(crate) async fn fill(store: &PostgresEventStore, count: u64) {
    let mut n = 0;
    while n < count {
        let batch = (count - n).min(1_000);
        for account in 0..100 {
            let events: Vec<_> = (n..n + batch)
                .filter(|i| i % 100 == account)
                .map(deposit)
                .collect();
            if !events.is_empty() {
                store
                    .append(
                        &StreamId::new("account", format!("a{account}")),
                        ExpectedVersion::Any,
                        events,
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        n += batch;
    }
}

pub(crate) async fn all_events(store: &PostgresEventStore, count: usize) -> Vec<StoredEvent> {
    let mut events = Vec::with_capacity(count);
    let mut at = Checkpoint::START;
    let deadline = Instant::now() + Duration::from_secs(60);
    while events.len() < count {
        assert!(Instant::now() < deadline, "the events are not readable");
        let page = store
            .read_all(at, 5_000)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if let Some(last) = page.last() {
            at = last.checkpoint;
        }
        events.extend(page);
    }
    events
}

/// The relay from the start of the log until it has delivered `count` events: events/s.
async fn relay(store: &PostgresEventStore, count: usize) -> f64 {
    let map = TopicMap::new()
        .with_prefix(format!("{}.", unique("relay")))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut relay = KafkaSink::new(&KafkaConfig::new(brokers()))
        .and_then(|s| s.with_topics(map))
        .map(|s| OutboxRelay::new(store.clone(), s, "bench"))
        .unwrap_or_else(|e| panic!("{e}"))
        .with_name(unique("bench-relay"))
        .with_batch(5_000);
    // As for the raw producer: the topic exists before the timing starts.
    relay
        .sink_mut()
        .create_topics(&["account"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let mut delivered = 0;
    while delivered < count {
        delivered += relay
            .step()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .delivered;
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// Reading the log as the relay does, nothing sent: events/s.
async fn read_only(store: &PostgresEventStore, count: usize) -> f64 {
    let started = Instant::now();
    let read = all_events(store, count).await.len();
    read as f64 / started.elapsed().as_secs_f64()
}

/// Envelope serialization alone: events/s.
fn serialize_only(events: &[StoredEvent]) -> f64 {
    let started = Instant::now();
    let bytes: usize = events
        .iter()
        .map(|e| JsonEnvelope.serialize(e).map_or(0, |v| v.len()))
        .sum();
    std::hint::black_box(bytes);
    events.len() as f64 / started.elapsed().as_secs_f64()
}

/// A raw producer with the relay's settings sending the same bytes: events/s.
async fn raw(events: &[StoredEvent]) -> f64 {
    let topic = unique("raw");
    let admin: rdkafka::admin::AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &topic,
                6,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    let values: Vec<(Vec<u8>, String, String, Option<String>)> = events
        .iter()
        .map(|e| {
            (
                JsonEnvelope.serialize(e).unwrap_or_else(|e| panic!("{e}")),
                e.event_id.to_string(),
                e.schema_version.to_string(),
                e.metadata.correlation_id.as_ref().map(ToString::to_string),
            )
        })
        .collect();
    // Warm up: connection, producer id and the new topic's metadata, outside the timing.
    producer
        .send(
            FutureRecord::to(&topic).key("warm-up").payload("{}"),
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("{e}"));
    let started = Instant::now();
    let mut pending = Vec::with_capacity(values.len());
    for (event, (value, id, schema, correlation)) in events.iter().zip(&values) {
        let mut headers = OwnedHeaders::new_with_capacity(6)
            .insert(Header {
                key: "cqrs-event-id",
                value: Some(id),
            })
            .insert(Header {
                key: "cqrs-event-type",
                value: Some(&event.event_type),
            })
            .insert(Header {
                key: "cqrs-schema-version",
                value: Some(schema),
            })
            .insert(Header {
                key: "cqrs-aggregate-type",
                value: Some(&event.stream.aggregate_type),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            });
        if let Some(correlation) = correlation {
            headers = headers.insert(Header {
                key: "cqrs-correlation-id",
                value: Some(correlation),
            });
        }
        let mut record = FutureRecord::to(&topic)
            .key(event.stream.aggregate_id.as_str())
            .payload(value)
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(future) => break pending.push(future),
                Err((_, back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }
    for future in pending {
        if let Ok(Err((error, _))) | Err(error) = future
            .await
            .map_err(|_| rdkafka::error::KafkaError::Canceled)
        {
            panic!("delivery failed: {error}");
        }
    }
    events.len() as f64 / started.elapsed().as_secs_f64()
}

/// Append-to-consumer latencies of `samples` single appends with a running relay, in ms.
async fn latency(samples: usize) -> Vec<f64> {
    let store = store().await;
    let prefix = format!("{}.", unique("latency"));
    let map = TopicMap::new()
        .with_prefix(prefix.clone())
        .unwrap_or_else(|e| panic!("{e}"));
    // The topic first, so the consumer can be assigned before the first append.
    fill(&store, 1).await;
    let mut relay = KafkaSink::new(&KafkaConfig::new(brokers()))
        .and_then(|s| s.with_topics(map))
        .map(|s| OutboxRelay::new(store.clone(), s, "latency"))
        .unwrap_or_else(|e| panic!("{e}"));
    while relay
        .step()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .delivered
        == 0
    {}
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(Duration::from_secs(1), async {
        stopped.await.ok();
    }));
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("latency"))
        .set("auto.offset.reset", "latest")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    let topic = format!("{prefix}account");
    consumer
        .subscribe(&[&topic])
        .unwrap_or_else(|e| panic!("{e}"));
    // Wait for the assignment.
    while consumer.assignment().map_or(0, |a| a.count()) == 0 {
        let _ = tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::with_capacity(samples);
    for n in 0..samples {
        let data = deposit(n as u64);
        let id = data.event_id;
        let started = Instant::now();
        store
            .append(
                &StreamId::new("account", "latency"),
                ExpectedVersion::Any,
                vec![data],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
                .await
                .unwrap_or_else(|_| panic!("no message within 30 s"))
                .unwrap_or_else(|e| panic!("{e}"));
            let event = JsonEnvelope
                .deserialize(message.payload().unwrap_or_default())
                .unwrap_or_else(|e| panic!("{e}"));
            if event.event_id == id {
                break;
            }
        }
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
    }
    stop.send(()).ok();
    running.await.ok();
    latencies
}

/// K1's measurements: rates per run, and append-to-consumer latencies in ms.
pub struct K1 {
    /// The relay, events/s per run.
    pub relay: Vec<f64>,
    /// The raw producer, events/s per run.
    pub raw: Vec<f64>,
    /// Reading the log alone, events/s per run.
    pub read: Vec<f64>,
    /// Envelope serialization alone, events/s per run.
    pub serialize: Vec<f64>,
    /// Append to consumer, ms.
    pub latencies: Vec<f64>,
}

/// Runs K1 over `count` events, `runs` times, and `samples` latency samples.
pub async fn k1(count: u64, runs: usize, samples: usize) -> K1 {
    let store = store().await;
    fill(&store, count).await;
    let events = all_events(&store, count as usize).await;
    // The fill's dirty pages are written now, not by the checkpointer during a timed run (only
    // the relay's side reads the database, so only it would pay for them).
    if let Err(e) = sqlx::query("CHECKPOINT").execute(store.pool()).await {
        println!("   K1: CHECKPOINT refused ({e}); timing with the fill's pages unwritten");
    }
    let mut k = K1 {
        relay: Vec::new(),
        raw: Vec::new(),
        read: Vec::new(),
        serialize: Vec::new(),
        latencies: Vec::new(),
    };
    for run in 0..runs {
        // Each side goes first in every other run: neither always meets the broker as the
        // other left it.
        if run % 2 == 0 {
            k.relay.push(relay(&store, events.len()).await);
            k.raw.push(raw(&events).await);
        } else {
            k.raw.push(raw(&events).await);
            k.relay.push(relay(&store, events.len()).await);
        }
        k.read.push(read_only(&store, events.len()).await);
        k.serialize.push(serialize_only(&events));
    }
    k.latencies = latency(samples).await;
    k
}
