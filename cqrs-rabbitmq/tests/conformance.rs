//! The transport conformance suite against the real RabbitMQ (`AMQP_URL`, default
//! amqp://guest:guest@127.0.0.1:5672/%2f) and the real PostgreSQL.

mod support;

use evently_transport::conformance;
use support::{Rabbit, namespace};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_200_times_loses_nothing_and_keeps_each_aggregates_order() {
    let report = conformance::relay_killed_at_random_points(&Rabbit, &namespace("kill"), 200).await;
    println!("RabbitMQ, relay killed at random points: {report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_the_rest_flows() {
    conformance::poison_is_dead_lettered(&Rabbit, &namespace("poison")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_handler_applies_the_event_once() {
    conformance::consumer_killed_mid_handler(&Rabbit, &namespace("midkill")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_retried_after_a_fix_is_applied_once() {
    conformance::dead_letter_retried_after_a_fix(&Rabbit, &namespace("fix")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_not_ours_is_dead_lettered() {
    conformance::not_ours_is_dead_lettered(&Rabbit, &namespace("foreign")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_under_one_name_publish_each_event_once_in_order() {
    let (events, refused) =
        conformance::two_relays_under_one_name(&Rabbit, &namespace("twins")).await;
    println!(
        "RabbitMQ, two relays under one name: {events} events, {refused} steps refused the lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_is_handled_in_the_trace_of_its_command() {
    conformance::trace_follows_each_event(&Rabbit, &namespace("trace")).await;
}
