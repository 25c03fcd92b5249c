//! R1 and N1: the outbox relay publishing to RabbitMQ (publisher confirms) and NATS JetStream
//! (publish acks) against the raw client publishing the same bytes with the same settings to the
//! same server in the same run, every confirm or ack awaited. Needs RabbitMQ at `AMQP_URL` and
//! NATS at `NATS_URL` (`scripts/brokers-up.sh`).

use std::future::Future;
use std::time::Instant;

use evently_core::StoredEvent;
use evently_kafka::{EventSerializer, JsonEnvelope};
use evently_nats::{NatsConfig, NatsRelay, NatsSink};
use evently_postgres::PostgresEventStore;
use evently_rabbitmq::{RabbitConfig, RabbitRelay, RabbitSink};
use evently_transport::{Relay, Sink};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

use crate::kafka::{all_events, fill, store};

/// A name no earlier run used.
pub(crate) fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("bench_{name}_{}_{nanos}", std::process::id())
}

/// Rates per run of one broker's relay and raw client, events/s, and append -> consumer
/// latencies through a running relay, ms.
#[derive(Debug, Default)]
pub struct BrokerRow {
    /// The relay.
    pub relay: Vec<f64>,
    /// The raw client.
    pub raw: Vec<f64>,
    /// Append -> a consumer has it, ms.
    pub latencies: Vec<f64>,
}

/// Appends one deposit per sample to `store` and waits until `received` yields its event id:
/// the times, in ms.
pub(crate) async fn append_to_receive(
    store: &PostgresEventStore,
    samples: usize,
    mut received: impl futures::Stream<Item = Option<String>> + Unpin,
) -> Vec<f64> {
    use evently_core::prelude::*;
    use futures::StreamExt;
    let mut latencies = Vec::with_capacity(samples);
    for n in 0..samples {
        let data = crate::kafka::deposit(n as u64);
        let id = data.event_id.to_string();
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
            let got = tokio::time::timeout(std::time::Duration::from_secs(30), received.next())
                .await
                .unwrap_or_else(|_| panic!("no message within 30 s"))
                .unwrap_or_else(|| panic!("the consumer ended"));
            if got.as_deref() == Some(id.as_str()) {
                break;
            }
        }
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
    }
    latencies
}

/// Append -> consumer latencies through a running RabbitMQ relay: a consumer of an exclusive
/// queue bound to the relay's exchange, ms.
async fn rabbit_latency(store: &PostgresEventStore, samples: usize) -> Vec<f64> {
    use futures::StreamExt;
    let exchange = unique("latency");
    let config = RabbitConfig::from_env().with_exchange(exchange.clone());
    let connection = Connection::connect(config.url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let channel = connection
        .create_channel()
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
    let queue = channel
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    channel
        .queue_bind(
            queue.name().as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let deliveries = channel
        .basic_consume(
            queue.name().as_str().into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..lapin::options::BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let relay = RabbitRelay::new(store.clone(), RabbitSink::new(config), "latency")
        .with_name(unique("rabbit-latency"));
    let latencies = with_running(relay, async {
        let ids = deliveries.map(|delivery| {
            delivery
                .ok()?
                .properties
                .message_id()
                .as_ref()
                .map(ToString::to_string)
        });
        append_to_receive(store, samples, ids).await
    })
    .await;
    let _ = connection.close(200, "done".into()).await;
    latencies
}

/// Append -> consumer latencies through a running NATS relay: a core subscription to the
/// relay's subjects, ms.
async fn nats_latency(store: &PostgresEventStore, samples: usize) -> Vec<f64> {
    use futures::StreamExt;
    let ns = unique("latency");
    let config = NatsConfig::from_env()
        .with_stream(ns.to_uppercase(), ns.clone())
        .unwrap_or_else(|e| panic!("{e}"));
    let client = async_nats::connect(config.url())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let subscription = client
        .subscribe(format!("{ns}.>"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let relay = NatsRelay::new(store.clone(), NatsSink::new(config), "latency")
        .with_name(unique("nats-latency"));
    let latencies = with_running(relay, async {
        let ids = subscription.map(|message| {
            message
                .headers
                .as_ref()?
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_owned())
        });
        append_to_receive(store, samples, ids).await
    })
    .await;
    if let Ok(client) = async_nats::connect(NatsConfig::from_env().url()).await {
        let _ = async_nats::jetstream::new(client)
            .delete_stream(ns.to_uppercase())
            .await;
    }
    latencies
}

/// Runs `relay` (after draining what is there) while `work` runs.
pub(crate) async fn with_running<S: Sink, T>(
    mut relay: Relay<S>,
    work: impl Future<Output = T>,
) -> T {
    // Caught up first, so the samples time one event each.
    while relay
        .step()
        .await
        .map(|s| s.sent > 0 || s.delivered > 0)
        .unwrap_or_else(|e| panic!("{e}"))
    {}
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(std::time::Duration::from_secs(1), async {
        stopped.await.ok();
    }));
    let out = work.await;
    stop.send(()).ok();
    running.await.ok();
    out
}

/// The relay from the start of the log until it has delivered `count` events: events/s.
pub(crate) async fn relay<S: Sink>(mut relay: Relay<S>, count: usize) -> f64 {
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
pub(crate) fn values(events: &[StoredEvent]) -> Vec<Vec<u8>> {
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
        evently_transport::envelope::headers_of(event, "application/json", |key, value| {
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

/// A raw async-nats JetStream publisher, `Nats-Msg-Id`, `Nats-Expected-Last-Msg-Id` and the
/// relay's headers, every ack awaited.
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
    // The client waits for a permit at 5,000 acks in flight: keep below it, oldest first.
    let mut pending: std::collections::VecDeque<async_nats::jetstream::context::PublishAckFuture> =
        std::collections::VecDeque::with_capacity(4_096);
    let mut previous: Option<String> = None;
    for (event, value) in events.iter().zip(values) {
        let id = event.event_id.to_string();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        // The relay's order guard: stored only right after the previous message.
        if let Some(previous) = previous.replace(id) {
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_MESSAGE_ID,
                previous.as_str(),
            );
        }
        evently_transport::envelope::headers_of(event, "application/json", |key, value| {
            headers.insert(key, value);
        });
        if pending.len() >= 4_096
            && let Some(ack) = pending.pop_front()
        {
            ack.await.unwrap_or_else(|e| panic!("{e}"));
        }
        pending.push_back(
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

/// R1 (RabbitMQ) and N1 (NATS): `runs` runs of each side over `count` events, then `samples`
/// append -> consumer latencies through each.
pub async fn r1_n1(count: u64, runs: usize, samples: usize) -> (BrokerRow, BrokerRow) {
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
    rabbit.latencies = rabbit_latency(&store, samples).await;
    nats.latencies = nats_latency(&store, samples).await;
    (rabbit, nats)
}
