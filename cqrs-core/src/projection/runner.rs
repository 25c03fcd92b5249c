//! The in-process projection runner: keeps a projection whose state lives in the process up to date
//! from any [`EventStore`], with a checkpoint store, retries, dead letters and a live mode.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use tracing::Instrument as _;

use super::Projection;
use super::failure::{DeadLetter, Failure, FailureMode, FailurePolicy, Redrive, WAITS_BEHIND};
use crate::envelope::{Checkpoint, EventId, StoredEvent, StreamId};
use crate::store::{EventStore, StoreError};

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
}

/// Checkpoints in process memory (clones share them): the counterpart of a projection whose state
/// lives in the process too, so both survive a runner restart and neither survives the process.
#[derive(Debug, Clone, Default)]
pub struct InMemoryCheckpoints {
    inner: Arc<Mutex<HashMap<String, Checkpoint>>>,
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
        Ok(())
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

    fn park(&self, projection: &str, event: &StoredEvent, failure: Failure) {
        self.park_row(
            projection,
            event.event_id,
            &event.stream,
            event.version,
            failure,
        );
    }

    fn park_row(
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
            error: failure.error,
            attempts: failure.attempts,
            first_failed_at: failure.first_failed_at,
            last_failed_at: Utc::now(),
        };
        inner.parked.insert(id, (projection.to_owned(), letter));
    }

    fn blocked_streams(&self, projection: &str) -> HashSet<StreamId> {
        lock(&self.inner)
            .parked
            .values()
            .filter(|(p, _)| p == projection)
            .map(|(_, letter)| letter.stream.clone())
            .collect()
    }

    /// The first dead letter of `stream` after version `after` (in version order): a redrive
    /// walks a stream's letters one at a time instead of copying them all.
    fn next_of_stream(
        &self,
        projection: &str,
        stream: &StreamId,
        after: Option<u64>,
    ) -> Option<DeadLetter> {
        lock(&self.inner)
            .parked
            .values()
            .filter(|(p, letter)| {
                p == projection
                    && &letter.stream == stream
                    && after.is_none_or(|after| letter.version > after)
            })
            .map(|(_, letter)| letter)
            .min_by_key(|letter| letter.version)
            .cloned()
    }

    fn resolve(&self, id: i64) {
        lock(&self.inner).parked.remove(&id);
    }

    fn fail_again(&self, id: i64, error: String) {
        if let Some((_, letter)) = lock(&self.inner).parked.get_mut(&id) {
            letter.error = error;
            letter.attempts += 1;
            letter.last_failed_at = Utc::now();
        }
    }

    fn reset(&self, projection: &str) {
        lock(&self.inner).parked.retain(|_, (p, _)| p != projection);
    }
}

/// What one step of a runner did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Events read from the global order (handled or skipped); 0 when there was nothing new.
    pub read: usize,
    /// Events the projection handled.
    pub applied: usize,
    /// Events parked as dead letters (failed, or waiting behind one).
    pub parked: usize,
    /// The checkpoint after the step.
    pub checkpoint: Checkpoint,
}

/// Counters of a runner, for the application to read or export.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProjectionMetrics {
    /// Events applied since the runner started.
    pub applied: u64,
    /// Events parked as dead letters since the runner started.
    pub parked: u64,
    /// Batches that failed since the runner started (rolled back, for the PostgreSQL worker).
    pub failed_batches: u64,
    /// Events per second of the last batch that applied any.
    pub events_per_second: f64,
}

impl ProjectionMetrics {
    /// Counts a batch that took `elapsed`.
    pub fn record(&mut self, step: &Step, elapsed: Duration) {
        self.applied += step.applied as u64;
        self.parked += step.parked as u64;
        if step.applied > 0 {
            self.events_per_second = step.applied as f64 / elapsed.as_secs_f64().max(1e-9);
        }
    }
}

/// The span runners open around one event's application (`cqrs.projection.event`, at trace level,
/// under the batch's `cqrs.projection.batch` span at debug level).
#[must_use]
pub fn event_span(projection: &'static str, event: &StoredEvent) -> tracing::Span {
    tracing::trace_span!(
        "cqrs.projection.event",
        projection,
        stream = %event.stream,
        version = event.version,
        event_type = %event.event_type,
    )
}

