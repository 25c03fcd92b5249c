//! The transport conformance suite against the real NATS JetStream server (`NATS_URL`, default
//! nats://127.0.0.1:4222) and the real PostgreSQL.

use std::time::Duration;

use cqrs_nats::{NatsConfig, NatsConsumer, NatsSink, TransportError};
use cqrs_transport::conformance::{self, BoxFuture, Broker, Recorder, Unused};

struct Nats;

/// A namespace no earlier run used (streams outlive a run).
fn namespace(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("nats_{name}_{}_{nanos}", std::process::id())
}

fn config(ns: &str) -> NatsConfig {
    NatsConfig::from_env()
        .with_stream(ns.to_uppercase(), format!("t.{ns}"))
        .unwrap_or_else(|e| panic!("{e}"))
}

impl Broker for Nats {
    type Sink = NatsSink;

    fn sink(&self, ns: &str) -> NatsSink {
        NatsSink::new(config(ns))
    }

    fn declare<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move { NatsConsumer::new(&config(ns), name, Unused)?.declare().await })
    }

    fn consume(
        &self,
        ns: &str,
        name: &str,
        handler: Recorder,
        shutdown: BoxFuture<'static, ()>,
    ) -> BoxFuture<'static, Result<cqrs_nats::ConsumerMetrics, TransportError>> {
        let consumer = NatsConsumer::new(&config(ns), name, handler)
            .map(|c| {
                c.with_retries(3, Duration::from_millis(10))
                    .with_ack_wait(Duration::from_secs(2))
            });
        Box::pin(async move { consumer?.run(shutdown).await })
    }

    fn dead_letters<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<u64, TransportError>> {
        Box::pin(async move {
            let config = config(ns);
            let client = async_nats::connect(config.url())
                .await
                .map_err(TransportError::broker("NATS", "connect"))?;
            let js = async_nats::jetstream::new(client);
            let mut stream = js
                .get_stream(config.dead_letter_stream())
                .await
                .map_err(TransportError::broker("NATS", "stream"))?;
            let _ = name;
            let info = stream
                .info()
                .await
                .map_err(TransportError::broker("NATS", "stream info"))?;
            // One consumer per namespace here: the stream's count is this consumer's.
            Ok(info.state.messages)
        })
    }

    fn publish_foreign<'a>(
        &'a self,
        ns: &'a str,
        _name: &'a str,
        value: &'a [u8],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let config = config(ns);
            let client = async_nats::connect(config.url())
                .await
                .map_err(TransportError::broker("NATS", "connect"))?;
            let js = async_nats::jetstream::new(client);
            js.publish(
                format!("t.{ns}.stranger.x.y"),
                bytes::Bytes::copy_from_slice(value),
            )
            .await
            .map_err(TransportError::broker("NATS", "publish"))?
            .await
            .map_err(TransportError::broker("NATS", "publish"))?;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_200_times_loses_nothing_and_keeps_each_aggregates_order() {
    let report = conformance::relay_killed_at_random_points(&Nats, &namespace("kill"), 200).await;
    println!("NATS, relay killed at random points: {report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_the_rest_flows() {
    conformance::poison_is_dead_lettered(&Nats, &namespace("poison")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_handler_applies_the_event_once() {
    conformance::consumer_killed_mid_handler(&Nats, &namespace("midkill")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_not_ours_is_dead_lettered() {
    conformance::not_ours_is_dead_lettered(&Nats, &namespace("foreign")).await;
}
