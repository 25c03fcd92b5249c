//! `cqrs dlq rabbitmq <queue> ...` and `cqrs dlq nats <consumer> ...`: the dead letters a broker
//! holds for a consumer, through the one [`DeadLetterQueue`] port.

use clap::Subcommand;
use cqrs_transport::DeadLetterQueue;

use crate::Failure;

/// What to do with a consumer's dead letters at a broker.
#[derive(Subcommand, Debug, Clone)]
pub(crate) enum Action {
    /// How many there are; with `--alert-over N`, a warning (and exit code 4) above N.
    Count {
        /// The size above which the dead-letter place needs attention.
        #[arg(long)]
        alert_over: Option<u64>,
    },
    /// List them, oldest first (left in place).
    List {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Send one back to its consumer (confirmed by the broker), then remove it.
    Retry {
        /// Its id, as `list` shows it after `#`.
        id: String,
    },
    /// Send every one there is now back to its consumer.
    RetryAll,
    /// Drop them all.
    Purge,
}

/// The dead letters are over the alert size (exit code 4).
#[derive(Debug)]
pub(crate) struct OverThreshold(pub(crate) String);

impl std::fmt::Display for OverThreshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OverThreshold {}

/// Runs `action` on `queue`.
pub(crate) async fn run(queue: &dyn DeadLetterQueue, action: Action) -> Result<(), Failure> {
    let place = queue.describe();
    match action {
        Action::Count { alert_over } => {
            let count = queue.count().await?;
            println!("{count} dead letters in {place}");
            if let Some(threshold) = alert_over
                && count > threshold
            {
                return Err(Box::new(OverThreshold(format!(
                    "{count} dead letters in {place}, over the alert size {threshold}"
                ))));
            }
        }
        Action::List { limit } => {
            let letters = queue.list(limit).await?;
            if letters.is_empty() {
                println!("no dead letters in {place}");
            }
            for letter in letters {
                println!("{letter}");
            }
        }
        Action::Retry { id } => {
            if queue.retry(&id).await? {
                println!("dead letter #{id} sent back to its consumer");
            } else {
                return Err(format!("no dead letter #{id} in {place} (see `list`)").into());
            }
        }
        Action::RetryAll => {
            let retried = queue.retry_all().await?;
            println!("{retried} dead letters sent back to their consumer from {place}");
        }
        Action::Purge => {
            let purged = queue.purge().await?;
            println!("purged {purged} dead letters from {place}");
        }
    }
    Ok(())
}
