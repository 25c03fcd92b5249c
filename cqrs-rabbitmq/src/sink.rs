//! The relay's RabbitMQ side: persistent messages on a topic exchange, publisher confirms on a
//! channel of their own, taken in the order the messages were published.

use std::collections::VecDeque;

use evently_core::RawStoredEvent;
use evently_transport::envelope::headers_of;
use evently_transport::{BrokerError, Layout, Outgoing, Sink, TransportError};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use lapin::{Confirmation, PublisherConfirm};

use crate::topology::{connect, declare_events_exchange};
use crate::{BROKER, RabbitConfig, broker};

/// How long a confirm may take before the delivery counts as failed.
const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How often a wait for a confirm looks at the channel's state.
pub(crate) const WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// The relay publishing to RabbitMQ: `RabbitRelay::new(store, RabbitSink::new(config), owner)`.
pub type RabbitRelay = evently_transport::Relay<RabbitSink>;

/// Publishes the relay's messages to the config's topic exchange: routing key from the aggregate
/// type and event type, `message_id` = the event id, persistent delivery mode, the framework's
/// headers. One channel in confirm mode carries every message in the global order, so each
/// aggregate's events reach a queue in order; a message counts as sent only once the broker
/// confirmed it (for a quorum queue: once a majority of its replicas has it).
pub struct RabbitSink {
    config: RabbitConfig,
    connection: Option<Connection>,
    channel: Option<Channel>,
    pending: VecDeque<PublisherConfirm>,
    declared: bool,
}

impl std::fmt::Debug for RabbitSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitSink")
            .field("config", &self.config)
            .field("connected", &self.channel.is_some())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl RabbitSink {
    /// A sink to the broker of `config` (connected at the first page).
    #[must_use]
    pub fn new(config: RabbitConfig) -> Self {
        Self {
            config,
            connection: None,
            channel: None,
            pending: VecDeque::new(),
            declared: false,
        }
    }

    /// The channel in confirm mode, connecting (and declaring or checking the exchange) first
    /// when there is none.
    async fn channel(&mut self) -> Result<&Channel, TransportError> {
        let usable = self
            .channel
            .as_ref()
            .is_some_and(|c| c.status().connected());
        if !usable {
            if !self.pending.is_empty() {
                // The relay holds one message in flight per confirm awaited here. Dropping the
                // confirms to publish on a new channel would pair the new channel's confirms
                // with the old channel's messages, whose fate is unknown: a message lost in the
                // cut would count as confirmed and the checkpoint would pass it. So the send
                // fails; the relay collects the old confirms (they fail: the channel is closed)
                // and starts again from its checkpoint.
                return Err(TransportError::Broker {
                    broker: BROKER,
                    operation: "publish",
                    source: format!(
                        "the channel closed with {} messages awaiting their confirms",
                        self.pending.len()
                    )
                    .into(),
                });
            }
            let connection = match self.connection.take() {
                Some(c) if c.status().connected() => c,
                _ => connect(&self.config).await?,
            };
            let channel = connection
                .create_channel()
                .await
                .map_err(broker("open a channel"))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(broker("enable publisher confirms"))?;
            if !self.declared {
                declare_events_exchange(&channel, &self.config).await?;
                self.declared = true;
            }
            self.connection = Some(connection);
            self.channel = Some(channel);
        }
        self.channel
            .as_ref()
            .ok_or_else(|| TransportError::config(BROKER, "no channel"))
    }
}

/// The routing key and properties of the relay's messages.
#[derive(Clone)]
pub struct RabbitLayout {
    config: RabbitConfig,
}

impl std::fmt::Debug for RabbitLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitLayout").finish_non_exhaustive()
    }
}

/// What the layout builds for one message.
#[derive(Debug)]
pub struct RabbitMessage {
    routing_key: ShortString,
    properties: BasicProperties,
}

impl Layout for RabbitLayout {
    type Headers = RabbitMessage;

    fn headers(&self, event: &RawStoredEvent, content_type: &'static str) -> RabbitMessage {
        let mut headers = FieldTable::default();
        headers_of(event, content_type, |key, value| {
            headers.insert(
                key.into(),
                AMQPValue::LongString(LongString::from(value.as_bytes())),
            );
        });
        let timestamp = u64::try_from(event.recorded_at.timestamp()).unwrap_or_default();
        let properties = BasicProperties::default()
            .with_message_id(event.event_id.to_string().into())
            .with_delivery_mode(2)
            .with_content_type(content_type.into())
            .with_type(event.event_type.as_str().into())
            .with_timestamp(timestamp)
            .with_headers(headers);
        RabbitMessage {
            routing_key: self
                .config
                .routing_key(&event.stream.aggregate_type, &event.event_type)
                .into(),
            properties,
        }
    }
}

impl Sink for RabbitSink {
    const BROKER: &'static str = BROKER;
    const DEFAULT_NAME: &'static str = "rabbitmq-relay";
    type Layout = RabbitLayout;

    fn layout(&self) -> RabbitLayout {
        RabbitLayout {
            config: self.config.clone(),
        }
    }

    fn destination(&self, aggregate_type: &str) -> String {
        format!(
            "exchange `{}`, routing key {aggregate_type}.*",
            self.config.exchange()
        )
    }

    async fn prepare(&mut self, _aggregate_types: &[&str]) -> Result<(), TransportError> {
        self.channel().await.map(|_| ())
    }

    async fn send(&mut self, message: Outgoing<'_, RabbitMessage>) -> Result<(), BrokerError> {
        let exchange: ShortString = self.config.exchange().into();
        let channel = self.channel().await.map_err(Box::new)?;
        let confirm = channel
            .basic_publish(
                exchange,
                message.headers.routing_key,
                BasicPublishOptions::default(),
                message.value,
                message.headers.properties,
            )
            .await?;
        self.pending.push_back(confirm);
        Ok(())
    }

    async fn confirmed(&mut self) -> Result<(), BrokerError> {
        let Some(front) = self.pending.front_mut() else {
            return Err("no message is waiting for a confirm".into());
        };
        // Awaited in place, and taken off the queue only once answered: cancel-safe. lapin may
        // never answer a confirm of a channel whose connection died: the channel's state is
        // watched, and a confirm that takes longer than the timeout fails the delivery.
        let channel = self.channel.clone();
        let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
        let answer = loop {
            tokio::select! {
                answer = &mut *front => break answer,
                () = tokio::time::sleep(WATCH_EVERY) => {
                    if !channel.as_ref().is_some_and(|c| c.status().connected()) {
                        self.pending.clear();
                        return Err("the channel closed before the broker confirmed".into());
                    }
                    if tokio::time::Instant::now() >= deadline {
                        self.pending.clear();
                        return Err(format!("no confirm within {CONFIRM_TIMEOUT:?}").into());
                    }
                }
            }
        };
        self.pending.pop_front();
        match answer? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(format!(
                "the broker returned the message: {} {}",
                returned.reply_code, returned.reply_text
            )
            .into()),
            Confirmation::Nack(_) => Err("the broker refused the message (nack)".into()),
            Confirmation::NotRequested => Err("publisher confirms are off on the channel".into()),
        }
    }

    fn forget(&mut self) {
        // Confirms of forgotten messages would pile up on the channel: open a new one.
        if !self.pending.is_empty() {
            self.pending.clear();
            self.channel = None;
        }
    }

    async fn restart(&mut self) -> Result<(), TransportError> {
        self.pending.clear();
        self.channel = None;
        self.connection = None;
        self.declared = false;
        Ok(())
    }
}
