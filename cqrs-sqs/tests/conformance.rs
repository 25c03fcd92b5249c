//! The transport conformance suite against a local SQS server (`SQS_ENDPOINT`, default
//! http://127.0.0.1:4566: ministack, started by `scripts/sqs-up.sh`) and the real PostgreSQL.

mod support;

use evently_transport::conformance;
use support::{Sqs, namespace};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_200_times_loses_nothing_and_keeps_each_aggregates_order() {
    let report =
        conformance::relay_killed_at_random_points(&Sqs::FIFO, &namespace("kill"), 200).await;
    println!("SQS, relay killed at random points: {report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_the_rest_flows() {
    conformance::poison_is_dead_lettered(&Sqs::FIFO, &namespace("poison")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_handler_applies_the_event_once() {
    conformance::consumer_killed_mid_handler(&Sqs::FIFO, &namespace("midkill")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_retried_after_a_fix_is_applied_once() {
    conformance::dead_letter_retried_after_a_fix(&Sqs::FIFO, &namespace("fix")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_not_ours_is_dead_lettered() {
    conformance::not_ours_is_dead_lettered(&Sqs::FIFO, &namespace("foreign")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_under_one_name_publish_each_event_once_in_order() {
    for _ in 0..2 {
        let (events, held) =
            conformance::two_relays_under_one_name(&Sqs::FIFO, &namespace("twins")).await;
        println!(
            "SQS, two relays under one name: {events} events, {held} steps found the lease held"
        );
    }
}

/// A standard queue keeps no order and may deliver twice: with the relay cut 100 times, every
/// event is still applied once (the inbox drops the redeliveries); the inversions are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_queue_a_relay_killed_100_times_loses_nothing_and_applies_each_event_once() {
    let report = conformance::relay_killed_at_random_points_unordered(
        &Sqs::STANDARD,
        &namespace("stdkill"),
        100,
    )
    .await;
    println!("SQS standard queue, relay killed at random points: {report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_queue_a_message_that_is_not_ours_is_dead_lettered() {
    conformance::not_ours_is_dead_lettered(&Sqs::STANDARD, &namespace("stdforeign")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_queue_a_dead_letter_retried_after_a_fix_is_applied_once() {
    conformance::dead_letter_retried_after_a_fix(&Sqs::STANDARD, &namespace("stdfix")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_is_handled_in_the_trace_of_its_command() {
    conformance::trace_follows_each_event(&Sqs::FIFO, &namespace("trace")).await;
}
