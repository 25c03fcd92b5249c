//! `cqrs dlq`: dead letters of projections (in the store) and of broker consumers.

use clap::Subcommand;
use std::time::Duration;

use evently_postgres::PostgresEventStore;
use evently_postgres::control::{Control, DeadLetters, LetterState};

use crate::projections::{find, no_answer};
use crate::{Failure, brokers, confirmed, wait_for};

#[derive(Subcommand)]
pub(crate) enum Dlq {
    /// The dead-letter topic (`<topic>.dlq`) of a Kafka subscriber (brokers at `KAFKA_BROKERS`).
    /// Ids are `<partition>:<offset>`; what was retried or purged is recorded as the offsets of
    /// consumer group `cqrs-dlq.<dead-letter topic>` (the topic itself is never written to).
    Kafka {
        /// The dead-letter topic, e.g. `cqrs.order.dlq`.
        topic: String,
        #[command(subcommand)]
        action: brokers::Action,
    },
    /// The dead-letter queue (`<queue>.dlq`) of a RabbitMQ consumer (broker at `AMQP_URL`).
    Rabbitmq {
        /// The consumer's queue.
        queue: String,
        #[command(subcommand)]
        action: brokers::Action,
    },
    /// The dead letters of a NATS JetStream consumer in the dead-letter stream (server at
    /// `NATS_URL`).
    Nats {
        /// The durable consumer's name.
        consumer: String,
        /// The events stream (its dead-letter stream is `<stream>_DLQ`).
        #[arg(long, default_value = "CQRS_EVENTS")]
        stream: String,
        /// The events' subject prefix.
        #[arg(long, default_value = "cqrs.events")]
        prefix: String,
        #[command(subcommand)]
        action: brokers::Action,
    },
    /// The dead-letter queue (`<queue>-dlq.fifo`, `<queue>-dlq` for a standard queue) of an
    /// SQS consumer (`SQS_ENDPOINT` for a local server, else AWS with `AWS_REGION` and the normal
    /// credentials). Ids are the dead letters' message ids; on a FIFO queue a letter behind an
    /// earlier one of its message group (aggregate) is reached only after that one.
    Sqs {
        /// The consumer's queue, e.g. `shop-events.fifo` (or a standard queue, `shop-events`).
        queue: String,
        #[command(subcommand)]
        action: brokers::Action,
    },
    /// A projection's dead letters.
    List {
        /// The projection's name.
        projection: String,
    },
    /// Asks the projection's worker to apply dead letter `id` again (after the letters before
    /// it in its stream, to keep per-stream order) and waits for the outcome.
    Retry {
        /// The dead letter's id (`#id` in `dlq list`).
        id: i64,
        /// How long to wait for the worker, in seconds (exit code 3 after).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Asks for every dead letter of a projection to be applied again and waits for the outcome.
    RetryAll {
        /// The projection's name.
        projection: String,
        /// How long to wait for the worker, in seconds (exit code 3 after).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Drop dead letters without applying them.
    Purge {
        /// The projection's name.
        projection: String,
        /// Only those that last failed longer ago than this (`30m`, `12h`, `7d`, `2w`, `1h 30m`).
        #[arg(long, value_parser = parse_age)]
        older_than: Option<chrono::Duration>,
        /// Say how many would be purged, purge nothing.
        #[arg(long)]
        dry_run: bool,
        /// Purge without asking (needed when the input is not a terminal).
        #[arg(long, short)]
        yes: bool,
    },
}

impl Dlq {
    /// Whether this is about a broker's dead letters (no database needed).
    pub(crate) fn is_broker(&self) -> bool {
        matches!(
            self,
            Self::Kafka { .. } | Self::Rabbitmq { .. } | Self::Nats { .. } | Self::Sqs { .. }
        )
    }
}

/// Runs a `dlq` command on a broker's dead letters; a command on the store's is refused.
pub(crate) async fn run_broker(command: &Dlq) -> Result<(), Failure> {
    match command {
        Dlq::Kafka { topic, action } => {
            let dead = evently_kafka::KafkaDeadLetters::new(
                &evently_kafka::KafkaConfig::from_env(),
                topic.clone(),
            );
            brokers::run(&dead, action.clone()).await
        }
        Dlq::Rabbitmq { queue, action } => {
            let dead = evently_rabbitmq::RabbitDeadLetters::new(
                &evently_rabbitmq::RabbitConfig::from_env(),
                queue.clone(),
            );
            brokers::run(&dead, action.clone()).await
        }
        Dlq::Nats {
            consumer,
            stream,
            prefix,
            action,
        } => {
            let config =
                evently_nats::NatsConfig::from_env().with_stream(stream.clone(), prefix.clone())?;
            let dead = evently_nats::NatsDeadLetters::new(&config, consumer.clone());
            brokers::run(&dead, action.clone()).await
        }
        Dlq::Sqs { queue, action } => {
            let config = evently_sqs::SqsConfig::from_env();
            let dead =
                evently_sqs::SqsDeadLetters::new(&config, evently_sqs::dead_letter_queue(queue));
            brokers::run(&dead, action.clone()).await
        }
        _ => Err("this dead-letter command needs the store".into()),
    }
}

/// Runs a `dlq` command on the store's dead letters.
pub(crate) async fn run(
    store: &PostgresEventStore,
    command: Dlq,
    json: bool,
) -> Result<(), Failure> {
    match command {
        Dlq::Kafka { .. } | Dlq::Rabbitmq { .. } | Dlq::Nats { .. } | Dlq::Sqs { .. } => {
            run_broker(&command).await?;
        }
        Dlq::Retry { id, timeout } => {
            retry(store, id, Duration::from_secs(timeout)).await?;
        }
        Dlq::RetryAll {
            projection,
            timeout,
        } => {
            retry_all(store, &projection, Duration::from_secs(timeout)).await?;
        }
        Dlq::List { projection } => {
            let letters = DeadLetters::new(store.clone()).list(&projection).await?;
            if json {
                for l in &letters {
                    out!(
                        "{}",
                        serde_json::json!({
                            "id": l.id,
                            "projection": projection,
                            "stream": l.stream.to_string(),
                            "version": l.version,
                            "event_id": l.event_id.0,
                            "attempts": l.attempts,
                            "first_failed_at": l.first_failed_at,
                            "last_failed_at": l.last_failed_at,
                            "reason": l.reason.as_str(),
                            "error": l.error,
                        })
                    );
                }
                return Ok(());
            }
            if letters.is_empty() {
                out!("no dead letters for `{projection}`");
            }
            for l in letters {
                out!(
                    "#{} {} v{} event {} attempts {} first {} last {}: {}",
                    l.id,
                    l.stream,
                    l.version,
                    l.event_id.0,
                    l.attempts,
                    l.first_failed_at.format("%Y-%m-%d %H:%M:%S"),
                    l.last_failed_at.format("%Y-%m-%d %H:%M:%S"),
                    l.error
                );
            }
        }
        Dlq::Purge {
            projection,
            older_than,
            dry_run,
            yes,
        } => {
            let now = chrono::Utc::now();
            // The parser checked that the age fits.
            let before = older_than.and_then(|age| now.checked_sub_signed(age));
            let letters = DeadLetters::new(store.clone());
            let matching = letters
                .list(&projection)
                .await?
                .into_iter()
                .filter(|l| before.is_none_or(|before| l.last_failed_at < before))
                .count();
            let which = match before {
                Some(before) => format!(
                    "{matching} dead letters of `{projection}` that last failed before {}",
                    before.format("%Y-%m-%d %H:%M:%S UTC")
                ),
                None => format!("all {matching} dead letters of `{projection}`"),
            };
            if dry_run {
                out!("would purge {which}");
                return Ok(());
            }
            if matching == 0 {
                out!("purged 0 dead letters of `{projection}`");
                return Ok(());
            }
            if !yes && !confirmed(&format!("purge {which}"))? {
                out!("purged nothing");
                return Ok(());
            }
            let purged = letters.purge(&projection, before).await?;
            out!("purged {purged} dead letters of `{projection}`");
        }
    }
    Ok(())
}

/// An age: `30s`, `30m`, `12h`, `7d`, `2w`, `1h 30m` (humantime's units; never negative), at
/// most what a date can go back.
fn parse_age(text: &str) -> Result<chrono::Duration, String> {
    let age = humantime::parse_duration(text)
        .map_err(|e| format!("`{text}`: {e} (expected an age such as 30m, 12h, 7d or 2w)"))?;
    chrono::Duration::from_std(age)
        .ok()
        .filter(|age| chrono::Utc::now().checked_sub_signed(*age).is_some())
        .ok_or_else(|| format!("`{text}`: longer than any date can go back"))
}

async fn retry(store: &PostgresEventStore, id: i64, timeout: Duration) -> Result<(), Failure> {
    let control = Control::new(store.clone());
    let Some(projection) = control.request_retry(id).await? else {
        return Err(format!("no dead letter #{id}").into());
    };
    let outcome = wait_for(timeout, || async {
        Ok(match control.letter(id).await? {
            LetterState::Pending => None,
            done => Some(done),
        })
    })
    .await?;
    match outcome {
        Some(LetterState::Gone) => {
            out!("dead letter #{id} of `{projection}` applied");
            Ok(())
        }
        Some(LetterState::Failed(error)) => {
            Err(format!("dead letter #{id} of `{projection}` failed again: {error}").into())
        }
        Some(LetterState::Pending) | None => {
            Err(no_answer(&find(store, &projection).await?, timeout))
        }
    }
}

async fn retry_all(
    store: &PostgresEventStore,
    projection: &str,
    timeout: Duration,
) -> Result<(), Failure> {
    let p = find(store, projection).await?;
    let control = Control::new(store.clone());
    let asked = control.request_retry_all(projection).await?;
    if asked == 0 {
        out!("no dead letters for `{projection}`");
        return Ok(());
    }
    let answered = wait_for(timeout, || async {
        let pending = control
            .requests(projection)
            .await?
            .map_or(0, |r| r.retries_pending);
        Ok((pending == 0).then_some(()))
    })
    .await?;
    if answered.is_none() {
        return Err(no_answer(&p, timeout));
    }
    let left = DeadLetters::new(store.clone())
        .list(projection)
        .await?
        .len() as u64;
    let applied = asked.saturating_sub(left);
    if left > 0 {
        return Err(format!(
            "retried {asked} dead letters of `{projection}`: {applied} applied, {left} still dead (see `cqrs dlq list {projection}`)"
        )
        .into());
    }
    out!("retried {asked} dead letters of `{projection}`: all applied");
    Ok(())
}
