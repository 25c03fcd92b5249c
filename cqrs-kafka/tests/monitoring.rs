//! What operators see from a running relay and subscriber: lag reported as tracing events, a
//! warning when dead letters pass the alert size.

#[path = "../../cqrs-postgres/tests/common/mod.rs"]
mod pg;

#[path = "support/mod.rs"]
mod support;

mod common;
use common::*;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use evently_kafka::{KafkaConfig, KafkaSink, KafkaSubscriber, OutboxRelay};
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::{brokers, unique};

mod deposits;
use deposits::*;

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
