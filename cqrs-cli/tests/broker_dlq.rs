//! `cqrs dlq kafka|rabbitmq|nats|sqs`: a consumer's dead letters at the real Kafka, RabbitMQ and
//! NATS servers and the local SQS server,
//! put there the way a consumer does (a message that is not an envelope), counted, listed,
//! alerted on, retried and purged from the command line.

use std::process::Output;
use std::time::{Duration, Instant};

use evently_kafka::{KafkaConfig, KafkaSubscriber};
use evently_nats::{NatsConfig, NatsConsumer};
use evently_rabbitmq::{RabbitConfig, RabbitConsumer};
use evently_sqs::{SqsConfig, SqsConsumer};
use evently_transport::conformance::Unused;

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

/// The id of the first dead letter `cqrs dlq ... list` printed (`#<id> ...`).
fn first_id(listed: &str) -> String {
    listed
        .trim_start_matches('#')
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Runs `consumer` until it has dead-lettered one message (or 30 s).
async fn until_dead_lettered<F>(run: F, count: impl Fn() -> Output)
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    until_dead_lettered_n(run, count, 1).await;
}

/// Runs `consumer` until it has dead-lettered `n` messages (or 60 s).
async fn until_dead_lettered_n<F>(run: F, count: impl Fn() -> Output, n: u64)
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    let running = tokio::spawn(run);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, out) = text(&count());
        if code == 0 && out.starts_with(&format!("{n} dead letters")) {
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
    let (_, out) = text(&cqrs(&["dlq", "rabbitmq", &queue, "purge", "--yes"], &[]));
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
    let id = first_id(&out);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_dead_letters_from_the_command_line() {
    let queue = format!("{}.fifo", unique("q"));
    let config = SqsConfig::from_env();
    let consumer = SqsConsumer::new(&config, queue.clone(), Unused)
        .unwrap_or_else(|e| panic!("{e}"))
        .with_wait(Duration::from_secs(1));
    consumer.declare().await.unwrap_or_else(|e| panic!("{e}"));
    // A stranger's message straight into the queue: the consumer dead-letters it.
    let client = config.client().await;
    let url = client
        .get_queue_url()
        .queue_name(&queue)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .queue_url
        .unwrap_or_default();
    client
        .send_message()
        .queue_url(&url)
        .message_body("not an envelope")
        .message_group_id("stranger")
        .message_deduplication_id("m-1")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let q = queue.clone();
    let count = move || cqrs(&["dlq", "sqs", &q, "count"], &[]);
    until_dead_lettered(consumer.run(std::future::pending::<()>()), count).await;

    let (code, out) = text(&cqrs(&["dlq", "sqs", &queue, "list"], &[]));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("not an event envelope"),
        "the list says why: {out}"
    );
    let id = first_id(&out);
    let (code, out) = text(&cqrs(&["dlq", "sqs", &queue, "retry", "nope"], &[]));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no dead letter #nope"), "{out}");
    // Sent back to the queue (nothing consumes it now), then gone from the dead letters.
    let (code, out) = text(&cqrs(&["dlq", "sqs", &queue, "retry", &id], &[]));
    assert_eq!(code, 0, "{out}");
    let (_, out) = text(&cqrs(&["dlq", "sqs", &queue, "count"], &[]));
    assert!(out.starts_with("0 dead letters"), "{out}");
    let (_, out) = text(&cqrs(&["dlq", "sqs", &queue, "purge", "--yes"], &[]));
    assert!(out.starts_with("purged 0 dead letters"), "{out}");
    let (code, out) = text(&cqrs(&["dlq", "sqs", "no-such-queue.fifo", "count"], &[]));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("no-such-queue-dlq.fifo"),
        "a missing queue is named: {out}"
    );
}

