//! The transport conformance suite against the real NATS JetStream server (`NATS_URL`, default
//! nats://127.0.0.1:4222) and the real PostgreSQL.

mod support;

use evently_transport::conformance;
use support::{Nats, namespace};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_200_times_loses_nothing_and_keeps_each_aggregates_order() {
    let report = conformance::relay_killed_at_random_points(&Nats, &namespace("kill"), 200).await;
    println!("NATS, relay killed at random points: {report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_the_rest_flows() {
    conformance::poison_is_dead_lettered(&Nats, &namespace("poison")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_handler_applies_the_event_once() {
    conformance::consumer_killed_mid_handler(&Nats, &namespace("midkill")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_retried_after_a_fix_is_applied_once() {
    conformance::dead_letter_retried_after_a_fix(&Nats, &namespace("fix")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_not_ours_is_dead_lettered() {
    conformance::not_ours_is_dead_lettered(&Nats, &namespace("foreign")).await;
}

/// Pages larger than the client's limit of acks in flight (async-nats waits for a permit at its
/// limit, and the relay awaits a page's acks only after sending the next): the sink takes the
/// oldest acks early, so the relay never waits on itself. Before, a page of 5,000 behind another
/// of 5,000 hung for good (found by the N1 benchmark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_larger_than_the_ack_window_do_not_deadlock() {
    use evently_core::{EventData, EventId, EventStore, ExpectedVersion, Metadata, StreamId};
    let ns = namespace("window");
    let store = conformance::fresh_store(&ns).await;
    for chunk in 0..12u64 {
        let events = (0..1_000u64)
            .map(|n| EventData {
                event_id: EventId::new(),
                event_type: "Noted".to_owned(),
                schema_version: 1,
                payload: serde_json::json!({ "n": chunk * 1_000 + n }),
                metadata: Metadata::default(),
            })
            .collect();
        store
            .append(
                &StreamId::new("note", format!("n{chunk}")),
                ExpectedVersion::Any,
                events,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut relay = evently_nats::NatsRelay::new(
        store.clone(),
        conformance::Broker::sink(&Nats, &ns),
        "window",
    )
    .with_batch(10_000);
    let drained = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        let mut delivered = 0;
        while delivered < 12_000 {
            delivered += relay
                .step()
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .delivered;
        }
        delivered
    })
    .await
    .unwrap_or_else(|_| panic!("the relay hung with pages of 10,000"));
    assert_eq!(drained, 12_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_under_one_name_publish_each_event_once_in_order() {
    let (events, refused) =
        conformance::two_relays_under_one_name(&Nats, &namespace("twins")).await;
    println!("NATS, two relays under one name: {events} events, {refused} steps refused the lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_is_handled_in_the_trace_of_its_command() {
    conformance::trace_follows_each_event(&Nats, &namespace("trace")).await;
}
