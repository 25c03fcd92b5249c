//! The in-memory checkpoint and dead-letter stores of [`ProjectionRunner`](super::ProjectionRunner):
//! the embedded default, and what tests run against.

use crate::envelope::{Checkpoint, EventId, StreamId};
use crate::projection::failure::{DeadLetter, Failure, LetterReason};
use crate::store::StoreError;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Where runners keep how far each projection got.
#[async_trait::async_trait]
pub trait CheckpointStore: Send + Sync {
    /// The checkpoint of `projection` ([`Checkpoint::START`] when it has none).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the store fails.
    async fn load(&self, projection: &str) -> Result<Checkpoint, StoreError>;

    /// Records the checkpoint of `projection`.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the store fails.
    async fn save(&self, projection: &str, checkpoint: Checkpoint) -> Result<(), StoreError>;

    /// Records `to` only if the stored checkpoint is `from`; `false` (recording nothing) when it
    /// is not. The default loads and saves (not atomic: override it where the store can).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the store fails.
    async fn compare_and_save(
        &self,
        projection: &str,
        from: Checkpoint,
        to: Checkpoint,
    ) -> Result<bool, StoreError> {
        if self.load(projection).await? != from {
            return Ok(false);
        }
        self.save(projection, to).await.map(|()| true)
    }

    /// Resolves when the checkpoint of `projection` may have moved, or after `at_most`, whichever
    /// comes first: what [`wait_until_caught_up`](super::wait_until_caught_up) waits on between
    /// reads. The default sleeps `at_most`; a store that can signal its saves wakes the waiter.
    async fn moved(&self, projection: &str, at_most: Duration) {
        let _ = projection;
        tokio::time::sleep(at_most).await;
    }
}
/// Checkpoints in process memory (clones share them): the counterpart of a projection whose state
/// lives in the process too, so both survive a runner restart and neither survives the process.
#[derive(Debug, Clone, Default)]
pub struct InMemoryCheckpoints {
    inner: Arc<Mutex<HashMap<String, Checkpoint>>>,
    /// Woken by every save: what waiters for a checkpoint wait on.
    saved: Arc<tokio::sync::Notify>,
}

impl InMemoryCheckpoints {
    /// No checkpoints yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait::async_trait]
impl CheckpointStore for InMemoryCheckpoints {
    async fn load(&self, projection: &str) -> Result<Checkpoint, StoreError> {
        Ok(lock(&self.inner)
            .get(projection)
            .copied()
            .unwrap_or(Checkpoint::START))
    }

    async fn save(&self, projection: &str, checkpoint: Checkpoint) -> Result<(), StoreError> {
        lock(&self.inner).insert(projection.to_owned(), checkpoint);
        self.saved.notify_waiters();
        Ok(())
    }

    async fn compare_and_save(
        &self,
        projection: &str,
        from: Checkpoint,
        to: Checkpoint,
    ) -> Result<bool, StoreError> {
        let mut inner = lock(&self.inner);
        let stored = inner
            .entry(projection.to_owned())
            .or_insert(Checkpoint::START);
        if *stored != from {
            return Ok(false);
        }
        *stored = to;
        drop(inner);
        self.saved.notify_waiters();
        Ok(true)
    }

    async fn moved(&self, _projection: &str, at_most: Duration) {
        // A save between the waiter's read and this call is caught by the next read, at most
        // `at_most` later (the waiter's pause is short).
        let _ = tokio::time::timeout(at_most, self.saved.notified()).await;
    }
}
/// Locks a mutex whose data every writer leaves consistent (each writes a whole entry or nothing),
/// so a panic elsewhere while it was held does not make it unusable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
/// Dead letters in process memory (clones share them), with the PostgreSQL `DeadLetters` API.
#[derive(Debug, Clone, Default)]
pub struct InMemoryDeadLetters {
    inner: Arc<Mutex<Letters>>,
}
#[derive(Debug, Default)]
struct Letters {
    next_id: i64,
    /// By id, so by parking order; each with its projection. The event itself is not kept (a
    /// blocked stream would hold a copy of each of its events): a redrive reads it again.
    parked: BTreeMap<i64, (String, DeadLetter)>,
}

impl InMemoryDeadLetters {
    /// No dead letters yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The dead letters of `projection`, by stream and version.
    #[must_use]
    pub fn list(&self, projection: &str) -> Vec<DeadLetter> {
        let mut letters: Vec<DeadLetter> = lock(&self.inner)
            .parked
            .values()
            .filter(|(p, _)| p == projection)
            .map(|(_, letter)| letter.clone())
            .collect();
        letters.sort_by(|a, b| (&a.stream, a.version).cmp(&(&b.stream, b.version)));
        letters
    }

    /// Removes the dead letters of `projection` that last failed before `older_than` (all of them
    /// with `None`), without applying them; returns how many.
    pub fn purge(&self, projection: &str, older_than: Option<DateTime<Utc>>) -> u64 {
        let mut inner = lock(&self.inner);
        let before = inner.parked.len();
        inner.parked.retain(|_, (p, letter)| {
            p != projection || older_than.is_some_and(|t| letter.last_failed_at >= t)
        });
        (before - inner.parked.len()) as u64
    }

    pub(super) fn park_row(
        &self,
        projection: &str,
        event_id: EventId,
        stream: &StreamId,
        version: u64,
        failure: Failure,
    ) {
        let mut inner = lock(&self.inner);
        inner.next_id += 1;
        let id = inner.next_id;
        let letter = DeadLetter {
            id,
            event_id,
            stream: stream.clone(),
            version,
            reason: failure.reason,
            error: failure.error,
            attempts: failure.attempts,
            first_failed_at: failure.first_failed_at,
            last_failed_at: Utc::now(),
        };
        inner.parked.insert(id, (projection.to_owned(), letter));
    }

    pub(super) fn blocked_streams(&self, projection: &str) -> HashSet<StreamId> {
        lock(&self.inner)
            .parked
            .values()
            .filter(|(p, _)| p == projection)
            .map(|(_, letter)| letter.stream.clone())
            .collect()
    }

    /// Up to `limit` dead letters of `stream` after version `after`, in version order (a redrive
    /// walks a stream's letters a page at a time).
    pub(super) fn of_stream(
        &self,
        projection: &str,
        stream: &StreamId,
        after: Option<u64>,
        limit: usize,
    ) -> Vec<DeadLetter> {
        let mut letters: Vec<DeadLetter> = lock(&self.inner)
            .parked
            .values()
            .filter(|(p, letter)| {
                p == projection
                    && &letter.stream == stream
                    && after.is_none_or(|after| letter.version > after)
            })
            .map(|(_, letter)| letter.clone())
            .collect();
        letters.sort_by_key(|letter| letter.version);
        letters.truncate(limit);
        letters
    }

    pub(super) fn resolve(&self, id: i64) {
        lock(&self.inner).parked.remove(&id);
    }

    pub(super) fn fail_again(&self, id: i64, error: String) {
        if let Some((_, letter)) = lock(&self.inner).parked.get_mut(&id) {
            letter.reason = LetterReason::Failed;
            letter.error = error;
            letter.attempts += 1;
            letter.last_failed_at = Utc::now();
        }
    }

    pub(super) fn reset(&self, projection: &str) {
        lock(&self.inner).parked.retain(|_, (p, _)| p != projection);
    }
}
