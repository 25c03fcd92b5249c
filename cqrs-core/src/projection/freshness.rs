//! Waiting for a read model to reflect a write: read-your-writes after a command, and "caught up"
//! in integration tests, without sleeping a guessed time.
//!
//! A command's [`Executed::checkpoint`](crate::Executed::checkpoint) is the place of its last event
//! in the global order; [`wait_until_caught_up`] returns once the projection's stored checkpoint
//! is at or past it (the projection has then handled that event and everything before it in the
//! order), or fails with [`NotCaughtUp`] at the timeout, saying how far the projection got.
//!
//! ```
//! # use std::time::Duration;
//! # use evently_core::projection::{Projection, Progress, wait_until_caught_up};
//! # async fn doc<P: Projection, A: evently_core::Aggregate>(
//! #     executed: evently_core::Executed<A::Event>,
//! #     progress: &impl Progress,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! if let Some(written) = executed.checkpoint() {
//!     wait_until_caught_up(progress, P::NAME, written, Duration::from_secs(2)).await?;
//! }
//! // The read model of `P` now reflects the command.
//! # Ok(()) }
//! ```
//!
//! The rule, stated once: the projection has *passed* an event when its checkpoint is at or after
//! the event's. An event it passed was applied, or skipped (not one it subscribes to), or parked
//! as a dead letter (it kept failing, or waits behind an earlier dead letter of its stream): the
//! wait is about the projection's progress, not about the handler's success; list the dead
//! letters to tell the last case apart. A projection that is stopped, or stuck behind a failing
//! store, does not pass anything: the wait ends at its timeout.

use std::time::{Duration, Instant};

use super::memory::CheckpointStore;
use crate::backoff::Backoff;
use crate::envelope::Checkpoint;
use crate::store::StoreError;

/// How far projections got, readable by anyone (not only by their runner): the in-memory
/// [`CheckpointStore`]s, and `PostgresEventStore` for projections run by PostgreSQL workers.
#[async_trait::async_trait]
pub trait Progress: Send + Sync {
    /// The stored checkpoint of `projection` ([`Checkpoint::START`] when it has none).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the checkpoint cannot be read.
    async fn checkpoint_of(&self, projection: &str) -> Result<Checkpoint, StoreError>;

    /// Resolves when the checkpoint of `projection` may have moved, or after `at_most`, whichever
    /// comes first. The default sleeps `at_most` (the caller polls with a growing interval);
    /// in-process stores wake their waiters at once.
    async fn moved(&self, projection: &str, at_most: Duration) {
        let _ = projection;
        tokio::time::sleep(at_most).await;
    }
}

#[async_trait::async_trait]
impl<T: CheckpointStore + ?Sized> Progress for T {
    async fn checkpoint_of(&self, projection: &str) -> Result<Checkpoint, StoreError> {
        self.load(projection).await
    }

    async fn moved(&self, projection: &str, at_most: Duration) {
        CheckpointStore::moved(self, projection, at_most).await;
    }
}

/// Why [`wait_until_caught_up`] returned without the projection passing the target.
#[derive(Debug, thiserror::Error)]
pub enum NotCaughtUp {
    /// The timeout passed first.
    #[error(
        "projection `{projection}` did not reach {target} within {waited:?}: its checkpoint is {reached}"
    )]
    TimedOut {
        /// The projection.
        projection: String,
        /// The checkpoint waited for.
        target: Checkpoint,
        /// Where the projection was when the wait ended.
        reached: Checkpoint,
        /// How long it waited.
        waited: Duration,
    },
    /// The checkpoint could not be read.
    #[error("reading the checkpoint of projection `{projection}`: {source}")]
    Store {
        /// The projection.
        projection: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
}

/// The longest pause between two reads of a checkpoint that does not signal its moves.
const MAX_POLL: Duration = Duration::from_millis(50);
/// The first pause (doubled after each read that found the projection behind, by [`Backoff`]).
const FIRST_POLL: Duration = Duration::from_millis(1);

/// Waits until `projection` has passed `target` (its checkpoint is at or after it) and returns
/// the checkpoint it reached. An event it passed was applied, or skipped (not one it subscribes
/// to), or parked as a dead letter: the wait is about the projection's progress, not the handler's
/// success (list the dead letters to tell the last case apart). A stopped projection passes
/// nothing: the wait ends at its timeout.
///
/// Reads the checkpoint at once, then whenever `progress` signals a move or after a pause that
/// grows from 1 ms to 50 ms. A transient failure to read the checkpoint is retried until the
/// timeout (a store restarting is not a reason to give up early).
///
/// # Errors
/// [`NotCaughtUp::TimedOut`] with the checkpoint reached when `timeout` passes first;
/// [`NotCaughtUp::Store`] when the last read before the timeout failed.
pub async fn wait_until_caught_up<G: Progress + ?Sized>(
    progress: &G,
    projection: &str,
    target: Checkpoint,
    timeout: Duration,
) -> Result<Checkpoint, NotCaughtUp> {
    let started = Instant::now();
    let mut pauses = Backoff::new(FIRST_POLL, MAX_POLL).without_jitter();
    let mut reached = Checkpoint::START;
    loop {
        let failed = match progress.checkpoint_of(projection).await {
            Ok(checkpoint) if checkpoint >= target => return Ok(checkpoint),
            Ok(checkpoint) => {
                reached = checkpoint;
                None
            }
            Err(error) => {
                tracing::debug!(projection, %error, "reading a checkpoint to wait on; retrying");
                Some(error)
            }
        };
        let waited = started.elapsed();
        let Some(left) = timeout.checked_sub(waited).filter(|left| !left.is_zero()) else {
            return Err(match failed {
                Some(source) => NotCaughtUp::Store {
                    projection: projection.to_owned(),
                    source,
                },
                None => NotCaughtUp::TimedOut {
                    projection: projection.to_owned(),
                    target,
                    reached,
                    waited,
                },
            });
        };
        progress
            .moved(projection, pauses.next_delay().min(left))
            .await;
    }
}
