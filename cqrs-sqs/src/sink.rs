//! The relay's SQS side: `SendMessageBatch` in tens to a FIFO queue, several batches in flight,
//! answers handed to the relay in the order the messages were sent.
//!
//! # Order
//!
//! SQS keeps a message group's order as it receives the messages, and has no conditional send
//! (Kafka's idempotent producer and NATS' expected last message id have no counterpart). So a
//! group is never in two batches on their way at once: its next messages wait until the batch
//! holding it was answered, while batches of other groups go (16 in flight). Within a batch the
//! service stores a group's messages in order; it refuses entries one by one only for the
//! entry's own fault (its size, its attributes), and such an event stops the relay for good, so
//! a later message of its group stored before it is never followed by it. (A refusal that is not
//! the entry's fault, followed by a success of its group in the same batch, would invert them:
//! logged as an error naming the group.) After a failure nothing more is sent
//! until the relay starts again from its checkpoint, and batches still on their way when it does
//! are waited for before anything is sent again, so a resend can never overtake its original.
//! Resends are dropped by the server within its 5-minute deduplication window
//! (`MessageDeduplicationId` = event id). What no client can rule out: a process killed while
//! a request it sent is still being processed, replaced by one that sends the next event of
//! that group faster (a window of one request's processing time).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use evently_core::RawStoredEvent;
use evently_transport::envelope::headers_of;
use evently_transport::{BrokerError, Layout, Outgoing, Sink, TransportError};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;

use crate::queues::{group_id, queue_url, text};
use crate::{BROKER, SqsConfig};

/// The relay publishing to SQS: `SqsRelay::new(store, SqsSink::new(config), owner)`.
pub type SqsRelay = evently_transport::Relay<SqsSink>;

/// Messages per `SendMessageBatch` (the service's limit).
const BATCH: usize = 10;
/// Bytes per `SendMessageBatch` (the service's classic limit; bodies and attributes).
const BATCH_BYTES: usize = 256 * 1024;
/// Batches on their way at once.
const IN_FLIGHT: usize = 16;
/// How deep a batch looks past messages of busy groups.
const SCAN: usize = 1_000;

/// One message waiting to be sent.
struct Entry {
    seq: u64,
    group: String,
    dedup: String,
    body: String,
    attributes: HashMap<String, MessageAttributeValue>,
}

impl Entry {
    fn size(&self) -> usize {
        self.body.len()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.string_value().map_or(0, str::len) + 6)
                .sum::<usize>()
    }
}

/// A batch's answers, by message.
struct Answered {
    groups: Vec<String>,
    answers: Vec<(u64, Result<(), String>)>,
}

type InFlight = Pin<Box<dyn Future<Output = Answered> + Send + Sync>>;

/// Publishes the relay's messages to a FIFO queue ([`SqsConfig::queue`]): `MessageGroupId` =
/// the aggregate ([`group_id`]), `MessageDeduplicationId` = the event id, the framework's
/// headers as message attributes. To a standard queue: the same without the two ids, every
/// batch sent as soon as it is full (no order to keep). A message counts as sent once the service answered the batch
/// that holds it with success for it.
pub struct SqsSink {
    config: SqsConfig,
    client: Option<(Client, String)>,
    unsent: VecDeque<Entry>,
    /// The sequence number of the next message sent.
    next: u64,
    /// The oldest message whose answer the relay has not taken.
    oldest: u64,
    answers: BTreeMap<u64, Result<(), String>>,
    in_flight: FuturesUnordered<InFlight>,
    /// Groups with a message on its way.
    busy: HashSet<String>,
    /// Batches sent before the relay started again: waited for before anything is sent.
    draining: FuturesUnordered<InFlight>,
    /// A message failed: nothing more is sent until the relay starts again.
    failed: bool,
}

