//! A consumer's dead-letter queue (`<queue>.dlq`), for operators: count, list, retry, purge.

use evently_transport::{BrokerDeadLetter, DeadLetterQueue, TransportError};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation, Connection};

use crate::topology::connect;
use crate::{BROKER, RabbitConfig, broker};

/// The dead letters of the consumer of queue `queue`: the messages in `<queue>.dlq`. Retrying
/// one publishes it back to `queue` (through the default exchange, confirmed) and then removes it
/// from the dead-letter queue. Listing takes messages without acknowledging them and gives them
/// back when done (they stay, possibly in another order).
#[derive(Debug, Clone)]
pub struct RabbitDeadLetters {
    config: RabbitConfig,
    queue: String,
}

impl RabbitDeadLetters {
    /// The dead letters of the consumer of `queue`.
    pub fn new(config: &RabbitConfig, queue: impl Into<String>) -> Self {
        Self {
            config: config.clone(),
            queue: queue.into(),
        }
    }

    fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.queue)
    }

    async fn open(&self) -> Result<(Connection, Channel), TransportError> {
        let connection = connect(&self.config).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(broker("open a channel"))?;
        Ok((connection, channel))
    }

    /// Takes up to `limit` messages off the dead-letter queue, unacknowledged.
    async fn take(
        &self,
        channel: &Channel,
        limit: usize,
    ) -> Result<Vec<lapin::message::BasicGetMessage>, TransportError> {
        let mut taken = Vec::new();
        while taken.len() < limit {
            match channel
                .basic_get(
                    self.dead_letter_queue().as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .map_err(|e| self.missing(&e))?
            {
                Some(message) => taken.push(message),
                None => break,
            }
        }
        Ok(taken)
    }

    fn missing(&self, error: &lapin::Error) -> TransportError {
        TransportError::Topology {
            broker: BROKER,
            destination: format!("queue {}", self.dead_letter_queue()),
            reason: error.to_string(),
        }
    }

    /// Publishes `message` back to the consumer's queue on `confirms` and waits for the confirm.
    async fn send_back(
        &self,
        confirms: &Channel,
        message: &lapin::message::BasicGetMessage,
    ) -> Result<(), TransportError> {
        let confirm = confirms
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                &message.delivery.data,
                message.delivery.properties.clone(),
            )
            .await
            .map_err(broker("send a dead letter back"))?
            .await
            .map_err(broker("send a dead letter back"))?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            other => Err(TransportError::Broker {
                broker: BROKER,
                operation: "send a dead letter back",
                source: format!("not confirmed: {other:?}").into(),
            }),
        }
    }
}

/// The id of a dead letter: its message id (the event id), else its position in the listing.
fn id_of(message: &lapin::message::BasicGetMessage, position: usize) -> String {
    message
        .delivery
        .properties
        .message_id()
        .as_ref()
        .map_or_else(|| format!("@{position}"), ToString::to_string)
}

fn header(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    let value = headers?.inner().get(key)?;
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn describe(message: &lapin::message::BasicGetMessage, position: usize) -> BrokerDeadLetter {
    let headers = message.delivery.properties.headers().as_ref();
    let mut letter =
        BrokerDeadLetter::from_headers(id_of(message, position), |k| header(headers, k));
    if letter.error.is_none() && headers.is_some_and(|h| h.contains_key("x-death")) {
        // Dead-lettered by the broker (past the queue's delivery limit), not by the consumer.
        letter.error = Some("dead-lettered by the broker (delivery limit)".to_owned());
    }
    letter
}

#[async_trait::async_trait]
impl DeadLetterQueue for RabbitDeadLetters {
    fn describe(&self) -> String {
        format!("RabbitMQ queue {}", self.dead_letter_queue())
    }

    async fn count(&self) -> Result<u64, TransportError> {
        let (connection, channel) = self.open().await?;
        let queue = channel
            .queue_declare(
                self.dead_letter_queue().as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| self.missing(&e))?;
        let _ = connection.close(200, "counted".into()).await;
        Ok(u64::from(queue.message_count()))
    }

    async fn list(&self, limit: usize) -> Result<Vec<BrokerDeadLetter>, TransportError> {
        let (connection, channel) = self.open().await?;
        let taken = self.take(&channel, limit).await?;
        let letters = taken
            .iter()
            .enumerate()
            .map(|(i, m)| describe(m, i))
            .collect();
        // Closing the channel gives back what was taken, unacknowledged.
        let _ = connection.close(200, "listed".into()).await;
        Ok(letters)
    }

    async fn retry(&self, id: &str) -> Result<bool, TransportError> {
        let (connection, channel) = self.open().await?;
        let confirms = connection
            .create_channel()
            .await
            .map_err(broker("open a channel"))?;
        confirms
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker("enable publisher confirms"))?;
        let count = usize::try_from(self.count().await?).unwrap_or(usize::MAX);
        let taken = self.take(&channel, count).await?;
        let mut found = false;
        for (position, message) in taken.iter().enumerate() {
            if id_of(message, position) == id {
                self.send_back(&confirms, message).await?;
                message
                    .delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(broker("remove a dead letter"))?;
                found = true;
                break;
            }
        }
        let _ = connection.close(200, "retried".into()).await;
        Ok(found)
    }

    async fn retry_all(&self) -> Result<u64, TransportError> {
        let (connection, channel) = self.open().await?;
        let confirms = connection
            .create_channel()
            .await
            .map_err(broker("open a channel"))?;
        confirms
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker("enable publisher confirms"))?;
        // Only what is there now: a message that fails again comes back behind them.
        let count = usize::try_from(self.count().await?).unwrap_or(usize::MAX);
        let mut retried = 0;
        for message in self.take(&channel, count).await? {
            self.send_back(&confirms, &message).await?;
            message
                .delivery
                .ack(BasicAckOptions::default())
                .await
                .map_err(broker("remove a dead letter"))?;
            retried += 1;
        }
        let _ = connection.close(200, "retried".into()).await;
        Ok(retried)
    }

    async fn purge(&self) -> Result<u64, TransportError> {
        let (connection, channel) = self.open().await?;
        let purged = channel
            .queue_purge(
                self.dead_letter_queue().as_str().into(),
                QueuePurgeOptions::default(),
            )
            .await
            .map_err(|e| self.missing(&e))?;
        let _ = connection.close(200, "purged".into()).await;
        Ok(u64::from(purged))
    }
}
