//! The machine's RabbitMQ stopped and started again mid-stream (`rabbitmqctl stop_app` /
//! `start_app`; a test binary of its own, so no other test of this crate runs meanwhile): the
//! relay and the consumer reconnect by themselves and lose, double and reorder nothing.

mod support;

use std::time::Duration;

use evently_transport::conformance;

fn rabbitmqctl(command: &str) {
    let status = std::process::Command::new("rabbitmqctl")
        .arg(command)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("this test restarts the broker with rabbitmqctl: {e}"));
    assert!(status.success(), "rabbitmqctl {command}: {status}");
}

async fn wait_up() {
    for _ in 0..200 {
        let url = evently_rabbitmq::RabbitConfig::from_env().url().to_owned();
        if lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("RabbitMQ did not come back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_restarted_three_times_mid_stream_loses_and_reorders_nothing() {
    let restart = |_n: u32| -> conformance::BoxFuture<'static, ()> {
        Box::pin(async {
            tokio::task::spawn_blocking(|| {
                rabbitmqctl("stop_app");
                rabbitmqctl("start_app");
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            wait_up().await;
        })
    };
    conformance::broker_restarted_mid_stream(
        &support::Rabbit,
        &support::namespace("restart"),
        3,
        restart,
    )
    .await;
}
