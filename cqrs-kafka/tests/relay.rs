//! The outbox relay against a real Kafka-protocol broker (`scripts/kafka-up.sh` starts one at
//! `KAFKA_BROKERS`, default 127.0.0.1:9092) and the real PostgreSQL: every event reaches its topic,
//! keyed and in order, through kills, refusals, slow brokers and rows it cannot read.

#[path = "../../cqrs-postgres/tests/common/mod.rs"]
mod pg;

#[path = "support/mod.rs"]
mod support;

mod common;
use common::*;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use evently_core::prelude::*;
use evently_core::testing::cut_after;
use evently_kafka::envelope::header;
use evently_kafka::{
    EventSerializer, JsonEnvelope, KafkaConfig, KafkaError, KafkaSink, KafkaSubscriber,
    OutboxRelay, TopicMap,
};
use evently_postgres::PostgresEventStore;
use rand::Rng;
use sqlx::AssertSqlSafe;
use support::{brokers, unique};

mod deposits;
use deposits::*;

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
    assert!(matches!(
        other.step().await,
        Err(KafkaError::LeaseLost {
            loss: evently_postgres::LeaseLoss::HeldElsewhere,
            ..
        })
    ));

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
