//! What a RabbitMQ relay and consumer do with a broker that is missing what they need, or not
//! there at all: typed errors naming it, nothing acknowledged, no panic.

use std::time::Duration;

use evently_rabbitmq::{RabbitConfig, RabbitConsumer, RabbitSink, TransportError};
use evently_transport::Sink;
use evently_transport::conformance::Unused;

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("bad_{name}_{}_{nanos}", std::process::id())
}

#[tokio::test]
async fn with_declaration_off_a_missing_exchange_or_queue_is_named() {
    let exchange = unique("ex");
    let config = RabbitConfig::from_env()
        .with_exchange(exchange.clone())
        .with_declare(false);
    let mut sink = RabbitSink::new(config.clone());
    match sink.prepare(&["order"]).await {
        Err(TransportError::Topology { destination, .. }) => {
            assert!(destination.contains(&exchange), "{destination}");
        }
        other => panic!("expected the missing exchange named, got {other:?}"),
    }
    let queue = unique("q");
    let consumer = RabbitConsumer::new(&config, queue, Unused);
    match consumer.declare().await {
        Err(TransportError::Topology { destination, .. }) => {
            assert!(destination.contains(&exchange), "{destination}");
        }
        other => panic!("expected a topology error, got {other:?}"),
    }
    // `run` does not wait for topology that waiting cannot create.
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        consumer.run(std::future::pending::<()>()),
    )
    .await
    .unwrap_or_else(|_| panic!("run waited on missing topology"));
    assert!(
        matches!(outcome, Err(TransportError::Topology { .. })),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn an_unreachable_broker_is_a_broker_error() {
    let config = RabbitConfig::new("amqp://guest:guest@127.0.0.1:1/%2f");
    let mut sink = RabbitSink::new(config.clone());
    match sink.prepare(&["order"]).await {
        Err(TransportError::Broker { operation, .. }) => assert_eq!(operation, "connect"),
        other => panic!("expected a connect error, got {other:?}"),
    }
    let consumer = RabbitConsumer::new(&config, unique("q"), Unused);
    assert!(matches!(
        consumer.declare().await,
        Err(TransportError::Broker {
            operation: "connect",
            ..
        })
    ));
}