impl std::fmt::Debug for SqsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsSink")
            .field("config", &self.config)
            .field("connected", &self.client.is_some())
            .field("unsent", &self.unsent.len())
            .field("batches_in_flight", &self.in_flight.len())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl SqsSink {
    /// A sink to the queue of `config` (resolved, or declared, at the first page).
    #[must_use]
    pub fn new(config: SqsConfig) -> Self {
        Self {
            config,
            client: None,
            unsent: VecDeque::new(),
            next: 0,
            oldest: 0,
            answers: BTreeMap::new(),
            in_flight: FuturesUnordered::new(),
            busy: HashSet::new(),
            draining: FuturesUnordered::new(),
            failed: false,
        }
    }

    async fn connect(&mut self) -> Result<(), TransportError> {
        if self.client.is_none() {
            let client = self.config.client().await;
            let url = queue_url(&client, &self.config, self.config.queue()).await?;
            self.client = Some((client, url));
        }
        Ok(())
    }

    /// Sends batches while there is room: only full ones unless `all`. A batch takes messages
    /// in order, passing over groups that have a message on its way (their later messages wait
    /// too, so a group's order holds), and at most [`SCAN`] messages deep.
    fn launch(&mut self, all: bool) {
        if self.failed || !self.draining.is_empty() {
            return;
        }
        let Some((client, url)) = &self.client else {
            return;
        };
        // A standard queue keeps no order: no group waits for another batch.
        let fifo = self.config.is_fifo();
        while self.in_flight.len() < IN_FLIGHT && (all || self.unsent.len() >= BATCH) {
            let (mut batch, mut groups, mut bytes) = (Vec::new(), Vec::<String>::new(), 0);
            let mut index = 0;
            while batch.len() < BATCH && index < self.unsent.len().min(SCAN) {
                let entry = &self.unsent[index];
                let size = entry.size();
                if (fifo && self.busy.contains(&entry.group))
                    || (!batch.is_empty() && bytes + size > BATCH_BYTES)
                {
                    index += 1;
                    continue;
                }
                let Some(entry) = self.unsent.remove(index) else {
                    break;
                };
                bytes += size;
                if fifo && !groups.contains(&entry.group) {
                    groups.push(entry.group.clone());
                }
                batch.push(entry);
            }
            if batch.is_empty() {
                return;
            }
            self.busy.extend(groups.iter().cloned());
            let seqs: Vec<u64> = batch.iter().map(|e| e.seq).collect();
            // On a task of its own: it goes on if the relay drops this sink's future.
            let task = tokio::spawn(send_batch(client.clone(), url.clone(), batch, fifo));
            self.in_flight.push(Box::pin(async move {
                let answers = match task.await {
                    Ok(answers) => answers,
                    Err(error) => seqs
                        .into_iter()
                        .map(|seq| (seq, Err(format!("the send task failed: {error}"))))
                        .collect(),
                };
                Answered { groups, answers }
            }));
        }
    }

    /// Takes the answers of the next batch answered (cancel-safe: awaited in place).
    async fn collect(&mut self) {
        if let Some(Answered { groups, answers }) = self.in_flight.next().await {
            for group in groups {
                self.busy.remove(&group);
            }
            for (seq, answer) in answers {
                self.failed |= answer.is_err();
                self.answers.insert(seq, answer);
            }
        }
    }
}

/// Sends `batch` to the queue at `url` (with group and deduplication ids when `fifo`); the
/// answer for each message by sequence number.
async fn send_batch(
    client: Client,
    url: String,
    batch: Vec<Entry>,
    fifo: bool,
) -> Vec<(u64, Result<(), String>)> {
    let seqs: Vec<u64> = batch.iter().map(|e| e.seq).collect();
    let groups: Vec<String> = batch.iter().map(|e| e.group.clone()).collect();
    let mut entries = Vec::with_capacity(batch.len());
    for entry in batch {
        let mut built = SendMessageBatchRequestEntry::builder()
            .id(entry.seq.to_string())
            .message_body(entry.body)
            .set_message_attributes(Some(entry.attributes));
        if fifo {
            built = built
                .message_group_id(entry.group)
                .message_deduplication_id(entry.dedup);
        }
        match built.build() {
            Ok(built) => entries.push(built),
            Err(error) => {
                return seqs
                    .into_iter()
                    .map(|seq| (seq, Err(error.to_string())))
                    .collect();
            }
        }
    }
    let sent = client
        .send_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await;
    match sent {
        Ok(out) => {
            let mut answers: HashMap<String, Result<(), String>> = out
                .successful()
                .iter()
                .map(|s| (s.id().to_owned(), Ok(())))
                .collect();
            for failed in out.failed() {
                answers.insert(
                    failed.id().to_owned(),
                    Err(format!(
                        "refused ({}{}): {}",
                        failed.code(),
                        if failed.sender_fault() {
                            ", the message's fault"
                        } else {
                            ""
                        },
                        failed.message().unwrap_or("no reason given")
                    )),
                );
            }
            let answered: Vec<(u64, Result<(), String>)> = seqs
                .into_iter()
                .map(|seq| {
                    let answer = answers
                        .remove(&seq.to_string())
                        .unwrap_or_else(|| Err("the service did not answer for it".to_owned()));
                    (seq, answer)
                })
                .collect();
            if fifo {
                warn_inversions(&groups, &answered);
            }
            answered
        }
        Err(error) => {
            let reason = DisplayErrorContext(&error).to_string();
            seqs.into_iter()
                .map(|seq| (seq, Err(reason.clone())))
                .collect()
        }
    }
}

