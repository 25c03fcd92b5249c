//! R1 and N1: the outbox relay publishing to RabbitMQ (publisher confirms) and NATS JetStream
//! (publish acks) against the raw client publishing the same bytes with the same settings to the
//! same server in the same run, every confirm or ack awaited. Needs RabbitMQ at `AMQP_URL` and
//! NATS at `NATS_URL` (`scripts/brokers-up.sh`).

use std::time::Instant;

use cqrs_core::StoredEvent;
use cqrs_kafka::{EventSerializer, JsonEnvelope};
use cqrs_nats::{NatsConfig, NatsRelay, NatsSink};
use cqrs_postgres::PostgresEventStore;
use cqrs_rabbitmq::{RabbitConfig, RabbitRelay, RabbitSink};
use cqrs_transport::{Relay, Sink};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

use crate::kafka::{all_events, fill, store};

/// A name no earlier run used.
fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("bench_{name}_{}_{nanos}", std::process::id())
}

/// Rates per run of one broker's relay and raw client, events/s.
#[derive(Debug, Default)]
pub struct BrokerRow {
    /// The relay.
    pub relay: Vec<f64>,
    /// The raw client.
    pub raw: Vec<f64>,
}

/// The relay from the start of the log until it has delivered `count` events: events/s.
async fn relay<S: Sink>(mut relay: Relay<S>, count: usize) -> f64 {
    // As for the raw client: connected, the destination declared, before the timing starts.
    relay
        .sink_mut()
        .prepare(&["account"])
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

/// The envelope bytes of `events`, as the relay sends them.
fn values(events: &[StoredEvent]) -> Vec<Vec<u8>> {
    events
        .iter()
        .map(|e| JsonEnvelope.serialize(e).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// A raw lapin publisher on a confirm channel, the relay's properties and headers, every confirm
/// awaited.
async fn raw_rabbit(events: &[StoredEvent]) -> f64 {
    let config = RabbitConfig::from_env();
    let exchange = unique("raw");
    let connection = Connection::connect(config.url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ at {}: {e}", config.url()));
    let channel = connection
        .create_channel()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let values = values(events);
    let started = Instant::now();
    let mut pending = Vec::with_capacity(events.len());
    for (event, value) in events.iter().zip(&values) {
        let mut headers = FieldTable::default();
        cqrs_transport::envelope::headers_of(event, "application/json", |key, value| {
            headers.insert(
                key.into(),
                lapin::types::AMQPValue::LongString(value.as_bytes().into()),
            );
        });
        let properties = BasicProperties::default()
            .with_message_id(event.event_id.to_string().into())
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_type(event.event_type.as_str().into())
            .with_headers(headers);
        pending.push(
            channel
                .basic_publish(
                    exchange.as_str().into(),
                    format!("{}.{}", event.stream.aggregate_type, event.event_type).into(),
                    BasicPublishOptions::default(),
                    value,
                    properties,
                )
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    for confirm in pending {
        let answer = confirm.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(answer.is_ack(), "not confirmed");
    }
    let rate = events.len() as f64 / started.elapsed().as_secs_f64();
    let _ = connection.close(200, "done".into()).await;
    rate
}

/// A raw async-nats JetStream publisher, `Nats-Msg-Id` and the relay's headers, every ack awaited.
async fn raw_nats(events: &[StoredEvent]) -> f64 {
    let url = NatsConfig::from_env().url().to_owned();
    let client = async_nats::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("NATS at {url}: {e}"));
    let js = async_nats::jetstream::new(client);
    let name = unique("RAW").to_uppercase();
    let prefix = unique("raw");
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("{prefix}.>")],
        ..async_nats::jetstream::stream::Config::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let values = values(events);
    let started = Instant::now();
    let mut pending = Vec::with_capacity(events.len());
    for (event, value) in events.iter().zip(values) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            event.event_id.to_string().as_str(),
        );
        cqrs_transport::envelope::headers_of(event, "application/json", |key, value| {
            headers.insert(key, value);
        });
        pending.push(
            js.publish_with_headers(
                format!(
                    "{prefix}.{}.{}.{}",
                    event.stream.aggregate_type,
                    event.stream.aggregate_id.as_str(),
                    event.event_type
                ),
                headers,
                value.into(),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    for ack in pending {
        ack.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let rate = events.len() as f64 / started.elapsed().as_secs_f64();
    let _ = js.delete_stream(&name).await;
    rate
}

/// R1 (RabbitMQ) and N1 (NATS): `runs` runs of each side over `count` events.
pub async fn r1_n1(count: u64, runs: usize) -> (BrokerRow, BrokerRow) {
    let store: PostgresEventStore = store().await;
    fill(&store, count).await;
    let events = all_events(&store, count as usize).await;
    let n = events.len();
    let mut rabbit = BrokerRow::default();
    let mut nats = BrokerRow::default();
    for _ in 0..runs {
        let config = RabbitConfig::from_env().with_exchange(unique("relay"));
        let sink = RabbitSink::new(config);
        let r = RabbitRelay::new(store.clone(), sink, "bench").with_name(unique("rabbit-relay"));
        rabbit.relay.push(relay(r.with_batch(5_000), n).await);
        rabbit.raw.push(raw_rabbit(&events).await);
        let ns = unique("relay");
        let config = NatsConfig::from_env()
            .with_stream(ns.to_uppercase(), ns.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        let r = NatsRelay::new(store.clone(), NatsSink::new(config), "bench")
            .with_name(unique("nats-relay"));
        nats.relay.push(relay(r.with_batch(5_000), n).await);
        nats.raw.push(raw_nats(&events).await);
        // The relays' streams are left to the server's limits; delete what this run made.
        if let Ok(client) = async_nats::connect(NatsConfig::from_env().url()).await {
            let _ = async_nats::jetstream::new(client)
                .delete_stream(ns.to_uppercase())
                .await;
        }
    }
    (rabbit, nats)
}
