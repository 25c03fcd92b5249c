//! What a NATS relay and consumer do with a server that is missing what they need, or not there
//! at all: typed errors naming it, nothing acknowledged, no panic.

use std::time::Duration;

use evently_nats::{NatsConfig, NatsConsumer, NatsSink, TransportError};
use evently_transport::Sink;
use evently_transport::conformance::Unused;

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("bad_{name}_{}_{nanos}", std::process::id())
}

#[tokio::test]
async fn with_declaration_off_a_missing_stream_is_named() {
    let ns = unique("s");
    let config = NatsConfig::from_env()
        .with_stream(ns.to_uppercase(), ns.clone())
        .unwrap_or_else(|e| panic!("{e}"))
        .with_declare(false);
    let mut sink = NatsSink::new(config.clone());
    match sink.prepare(&["order"]).await {
        Err(TransportError::Topology { destination, .. }) => {
            assert!(destination.contains(&ns.to_uppercase()), "{destination}");
        }
        other => panic!("expected the missing stream named, got {other:?}"),
    }
    let consumer = NatsConsumer::new(&config, "c", Unused).unwrap_or_else(|e| panic!("{e}"));
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
async fn bad_names_and_an_unreachable_server_are_typed_errors() {
    let config = NatsConfig::new("nats://127.0.0.1:1");
    assert!(matches!(
        NatsConsumer::new(&config, "has.dot", Unused),
        Err(TransportError::Config { .. })
    ));
    let mut sink = NatsSink::new(config);
    match sink.prepare(&["order"]).await {
        Err(TransportError::Broker { operation, .. }) => assert_eq!(operation, "connect"),
        other => panic!("expected a connect error, got {other:?}"),
    }
}
