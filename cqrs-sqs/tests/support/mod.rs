//! The SQS side of the transport conformance suite: a FIFO queue per test on the local server at
//! `SQS_ENDPOINT` (default http://127.0.0.1:4566, started by `scripts/sqs-up.sh`), or through a
//! test's own proxy.

use std::time::Duration;

use cqrs_sqs::{DeadLetterQueue, SqsConfig, SqsConsumer, SqsDeadLetters, SqsSink, TransportError};
use cqrs_transport::conformance::{BoxFuture, Broker, Recorder, Unused};

pub struct Sqs;

/// The endpoint the harness talks to: `SQS_ENDPOINT` unless a test set one (a proxy).
static ENDPOINT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The server's endpoint from the environment.
pub fn server() -> String {
    std::env::var("SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".to_owned())
}

/// Makes the harness talk to `endpoint` (once, before the first use).
#[allow(dead_code, reason = "used by network_cut.rs, not by conformance.rs")]
pub fn set_endpoint(endpoint: String) {
    let _ = ENDPOINT.set(endpoint);
}

/// A namespace no earlier run used (queues outlive a run on a long-running server).
pub fn namespace(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("sqs_{name}_{}_{nanos}", std::process::id())
}

fn queue(ns: &str) -> String {
    format!("{ns}.fifo")
}

pub fn config(ns: &str) -> SqsConfig {
    let endpoint = ENDPOINT.get_or_init(server);
    SqsConfig::local(endpoint.clone())
        .with_visibility(Duration::from_secs(2))
        .with_queue(queue(ns))
        .unwrap_or_else(|e| panic!("{e}"))
}

impl Broker for Sqs {
    type Sink = SqsSink;

    fn sink(&self, ns: &str) -> SqsSink {
        SqsSink::new(config(ns))
    }

    fn declare<'a>(
        &'a self,
        ns: &'a str,
        _name: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            SqsConsumer::new(&config(ns), queue(ns), Unused)?
                .declare()
                .await
        })
    }

    fn consume(
        &self,
        ns: &str,
        _name: &str,
        handler: Recorder,
        shutdown: BoxFuture<'static, ()>,
    ) -> BoxFuture<'static, Result<cqrs_sqs::ConsumerMetrics, TransportError>> {
        let consumer = SqsConsumer::new(&config(ns), queue(ns), handler).map(|c| {
            c.with_retries(3, Duration::from_millis(10))
                .with_wait(Duration::from_secs(1))
        });
        Box::pin(async move { consumer?.run(shutdown).await })
    }

    fn dead_letters<'a>(
        &'a self,
        ns: &'a str,
        _name: &'a str,
    ) -> BoxFuture<'a, Result<u64, TransportError>> {
        Box::pin(async move {
            SqsDeadLetters::new(&config(ns), cqrs_sqs::dead_letter_queue(&queue(ns)))
                .count()
                .await
        })
    }

    fn dead_letter_queue(&self, ns: &str, _name: &str) -> Option<Box<dyn DeadLetterQueue>> {
        Some(Box::new(SqsDeadLetters::new(
            &config(ns),
            cqrs_sqs::dead_letter_queue(&queue(ns)),
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
            let client = config.client().await;
            let url = client
                .get_queue_url()
                .queue_name(queue(ns))
                .send()
                .await
                .map_err(TransportError::broker("SQS", "get queue url"))?
                .queue_url
                .unwrap_or_default();
            client
                .send_message()
                .queue_url(url)
                .message_body(String::from_utf8_lossy(value))
                .message_group_id("stranger")
                .message_deduplication_id(uuid_like())
                .send()
                .await
                .map_err(TransportError::broker("SQS", "send"))?;
            Ok(())
        })
    }
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )
}