/// Keeps an in-process projection (its state in itself or in `Context`) up to date from any
/// [`EventStore`].
///
/// Each [`step`](ProjectionRunner::step) reads a batch after the checkpoint (only the subscribed
/// event types travel), applies it, parks what keeps failing (see [`FailurePolicy`]) and saves the
/// checkpoint. [`run`](ProjectionRunner::run) catches up, then waits for the store's commit signal
/// (the in-memory store wakes it at once) or the poll interval, and catches up again.
///
/// There is no transaction around in-process state: a handler that fails is called again for the
/// same event, so it should check before it changes anything. For read models in PostgreSQL, use
/// `cqrs_postgres::projection::ProjectionWorker`, which commits them with the checkpoint.
pub struct ProjectionRunner<P: Projection, S>
where
    P::Context: Sized,
{
    store: S,
    projection: P,
    context: P::Context,
    checkpoints: Arc<dyn CheckpointStore>,
    dead_letters: InMemoryDeadLetters,
    /// Where this runner is; loaded from the checkpoint store on the first step.
    checkpoint: Option<Checkpoint>,
    batch: usize,
    policy: FailurePolicy,
    metrics: ProjectionMetrics,
}

impl<P: Projection, S> std::fmt::Debug for ProjectionRunner<P, S>
where
    P::Context: Sized,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("projection", &P::NAME)
            .field("checkpoint", &self.checkpoint)
            .field("batch", &self.batch)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<P, S> ProjectionRunner<P, S>
