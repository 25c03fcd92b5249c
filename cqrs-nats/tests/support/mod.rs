//! The NATS side of the transport conformance suite: a namespace per test (a stream and subject
//! prefix of its own) on the server at `NATS_URL` (default nats://127.0.0.1:4222), or the test's
//! own server.

use std::time::Duration;

use evently_nats::{NatsConfig, NatsConsumer, NatsSink, TransportError};
use evently_transport::conformance::{BoxFuture, Broker, Recorder, Unused};

pub struct Nats;

/// The server the harness talks to: `NATS_URL` unless a test of its own server set one.
static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes the harness talk to the server at `url` (once, before the first use).
#[allow(dead_code, reason = "used by server_restart.rs, not by conformance.rs")]
pub fn set_url(url: String) {
    let _ = URL.set(url);
}

/// A namespace no earlier run used (streams outlive a run).
pub fn namespace(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("nats_{name}_{}_{nanos}", std::process::id())
}

fn config(ns: &str) -> NatsConfig {
    let url = URL.get_or_init(|| NatsConfig::from_env().url().to_owned());
    NatsConfig::new(url.clone())
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
        Box::pin(async move {
            NatsConsumer::new(&config(ns), name, Unused)?
                .declare()
                .await
        })
    }

    fn consume(
        &self,
        ns: &str,
        name: &str,
        handler: Recorder,
        shutdown: BoxFuture<'static, ()>,
    ) -> BoxFuture<'static, Result<evently_nats::ConsumerMetrics, TransportError>> {
        let consumer = NatsConsumer::new(&config(ns), name, handler).map(|c| {
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

    fn dead_letter_queue(
        &self,
        ns: &str,
        name: &str,
    ) -> Option<Box<dyn evently_nats::DeadLetterQueue>> {
        Some(Box::new(evently_nats::NatsDeadLetters::new(
            &config(ns),
            name,
        )))
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
