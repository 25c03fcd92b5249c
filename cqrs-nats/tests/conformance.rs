//! The transport conformance suite against the real NATS JetStream server (`NATS_URL`, default
//! nats://127.0.0.1:4222) and the real PostgreSQL.

mod support;

use cqrs_transport::conformance;
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
async fn a_message_that_is_not_ours_is_dead_lettered() {
    conformance::not_ours_is_dead_lettered(&Nats, &namespace("foreign")).await;
}
