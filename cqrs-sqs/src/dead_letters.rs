//! A consumer's dead-letter queue, for operators: count, list, retry, purge.
//!
//! Local SQS servers have no `StartMessageMoveTask`, so a retry is receive -> send back ->
//! delete: the letter is received (held invisible for 30 s), sent to the queue named by its
//! `cqrs-dlq-topic` attribute in its message group (deduplication id `<message id>-retry`, new
//! for each letter), and deleted from the dead-letter queue once the service took the copy. A
//! crash between the send and the delete leaves the letter to be retried again; the consumer's
//! inbox drops the second copy.

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName, QueueAttributeName};
use evently_transport::envelope::header;
use evently_transport::{BrokerDeadLetter, DeadLetterQueue, TransportError};

use crate::queues::{existing, sdk, send_copy};
use crate::{BROKER, SqsConfig};

/// How long a retry holds the letters it received.
const HOLD_SECS: i32 = 30;

/// The dead letters of one SQS consumer: its dead-letter queue (`<queue>-dlq.fifo`, or
/// `<queue>-dlq` for a standard queue).
#[derive(Debug, Clone)]
pub struct SqsDeadLetters {
    config: SqsConfig,
    queue: String,
}

impl SqsDeadLetters {
    /// The dead-letter queue named `queue` ([`dead_letter_queue`](crate::dead_letter_queue) of
    /// the consumer's queue).
    pub fn new(config: &SqsConfig, queue: impl Into<String>) -> Self {
        Self {
            config: config.clone(),
            queue: queue.into(),
        }
    }

    async fn connect(&self) -> Result<(Client, String), TransportError> {
        let client = self.config.client().await;
        let url = existing(&client, &self.queue).await?;
        Ok((client, url))
    }

    /// Up to 10 letters, held invisible for `hold` seconds (0: left visible).
    async fn receive(
        client: &Client,
        url: &str,
        hold: i32,
    ) -> Result<Vec<Message>, TransportError> {
        let out = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(0)
            .visibility_timeout(hold)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(sdk("receive dead letters"))?;
        Ok(out.messages.unwrap_or_default())
    }

    /// Sends `letter` back to the queue it came from and deletes it here.
    async fn send_back(client: &Client, url: &str, letter: &Message) -> Result<(), TransportError> {
        let mut attributes = letter.message_attributes.clone().unwrap_or_default();
        let source = attributes
            .get(header::DLQ_TOPIC)
            .and_then(|v| v.string_value())
            .map(str::to_owned)
            .ok_or_else(|| TransportError::Topology {
                broker: BROKER,
                destination: "the letter's source queue".to_owned(),
                reason: format!(
                    "dead letter {} has no `{}` attribute: it was not left by a consumer of this crate",
                    letter.message_id.as_deref().unwrap_or("?"),
                    header::DLQ_TOPIC
                ),
            })?;
        for key in [
            header::DLQ_ERROR,
            header::DLQ_ATTEMPTS,
            header::DLQ_CONSUMER,
            header::DLQ_TOPIC,
        ] {
            attributes.remove(key);
        }
        let source_url = existing(client, &source).await?;
        send_copy(
            client,
            &source_url,
            letter,
            attributes,
            "retry",
            "send a dead letter back",
        )
        .await?;
        if let Some(receipt) = &letter.receipt_handle {
            client
                .delete_message()
                .queue_url(url)
                .receipt_handle(receipt)
                .send()
                .await
                .map_err(sdk("delete a dead letter"))?;
        }
        Ok(())
    }

    /// Makes `letters` visible again.
    async fn release(client: &Client, url: &str, letters: &[Message]) {
        for letter in letters {
            if let Some(receipt) = &letter.receipt_handle {
                let _ = client
                    .change_message_visibility()
                    .queue_url(url)
                    .receipt_handle(receipt)
                    .visibility_timeout(0)
                    .send()
                    .await;
            }
        }
    }
}

fn letter(message: &Message) -> BrokerDeadLetter {
    let attributes = message.message_attributes.as_ref();
    BrokerDeadLetter::from_headers(message.message_id.clone().unwrap_or_default(), |key| {
        attributes
            .and_then(|a| a.get(key))
            .and_then(|v| v.string_value())
            .map(str::to_owned)
    })
}

#[async_trait::async_trait]
impl DeadLetterQueue for SqsDeadLetters {
    fn describe(&self) -> String {
        format!("SQS queue {}", self.queue)
    }

    async fn count(&self) -> Result<u64, TransportError> {
        let (client, url) = self.connect().await?;
        let out = client
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(sdk("count dead letters"))?;
        let attributes = out.attributes();
        let number = |name: &QueueAttributeName| {
            attributes
                .and_then(|a| a.get(name))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(number(&QueueAttributeName::ApproximateNumberOfMessages)
            + number(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible))
    }

    /// Receives them with a visibility timeout of 0 (they stay available), so only what one
    /// receive shows: at most 10, and a message group's first ones.
    async fn list(&self, limit: usize) -> Result<Vec<BrokerDeadLetter>, TransportError> {
        let (client, url) = self.connect().await?;
        let mut seen = std::collections::HashSet::new();
        let mut letters = Vec::new();
        for _ in 0..3 {
            let received = Self::receive(&client, &url, 0).await?;
            let fresh: Vec<_> = received
                .iter()
                .filter(|m| seen.insert(m.message_id.clone()))
                .map(letter)
                .collect();
            if fresh.is_empty() {
                break;
            }
            letters.extend(fresh);
            if letters.len() >= limit {
                break;
            }
        }
        letters.truncate(limit);
        Ok(letters)
    }

    async fn retry(&self, id: &str) -> Result<bool, TransportError> {
        let (client, url) = self.connect().await?;
        let mut held = Vec::new();
        let mut found = None;
        // A group's later letters are only received once its earlier ones are held.
        for _ in 0..100 {
            let received = Self::receive(&client, &url, HOLD_SECS).await?;
            if received.is_empty() {
                break;
            }
            for message in received {
                if found.is_none() && message.message_id.as_deref() == Some(id) {
                    found = Some(message);
                } else {
                    held.push(message);
                }
            }
            if found.is_some() {
                break;
            }
        }
        let outcome = match &found {
            Some(message) => Self::send_back(&client, &url, message).await.map(|()| true),
            None => Ok(false),
        };
        Self::release(&client, &url, &held).await;
        outcome
    }

    async fn retry_all(&self) -> Result<u64, TransportError> {
        let (client, url) = self.connect().await?;
        let mut sent = 0;
        loop {
            let received = Self::receive(&client, &url, HOLD_SECS).await?;
            if received.is_empty() {
                return Ok(sent);
            }
            for (index, message) in received.iter().enumerate() {
                if let Err(error) = Self::send_back(&client, &url, message).await {
                    Self::release(&client, &url, &received[index..]).await;
                    return Err(error);
                }
                sent += 1;
            }
        }
    }

    async fn purge(&self) -> Result<u64, TransportError> {
        let (client, url) = self.connect().await?;
        let mut purged = 0;
        loop {
            let received = Self::receive(&client, &url, HOLD_SECS).await?;
            if received.is_empty() {
                return Ok(purged);
            }
            for message in &received {
                if let Some(receipt) = &message.receipt_handle {
                    client
                        .delete_message()
                        .queue_url(&url)
                        .receipt_handle(receipt)
                        .send()
                        .await
                        .map_err(sdk("delete a dead letter"))?;
                    purged += 1;
                }
            }
        }
    }
}