/// Logs an error for each group whose message was refused while a later one of it in the same
/// batch was stored: the service now holds them out of order.
fn warn_inversions(groups: &[String], answered: &[(u64, Result<(), String>)]) {
    for (i, (seq, answer)) in answered.iter().enumerate() {
        if let Err(reason) = answer
            && answered[i + 1..]
                .iter()
                .zip(&groups[i + 1..])
                .any(|((_, later), group)| later.is_ok() && *group == groups[i])
        {
            tracing::error!(broker = BROKER, group = %groups[i], message = seq, %reason, "a message was refused and a later one of its group in the same batch was stored: the queue holds them out of order");
        }
    }
}

/// The message attributes and group of the relay's messages.
#[derive(Clone, Debug)]
pub struct SqsLayout;

/// What the layout builds for one message.
#[derive(Debug)]
pub struct SqsMessage {
    group: String,
    dedup: String,
    attributes: HashMap<String, MessageAttributeValue>,
}

impl Layout for SqsLayout {
    type Headers = SqsMessage;

    fn headers(&self, event: &RawStoredEvent, content_type: &'static str) -> SqsMessage {
        let mut attributes = HashMap::new();
        headers_of(event, content_type, |key, value| {
            // Attribute values cannot be empty; building one cannot fail (its type is set).
            if let (false, Ok(value)) = (value.is_empty(), text(value)) {
                attributes.insert(key.to_owned(), value);
            }
        });
        SqsMessage {
            group: group_id(&event.stream),
            dedup: event.event_id.to_string(),
            attributes,
        }
    }
}

impl Sink for SqsSink {
    const BROKER: &'static str = BROKER;
    const DEFAULT_NAME: &'static str = "sqs-relay";
    type Layout = SqsLayout;

    fn layout(&self) -> SqsLayout {
        SqsLayout
    }

    fn destination(&self, _aggregate_type: &str) -> String {
        format!("queue {}", self.config.queue())
    }

    async fn prepare(&mut self, _aggregate_types: &[&str]) -> Result<(), TransportError> {
        self.connect().await
    }

    async fn send(&mut self, message: Outgoing<'_, SqsMessage>) -> Result<(), BrokerError> {
        let body = std::str::from_utf8(message.value).map_err(|_| -> BrokerError {
            "SQS message bodies are text: the serializer wrote bytes that are not UTF-8".into()
        })?;
        self.connect().await.map_err(Box::new)?;
        let SqsMessage {
            group,
            dedup,
            attributes,
        } = message.headers;
        self.unsent.push_back(Entry {
            seq: self.next,
            group,
            dedup,
            body: body.to_owned(),
            attributes,
        });
        self.next += 1;
        self.launch(false);
        Ok(())
    }

    async fn confirmed(&mut self) -> Result<(), BrokerError> {
        loop {
            if let Some(answer) = self.answers.remove(&self.oldest) {
                self.oldest += 1;
                self.launch(false);
                return answer.map_err(Into::into);
            }
            if self.oldest >= self.next {
                return Err("no message is waiting for an answer".into());
            }
            if !self.draining.is_empty() {
                // Batches from before the relay started again: they land before anything new.
                self.draining.next().await;
                continue;
            }
            if self.in_flight.is_empty() {
                if self.failed {
                    // Never sent: an earlier message failed and sending stopped there.
                    self.oldest += 1;
                    return Err("not sent: an earlier message failed".into());
                }
                self.launch(true);
                if self.in_flight.is_empty() {
                    return Err("the sink has no connection to send with".into());
                }
            }
            self.collect().await;
        }
    }

    fn forget(&mut self) {
        for batch in std::mem::take(&mut self.in_flight) {
            self.draining.push(batch);
        }
        self.unsent.clear();
        self.answers.clear();
        self.busy.clear();
        self.failed = false;
        self.oldest = self.next;
    }

    async fn restart(&mut self) -> Result<(), TransportError> {
        self.forget();
        self.client = None;
        Ok(())
    }
}
