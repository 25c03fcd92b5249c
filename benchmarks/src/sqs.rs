//! S1: the outbox relay sending to an SQS FIFO queue against the raw SDK sending the same
//! batches (ten consecutive events, the same bodies, group ids, deduplication ids and
//! attributes, 16 requests in flight) to the same server in the same run. Needs a local SQS
//! server at `SQS_ENDPOINT` (`scripts/sqs-up.sh`).

use std::collections::HashMap;
use std::time::Instant;

use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use evently_core::StoredEvent;
use evently_postgres::PostgresEventStore;
use evently_sqs::{SqsConfig, SqsRelay, SqsSink, group_id};
use futures::StreamExt as _;

use crate::brokers::{BrokerRow, append_to_receive, relay, unique, values, with_running};
use crate::kafka::{all_events, fill, store};

fn config(queue: &str) -> SqsConfig {
    let endpoint =
        std::env::var("SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".to_owned());
    SqsConfig::local(endpoint)
        .with_queue(format!("{queue}.fifo"))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A queue made for one side of one run; its URL.
async fn queue(client: &aws_sdk_sqs::Client, name: &str) -> String {
    client
        .create_queue()
        .queue_name(format!("{name}.fifo"))
        .attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true")
        .send()
        .await
        .unwrap_or_else(|e| panic!("SQS: {}", aws_sdk_sqs::error::DisplayErrorContext(&e)))
        .queue_url
        .unwrap_or_default()
}

/// The raw SDK: batches of ten consecutive events with the relay's bodies, group ids,
/// deduplication ids and attributes, 16 requests in flight, every answer awaited.
async fn raw_sqs(events: &[StoredEvent]) -> f64 {
    let name = unique("raw");
    let client = config(&name).client().await;
    let url = queue(&client, &name).await;
    let values = values(events);
    let started = Instant::now();
    let batches = events
        .chunks(10)
        .zip(values.chunks(10))
        .map(|(events, values)| {
            let entries: Vec<_> = events
                .iter()
                .zip(values)
                .enumerate()
                .map(|(i, (event, value))| {
                    let mut attributes = HashMap::new();
                    evently_transport::envelope::headers_of(event, "application/json", |k, v| {
                        if let Ok(v) = MessageAttributeValue::builder()
                            .data_type("String")
                            .string_value(v)
                            .build()
                        {
                            attributes.insert(k.to_owned(), v);
                        }
                    });
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(String::from_utf8_lossy(value))
                        .message_group_id(group_id(&event.stream))
                        .message_deduplication_id(event.event_id.to_string())
                        .set_message_attributes(Some(attributes))
                        .build()
                        .unwrap_or_else(|e| panic!("{e}"))
                })
                .collect();
            let client = client.clone();
            let url = url.clone();
            async move {
                let out = client
                    .send_message_batch()
                    .queue_url(url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{}", aws_sdk_sqs::error::DisplayErrorContext(&e)));
                assert!(out.failed().is_empty(), "{:?}", out.failed());
            }
        });
    futures::stream::iter(batches)
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let rate = events.len() as f64 / started.elapsed().as_secs_f64();
    let _ = client.delete_queue().queue_url(url).send().await;
    rate
}

/// Append -> a consumer received it through a running relay: a receive loop on the relay's
/// queue (long polls of 1 s, each message deleted at once so its group goes on), ms.
async fn sqs_latency(store: &PostgresEventStore, samples: usize) -> Vec<f64> {
    let name = unique("latency");
    let config = config(&name);
    let client = config.client().await;
    let url = queue(&client, &name).await;
    let mut relay = SqsRelay::new(store.clone(), SqsSink::new(config), "latency")
        .with_name(unique("sqs-latency"));
    // The log so far goes out first and is purged, so each sample waits for its own event only.
    while relay
        .step()
        .await
        .map(|s| s.sent > 0 || s.delivered > 0)
        .unwrap_or_else(|e| panic!("{e}"))
    {}
    client
        .purge_queue()
        .queue_url(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{}", aws_sdk_sqs::error::DisplayErrorContext(&e)));
    let received = futures::stream::unfold(
        (client.clone(), url.clone(), Vec::<Option<String>>::new()),
        |(client, url, mut buffered)| async move {
            while buffered.is_empty() {
                let out = client
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .message_attribute_names("All")
                    .send()
                    .await
                    .ok()?;
                for message in out.messages.unwrap_or_default() {
                    if let Some(receipt) = &message.receipt_handle {
                        let _ = client
                            .delete_message()
                            .queue_url(&url)
                            .receipt_handle(receipt)
                            .send()
                            .await;
                    }
                    buffered.push(
                        message
                            .message_attributes
                            .as_ref()
                            .and_then(|a| a.get(evently_transport::envelope::header::EVENT_ID))
                            .and_then(|v| v.string_value())
                            .map(str::to_owned),
                    );
                }
                buffered.reverse();
            }
            let next = buffered.pop()?;
            Some((next, (client, url, buffered)))
        },
    );
    let latencies = with_running(relay, async {
        append_to_receive(store, samples, Box::pin(received)).await
    })
    .await;
    let _ = client.delete_queue().queue_url(url).send().await;
    latencies
}

/// S1: `runs` runs of the relay and the raw SDK over `count` events, then `samples` append ->
/// consumer latencies.
pub async fn s1(count: u64, runs: usize, samples: usize) -> BrokerRow {
    let store: PostgresEventStore = store().await;
    fill(&store, count).await;
    let events = all_events(&store, count as usize).await;
    let n = events.len();
    let mut row = BrokerRow::default();
    for _ in 0..runs {
        let name = unique("relay");
        let r = SqsRelay::new(store.clone(), SqsSink::new(config(&name)), "bench")
            .with_name(unique("sqs-relay"));
        row.relay.push(relay(r.with_batch(5_000), n).await);
        row.raw.push(raw_sqs(&events).await);
    }
    row.latencies = sqs_latency(&store, samples).await;
    row
}
