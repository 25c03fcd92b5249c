//! Connecting, and the exchanges and queues the relay and consumers use: declared (idempotently)
//! or, with declaration off, only checked.

use evently_transport::TransportError;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::{BROKER, RabbitConfig, broker};

/// A connection to the config's broker (no automatic recovery: the relay and the consumers
/// reconnect themselves, with a backoff, and start again from what is confirmed).
pub(crate) async fn connect(config: &RabbitConfig) -> Result<Connection, TransportError> {
    // A broker that accepts TCP but does not answer (starting, or its app stopped) must not
    // hold a relay or a consumer forever.
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect(config.url(), ConnectionProperties::default()),
    )
    .await
    {
        Ok(connected) => connected.map_err(broker("connect")),
        Err(_) => Err(TransportError::Broker {
            broker: BROKER,
            operation: "connect",
            source: format!("no answer within {CONNECT_TIMEOUT:?}").into(),
        }),
    }
}

/// How long connecting may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `error` as a missing or refused piece of topology.
fn topology(destination: &str, error: &lapin::Error) -> TransportError {
    TransportError::Topology {
        broker: BROKER,
        destination: destination.to_owned(),
        reason: error.to_string(),
    }
}

/// Declares an exchange of `kind` (durable), or checks it exists when declaring is off.
async fn exchange(
    channel: &Channel,
    config: &RabbitConfig,
    name: &str,
    kind: ExchangeKind,
) -> Result<(), TransportError> {
    let options = ExchangeDeclareOptions {
        passive: !config.declares(),
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(name.into(), kind, options, FieldTable::default())
        .await
        .map_err(|e| topology(&format!("exchange {name}"), &e))
}

/// The topic exchange events are published to.
pub(crate) async fn declare_events_exchange(
    channel: &Channel,
    config: &RabbitConfig,
) -> Result<(), TransportError> {
    exchange(channel, config, config.exchange(), ExchangeKind::Topic).await
}

/// How a consumer's queue is declared.
#[derive(Debug, Clone)]
pub(crate) struct QueueSpec {
    pub(crate) name: String,
    pub(crate) bindings: Vec<String>,
    pub(crate) delivery_limit: u32,
    pub(crate) single_active: bool,
}

impl QueueSpec {
    /// The queue a consumer's dead letters land in.
    pub(crate) fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.name)
    }
}

/// A consumer's topology: the events exchange; the dead-letter exchange and the queue's
/// dead-letter queue bound to it by the queue's name; the queue itself (quorum, durable, a
/// delivery limit, dead-lettering at least once to the dead-letter exchange, optionally single
/// active consumer) bound to the events exchange with each of its bindings.
pub(crate) async fn declare_queue(
    channel: &Channel,
    config: &RabbitConfig,
    spec: &QueueSpec,
) -> Result<(), TransportError> {
    declare_events_exchange(channel, config).await?;
    let dlx = config.dead_letter_exchange();
    exchange(channel, config, &dlx, ExchangeKind::Direct).await?;
    let dlq = spec.dead_letter_queue();
    let quorum = |table: &mut FieldTable| {
        table.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    };
    let mut dlq_args = FieldTable::default();
    quorum(&mut dlq_args);
    declare(channel, config, &dlq, dlq_args).await?;
    let mut args = FieldTable::default();
    quorum(&mut args);
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(i32::try_from(spec.delivery_limit).unwrap_or(i32::MAX)),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(dlx.as_bytes())),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(spec.name.as_bytes())),
    );
    // At-least-once dead-lettering (quorum queues, RabbitMQ 3.10+) needs reject-publish overflow.
    args.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString(LongString::from("at-least-once")),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    if spec.single_active {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    declare(channel, config, &spec.name, args).await?;
    if config.declares() {
        bind(channel, &dlq, &dlx, &spec.name).await?;
        for binding in &spec.bindings {
            bind(channel, &spec.name, config.exchange(), binding).await?;
        }
    }
    Ok(())
}

async fn declare(
    channel: &Channel,
    config: &RabbitConfig,
    name: &str,
    args: FieldTable,
) -> Result<(), TransportError> {
    let options = QueueDeclareOptions {
        passive: !config.declares(),
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let args = if config.declares() {
        args
    } else {
        FieldTable::default()
    };
    channel
        .queue_declare(name.into(), options, args)
        .await
        .map(|_| ())
        .map_err(|e| topology(&format!("queue {name}"), &e))
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
) -> Result<(), TransportError> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| topology(&format!("binding {queue} <- {exchange} ({key})"), &e))
}
