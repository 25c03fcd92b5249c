//! The SQS side of the transport conformance suite: a FIFO queue per test on the local server at
//! `SQS_ENDPOINT` (default http://127.0.0.1:4566, started by `scripts/sqs-up.sh`), or through a
//! test's own proxy.

use std::time::Duration;

use evently_sqs::{
    DeadLetterQueue, SqsConfig, SqsConsumer, SqsDeadLetters, SqsSink, TransportError,
};
use evently_transport::conformance::{BoxFuture, Broker, Recorder, Unused};

/// The harness on FIFO queues ([`Sqs::FIFO`]) or standard ones ([`Sqs::STANDARD`]).
pub struct Sqs {
    fifo: bool,
}

impl Sqs {
    pub const FIFO: Self = Self { fifo: true };
    #[allow(dead_code, reason = "used by conformance.rs, not by network_cut.rs")]
    pub const STANDARD: Self = Self { fifo: false };

    fn queue(&self, ns: &str) -> String {
        if self.fifo {
            format!("{ns}.fifo")
        } else {
            ns.to_owned()
        }
    }

    fn config(&self, ns: &str) -> SqsConfig {
        let endpoint = ENDPOINT.get_or_init(server);
        let config = SqsConfig::local(endpoint.clone()).with_visibility(Duration::from_secs(2));
        if self.fifo {
            config.with_queue(self.queue(ns))
        } else {
            config.with_standard_queue(self.queue(ns))
        }
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

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

impl Broker for Sqs {
    type Sink = SqsSink;

    fn sink(&self, ns: &str) -> SqsSink {
        SqsSink::new(self.config(ns))
    }

    fn declare<'a>(
        &'a self,
        ns: &'a str,
        _name: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            SqsConsumer::new(&self.config(ns), self.queue(ns), Unused)?
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
    ) -> BoxFuture<'static, Result<evently_sqs::ConsumerMetrics, TransportError>> {
        let consumer = SqsConsumer::new(&self.config(ns), self.queue(ns), handler).map(|c| {
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
            SqsDeadLetters::new(
                &self.config(ns),
                evently_sqs::dead_letter_queue(&self.queue(ns)),
            )
            .count()
            .await
        })
    }

    fn dead_letter_queue(&self, ns: &str, _name: &str) -> Option<Box<dyn DeadLetterQueue>> {
        Some(Box::new(SqsDeadLetters::new(
            &self.config(ns),
            evently_sqs::dead_letter_queue(&self.queue(ns)),
        )))
    }

    fn publish_foreign<'a>(
        &'a self,
        ns: &'a str,
        _name: &'a str,
        value: &'a [u8],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let config = self.config(ns);
            let client = config.client().await;
            let url = client
                .get_queue_url()
                .queue_name(self.queue(ns))
                .send()
                .await
                .map_err(TransportError::broker("SQS", "get queue url"))?
                .queue_url
                .unwrap_or_default();
            let mut send = client
                .send_message()
                .queue_url(url)
                .message_body(String::from_utf8_lossy(value));
            if self.fifo {
                send = send
                    .message_group_id("stranger")
                    .message_deduplication_id(uuid_like());
            }
            send.send()
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
