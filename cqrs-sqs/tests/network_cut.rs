//! The network between the framework and a live SQS server cut mid-stream (every connection
//! through a TCP proxy dropped at once, requests in flight lost or answered into a closed
//! socket, the server itself up): the relay and the consumer come back by themselves, and every
//! event is applied once, in order per aggregate. (`server_restart.rs` restarts the server
//! itself.)

mod support;

use std::sync::Arc;

use evently_transport::conformance::{self, CutProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_cut_three_times_mid_stream_loses_and_reorders_nothing() {
    let target = support::server()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let proxy = Arc::new(CutProxy::start(target).await);
    support::set_endpoint(format!("http://127.0.0.1:{}", proxy.port()));
    conformance::broker_restarted_mid_stream(
        &support::Sqs::FIFO,
        &support::namespace("netcut"),
        3,
        proxy.cuts(),
    )
    .await;
}
