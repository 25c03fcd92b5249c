//! Queue URLs, declaration (a queue with a redrive policy to its dead-letter queue of the same
//! kind), message attributes and group ids.

use std::collections::HashMap;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_sqs::types::{
    Message, MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
};
use evently_core::StreamId;
use evently_transport::TransportError;

use crate::config::{dead_letter_queue, is_fifo};
use crate::{BROKER, SqsConfig};

/// The SDK's error while doing `operation`, with its whole context (the service's code and
/// message), as a [`TransportError::Broker`].
pub(crate) fn sdk<E>(operation: &'static str) -> impl FnOnce(E) -> TransportError
where
    E: std::error::Error + 'static,
{
    move |error| TransportError::Broker {
        broker: BROKER,
        operation,
        source: DisplayErrorContext(&error).to_string().into(),
    }
}

/// Whether the SDK error says the queue does not exist.
pub(crate) fn is_missing_queue(error: &impl ProvideErrorMetadata) -> bool {
    error
        .code()
        .is_some_and(|code| code.contains("NonExistentQueue") || code.contains("QueueDoesNotExist"))
}

/// The URL of `queue`: created first (with its dead-letter queue and redrive policy) when the
/// configuration declares queues.
///
/// # Errors
/// [`TransportError::Topology`] when it does not exist and declaring is off (or creating it was
/// refused), [`TransportError::Broker`] when the server cannot be reached.
pub(crate) async fn queue_url(
    client: &Client,
    config: &SqsConfig,
    queue: &str,
) -> Result<String, TransportError> {
    if config.declares() {
        return declare(client, config, queue).await;
    }
    existing(client, queue).await
}

/// The URL the service returned for `queue`.
fn returned_url(url: Option<&str>, queue: &str) -> Result<String, TransportError> {
    url.map(str::to_owned)
        .ok_or_else(|| TransportError::Topology {
            broker: BROKER,
            destination: queue.to_owned(),
            reason: "the server returned no URL".to_owned(),
        })
}

/// The URL of `queue`, which must exist.
pub(crate) async fn existing(client: &Client, queue: &str) -> Result<String, TransportError> {
    match client.get_queue_url().queue_name(queue).send().await {
        Ok(out) => returned_url(out.queue_url(), queue),
        Err(error) if error.as_service_error().is_some_and(is_missing_queue) => {
            Err(TransportError::Topology {
                broker: BROKER,
                destination: queue.to_owned(),
                reason: "no such queue (declaring is off: create it, or turn declaring on)"
                    .to_owned(),
            })
        }
        Err(error) => Err(sdk("get queue url")(error)),
    }
}

/// Creates `queue` and its dead-letter queue (idempotent) and returns the queue's URL.
async fn declare(
    client: &Client,
    config: &SqsConfig,
    queue: &str,
) -> Result<String, TransportError> {
    let dlq = dead_letter_queue(queue);
    let dlq_url = create(client, &dlq, HashMap::new()).await?;
    let attributes = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(sdk("get queue attributes"))?;
    let arn = attributes
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .ok_or_else(|| TransportError::Topology {
            broker: BROKER,
            destination: dlq.clone(),
            reason: "the server returned no ARN".to_owned(),
        })?;
    let redrive = format!(
        r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"{}"}}"#,
        config.max_receive_count()
    );
    create(
        client,
        queue,
        HashMap::from([
            (
                QueueAttributeName::VisibilityTimeout,
                config.visibility().as_secs().to_string(),
            ),
            (QueueAttributeName::RedrivePolicy, redrive),
        ]),
    )
    .await
}

/// Creates queue `queue` with `attributes` (a FIFO queue when its name ends in `.fifo`, with
/// explicit deduplication ids, not content-based), or finds it when it exists already with
/// other attributes.
async fn create(
    client: &Client,
    queue: &str,
    mut attributes: HashMap<QueueAttributeName, String>,
) -> Result<String, TransportError> {
    if is_fifo(queue) {
        attributes.insert(QueueAttributeName::FifoQueue, "true".to_owned());
        attributes.insert(
            QueueAttributeName::ContentBasedDeduplication,
            "false".to_owned(),
        );
    }
    match client
        .create_queue()
        .queue_name(queue)
        .set_attributes(Some(attributes))
        .send()
        .await
    {
        Ok(out) => returned_url(out.queue_url(), queue),
        // It exists with other attributes (set by operators): use it as it is.
        Err(error)
            if error
                .as_service_error()
                .is_some_and(|e| e.code().is_some_and(|c| c.contains("QueueNameExists"))) =>
        {
            existing(client, queue).await
        }
        Err(error) => Err(TransportError::Topology {
            broker: BROKER,
            destination: queue.to_owned(),
            reason: DisplayErrorContext(&error).to_string(),
        }),
    }
}

/// A text message attribute.
///
/// # Errors
/// Never in practice (the data type is set); the SDK's builder says it could.
pub(crate) fn text(value: &str) -> Result<MessageAttributeValue, TransportError> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .map_err(|e| TransportError::config(BROKER, e))
}

/// The message group of an aggregate's events: `<aggregate type>/<aggregate id>` when it is a
/// valid group id (at most 128 printable ASCII characters), else a name-based UUID of it (the
/// same for every relay, so a group never changes between runs).
#[must_use]
pub fn group_id(stream: &StreamId) -> String {
    let plain = format!("{}/{}", stream.aggregate_type, stream.aggregate_id.as_str());
    if plain.len() <= 128 && plain.bytes().all(|b| b.is_ascii_graphic()) {
        plain
    } else {
        format!(
            "h-{}",
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, plain.as_bytes()).simple()
        )
    }
}

/// Sends a copy of `message` (its body, its group) with `attributes` to the queue at `url`, with
/// deduplication id `<message id>-<suffix>` (a standard queue takes neither).
pub(crate) async fn send_copy(
    client: &Client,
    url: &str,
    message: &Message,
    attributes: HashMap<String, MessageAttributeValue>,
    suffix: &str,
    operation: &'static str,
) -> Result<(), TransportError> {
    let group = message
        .attributes
        .as_ref()
        .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId))
        .cloned()
        .unwrap_or_else(|| "cqrs-no-group".to_owned());
    let id = message.message_id.as_deref().unwrap_or("no-id");
    let mut send = client
        .send_message()
        .queue_url(url)
        .message_body(message.body.as_deref().unwrap_or(" "))
        .set_message_attributes(Some(attributes));
    if is_fifo(url) {
        send = send
            .message_group_id(group)
            .message_deduplication_id(truncate(&format!("{id}-{suffix}"), 128));
    }
    send.send().await.map_err(sdk(operation))?;
    Ok(())
}

/// At most `max` bytes of `text`, cut on a character boundary.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ids_are_valid_and_stable() {
        assert_eq!(group_id(&StreamId::new("order", "o-1")), "order/o-1");
        let long = group_id(&StreamId::new("order", "x".repeat(200)));
        assert!(long.starts_with("h-") && long.len() == 34, "{long}");
        assert_eq!(long, group_id(&StreamId::new("order", "x".repeat(200))));
        let spaced = group_id(&StreamId::new("order", "a b"));
        assert!(spaced.starts_with("h-"), "{spaced}");
    }
}
