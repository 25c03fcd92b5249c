//! The relay and the subscriber against a real Kafka-protocol broker (`scripts/kafka-up.sh` starts
//! one at `KAFKA_BROKERS`, default 127.0.0.1:9092) and the real PostgreSQL.

#[path = "../../cqrs-postgres/tests/common/mod.rs"]
mod pg;

#[path = "support/mod.rs"]
mod support;

mod common;
use common::*;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use cqrs_examples::bank::AccountEvent;
use evently_core::RecordedEvent;
use evently_core::prelude::*;
use evently_core::projection::{FailureMode, HandlerError};
use evently_core::testing::cut_after;
use evently_kafka::envelope::{header, header_value};
use evently_kafka::{
    EventSerializer, JsonEnvelope, KafkaConfig, KafkaError, KafkaSink, KafkaSubscriber,
    OutboxRelay, TopicMap, Transactional,
};
use evently_postgres::PostgresEventStore;
use rand::Rng;
use rdkafka::ClientConfig;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{AssertSqlSafe, PgConnection};
use support::{brokers, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_reaches_its_topic_keyed_in_order_with_its_headers() {
    let store = pg::fresh_store("k_basic").await;
    deposit(&store, 1, 300, 7).await;
    let (map, topic) = account_topics("basic", 3);
    let mut relay = KafkaSink::new(&KafkaConfig::new(brokers()))
        .and_then(|s| s.with_topics(map.clone()))
        .map(|s| OutboxRelay::new(store.clone(), s, "relay-a"))
        .unwrap_or_else(|e| panic!("{e}"))
        .with_batch(64);
    drain(&mut relay, &store).await;
    assert_eq!(relay.lag().await.unwrap_or_else(|e| panic!("{e}")), 0);
    assert_eq!(relay.metrics().delivered, 300);
    assert_eq!(relay.metrics().failures, 0);

    // A second relay under the same name waits for the lease.
    let mut other = KafkaSink::new(&KafkaConfig::new(brokers()))
        .map(|s| OutboxRelay::new(store.clone(), s, "relay-b"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(other.step().await, Err(KafkaError::LeaseLost(_))));

    let stored = all_events(&store).await;
    let read = read_until(&brokers(), std::slice::from_ref(&topic), |r| r.len() >= 300).await;
    assert_eq!(audit(&stored, &read), (0, 0, 0));
    let mut partitions_of: HashMap<&str, HashSet<i32>> = HashMap::new();
    for r in &read {
        assert_eq!(r.key, r.event.stream.aggregate_id.as_str());
        partitions_of.entry(&r.key).or_default().insert(r.partition);
        let h = |k: &str| r.headers.get(k).map(String::as_str);
        assert_eq!(
            h(header::EVENT_ID),
            Some(r.event.event_id.to_string().as_str())
        );
        assert_eq!(h(header::EVENT_TYPE), Some("MoneyDeposited"));
        assert_eq!(h(header::SCHEMA_VERSION), Some("2"));
        assert_eq!(h(header::AGGREGATE_TYPE), Some("account"));
        assert_eq!(h(header::CONTENT_TYPE), Some("application/json"));
        assert_eq!(
            h(header::CORRELATION_ID),
            r.event
                .metadata
                .correlation_id
                .map(|c| c.to_string())
                .as_deref()
        );
    }
    assert_eq!(partitions_of.len(), 7);
    assert!(
        partitions_of.values().all(|p| p.len() == 1),
        "one partition per key"
    );
    // What was read is what was stored, field for field.
    let by_id: HashMap<_, _> = stored.iter().map(|e| (e.event_id, e)).collect();
    for r in &read {
        assert_eq!(
            &&r.event,
            by_id
                .get(&r.event.event_id)
                .unwrap_or_else(|| panic!("unknown event"))
        );
    }
}

/// With topic creation off, a topic that does not exist fails the deliveries to it, naming it;
/// nothing is checkpointed; once the topic is made (by whoever manages topics) the relay sends
/// everything from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_creation_off_a_missing_topic_fails_the_delivery_and_nothing_is_skipped() {
    let store = pg::fresh_store("k_no_create").await;
    deposit(&store, 1, 30, 3).await;
    let (map, topic) = account_topics("nocreate", 2);
    let config = KafkaConfig::new(brokers())
        .set("topic.metadata.propagation.max.ms", "200")
        .set("message.timeout.ms", "3000");
    let mut relay = KafkaSink::new(&config)
        .and_then(|s| s.with_topics(map.clone().with_topic_creation(false)))
        .map(|s| OutboxRelay::new(store.clone(), s, "no-create"))
        .unwrap_or_else(|e| panic!("{e}"))
        .with_batch(10);
    let deadline = Instant::now() + Duration::from_secs(30);
    let failure = loop {
        assert!(Instant::now() < deadline, "no delivery failed");
        match relay.step().await {
            Ok(_) => {}
            Err(KafkaError::Delivery(error)) => break error,
            Err(other) => panic!("{other}"),
        }
    };
    assert_eq!(failure.destination, topic);
    assert!(failure.to_string().contains(&topic), "{failure}");
    assert_eq!(
        relay.checkpoint().await.unwrap_or_else(|e| panic!("{e}")),
        evently_core::Checkpoint::START
    );
    // The topic is made elsewhere (here: by a relay that creates topics).
    let mut creator = KafkaSink::new(&KafkaConfig::new(brokers()))
        .and_then(|s| s.with_topics(map))
        .map(|s| OutboxRelay::new(store.clone(), s, "creator"))
        .unwrap_or_else(|e| panic!("{e}"));
    creator
        .sink_mut()
        .create_topics(&["account"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drain(&mut relay, &store).await;
    let stored = all_events(&store).await;
    let read = read_until(&brokers(), std::slice::from_ref(&topic), |r| {
        distinct(r) >= 30
    })
    .await;
    let (missing, _, inversions) = audit(&stored, &read);
    assert_eq!((missing, inversions), (0, 0));
}

/// Counts every deposit it applies, one row per application: a second effect of one event shows
/// as a second row.
#[derive(Projection)]
#[projection(name = "deposit_effects", events(AccountEvent), context = PgConnection)]
struct DepositEffects {
    schema: String,
    /// Fail on deposits whose amount is a multiple of 13.
    poison: bool,
}

/// The effects handler on `store`'s schema, fed from Kafka with its inbox.
fn deposit_effects(store: &PostgresEventStore, poison: bool) -> Transactional<DepositEffects> {
    Transactional::new(
        store.clone(),
        DepositEffects {
            schema: store.schema().to_owned(),
            poison,
        },
    )
}

#[async_trait::async_trait]
impl Handles<AccountEvent, PgConnection> for DepositEffects {
    async fn handle(
        &mut self,
        event: &RecordedEvent<AccountEvent>,
        conn: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        if let AccountEvent::Deposited(deposit) = &event.event {
            if self.poison && deposit.amount_cents % 13 == 0 {
                return Err(format!("poison deposit of {}", deposit.amount_cents).into());
            }
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO \"{}\".effects (event_id, amount) VALUES ($1, $2)",
                self.schema
            )))
            .bind(event.event_id.0)
            .bind(i64::try_from(deposit.amount_cents)?)
            .execute(conn)
            .await?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_pages_read_in_two_halves_lose_and_reorder_nothing_under_concurrent_writers() {
    // Pages of 2,000 are read as two halves of 1,000 at once (split at the middle event's
    // checkpoint), while writers keep committing.
    let store = pg::fresh_store("k_halves").await;
    deposit(&store, 1, 5_000, 31).await;
    let (map, topic) = account_topics("halves", 6);
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0..250 {
                    deposit(&store, 100_000 + w * 1_000 + n, 1, 31).await;
                }
            })
        })
        .collect();
    let mut relay = KafkaSink::new(&KafkaConfig::new(brokers()))
        .and_then(|s| s.with_topics(map))
        .map(|s| OutboxRelay::new(store.clone(), s, "halves"))
        .unwrap_or_else(|e| panic!("{e}"))
        .with_batch(2_000);
    let mut full = 0;
    while !writers.iter().all(tokio::task::JoinHandle::is_finished) {
        if relay.step().await.unwrap_or_else(|e| panic!("{e}")).sent == 2_000 {
            full += 1;
        }
    }
    for writer in writers {
        writer.await.unwrap_or_else(|e| panic!("{e}"));
    }
    drain(&mut relay, &store).await;
    // The first page is read whole; a full page after a full page was read in halves (a half
    // that did not end at the split would have made it a page of 1,000).
    assert!(full >= 2, "full pages: {full}");
    let stored = all_events(&store).await;
    assert_eq!(stored.len(), 6_000);
    let read = read_until(&brokers(), std::slice::from_ref(&topic), |r| {
        distinct(r) >= stored.len()
    })
    .await;
    assert_eq!(audit(&stored, &read), (0, 0, 0));
}

