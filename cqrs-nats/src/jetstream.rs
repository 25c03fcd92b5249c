//! Connecting, and the streams the relay and consumers use: created (idempotently) or, with
//! declaration off, only checked.

use async_nats::jetstream::{self, Context, stream};
use evently_transport::TransportError;

use crate::{BROKER, NatsConfig};

/// A client of the config's server and its JetStream context. The client reconnects by itself;
/// while it is away, publishes and acks fail or time out and the relay and consumers start
/// again from what was confirmed.
pub(crate) async fn connect(config: &NatsConfig) -> Result<Context, TransportError> {
    let client = async_nats::connect(config.url())
        .await
        .map_err(TransportError::broker(BROKER, "connect"))?;
    Ok(jetstream::ContextBuilder::new()
        .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
        .backpressure_on_inflight(true)
        .build(client))
}

/// The client's limit of publish acks in flight (the sink keeps below it).
pub(crate) const MAX_ACKS_IN_FLIGHT: usize = 8_192;

/// The stream `name` over `subjects`: created when missing (declaration on), else checked.
async fn ensure_stream(
    js: &Context,
    config: &NatsConfig,
    name: String,
    subjects: Vec<String>,
) -> Result<stream::Stream, TransportError> {
    let topology = |reason: String| TransportError::Topology {
        broker: BROKER,
        destination: format!("stream {name}"),
        reason,
    };
    if !config.declares() {
        return js
            .get_stream(&name)
            .await
            .map_err(|e| topology(e.to_string()));
    }
    js.get_or_create_stream(stream::Config {
        name: name.clone(),
        subjects,
        storage: stream::StorageType::File,
        duplicate_window: config.duplicate_window(),
        num_replicas: config.replicas(),
        ..stream::Config::default()
    })
    .await
    .map_err(|e| topology(e.to_string()))
}

/// The events stream (`<prefix>.>`).
pub(crate) async fn events_stream(
    js: &Context,
    config: &NatsConfig,
) -> Result<stream::Stream, TransportError> {
    ensure_stream(
        js,
        config,
        config.stream().to_owned(),
        vec![format!("{}.>", config.prefix())],
    )
    .await
}

/// The dead-letter stream (`<prefix>-dlq.>`).
pub(crate) async fn dead_letter_stream(
    js: &Context,
    config: &NatsConfig,
) -> Result<stream::Stream, TransportError> {
    ensure_stream(
        js,
        config,
        config.dead_letter_stream(),
        vec![format!("{}-dlq.>", config.prefix())],
    )
    .await
}