/// The high watermark of partition 0 of `topic`.
fn end_of(config: &KafkaConfig, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = config
        .client_config()
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_dead_letters_from_the_command_line() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let topic = unique("t");
    let dlq = format!("{topic}.dlq");
    let config = KafkaConfig::from_env();
    // Three messages that are not envelopes: the subscriber dead-letters each to `<topic>.dlq`.
    let producer: FutureProducer = config
        .client_config()
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    let admin: rdkafka::admin::AdminClient<_> = config
        .client_config()
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &topic,
                1,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for n in 0..3 {
        let body = format!("not an envelope {n}");
        producer
            .send(
                FutureRecord::to(&topic).key("k").payload(&body),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("{e}"));
    }
    let subscriber = KafkaSubscriber::new(&config, unique("g"), &[&topic], Unused)
        .unwrap_or_else(|e| panic!("{e}"))
        .with_retries(1, Duration::from_millis(1));
    let d = dlq.clone();
    let count = move || cqrs(&["dlq", "kafka", &d, "count"], &[]);
    until_dead_lettered_n(subscriber.run(std::future::pending::<()>()), count, 3).await;

    let (code, out) = text(&cqrs(&["dlq", "kafka", &dlq, "list"], &[]));
    assert_eq!(code, 0, "{out}");
    let ids: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix('#')?.split_whitespace().next())
        .collect();
    assert_eq!(ids, ["0:0", "0:1", "0:2"], "{out}");
    assert!(
        out.contains("not an event envelope"),
        "the list says why: {out}"
    );
    let (code, out) = text(&cqrs(
        &["dlq", "kafka", &dlq, "count", "--alert-over", "2"],
        &[],
    ));
    assert_eq!(code, 4, "over the alert size: exit 4: {out}");
    let (code, out) = text(&cqrs(&["dlq", "kafka", &dlq, "retry", "0:7"], &[]));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no dead letter #0:7"), "{out}");
    let (code, out) = text(&cqrs(&["dlq", "kafka", &dlq, "retry", "seven"], &[]));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no dead letter #seven"), "{out}");

    // The middle one retried first: back on its topic, gone from the list, the others stay.
    assert_eq!(end_of(&config, &topic), 3);
    let (code, out) = text(&cqrs(&["dlq", "kafka", &dlq, "retry", "0:1"], &[]));
    assert_eq!(
        (code, out.trim()),
        (0, "dead letter #0:1 sent back to its consumer")
    );
    assert_eq!(
        end_of(&config, &topic),
        4,
        "sent back to the topic it came from"
    );
    let (_, out) = text(&cqrs(&["dlq", "kafka", &dlq, "list"], &[]));
    let ids: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix('#')?.split_whitespace().next())
        .collect();
    assert_eq!(ids, ["0:0", "0:2"], "{out}");
    let (_, out) = text(&cqrs(&["dlq", "kafka", &dlq, "retry", "0:1"], &[]));
    assert!(
        out.contains("no dead letter #0:1"),
        "retried once only: {out}"
    );
    assert_eq!(end_of(&config, &topic), 4);

    // The rest retried, then nothing is left to purge; the dead-letter topic itself unchanged.
    let (code, out) = text(&cqrs(&["dlq", "kafka", &dlq, "retry-all"], &[]));
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("2 dead letters sent back"), "{out}");
    assert_eq!(end_of(&config, &topic), 6);
    assert_eq!(
        end_of(&config, &dlq),
        3,
        "the tool never writes to the dead-letter topic"
    );
    let (_, out) = text(&cqrs(&["dlq", "kafka", &dlq, "count"], &[]));
    assert!(out.starts_with("0 dead letters"), "{out}");

    // A subscriber of another group reads all six (still not envelopes) into the dead letters;
    // purged, they are gone.
    let again = KafkaSubscriber::new(&config, unique("g2"), &[&topic], Unused)
        .unwrap_or_else(|e| panic!("{e}"))
        .with_retries(1, Duration::from_millis(1));
    let d = dlq.clone();
    let count = move || cqrs(&["dlq", "kafka", &d, "count"], &[]);
    until_dead_lettered_n(again.run(std::future::pending::<()>()), count, 6).await;
    let (_, out) = text(&cqrs(&["dlq", "kafka", &dlq, "purge", "--yes"], &[]));
    assert!(out.starts_with("purged 6 dead letters"), "{out}");
    let (_, out) = text(&cqrs(&["dlq", "kafka", &dlq, "count"], &[]));
    assert!(out.starts_with("0 dead letters"), "{out}");
    let (code, out) = text(&cqrs(
        &["dlq", "kafka", "no-such-topic-here.dlq", "count"],
        &[],
    ));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("no-such-topic-here.dlq"),
        "a missing topic is named: {out}"
    );
}
