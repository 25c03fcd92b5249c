//! The network between the framework and a live RabbitMQ cut mid-stream (every connection
//! through a TCP proxy dropped at once, frames in flight lost, the broker up): the relay and the
//! consumer reconnect by themselves, and every event is applied once, in order per aggregate
//! (the broker returns the unacknowledged messages of a closed channel to the queue, ahead of
//! newer ones).

mod support;

use std::sync::Arc;

use evently_rabbitmq::RabbitConfig;
use evently_transport::conformance::{self, CutProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_cut_three_times_mid_stream_loses_and_reorders_nothing() {
    let url = RabbitConfig::from_env().url().to_owned();
    // amqp://user:pass@host:port/vhost -> host:port, and the same URL through the proxy.
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let (credentials, rest) = rest.rsplit_once('@').unwrap_or(("", rest));
    let (authority, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let target = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:5672")
    };
    let proxy = Arc::new(CutProxy::start(target).await);
    let at = if credentials.is_empty() {
        String::new()
    } else {
        format!("{credentials}@")
    };
    support::set_url(format!("amqp://{at}127.0.0.1:{}/{vhost}", proxy.port()));
    conformance::broker_restarted_mid_stream(
        &support::Rabbit,
        &support::namespace("netcut"),
        3,
        proxy.cuts(),
    )
    .await;
}
