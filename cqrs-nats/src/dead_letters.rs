//! A consumer's dead letters in the dead-letter stream, for operators: count, list, retry, purge.

use async_nats::HeaderMap;
use async_nats::jetstream::Context;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::Stream;
use evently_transport::envelope::header;
use evently_transport::{BrokerDeadLetter, DeadLetterQueue, TransportError};

use crate::jetstream::connect;
use crate::{BROKER, NatsConfig, broker};

/// The dead letters of durable consumer `durable`: the messages on its subject of the
/// dead-letter stream (`<prefix>-dlq.<durable>` in `<stream>_DLQ`), each known by its sequence
/// number there. Retrying one publishes it back to the subject it was consumed from (so every
/// consumer of that subject receives it again; the others' inboxes drop it) with a message id of
/// its own (the event id is still within the events stream's duplicate window), then deletes it.
#[derive(Debug, Clone)]
pub struct NatsDeadLetters {
    config: NatsConfig,
    durable: String,
}

impl NatsDeadLetters {
    /// The dead letters of durable consumer `durable`.
    pub fn new(config: &NatsConfig, durable: impl Into<String>) -> Self {
        Self {
            config: config.clone(),
            durable: durable.into(),
        }
    }

    async fn stream(&self) -> Result<(Context, Stream), TransportError> {
        let js = connect(&self.config).await?;
        let name = self.config.dead_letter_stream();
        let stream = js
            .get_stream(&name)
            .await
            .map_err(|e| TransportError::Topology {
                broker: BROKER,
                destination: format!("stream {name}"),
                reason: e.to_string(),
            })?;
        Ok((js, stream))
    }

    /// Up to `limit` of this consumer's dead letters, oldest first.
    async fn letters(
        &self,
        stream: &mut Stream,
        limit: usize,
    ) -> Result<Vec<StreamMessage>, TransportError> {
        let subject = self.config.dead_letter_subject(&self.durable);
        let state = stream
            .info()
            .await
            .map_err(broker("stream info"))?
            .state
            .clone();
        let mut letters = Vec::new();
        if state.messages == 0 {
            return Ok(letters);
        }
        for sequence in state.first_sequence..=state.last_sequence {
            if letters.len() >= limit {
                break;
            }
            // A deleted sequence is a gap: skip it.
            if let Ok(message) = stream.get_raw_message(sequence).await
                && message.subject.as_str() == subject
            {
                letters.push(message);
            }
        }
        Ok(letters)
    }

    /// Publishes `letter` back where it was consumed from, then deletes it.
    async fn send_back(
        &self,
        js: &Context,
        stream: &Stream,
        letter: StreamMessage,
    ) -> Result<(), TransportError> {
        let Some(source) = text(&letter.headers, header::DLQ_TOPIC) else {
            return Err(TransportError::Broker {
                broker: BROKER,
                operation: "send a dead letter back",
                source: format!(
                    "dead letter {} has no `{}` header: where it came from is unknown",
                    letter.sequence,
                    header::DLQ_TOPIC
                )
                .into(),
            });
        };
        let mut headers = HeaderMap::new();
        for (name, values) in letter.headers.iter() {
            let name: &str = name.as_ref();
            // The server's headers (message id, expectations) are the sender's own: a new
            // message id is set below; an expectation would be refused.
            if name.starts_with("cqrs-dlq-") || name.starts_with("Nats-") {
                continue;
            }
            for value in values {
                headers.append(name, value.as_str());
            }
        }
        let id = text(&letter.headers, header::EVENT_ID).unwrap_or_default();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("{id}-retry-{}-{}", self.durable, letter.sequence).as_str(),
        );
        js.publish_with_headers(source, headers, letter.payload.clone())
            .await
            .map_err(broker("send a dead letter back"))?
            .await
            .map_err(broker("send a dead letter back"))?;
        stream
            .delete_message(letter.sequence)
            .await
            .map_err(broker("remove a dead letter"))?;
        Ok(())
    }
}

fn text(headers: &HeaderMap, key: &str) -> Option<String> {
    headers.get(key).map(|v| v.as_str().to_owned())
}

#[async_trait::async_trait]
impl DeadLetterQueue for NatsDeadLetters {
    fn describe(&self) -> String {
        format!(
            "NATS stream {} subject {}",
            self.config.dead_letter_stream(),
            self.config.dead_letter_subject(&self.durable)
        )
    }

    async fn count(&self) -> Result<u64, TransportError> {
        let (_, mut stream) = self.stream().await?;
        let letters = self.letters(&mut stream, usize::MAX).await?;
        Ok(letters.len() as u64)
    }

    async fn list(&self, limit: usize) -> Result<Vec<BrokerDeadLetter>, TransportError> {
        let (_, mut stream) = self.stream().await?;
        Ok(self
            .letters(&mut stream, limit)
            .await?
            .into_iter()
            .map(|m| {
                BrokerDeadLetter::from_headers(m.sequence.to_string(), |k| text(&m.headers, k))
            })
            .collect())
    }

    async fn retry(&self, id: &str) -> Result<bool, TransportError> {
        let Ok(sequence) = id.parse::<u64>() else {
            return Ok(false);
        };
        let (js, stream) = self.stream().await?;
        let Ok(letter) = stream.get_raw_message(sequence).await else {
            return Ok(false);
        };
        if letter.subject.as_str() != self.config.dead_letter_subject(&self.durable) {
            return Ok(false);
        }
        self.send_back(&js, &stream, letter).await?;
        Ok(true)
    }

    async fn retry_all(&self) -> Result<u64, TransportError> {
        let (js, mut stream) = self.stream().await?;
        let mut retried = 0;
        for letter in self.letters(&mut stream, usize::MAX).await? {
            self.send_back(&js, &stream, letter).await?;
            retried += 1;
        }
        Ok(retried)
    }

    async fn purge(&self) -> Result<u64, TransportError> {
        let (_, stream) = self.stream().await?;
        let purged = stream
            .purge()
            .filter(self.config.dead_letter_subject(&self.durable))
            .await
            .map_err(broker("purge"))?;
        Ok(purged.purged)
    }
}
