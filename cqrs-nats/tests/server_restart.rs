//! A NATS server of the test's own (on another port, with its own store directory) stopped and
//! started again mid-stream: the relay and the consumer come back by themselves.

mod support;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evently_transport::conformance;

/// `nats-server` with JetStream on `port`, storing in `dir`.
fn start(port: u16, dir: &std::path::Path) -> std::process::Child {
    std::process::Command::new(
        std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned()),
    )
    .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
    .arg(dir)
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap_or_else(|e| panic!("this test starts its own nats-server (NATS_SERVER or PATH): {e}"))
}

async fn wait_up(port: u16) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nats-server did not come up on {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_restarted_three_times_mid_stream_loses_and_reorders_nothing() {
    let port = 14_222 + u16::try_from(std::process::id() % 1_000).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("cqrs-nats-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server = Arc::new(Mutex::new(start(port, &dir)));
    wait_up(port).await;
    support::set_url(format!("nats://127.0.0.1:{port}"));
    let restart = {
        let server = server.clone();
        let dir = dir.clone();
        move |_n: u32| -> conformance::BoxFuture<'static, ()> {
            let server = server.clone();
            let dir = dir.clone();
            Box::pin(async move {
                {
                    let mut child = server
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let _ = child.kill();
                    let _ = child.wait();
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                *server
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = start(port, &dir);
                wait_up(port).await;
            })
        }
    };
    conformance::broker_restarted_mid_stream(
        &support::Nats,
        &support::namespace("restart"),
        3,
        restart,
    )
    .await;
    let _ = server.lock().map(|mut c| c.kill());
    let _ = std::fs::remove_dir_all(&dir);
}
