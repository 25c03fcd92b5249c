//! The Kafka subscriber: poison and malformed messages dead-lettered while the rest flows, a dead
//! letter that cannot be written never skipped, a database outage that dead-letters nothing.

#[path = "../../cqrs-postgres/tests/common/mod.rs"]
mod pg;

#[path = "support/mod.rs"]
mod support;

mod common;
use common::*;

use std::time::{Duration, Instant};

use evently_core::projection::FailureMode;
use evently_kafka::envelope::{header, header_value};
use evently_kafka::{
    EventSerializer, JsonEnvelope, KafkaConfig, KafkaSink, KafkaSubscriber, OutboxRelay,
};
use evently_postgres::PostgresEventStore;
use rdkafka::ClientConfig;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::AssertSqlSafe;
use support::{brokers, unique};

mod deposits;
use deposits::*;

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
