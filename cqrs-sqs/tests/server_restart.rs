//! A local SQS server of the test's own (ministack on another port, keeping its state across a
//! graceful restart: `PERSIST_STATE=1`) stopped and started again mid-stream: the relay and the
//! consumer come back by themselves, and every event is applied once, in order per aggregate.
//! (A restart that loses the server's state loses its messages: no client can help that, so the
//! server here keeps them, as SQS does.)

mod support;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evently_transport::conformance;

/// The ministack that `scripts/sqs-up.sh` installed (or `SQS_SERVER`).
fn binary() -> String {
    std::env::var("SQS_SERVER").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".to_owned());
        format!("{home}/.cache/cqrs-sqs-venv/bin/ministack")
    })
}

/// ministack on `port`, its state saved in `dir` when it stops and read back when it starts.
fn start(port: u16, dir: &std::path::Path) -> std::process::Child {
    std::process::Command::new(binary())
        .env("BIND_HOST", "127.0.0.1")
        .env("GATEWAY_PORT", port.to_string())
        .env("PERSIST_STATE", "1")
        .env("STATE_DIR", dir)
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "this test starts its own ministack ({}; SQS_SERVER, or run scripts/sqs-up.sh): {e}",
                binary()
            )
        })
}

/// Stops it the way a service manager would (SIGTERM: it saves its state), and waits.
fn stop(child: &mut std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..200 {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

async fn wait_up(port: u16) {
    for _ in 0..200 {
        if healthy(port).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("ministack did not come up on {port}");
}

/// Whether the server answers its health endpoint on `port`.
async fn healthy(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request = "GET /_ministack/health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    answer.starts_with(b"HTTP/1.1 200") || answer.starts_with(b"HTTP/1.0 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_restarted_three_times_mid_stream_loses_and_reorders_nothing() {
    let port = 14_566 + u16::try_from(std::process::id() % 1_000).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("cqrs-sqs-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server = Arc::new(Mutex::new(start(port, &dir)));
    wait_up(port).await;
    support::set_endpoint(format!("http://127.0.0.1:{port}"));
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
                    stop(&mut child);
                }
                *server
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = start(port, &dir);
                wait_up(port).await;
            })
        }
    };
    conformance::broker_restarted_mid_stream(
        &support::Sqs::FIFO,
        &support::namespace("restart"),
        3,
        restart,
    )
    .await;
    if let Ok(mut child) = server.lock() {
        stop(&mut child);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
