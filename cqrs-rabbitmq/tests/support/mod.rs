//! The RabbitMQ side of the transport conformance suite: a namespace per test (an exchange and
//! queues of its own) on the broker at `AMQP_URL` (default amqp://guest:guest@127.0.0.1:5672/%2f).

use std::time::Duration;

use evently_rabbitmq::{RabbitConfig, RabbitConsumer, RabbitSink, TransportError};
use evently_transport::conformance::{BoxFuture, Broker, Recorder, Unused};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

pub struct Rabbit;

/// A namespace no earlier run used (exchanges and queues outlive a run).
pub fn namespace(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("rmq_{name}_{}_{nanos}", std::process::id())
}

/// The broker the harness talks to: `AMQP_URL` unless a test set another (a proxy to it).
static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes the harness talk to the broker at `url` (once, before the first use).
#[allow(dead_code, reason = "used by network_cut.rs only")]
pub fn set_url(url: String) {
    let _ = URL.set(url);
}

fn config(ns: &str) -> RabbitConfig {
    let url = URL.get_or_init(|| RabbitConfig::from_env().url().to_owned());
    RabbitConfig::new(url.clone()).with_exchange(format!("{ns}.events"))
}

fn queue(ns: &str, name: &str) -> String {
    format!("{ns}.{name}")
}

impl Broker for Rabbit {
    type Sink = RabbitSink;

    fn sink(&self, ns: &str) -> RabbitSink {
        RabbitSink::new(config(ns))
    }

    fn declare<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            RabbitConsumer::new(&config(ns), queue(ns, name), Unused)
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
    ) -> BoxFuture<'static, Result<evently_rabbitmq::ConsumerMetrics, TransportError>> {
        let consumer = RabbitConsumer::new(&config(ns), queue(ns, name), handler)
            .with_retries(3, Duration::from_millis(10));
        Box::pin(consumer.run(shutdown))
    }

    fn dead_letters<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<u64, TransportError>> {
        Box::pin(async move {
            let (_, dead) = RabbitConsumer::new(&config(ns), queue(ns, name), Unused)
                .depth()
                .await?;
            Ok(u64::from(dead))
        })
    }

    fn dead_letter_queue(
        &self,
        ns: &str,
        name: &str,
    ) -> Option<Box<dyn evently_rabbitmq::DeadLetterQueue>> {
        Some(Box::new(evently_rabbitmq::RabbitDeadLetters::new(
            &config(ns),
            queue(ns, name),
        )))
    }

    fn publish_foreign<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
        value: &'a [u8],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let url = config(ns).url().to_owned();
            let connection = Connection::connect(&url, ConnectionProperties::default())
                .await
                .map_err(TransportError::broker("RabbitMQ", "connect"))?;
            let channel = connection
                .create_channel()
                .await
                .map_err(TransportError::broker("RabbitMQ", "channel"))?;
            // Straight into the queue through the default exchange, as a stranger would.
            channel
                .queue_declare(
                    queue(ns, name).as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(TransportError::broker("RabbitMQ", "queue"))?;
            channel
                .basic_publish(
                    "".into(),
                    queue(ns, name).as_str().into(),
                    BasicPublishOptions::default(),
                    value,
                    BasicProperties::default(),
                )
                .await
                .map_err(TransportError::broker("RabbitMQ", "publish"))?;
            let _ = connection.close(200, "done".into()).await;
            Ok(())
        })
    }
}