/// The JSON envelope, except that it refuses deposits of 5 cents.
struct RefusesFive;

impl EventSerializer for RefusesFive {
    fn content_type(&self) -> &'static str {
        JsonEnvelope.content_type()
    }

    fn serialize(
        &self,
        event: &evently_core::StoredEvent,
    ) -> Result<Vec<u8>, evently_kafka::SerializeError> {
        if event.payload["amount_cents"] == 5 {
            return Err(evently_kafka::SerializeError {
                event_id: event.event_id,
                stream: event.stream.clone(),
                event_type: event.event_type.clone(),
                reason: "five cents".to_owned(),
            });
        }
        JsonEnvelope.serialize(event)
    }

    fn deserialize(
        &self,
        value: &[u8],
    ) -> Result<evently_core::StoredEvent, evently_kafka::MalformedMessage> {
        JsonEnvelope.deserialize(value)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_the_serializer_refuses_stops_the_relay_before_it() {
    let store = pg::fresh_store("k_refuse").await;
    deposit(&store, 1, 8, 3).await;
    let (map, topic) = account_topics("refuse", 6);
    let stored = all_events(&store).await;
    for batch in [3, 100] {
        let mut relay = KafkaSink::new(&KafkaConfig::new(brokers()))
            .and_then(|s| s.with_topics(map.clone()))
            .map(|s| OutboxRelay::new(store.clone(), s, "refuse"))
            .unwrap_or_else(|e| panic!("{e}"))
            .with_name(format!("refuse-{batch}"))
            .with_serializer(RefusesFive)
            .with_batch(batch);
        let mut refused = None;
        for _ in 0..10 {
            match relay.step().await {
                Ok(_) => {}
                Err(KafkaError::Serialize(error)) => {
                    refused = Some(error);
                    break;
                }
                Err(error) => panic!("{error}"),
            }
        }
        let refused = refused.unwrap_or_else(|| panic!("batch {batch}: nothing refused"));
        assert_eq!(refused.event_id, stored[4].event_id, "{refused}");
        assert!(refused.to_string().contains("five cents"), "{refused}");
        // Everything before it is delivered and checkpointed.
        let checkpoint = relay.checkpoint().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(checkpoint, stored[3].checkpoint, "batch {batch}");
        // Again: it stops at the same event.
        assert!(matches!(relay.step().await, Err(KafkaError::Serialize(_))));
    }
    let read = read_until(&brokers(), std::slice::from_ref(&topic), |r| r.len() >= 8).await;
    // Two relays (batches of 3 and of 100) each published the first four, and only those.
    let amounts: HashSet<u64> = read
        .iter()
        .map(|r| r.event.payload["amount_cents"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(amounts, (1..=4).collect());
}

/// A stored row that cannot be read as an event (metadata of another shape, written around the
/// store) stops the relay like a refused event: everything before it is delivered and
/// checkpointed, nothing after it is sent, the error names the row and its checkpoint, and
/// `run` returns it instead of retrying for ever; with small pages and with one page.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stored_row_that_cannot_be_read_stops_the_relay_before_it() {
    let store = pg::fresh_store("k_corrupt").await;
    deposit(&store, 1, 40, 3).await;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO \"{}\".events (event_id, aggregate_type, aggregate_id, version, event_type, schema_version, payload, metadata) \
         VALUES (gen_random_uuid(), 'account', 'bad', 1, 'MoneyDeposited', 2, '{{\"amount_cents\": 1, \"reference\": \"\"}}', '{{\"correlation_id\": [1]}}')",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    deposit(&store, 41, 10, 3).await;
    let (map, topic) = account_topics("corrupt", 3);
    // The readable prefix: a global read returns the events before the row, then the row's error.
    let mut stored = Vec::new();
    loop {
        let after = stored.last().map_or(
            evently_core::Checkpoint::START,
            |e: &evently_core::StoredEvent| e.checkpoint,
        );
        match store.read_all(after, 1_000).await {
            // Held back a moment by another test's open transaction.
            Ok(page) if page.is_empty() => tokio::time::sleep(Duration::from_millis(10)).await,
            Ok(page) => stored.extend(page),
            Err(evently_core::StoreError::Corrupt(_)) => break,
            Err(error) => panic!("{error}"),
        }
    }
    assert_eq!(stored.len(), 40, "the readable prefix");
    for batch in [7, 4_000] {
        let mut relay = KafkaSink::new(&KafkaConfig::new(brokers()))
            .and_then(|s| s.with_topics(map.clone()))
            .map(|s| OutboxRelay::new(store.clone(), s, "corrupt"))
            .unwrap_or_else(|e| panic!("{e}"))
            .with_name(format!("corrupt-{batch}"))
            .with_batch(batch);
        let mut stopped = None;
        for _ in 0..20 {
            match relay.step().await {
                Ok(_) => {}
                Err(KafkaError::Store(evently_core::StoreError::Corrupt(row))) => {
                    stopped = Some(row);
                    break;
                }
                Err(error) => panic!("{error}"),
            }
        }
        let row = stopped.unwrap_or_else(|| panic!("batch {batch}: the relay did not stop"));
        assert_eq!(row.stream, StreamId::new("account", "bad"));
        assert!(row.message.starts_with("metadata"), "{row}");
        let checkpoint = relay.checkpoint().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(checkpoint, stored[39].checkpoint, "batch {batch}");
        assert!(row.checkpoint > checkpoint);
        // `run` stops on it too, rather than retrying for ever.
        let ran = tokio::time::timeout(
            Duration::from_secs(30),
            relay.run(Duration::from_millis(50), std::future::pending()),
        )
        .await
        .unwrap_or_else(|_| panic!("run kept retrying a row that cannot be read"));
        assert!(matches!(
            ran,
            Err(KafkaError::Store(evently_core::StoreError::Corrupt(_)))
        ));
    }
    let read = read_until(&brokers(), std::slice::from_ref(&topic), |r| {
        distinct(r) >= 40
    })
    .await;
    // Nothing after the row was sent by either relay.
    assert!(
        read.iter()
            .all(|r| r.event.payload["amount_cents"].as_u64().unwrap_or(0) <= 40),
        "an event after the unreadable row was published"
    );
    assert_eq!(distinct(&read), 40);
}

/// A fresh store (schema `k_<name>`) with an effects table and deposits 1..=`count` over
/// `accounts` accounts, relayed to a topic of `partitions`: the store, the config, the topic and
/// the relay (to relay more).
async fn relayed_deposits(
    name: &str,
    count: u64,
    accounts: u64,
    partitions: i32,
) -> (PostgresEventStore, KafkaConfig, String, OutboxRelay) {
    let store = pg::fresh_store(&format!("k_{name}")).await;
    effects_table(&store).await;
    deposit(&store, 1, count, accounts).await;
    let (map, topic) = account_topics(name, partitions);
    let config = KafkaConfig::new(brokers());
    let mut relay = KafkaSink::new(&config.clone())
        .and_then(|s| s.with_topics(map))
        .map(|s| OutboxRelay::new(store.clone(), s, "relay"))
        .unwrap_or_else(|e| panic!("{e}"));
    drain(&mut relay, &store).await;
    (store, config, topic, relay)
}

async fn effects_table(store: &PostgresEventStore) {
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE \"{}\".effects (event_id UUID NOT NULL, amount BIGINT NOT NULL)",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// (rows, distinct events, events applied more than once).
async fn effects(store: &PostgresEventStore) -> (i64, i64, i64) {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT count(*), count(DISTINCT event_id), \
                (SELECT count(*) FROM (SELECT event_id FROM \"{0}\".effects GROUP BY event_id HAVING count(*) > 1) d) \
         FROM \"{0}\".effects",
        store.schema()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_killed_at_random_points_loses_nothing_and_keeps_per_stream_order() {
    const WRITERS: u64 = 4;
    const PER_WRITER: u64 = 150;
    const KILLS: usize = 200;
    let store = pg::fresh_store("k_kill").await;
    effects_table(&store).await;
    let (map, topic) = account_topics("kill", 6);
    // One record per producer batch: tansu 0.6.0 returns nothing of a record batch to a consumer
    // that resumes at an offset inside it (its fetch looks for batches starting at or after the
    // offset), so a consumer group restarted mid-batch would skip the rest of that batch. Real
    // Kafka brokers return the whole batch and the client drops the records before the offset.
    let config = KafkaConfig::new(brokers()).set("batch.num.messages", "1");

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0..PER_WRITER {
                    deposit(&store, 1 + w * PER_WRITER + n, 1, 23).await;
                    if n % 10 == 0 {
                        let pause = rand::rng().random_range(0..8);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                }
            })
        })
        .collect();

    let mut cut = 0;
    let mut relayed_before_a_cut = 0;
    let (mut step_time, mut drop_time) = (Duration::ZERO, Duration::ZERO);
    for kill in 0..KILLS {
        // The same owner restarted: it takes its lease back at once.
        let mut relay = KafkaSink::new(&config.clone())
            .and_then(|s| s.with_topics(map.clone()))
            .map(|s| OutboxRelay::new(store.clone(), s, "relay"))
            .unwrap_or_else(|e| panic!("{e}"))
            .with_batch(10);
        // A few pipelined steps (each sends a batch and acknowledges the one before), cut at a
        // random poll: before a send, between sends and reports, in the checkpoint move.
        let (steps, polls) = {
            let mut rng = rand::rng();
            (rng.random_range(1..=4), rng.random_range(0..40))
        };
        let started = Instant::now();
        let outcome = cut_after(polls, async {
            let mut delivered = 0;
            for _ in 0..steps {
                delivered += relay.step().await?.delivered;
            }
            Ok::<_, KafkaError>(delivered)
        })
        .await;
        step_time += started.elapsed();
        let started = Instant::now();
        drop(relay);
        drop_time += started.elapsed();
        match outcome {
            None => cut += 1,
            Some(Ok(delivered)) => relayed_before_a_cut += delivered,
            Some(Err(error)) => panic!("kill {kill}: {error}"),
        }
        // Dropping the relay drops its producer mid-flight, as a dying process would.
    }
    println!("steps {step_time:?}, drops {drop_time:?}");
    for writer in writers {
        writer.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let mut relay = KafkaSink::new(&config.clone())
        .and_then(|s| s.with_topics(map.clone()))
        .map(|s| OutboxRelay::new(store.clone(), s, "relay"))
        .unwrap_or_else(|e| panic!("{e}"));
    drain(&mut relay, &store).await;

    let stored = all_events(&store).await;
    assert_eq!(stored.len() as u64, WRITERS * PER_WRITER);
    let read = read_until(&brokers(), std::slice::from_ref(&topic), |r| {
        distinct(r) >= stored.len()
    })
    .await;
    let (missing, duplicates, inversions) = audit(&stored, &read);
    println!(
        "kills: {KILLS} ({cut} cut mid-step; {relayed_before_a_cut} events delivered by completed steps); \
         events: {}; read back: {}; missing: {missing}; duplicates: {duplicates}; inversions: {inversions}",
        stored.len(),
        read.len()
    );
    assert_eq!((missing, inversions), (0, 0));
    assert!(cut > KILLS / 4, "most kills should land mid-step: {cut}");

    // A consumer with the inbox, itself killed at random points, applies each event once. A
    // killed member's partitions wait for its session to time out: 6 s, the broker's minimum.
    let config = config
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500");
    let group = unique("effects");
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (_, applied, _) = effects(&store).await;
        if applied as usize == stored.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the subscriber applied {applied} of {}",
            stored.len()
        );
        let handler = deposit_effects(&store, false);
        let mut subscriber =
            KafkaSubscriber::new(&config, group.clone(), &[topic.as_str()], handler)
                .unwrap_or_else(|e| panic!("{e}"));
        let messages = if kills < 4 {
            rand::rng().random_range(50..400)
        } else {
            usize::MAX
        };
        let mut handled = 0;
        while handled < messages {
            let polls = if kills < 4 && handled + 1 == messages {
                rand::rng().random_range(0..6)
            } else {
                usize::MAX
            };
            let step =
                tokio::time::timeout(Duration::from_secs(10), cut_after(polls, subscriber.poll()))
                    .await;
            match step {
                Ok(Some(Ok(()))) => handled += 1,
                Ok(Some(Err(error))) => eprintln!("subscriber: {error}"),
                Ok(None) | Err(_) => break,
            }
            if handled % 100 == 0 {
                subscriber.commit().unwrap_or_else(|e| panic!("{e}"));
            }
        }
        kills += 1;
    }
    let (rows, applied, twice) = effects(&store).await;
    println!(
        "subscriber: {kills} runs; effects: {rows} rows for {applied} events; applied twice: {twice}"
    );
    assert_eq!(
        (rows, applied, twice),
        (stored.len() as i64, stored.len() as i64, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_and_malformed_messages_go_to_the_dead_letter_topic_and_the_rest_flows() {
    let (store, config, topic, mut relay) = relayed_deposits("poison", 60, 5, 2).await;

    // Malformed messages from some other producer, between the good ones.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    let stored = all_events(&store).await;
    let mut unknown_type = serde_json::from_slice::<serde_json::Value>(
        &JsonEnvelope
            .serialize(&stored[0])
            .unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    unknown_type["event_type"] = "MoneyVanished".into();
    unknown_type["event_id"] = uuid::Uuid::now_v7().to_string().into();
    let unknown_type = serde_json::to_vec(&unknown_type).unwrap_or_else(|e| panic!("{e}"));
    let malformed: [(&str, Option<&[u8]>); 4] = [
        ("not JSON", Some(b"{not json")),
        ("no value", None),
        ("not an envelope", Some(br#"{"hello":"world"}"#)),
        ("unknown type", Some(&unknown_type)),
    ];
    for (key, value) in malformed {
        let mut record = FutureRecord::to(&topic).key(key);
        if let Some(value) = value {
            record = record.payload(value);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap_or_else(|(e, _)| panic!("{e}"));
    }
    deposit(&store, 61, 40, 5).await;
    drain(&mut relay, &store).await;
    let stored = all_events(&store).await;
    let poison: Vec<_> = stored
        .iter()
        .filter(|e| {
            e.payload["amount_cents"]
                .as_u64()
                .is_some_and(|a| a % 13 == 0)
        })
        .collect();
    assert_eq!(poison.len(), 7);

    // Skip mode: later deposits of an account with a dead letter still apply (the default,
    // waiting behind it, is the conformance suite's `poison_is_dead_lettered`).
    let handler = deposit_effects(&store, true).with_failure_mode(FailureMode::Skip);
    let mut subscriber =
        KafkaSubscriber::new(&config, unique("poison"), &[topic.as_str()], handler)
            .unwrap_or_else(|e| panic!("{e}"))
            .with_retries(3, Duration::from_millis(5));
    // The lag, read through a probe as a metrics endpoint would while the subscriber runs.
    let probe = subscriber.lag_probe();
    let total_lag = || async {
        let lags = probe.lag().await.unwrap_or_else(|e| panic!("{e}"));
        (lags.len(), lags.iter().map(|l| l.lag).sum::<i64>())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut halfway = None;
    while subscriber.metrics().received < 104 {
        assert!(Instant::now() < deadline, "{:?}", subscriber.metrics());
        subscriber.poll().await.unwrap_or_else(|e| panic!("{e}"));
        if subscriber.metrics().received == 50 {
            halfway = Some(total_lag().await);
        }
    }
    // Halfway it is behind, by at most what was not handed out yet (librdkafka's position also
    // counts what its queue took in ahead of the application), over every partition of the
    // topic; at the end by nothing.
    let (partitions, lag) = halfway.unwrap_or_else(|| panic!("no lag read halfway"));
    assert_eq!(partitions, 2);
    assert!(lag > 0 && lag <= 54, "lag halfway: {lag}");
    assert_eq!(total_lag().await, (2, 0));
    let metrics = subscriber.metrics();
    assert_eq!(metrics.applied, 93, "{metrics:?}");
    assert_eq!(metrics.dead_lettered, 11, "{metrics:?}");
    assert_eq!(
        metrics.retries, 14,
        "two retries per poison event: {metrics:?}"
    );
    let (rows, _, twice) = effects(&store).await;
    assert_eq!((rows, twice), (93, 0));

    // The dead-letter topic has each with its reason, attempts and where it came from.
    let dlq = format!("{topic}.dlq");
    let consumer = reader(&brokers(), std::slice::from_ref(&dlq));
    let mut letters = Vec::new();
    while letters.len() < 11 {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} dead letters", letters.len()))
            .unwrap_or_else(|e| panic!("{e}"));
        let headers = message.headers().unwrap_or_else(|| panic!("no headers"));
        let get = |k: &str| header_value(headers, k).unwrap_or_default().to_owned();
        assert_eq!(get(header::DLQ_TOPIC), topic);
        assert!(get(header::DLQ_OFFSET).parse::<i64>().is_ok());
        assert!(get(header::DLQ_PARTITION).parse::<i32>().is_ok());
        letters.push((
            String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
            get(header::DLQ_ERROR),
            get(header::DLQ_ATTEMPTS),
            message.payload().map(<[u8]>::to_vec),
        ));
    }
    let reason = |key: &str| {
        letters
            .iter()
            .find(|l| l.0 == key)
            .unwrap_or_else(|| panic!("no dead letter for {key}: {letters:?}"))
            .clone()
    };
    assert!(
        reason("not JSON").1.contains("not an event envelope"),
        "{letters:?}"
    );
    assert_eq!(reason("not JSON").2, "0");
    assert_eq!(reason("not JSON").3.as_deref(), Some(&b"{not json"[..]));
    assert!(reason("no value").1.contains("no value"), "{letters:?}");
    assert!(
        reason("not an envelope").1.contains("missing field"),
        "{letters:?}"
    );
    assert!(
        reason("unknown type").1.contains("MoneyVanished"),
        "{letters:?}"
    );
    let poisoned: Vec<_> = letters
        .iter()
        .filter(|l| l.1.contains("poison deposit"))
        .collect();
    assert_eq!(poisoned.len(), 7, "{letters:?}");
    assert!(poisoned.iter().all(|l| l.2 == "3"), "{letters:?}");
}

/// A consumer whose dead-lettering fails (the dead-letter topic is managed elsewhere and missing)
/// stays on the message it could not park: every poll gets it again, nothing after it is handled
/// or committed, and once the topic exists it is parked and the rest flows. (Before: the next poll
/// handled the message after it, whose stored offset then committed past the failed one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_dead_lettering_fails_is_never_skipped() {
    let store = pg::fresh_store("k_dlq_fails").await;
    effects_table(&store).await;
    let (map, topic) = account_topics("dlqfails", 1);
    let config = KafkaConfig::new(brokers())
        .set("topic.metadata.propagation.max.ms", "200")
        .set("message.timeout.ms", "3000");
    let mut relay = KafkaSink::new(&config.clone())
        .and_then(|s| s.with_topics(map))
        .map(|s| OutboxRelay::new(store.clone(), s, "relay"))
        .unwrap_or_else(|e| panic!("{e}"));
    relay
        .sink_mut()
        .create_topics(&["account"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // A malformed message first in the partition, then 20 good events.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    producer
        .send(
            FutureRecord::to(&topic)
                .key("junk")
                .payload(&b"{not json"[..]),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("{e}"));
    deposit(&store, 1, 20, 3).await;
    drain(&mut relay, &store).await;

    let handler = deposit_effects(&store, false);
    let mut subscriber =
        KafkaSubscriber::new(&config, unique("dlqfails"), &[topic.as_str()], handler)
            .unwrap_or_else(|e| panic!("{e}"))
            .with_dlq_topic_creation(false)
            .with_retries(1, Duration::from_millis(1));
    let mut failed = 0;
    for _ in 0..4 {
        match tokio::time::timeout(Duration::from_secs(30), subscriber.poll()).await {
            Ok(Err(_)) => failed += 1,
            Ok(Ok(())) => panic!("a poll succeeded: it moved past the message it could not park"),
            Err(_) => panic!("poll hung"),
        }
        assert_eq!(
            effects(&store).await.0,
            0,
            "a message after the failed one was handled"
        );
    }
    let metrics = subscriber.metrics();
    assert_eq!((failed, metrics.received, metrics.dead_lettered), (4, 4, 0));
    subscriber.commit().unwrap_or_else(|e| panic!("{e}"));

    // The dead-letter topic is made elsewhere: the message is parked and the rest flows.
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .unwrap_or_else(|e| panic!("{e}"));
    let dlq = format!("{topic}.dlq");
    admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &dlq,
                1,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while effects(&store).await.0 < 20 {
        assert!(Instant::now() < deadline, "{:?}", subscriber.metrics());
        let _ = tokio::time::timeout(Duration::from_secs(30), subscriber.poll()).await;
    }
    let metrics = subscriber.metrics();
    assert_eq!(
        (metrics.applied, metrics.dead_lettered),
        (20, 1),
        "{metrics:?}"
    );
    assert_eq!(effects(&store).await, (20, 20, 0));
    let consumer = reader(&brokers(), std::slice::from_ref(&dlq));
    let letter = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .unwrap_or_else(|_| panic!("nothing in {dlq}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(letter.payload(), Some(&b"{not json"[..]));
    eprintln!(
        "4 polls failed on the unparkable message with nothing after it handled; then 1 parked, 20 applied"
    );
}

/// A handler whose database is down for its first `down_for` calls.
struct Outage<H> {
    inner: H,
    down_for: u32,
}

#[async_trait::async_trait]
impl<H: evently_kafka::MessageHandler> evently_kafka::MessageHandler for Outage<H> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn handle(
        &mut self,
        event: &evently_core::StoredEvent,
    ) -> Result<evently_kafka::Handled, evently_kafka::HandleError> {
        if self.down_for > 0 {
            self.down_for -= 1;
            return Err(evently_kafka::HandleError::Unavailable(
                "the database is down".into(),
            ));
        }
        self.inner.handle(event).await
    }
}

/// A database outage longer than a message's tries dead-letters nothing: the subscriber waits on
/// the message it is at and goes on after the outage, in order. A real unreachable database is
/// classified as such (a closed pool, a refused connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_longer_than_the_retries_dead_letters_nothing() {
    let (store, config, topic, _) = relayed_deposits("outage", 20, 3, 1).await;
    let handler = Outage {
        inner: deposit_effects(&store, false),
        down_for: 12,
    };
    let mut subscriber =
        KafkaSubscriber::new(&config, unique("outage"), &[topic.as_str()], handler)
            .unwrap_or_else(|e| panic!("{e}"))
            .with_retries(3, Duration::from_millis(1));
    let deadline = Instant::now() + Duration::from_secs(60);
    while subscriber.metrics().applied < 20 {
        assert!(Instant::now() < deadline, "{:?}", subscriber.metrics());
        subscriber.poll().await.unwrap_or_else(|e| panic!("{e}"));
    }
    let metrics = subscriber.metrics();
    assert_eq!(
        (metrics.dead_lettered, metrics.received, metrics.retries),
        (0, 20, 12),
        "{metrics:?}"
    );
    // In order: the effects were written in the order of the events.
    let amounts: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT amount FROM \"{}\".effects ORDER BY ctid",
        store.schema()
    )))
    .fetch_all(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(amounts, (1..=20).collect::<Vec<i64>>());

    // The real thing: a pool that can reach no server is an outage, not a failed event.
    let stored = all_events(&store).await;
    let unreachable = PostgresEventStore::new(
        sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(300))
            .connect_lazy("postgres://postgres@127.0.0.1:1/nothing")
            .unwrap_or_else(|e| panic!("{e}")),
        store.schema(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut down = deposit_effects(&unreachable, false);
    assert!(matches!(
        evently_kafka::MessageHandler::handle(&mut down, &stored[0]).await,
        Err(evently_kafka::HandleError::Unavailable(_))
    ));
}

// On librdkafka's in-process mock cluster: broker responses no real broker gives on demand.

type Mock = rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

/// A mock cluster of one broker with topic `account` (3 partitions) already there, and a relay on
/// it with `settings` that expects its topics to exist (the mock cluster has no CreateTopics).
fn mock_relay(store: &PostgresEventStore, settings: &[(&str, &str)]) -> (Mock, OutboxRelay) {
    let mock = Mock::new(1).unwrap_or_else(|e| panic!("{e}"));
    mock.create_topic("account", 3, 1)
        .unwrap_or_else(|e| panic!("{e}"));
    let config = settings
        .iter()
        .fold(KafkaConfig::new(mock.bootstrap_servers()), |c, (k, v)| {
            c.set(*k, *v)
        });
    let relay = KafkaSink::new(&config)
        .and_then(|s| s.with_topics(TopicMap::new().with_topic_creation(false)))
        .map(|s| OutboxRelay::new(store.clone(), s, "mock-relay"))
        .unwrap_or_else(|e| panic!("{e}"));
    (mock, relay)
}

/// Reads the mock cluster's `account` topic until every stored event is there: (missing,
/// duplicates, inversions, messages read).
async fn audit_mock(
    mock: &Mock,
    stored: &[evently_core::StoredEvent],
) -> (usize, usize, usize, usize) {
    let read = read_until(&mock.bootstrap_servers(), &["account".to_owned()], |r| {
        distinct(r) >= stored.len()
    })
    .await;
    let (missing, duplicates, inversions) = audit(stored, &read);
    (missing, duplicates, inversions, read.len())
}

/// Produce requests the broker refuses (an authorization failure, which librdkafka does not
/// retry): the step that meets the first failed report stops, the checkpoint stays before that
/// event, the producer is replaced, and the next steps send everything from it on: nothing is
/// missing and no stream's events are read out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_produce_requests_stop_the_checkpoint_before_them_and_reorder_nothing() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let store = pg::fresh_store("k_mock_refused").await;
    deposit(&store, 1, 240, 8).await;
    let (mock, relay) = mock_relay(&store, &[]);
    let mut relay = relay.with_batch(40);
    // The first step sends a page, which is delivered; then the broker refuses one produce
    // request while the relay keeps sending.
    let first = relay.step().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.sent, 40);
    tokio::time::sleep(Duration::from_millis(200)).await;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 1],
    );
    let mut failure = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while failure.is_none() {
        assert!(Instant::now() < deadline, "no delivery failed");
        match relay.step().await {
            Err(KafkaError::Delivery(error)) => failure = Some(error),
            Err(other) => panic!("{other}"),
            Ok(step) => assert!(
                step.sent > 0 || step.delivered > 0,
                "caught up without a failure"
            ),
        }
    }
    let failure = failure.unwrap_or_else(|| unreachable!());
    assert_eq!(failure.destination, "account");
    assert!(
        failure.source.to_string().contains("authoriz"),
        "{}",
        failure.source
    );
    let stored = all_events(&store).await;
    let failed = stored
        .iter()
        .find(|e| e.event_id == failure.event_id)
        .unwrap_or_else(|| panic!("the failed event is not in the store"));
    let checkpoint = relay.checkpoint().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        checkpoint < failed.checkpoint,
        "the checkpoint {checkpoint:?} passed the undelivered event at {:?}",
        failed.checkpoint
    );
    assert_eq!(relay.metrics().failures, 1);
    assert_eq!(relay.metrics().producers, 2);

    drain(&mut relay, &store).await;
    let (missing, duplicates, inversions, read) = audit_mock(&mock, &stored).await;
    eprintln!(
        "refused produce: failed at {:?}, checkpoint then {checkpoint:?}, {read} read, {duplicates} duplicates",
        failed.checkpoint,
    );
    assert_eq!((missing, inversions), (0, 0));
}

/// A broker slower than the message timeout: deliveries in flight time out (librdkafka fails
/// them locally, not knowing whether the broker wrote them), the relay starts again from the
/// first of them with a new producer, and once the broker is fast again everything is there,
/// in order per stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_timing_out_on_a_slow_broker_are_sent_again_in_order() {
    let store = pg::fresh_store("k_mock_slow").await;
    deposit(&store, 1, 240, 8).await;
    let (mock, relay) = mock_relay(
        &store,
        &[("message.timeout.ms", "300"), ("request.timeout.ms", "200")],
    );
    let mut relay = relay.with_batch(20);
    relay.step().await.unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    mock.broker_round_trip_time(1, Duration::from_millis(1_000))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut failures = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while failures < 2 && Instant::now() < deadline {
        if let Err(error) = relay.step().await {
            assert!(
                error.to_string().contains("timed out"),
                "not a timeout: {error}"
            );
            failures += 1;
        }
    }
    mock.broker_round_trip_time(1, Duration::ZERO)
        .unwrap_or_else(|e| panic!("{e}"));
    drain(&mut relay, &store).await;
    let stored = all_events(&store).await;
    let (missing, duplicates, inversions, read) = audit_mock(&mock, &stored).await;
    eprintln!(
        "slow broker: {failures} failed steps, {read} read, {duplicates} duplicates, metrics {:?}",
        relay.metrics()
    );
    assert_eq!(failures, 2, "deliveries did not time out");
    assert_eq!((missing, inversions), (0, 0));
}

/// The events of target `evently_kafka::metrics`: their message and fields, as text.
#[derive(Clone, Default)]
struct Reports(std::sync::Arc<std::sync::Mutex<Vec<BTreeMap<String, String>>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Reports {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields<'a>(&'a mut BTreeMap<String, String>);
        impl tracing::field::Visit for Fields<'_> {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.insert(field.name().to_owned(), format!("{value:?}"));
            }
        }
        if event.metadata().target() == evently_kafka::METRICS_TARGET {
            let mut fields = BTreeMap::new();
            event.record(&mut Fields(&mut fields));
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(fields);
        }
    }
}

impl Reports {
    /// The fields of the events whose message is `message`.
    fn of(&self, message: &str) -> Vec<BTreeMap<String, String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|f| f.get("message").map(String::as_str) == Some(message))
            .cloned()
            .collect()
    }
}