where
    P: Projection,
    P::Context: Sized,
    S: EventStore,
{
    /// A runner of `projection` (handlers writing through `context`) over `store`, with in-memory
    /// checkpoints and dead letters, batches of 1,000 events and the default [`FailurePolicy`].
    pub fn new(store: S, projection: P, context: P::Context) -> Self {
        Self {
            store,
            projection,
            context,
            checkpoints: Arc::new(InMemoryCheckpoints::new()),
            dead_letters: InMemoryDeadLetters::new(),
            checkpoint: None,
            batch: 1_000,
            policy: FailurePolicy::default(),
            metrics: ProjectionMetrics::default(),
        }
    }

    /// Where the checkpoint is kept (shared with a later runner of the same projection to resume).
    #[must_use]
    pub fn with_checkpoints(mut self, checkpoints: Arc<dyn CheckpointStore>) -> Self {
        self.checkpoints = checkpoints;
        self.checkpoint = None;
        self
    }

    /// Where dead letters are parked (keep a clone to list and purge them).
    #[must_use]
    pub fn with_dead_letters(mut self, dead_letters: InMemoryDeadLetters) -> Self {
        self.dead_letters = dead_letters;
        self
    }

    /// What to do with events the projection keeps failing on.
    #[must_use]
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How many events one step reads at most.
    #[must_use]
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// The context handlers write through.
    pub fn context(&self) -> &P::Context {
        &self.context
    }

    /// The dead letters this runner parks into.
    pub fn dead_letters(&self) -> &InMemoryDeadLetters {
        &self.dead_letters
    }

    /// The runner's counters.
    #[must_use]
    pub fn metrics(&self) -> ProjectionMetrics {
        self.metrics
    }

    /// The checkpoint of the last event read.
    ///
    /// # Errors
    /// A failing checkpoint store.
    pub async fn checkpoint(&mut self) -> Result<Checkpoint, StoreError> {
        if let Some(checkpoint) = self.checkpoint {
            return Ok(checkpoint);
        }
        let checkpoint = self.checkpoints.load(P::NAME).await?;
        self.checkpoint = Some(checkpoint);
        Ok(checkpoint)
    }

    /// How far the projection is behind the head of the log, in global positions (an upper bound
    /// of the events still to read).
    ///
    /// # Errors
    /// A failing store.
    pub async fn lag(&mut self) -> Result<u64, StoreError> {
        let head = self.store.head().await?.unwrap_or(Checkpoint::START);
        let checkpoint = self.checkpoint().await?;
        Ok(head.position.saturating_sub(checkpoint.position))
    }

    /// Applies the next batch after the checkpoint and saves the checkpoint.
    ///
    /// # Errors
    /// A failing store or checkpoint store. Projection failures are not errors here: they are
    /// retried and parked as dead letters.
    pub async fn step(&mut self) -> Result<Step, StoreError> {
        let from = self.checkpoint().await?;
        let (page, last) = match self
            .store
            .read_filtered(from, self.batch, P::SUBSCRIPTIONS)
            .await
        {
            Ok(window) => window,
            Err(StoreError::Corrupt(corrupt)) => return self.pass_corrupt(&corrupt).await,
            Err(error) => return Err(error),
        };
        if last == from {
            return Ok(Step {
                read: 0,
                applied: 0,
                parked: 0,
                checkpoint: from,
            });
        }
        let span = tracing::debug_span!(
            "cqrs.projection.batch",
            projection = P::NAME,
            events = page.len()
        );
        let started = std::time::Instant::now();
        let (applied, parked) = self.apply_batch(&page).instrument(span).await;
        // The state moved: the runner moves on even if saving the checkpoint fails, so a retry
        // after that error never applies the batch twice.
        self.checkpoint = Some(last);
        let step = Step {
            read: page.len().max(1),
            applied,
            parked,
            checkpoint: last,
        };
        self.metrics.record(&step, started.elapsed());
        self.checkpoints.save(P::NAME, last).await?;
        Ok(step)
    }

    /// Parks a stored row the store cannot read as an event (the first after the checkpoint), if
    /// the projection subscribes to its type, and moves the checkpoint past it.
    async fn pass_corrupt(
        &mut self,
        corrupt: &crate::store::CorruptEvent,
    ) -> Result<Step, StoreError> {
        let crate::store::CorruptEvent {
            stream,
            version,
            event_id,
            event_type,
            checkpoint,
            ..
        } = corrupt;
        let subscribed = P::SUBSCRIPTIONS
            .iter()
            .any(|s| s.matches_type(&stream.aggregate_type, event_type));
        if subscribed {
            tracing::warn!(projection = P::NAME, %stream, version, %checkpoint, error = %corrupt, "parking an unreadable stored event as a dead letter");
            let failure = Failure {
                error: corrupt.to_string(),
                attempts: 1,
                first_failed_at: Utc::now(),
            };
            self.dead_letters
                .park_row(P::NAME, *event_id, stream, *version, failure);
        }
        self.checkpoint = Some(*checkpoint);
        let step = Step {
            read: 1,
            applied: 0,
            parked: usize::from(subscribed),
            checkpoint: *checkpoint,
        };
        self.metrics.record(&step, Duration::ZERO);
        self.checkpoints.save(P::NAME, *checkpoint).await?;
        Ok(step)
    }

    async fn apply_batch(&mut self, page: &[StoredEvent]) -> (usize, usize) {
        let mut blocked = match self.policy.mode {
            FailureMode::BlockStream => self.dead_letters.blocked_streams(P::NAME),
            FailureMode::Skip => HashSet::new(),
        };
        let (mut applied, mut parked) = (0, 0);
        for event in page.iter().filter(|e| P::subscribes_to(e)) {
            if blocked.contains(&event.stream) {
                let now = Utc::now();
                let failure = Failure {
                    error: WAITS_BEHIND.to_owned(),
                    attempts: 0,
                    first_failed_at: now,
                };
                self.dead_letters.park(P::NAME, event, failure);
                parked += 1;
                continue;
            }
            let span = event_span(P::NAME, event);
            match self.apply_with_retries(event).instrument(span).await {
                None => applied += 1,
                Some(failure) => {
                    tracing::warn!(
                        projection = P::NAME, stream = %event.stream, version = event.version,
                        attempts = failure.attempts, error = %failure.error,
                        "parking the event as a dead letter"
                    );
                    self.dead_letters.park(P::NAME, event, failure);
                    parked += 1;
                    if self.policy.mode == FailureMode::BlockStream {
                        blocked.insert(event.stream.clone());
                    }
                }
            }
        }
        (applied, parked)
    }

    async fn apply_with_retries(&mut self, event: &StoredEvent) -> Option<Failure> {
        let mut retries = self.policy.retries();
        loop {
            match self.projection.apply(event, &mut self.context).await {
                Ok(_) => return None,
                Err(error) => {
                    if let Some(failure) = retries.failed(&error).await {
                        return Some(failure);
                    }
                }
            }
        }
    }

    /// Steps until every event committed before the call is applied (or parked); returns how many
    /// were applied.
    ///
    /// # Errors
    /// As [`ProjectionRunner::step`].
    pub async fn catch_up(&mut self) -> Result<usize, StoreError> {
        let head = self.store.head().await?.unwrap_or(Checkpoint::START);
        let mut applied = 0;
        let mut pause = Duration::from_millis(2);
        loop {
            let step = self.step().await?;
            applied += step.applied;
            if step.read > 0 {
                pause = Duration::from_millis(2);
            } else if step.checkpoint >= head {
                return Ok(applied);
            } else {
                // The store holds committed events back for a moment (an older transaction is
                // still open): wait for them rather than stop short.
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
    }

    /// Keeps the projection up to date until `shutdown` completes, then returns the runner (with
    /// the projection and its state). It catches up, waits for the store's commit signal or `poll`
    /// (whichever comes first), and catches up again. A shutdown during a batch lets that batch
    /// finish: in-process state has no rollback, so the runner stops only between batches, with the
    /// checkpoint saved.
    ///
    /// # Errors
    /// A failing store or checkpoint store.
    pub async fn run(
        mut self,
        poll: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Self, StoreError> {
        let mut signal = self.store.commit_signal();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            if let Some(signal) = &mut signal {
                signal.borrow_and_update();
            }
            loop {
                let step = self.step().await?;
                if (&mut shutdown).now_or_never().is_some() {
                    return Ok(self);
                }
                if step.read == 0 {
                    break;
                }
            }
            let woken = async {
                match &mut signal {
                    Some(signal) => {
                        if tokio::time::timeout(poll, signal.changed())
                            .await
                            .is_ok_and(|changed| changed.is_err())
                        {
                            // The store is gone: no more signals, poll from now on.
                            tokio::time::sleep(poll).await;
                        }
                    }
                    None => tokio::time::sleep(poll).await,
                }
            };
            tokio::select! {
                () = &mut shutdown => return Ok(self),
                () = woken => {}
            }
        }
    }

    /// Applies the dead letters of `stream` again, in version order: each one that applies is
    /// removed; the first that fails again stays (with the new error) and so do the ones after it.
    ///
    /// Each event is read again from the store (dead letters hold no copy of it); one the store
    /// cannot read (or no longer has) fails again with the reason.
    pub async fn retry(&mut self, stream: &StreamId) -> Redrive {
        let mut redrive = Redrive::default();
        let mut after = None;
        while let Some(letter) = self.dead_letters.next_of_stream(P::NAME, stream, after) {
            after = Some(letter.version);
            let failure = match self.reread(&letter).await {
                Ok(event) => self.apply_with_retries(&event).await,
                Err(error) => Some(Failure {
                    error,
                    attempts: 1,
                    first_failed_at: letter.first_failed_at,
                }),
            };
            match failure {
                None => {
                    self.dead_letters.resolve(letter.id);
                    redrive.applied += 1;
                }
                Some(failure) => {
                    self.dead_letters.fail_again(letter.id, failure.error);
                    redrive.failed += 1;
                    break;
                }
            }
        }
        redrive
    }

    /// The event of a dead letter, read again from the store.
    async fn reread(&self, letter: &DeadLetter) -> Result<StoredEvent, String> {
        use futures::StreamExt as _;
        let mut events = self
            .store
            .load(&letter.stream, letter.version.saturating_sub(1));
        match events.next().await {
            Some(Ok(event)) if event.event_id == letter.event_id => Ok(event),
            Some(Ok(event)) => Err(format!(
                "the store holds event {} at version {} of {}, not the parked {}",
                event.event_id, letter.version, letter.stream, letter.event_id
            )),
            Some(Err(error)) => Err(error.to_string()),
            None => Err(format!(
                "the store has no version {} of {} any more",
                letter.version, letter.stream
            )),
        }
    }

    /// [`ProjectionRunner::retry`] for every stream with dead letters.
    pub async fn retry_all(&mut self) -> Redrive {
        let mut total = Redrive::default();
        for stream in self.dead_letters.blocked_streams(P::NAME) {
            let done = self.retry(&stream).await;
            total.applied += done.applied;
            total.failed += done.failed;
        }
        total
    }

    /// Rebuilds the projection from the first event: `reset` empties its state, the checkpoint goes
    /// back to the start, its dead letters are dropped, and it catches up (writers may keep
    /// writing: the result equals a clean replay).
    ///
    /// # Errors
    /// As [`ProjectionRunner::catch_up`].
    pub async fn rebuild(
        &mut self,
        reset: impl FnOnce(&mut P, &mut P::Context),
    ) -> Result<usize, StoreError> {
        reset(&mut self.projection, &mut self.context);
        self.checkpoint = Some(Checkpoint::START);
        self.dead_letters.reset(P::NAME);
        self.checkpoints.save(P::NAME, Checkpoint::START).await?;
        tracing::info!(projection = P::NAME, "rebuilding from the first event");
        self.catch_up().await
    }

    /// The runner's parts: the projection and its context.
    pub fn into_parts(self) -> (P, P::Context) {
        (self.projection, self.context)
    }
}
