//! `cqrs dlq rabbitmq <queue> ...` and `cqrs dlq nats <consumer> ...`: the dead letters a broker
//! holds for a consumer, through the one [`DeadLetterQueue`] port.

use clap::Subcommand;
use evently_transport::DeadLetterQueue;

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
    Purge {
        /// Say how many would be purged, purge nothing.
        #[arg(long)]
        dry_run: bool,
        /// Purge without asking (needed when the input is not a terminal).
        #[arg(long, short)]
        yes: bool,
    },
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
            out!("{count} dead letters in {place}");
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
                out!("no dead letters in {place}");
            }
            for letter in letters {
                out!("{letter}");
            }
        }
        Action::Retry { id } => {
            if queue.retry(&id).await? {
                out!("dead letter #{id} sent back to its consumer");
            } else {
                return Err(format!("no dead letter #{id} in {place} (see `list`)").into());
            }
        }
        Action::RetryAll => {
            let retried = queue.retry_all().await?;
            out!("{retried} dead letters sent back to their consumer from {place}");
        }
        Action::Purge { dry_run, yes } => {
            let count = queue.count().await?;
            if dry_run {
                out!("would purge {count} dead letters from {place}");
                return Ok(());
            }
            if count > 0
                && !yes
                && !crate::confirmed(&format!("purge {count} dead letters from {place}"))?
            {
                out!("purged nothing");
                return Ok(());
            }
            let purged = queue.purge().await?;
            out!("purged {purged} dead letters from {place}");
        }
    }
    Ok(())
}