/// While running, the relay reports its lag and counters and the subscriber the lag of each of
/// its partitions, as tracing events, until both are caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn running_relay_and_subscriber_report_their_lag_as_tracing_events() {
    use tracing::instrument::WithSubscriber;
    use tracing_subscriber::layer::SubscriberExt;
    let reports = Reports::default();
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(reports.clone()));

    let store = pg::fresh_store("k_reports").await;
    effects_table(&store).await;
    deposit(&store, 1, 50, 5).await;
    let (map, topic) = account_topics("reports", 2);
    let mut relay = KafkaSink::new(&KafkaConfig::new(brokers()))
        .and_then(|s| s.with_topics(map))
        .map(|s| OutboxRelay::new(store.clone(), s, "reports"))
        .unwrap_or_else(|e| panic!("{e}"))
        .with_report_every(Duration::from_millis(50));
    relay
        .sink_mut()
        .create_topics(&["account"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let handler = deposit_effects(&store, false);
    let subscriber = KafkaSubscriber::new(
        &KafkaConfig::new(brokers()),
        unique("reports"),
        &[topic.as_str()],
        handler,
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .with_report_every(Duration::from_millis(50));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let relay = tokio::spawn(
        relay
            .run(Duration::from_millis(20), until_stopped(stopped.clone()))
            .with_subscriber(dispatch.clone()),
    );
    let consumer = tokio::spawn(
        subscriber
            .run(until_stopped(stopped))
            .with_subscriber(dispatch),
    );
    // Until the relay reports no lag and the consumer has applied everything and reported no lag
    // in both partitions.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "no reports of a caught-up relay and consumer"
        );
        let relay_done = reports.of("relay report").iter().any(|r| {
            r.get("lag").map(String::as_str) == Some("0")
                && r.get("delivered").map(String::as_str) == Some("50")
        });
        let lags = reports.of("consumer lag");
        let caught_up: HashSet<&str> = lags
            .iter()
            .filter(|r| r.get("lag").map(String::as_str) == Some("0"))
            .filter_map(|r| r.get("partition").map(String::as_str))
            .collect();
        if relay_done && effects(&store).await.1 == 50 && caught_up.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).ok();
    relay.await.ok();
    consumer.await.ok();
    let relay_reports = reports.of("relay report");
    let first = &relay_reports[0];
    for field in ["relay", "lag", "delivered", "failures", "producers", "rate"] {
        assert!(first.contains_key(field), "{field} missing from {first:?}");
    }
    let lags = reports.of("consumer lag");
    for field in ["consumer", "topic", "partition", "lag", "high_watermark"] {
        assert!(
            lags[0].contains_key(field),
            "{field} missing from {:?}",
            lags[0]
        );
    }
    assert!(lags.iter().all(|r| r.get("topic") == Some(&topic)));
}

