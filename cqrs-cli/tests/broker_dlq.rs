//! `cqrs dlq rabbitmq|nats`: a consumer's dead letters at the real RabbitMQ and NATS servers,
//! put there the way a consumer does (a message that is not an envelope), counted, listed,
//! alerted on, retried and purged from the command line.

use std::process::Output;
use std::time::{Duration, Instant};

use cqrs_nats::{NatsConfig, NatsConsumer};
use cqrs_rabbitmq::{RabbitConfig, RabbitConsumer};
use cqrs_transport::conformance::Unused;

fn cqrs(args: &[&str], env: &[(&str, &str)]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cqrs"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run cqrs: {e}"))
}

fn text(output: &Output) -> (i32, String) {
    (
        output.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("cli_{name}_{}_{nanos}", std::process::id())
}

/// Runs `consumer` until it has dead-lettered one message (or 30 s).
async fn until_dead_lettered<F>(run: F, count: impl Fn() -> Output)
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    let running = tokio::spawn(run);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, out) = text(&count());
        if code == 0 && out.starts_with("1 dead letters") {
            break;
        }
        assert!(Instant::now() < deadline, "no dead letter: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    running.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_dead_letters_from_the_command_line() {
    let exchange = unique("ex");
    let queue = unique("q");
    let config = RabbitConfig::from_env().with_exchange(exchange.clone());
    let consumer = RabbitConsumer::new(&config, queue.clone(), Unused);
    consumer.declare().await.unwrap_or_else(|e| panic!("{e}"));
    // A stranger's message straight into the queue: the consumer dead-letters it.
    let connection =
        lapin::Connection::connect(config.url(), lapin::ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    let channel = connection
        .create_channel()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            b"not an envelope",
            lapin::BasicProperties::default().with_message_id("m-1".into()),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .await;
    let q = queue.clone();
    let count = move || cqrs(&["dlq", "rabbitmq", &q, "count"], &[]);
    until_dead_lettered(consumer.run(std::future::pending::<()>()), count).await;

    let (code, out) = text(&cqrs(&["dlq", "rabbitmq", &queue, "list"], &[]));
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("#m-1 "), "{out}");
    assert!(
        out.contains("not an event envelope"),
        "the list says why: {out}"
    );
    let (code, out) = text(&cqrs(
        &["dlq", "rabbitmq", &queue, "count", "--alert-over", "0"],
        &[],
    ));
    assert_eq!(code, 4, "over the alert size: exit 4: {out}");
    assert!(out.contains("over the alert size 0"), "{out}");
    let (code, out) = text(&cqrs(&["dlq", "rabbitmq", &queue, "retry", "nope"], &[]));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no dead letter #nope"), "{out}");
    // Sent back to the queue (nothing consumes it now), then gone from the dead letters.
    let (code, out) = text(&cqrs(&["dlq", "rabbitmq", &queue, "retry", "m-1"], &[]));
    assert_eq!(
        (code, out.trim()),
        (0, "dead letter #m-1 sent back to its consumer")
    );
    let (_, out) = text(&cqrs(&["dlq", "rabbitmq", &queue, "count"], &[]));
    assert!(out.starts_with("0 dead letters"), "{out}");
    let (_, out) = text(&cqrs(&["dlq", "rabbitmq", &queue, "purge"], &[]));
    assert!(out.starts_with("purged 0 dead letters"), "{out}");
    let (code, out) = text(&cqrs(
        &["dlq", "rabbitmq", "no-such-queue-here", "count"],
        &[],
    ));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("no-such-queue-here.dlq"),
        "a missing queue is named: {out}"
    );
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_dead_letters_from_the_command_line() {
    let stream = unique("s").to_uppercase();
    let prefix = unique("p");
    let config = NatsConfig::from_env()
        .with_stream(stream.clone(), prefix.clone())
        .unwrap_or_else(|e| panic!("{e}"));
    let consumer = NatsConsumer::new(&config, "cli", Unused).unwrap_or_else(|e| panic!("{e}"));
    consumer.declare().await.unwrap_or_else(|e| panic!("{e}"));
    let client = async_nats::connect(config.url())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let js = async_nats::jetstream::new(client);
    js.publish(format!("{prefix}.x.y.z"), "not an envelope".into())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let args = |action: &[&str]| {
        let mut all = vec![
            "dlq", "nats", "cli", "--stream", &stream, "--prefix", &prefix,
        ];
        all.extend_from_slice(action);
        all.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |action: &[&str]| {
        let owned = args(action);
        let borrowed: Vec<&str> = owned.iter().map(String::as_str).collect();
        cqrs(&borrowed, &[])
    };
    let count_args = args(&["count"]);
    let count = move || {
        let borrowed: Vec<&str> = count_args.iter().map(String::as_str).collect();
        cqrs(&borrowed, &[])
    };
    until_dead_lettered(consumer.run(std::future::pending::<()>()), count).await;
    let (code, out) = text(&run(&["list"]));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("not an event envelope"), "{out}");
    let id = out
        .trim_start_matches('#')
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let (code, out) = text(&run(&["retry", &id]));
    assert_eq!(code, 0, "{out}");
    // Back on its subject, the consumer (not running) has not seen it again: no dead letters.
    let (_, out) = text(&run(&["count"]));
    assert!(out.starts_with("0 dead letters"), "{out}");
    let (code, out) = text(&cqrs(
        &["dlq", "nats", "cli", "--stream", "NO_SUCH_STREAM", "count"],
        &[],
    ));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("NO_SUCH_STREAM_DLQ"),
        "a missing stream is named: {out}"
    );
}
