//! The network between the framework and a live NATS server cut mid-stream (every connection
//! through a TCP proxy dropped at once, messages in flight lost, the server itself up and
//! remembering what it delivered): the relay and the consumer come back by themselves, and every
//! event is applied once, in order per aggregate. Unlike a server restart, the server still
//! counts the messages it sent into the cut connections as delivered, and sends them again only
//! after `ack_wait`: a consumer that simply pulled on would apply newer messages first.

mod support;

use std::sync::Arc;

use evently_transport::conformance::{self, CutProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_cut_three_times_mid_stream_loses_and_reorders_nothing() {
    let server = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let target = server
        .trim_start_matches("nats://")
        .rsplit('@')
        .next()
        .unwrap_or("127.0.0.1:4222")
        .to_owned();
    let proxy = Arc::new(CutProxy::start(target).await);
    support::set_url(format!("nats://127.0.0.1:{}", proxy.port()));
    conformance::broker_restarted_mid_stream(
        &support::Nats,
        &support::namespace("netcut"),
        3,
        proxy.cuts(),
    )
    .await;
}