/// A subscriber with a dead-letter alert warns (target `cqrs::metrics`, `dead letters over
/// threshold`) once its dead-letter topic holds more letters than the threshold, and never
/// reports the count as unknown (the dead-letter topic is made before the first check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_subscriber_warns_when_its_dead_letters_pass_the_alert_size() {
    use tracing::instrument::WithSubscriber;
    use tracing_subscriber::layer::SubscriberExt;
    let reports = Reports::default();
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(reports.clone()));
    let config = KafkaConfig::new(brokers());
    let topic = unique("alert");
    let admin: rdkafka::admin::AdminClient<_> = config
        .client_config()
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &topic,
                1,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let subscriber = KafkaSubscriber::new(
        &config,
        unique("alert"),
        &[topic.as_str()],
        evently_transport::conformance::Unused,
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .with_retries(1, Duration::from_millis(1))
    .with_dead_letter_alert(1, Duration::from_secs(1));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(
        subscriber
            .run(async move {
                let _ = stopped.await;
            })
            .with_subscriber(dispatch),
    );
    // The first check, before any dead letter: a count of 0, not an unknown one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while reports.of("dead letters").is_empty() {
        assert!(
            reports.of("dead letters: unknown").is_empty(),
            "the dead-letter topic did not exist at the first check: {:?}",
            reports.of("dead letters: unknown")
        );
        assert!(Instant::now() < deadline, "no dead-letter check reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        reports.of("dead letters")[0]
            .get("count")
            .map(String::as_str),
        Some("0")
    );
    let producer: FutureProducer = config
        .client_config()
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    for n in 0..2 {
        producer
            .send(
                FutureRecord::to(&topic)
                    .key("k")
                    .payload(&format!("{{not json {n}")),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("{e}"));
    }
    let alert = loop {
        if let Some(alert) = reports
            .of("dead letters over threshold")
            .into_iter()
            .find(|r| r.get("count").map(String::as_str) == Some("2"))
        {
            break alert;
        }
        assert!(
            Instant::now() < deadline,
            "no alert; reports: {:?}",
            reports.of("dead letters")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = stop.send(());
    let metrics = running
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(metrics.dead_lettered, 2, "{metrics:?}");
    assert_eq!(alert.get("threshold").map(String::as_str), Some("1"));
    assert!(
        alert
            .get("place")
            .is_some_and(|p| p.contains(&format!("{topic}.dlq"))),
        "{alert:?}"
    );
    assert!(
        reports.of("dead letters: unknown").is_empty(),
        "the count was never unknown: {:?}",
        reports.of("dead letters: unknown")
    );
}
