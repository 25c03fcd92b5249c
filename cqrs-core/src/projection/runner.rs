//! The in-process projection runner: keeps a projection whose state lives in the process up to date
//! from any [`EventStore`], with a checkpoint store, retries, dead letters and a live mode.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::Projection;
use super::engine::{DeliveryBackend, DeliveryError, Engine, Parked, Savepoint};
use super::failure::{DeadLetter, FailurePolicy, Redrive};
use super::memory::{CheckpointStore, InMemoryCheckpoints, InMemoryDeadLetters};
use crate::envelope::{Checkpoint, StoredEvent, StreamId};
use crate::store::{EventStore, StoreError};

/// What one step of a runner did: one batch of the global order read, applied and checkpointed
/// (named apart from saga steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
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
    /// How far behind it was when last sampled: exact (`Lag::events == 0`) after a step that found
    /// nothing new; otherwise counted by the store at most every ten seconds, with `seconds` the
    /// age of the last event applied. `None` until the first step, or when the store cannot
    /// count.
    pub lag: Option<super::Lag>,
}

impl ProjectionMetrics {
    /// Counts a batch that took `elapsed`.
    pub fn record(&mut self, step: &Batch, elapsed: Duration) {
        self.applied += step.applied as u64;
        self.parked += step.parked as u64;
        if step.applied > 0 {
            self.events_per_second = step.applied as f64 / elapsed.as_secs_f64().max(1e-9);
        }
    }
}

/// The span runners open around one event's application (`cqrs.projection.event`, at trace level,
/// under the batch's `cqrs.projection.batch` span at debug level), continuing the event's trace.
#[must_use]
pub fn event_span<T>(projection: &'static str, event: &StoredEvent<T>) -> tracing::Span {
    let span = tracing::trace_span!(
        "cqrs.projection.event",
        projection,
        stream = %event.stream,
        version = event.version,
        event_type = %event.event_type,
        trace_id = tracing::field::Empty,
    );
    if !span.is_disabled()
        && let Some(trace) = crate::trace::TraceContext::of(&event.metadata)
    {
        crate::trace::follow(&span, &trace);
    }
    span
}
/// The in-memory adapter of the [`Engine`]: checkpoints in a [`CheckpointStore`], dead letters in
/// [`InMemoryDeadLetters`], the context in the process. No unit of work rolls back: each event is
/// applied once, with its retries, and the checkpoint moves (by compare-and-set) after the batch.
pub struct InMemoryBackend<P: Projection, S>
where
    P::Context: Sized,
{
    store: S,
    context: P::Context,
    checkpoints: Arc<dyn CheckpointStore>,
    dead_letters: InMemoryDeadLetters,
    /// Where the projection is; loaded from the checkpoint store on the first step.
    checkpoint: Option<Checkpoint>,
}
impl<P: Projection, S> std::fmt::Debug for InMemoryBackend<P, S>
where
    P::Context: Sized,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryBackend")
            .field("projection", &P::NAME)
            .field("checkpoint", &self.checkpoint)
            .finish_non_exhaustive()
    }
}
#[async_trait::async_trait]
impl<P, S> DeliveryBackend<P> for InMemoryBackend<P, S>
where
    P: Projection,
    P::Context: Sized,
    S: EventStore + Clone + 'static,
{
    type Unit = ();
    const TRANSACTIONAL: bool = false;
    type Store = S;

    fn event_store(&self) -> &S {
        &self.store
    }

    async fn load_checkpoint(&mut self) -> Result<Checkpoint, DeliveryError> {
        if let Some(checkpoint) = self.checkpoint {
            return Ok(checkpoint);
        }
        super::check_tenants::<P>(&self.store.scope())?;
        let checkpoint = self.checkpoints.load(P::NAME).await?;
        self.checkpoint = Some(checkpoint);
        Ok(checkpoint)
    }

    async fn begin_unit(&mut self) -> Result<(), DeliveryError> {
        Ok(())
    }

    fn unit_context<'a>(&'a mut self, (): &'a mut ()) -> &'a mut P::Context {
        &mut self.context
    }

    async fn savepoint(&mut self, (): &mut (), _op: Savepoint) -> Result<(), DeliveryError> {
        Ok(())
    }

    async fn blocked_streams(&mut self, (): &mut ()) -> Result<HashSet<StreamId>, DeliveryError> {
        Ok(self.dead_letters.blocked_streams(P::NAME))
    }

    async fn park_event(&mut self, (): &mut (), parked: Parked<'_>) -> Result<(), DeliveryError> {
        self.dead_letters.park_row(
            P::NAME,
            parked.event_id,
            parked.stream,
            parked.version,
            parked.failure.clone(),
        );
        Ok(())
    }

    async fn advance_checkpoint(
        &mut self,
        (): &mut (),
        from: Checkpoint,
        to: Checkpoint,
    ) -> Result<(), DeliveryError> {
        // The state moved already (there is no rollback): the runner moves on even if recording
        // the checkpoint fails, so a retry after that error never applies the batch twice.
        self.checkpoint = Some(to);
        if self.checkpoints.compare_and_save(P::NAME, from, to).await? {
            Ok(())
        } else {
            let stored = self.checkpoints.load(P::NAME).await?;
            self.checkpoint = Some(stored);
            Err(DeliveryError::CheckpointMoved {
                projection: P::NAME,
                stored,
            })
        }
    }

    async fn end_unit(&mut self, (): (), _commit: bool) -> Result<(), DeliveryError> {
        Ok(())
    }

    async fn letters_of(
        &mut self,
        (): &mut (),
        stream: &StreamId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DeliveryError> {
        Ok(self.dead_letters.of_stream(P::NAME, stream, after, limit))
    }

    async fn reread_letter(
        &mut self,
        (): &mut (),
        letter: &DeadLetter,
    ) -> Result<Result<StoredEvent, String>, DeliveryError> {
        use futures::StreamExt as _;
        let mut events = self
            .store
            .load(&letter.stream, letter.version.saturating_sub(1));
        Ok(match events.next().await {
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
        })
    }

    async fn resolve_letter(&mut self, (): &mut (), id: i64) -> Result<(), DeliveryError> {
        self.dead_letters.resolve(id);
        Ok(())
    }

    async fn fail_letter_again(
        &mut self,
        (): &mut (),
        id: i64,
        error: &str,
    ) -> Result<(), DeliveryError> {
        self.dead_letters.fail_again(id, error.to_owned());
        Ok(())
    }
}
/// A runner's error: what the store said (a runner holds no lease to lose).
fn store_error(error: DeliveryError) -> StoreError {
    match error {
        DeliveryError::Store(error) => error,
        other => StoreError::backend(other.to_string()),
    }
}
/// Keeps an in-process projection (its state in itself or in `Context`) up to date from any
/// [`EventStore`]: the [`Engine`] on an [`InMemoryBackend`].
///
/// Each [`step`](ProjectionRunner::step) reads a batch after the checkpoint (only the subscribed
/// event types travel), applies it, parks what keeps failing (see [`FailurePolicy`]) and moves the
/// checkpoint. [`run`](ProjectionRunner::run) catches up, then waits for the store's commit signal
/// (the in-memory store wakes it at once) or the poll interval, and catches up again.
///
/// There is no transaction around in-process state: a handler that fails is called again for the
/// same event, so it should check before it changes anything. For read models in PostgreSQL, use
/// `evently_postgres::projection::ProjectionWorker`, which commits them with the checkpoint.
pub struct ProjectionRunner<P: Projection, S>
where
    P::Context: Sized,
{
    engine: Engine<P, InMemoryBackend<P, S>>,
}
impl<P: Projection, S> std::fmt::Debug for ProjectionRunner<P, S>
where
    P::Context: Sized,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("projection", &P::NAME)
            .field("checkpoint", &self.engine.backend().checkpoint)
            .field("batch", &self.engine.batch())
            .field("policy", &self.engine.policy())
            .finish_non_exhaustive()
    }
}

impl<P, S> ProjectionRunner<P, S>
where
    P: Projection,
    P::Context: Sized,
    S: EventStore + Clone + 'static,
{
    /// A runner of `projection` (handlers writing through `context`) over `store`, with in-memory
    /// checkpoints and dead letters, batches of 1,000 events and the default [`FailurePolicy`].
    pub fn new(store: S, projection: P, context: P::Context) -> Self {
        let backend = InMemoryBackend {
            store,
            context,
            checkpoints: Arc::new(InMemoryCheckpoints::new()),
            dead_letters: InMemoryDeadLetters::new(),
            checkpoint: None,
        };
        Self {
            engine: Engine::new(projection, backend, 1_000),
        }
    }

    /// Where the checkpoint is kept (shared with a later runner of the same projection to resume).
    #[must_use]
    pub fn with_checkpoints(mut self, checkpoints: Arc<dyn CheckpointStore>) -> Self {
        let backend = self.engine.backend_mut();
        backend.checkpoints = checkpoints;
        backend.checkpoint = None;
        self
    }

    /// Where the checkpoint is kept: hand it to
    /// [`wait_until_caught_up`](super::wait_until_caught_up) to wait for the runner (which may be
    /// running on another task) to pass a command's events.
    #[must_use]
    pub fn checkpoints(&self) -> Arc<dyn CheckpointStore> {
        Arc::clone(&self.engine.backend().checkpoints)
    }

    /// Where dead letters are parked (keep a clone to list and purge them).
    #[must_use]
    pub fn with_dead_letters(mut self, dead_letters: InMemoryDeadLetters) -> Self {
        self.engine.backend_mut().dead_letters = dead_letters;
        self
    }

    /// What to do with events the projection keeps failing on.
    #[must_use]
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.engine.set_policy(policy);
        self
    }

    /// How many events one step reads when the runner is not behind (1,000 unless set); while
    /// it is behind, each window that moved the checkpoint doubles the next, up to eight times
    /// this unless [`with_max_batch`](Self::with_max_batch) says otherwise.
    #[must_use]
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.engine.set_batch(batch);
        self
    }

    /// The most events one step reads while the runner is behind (see
    /// [`Engine::set_max_batch`](super::engine::Engine::set_max_batch)); set it after
    /// [`with_batch`](Self::with_batch).
    #[must_use]
    pub fn with_max_batch(mut self, max_batch: usize) -> Self {
        self.engine.set_max_batch(max_batch);
        self
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        self.engine.projection()
    }

    /// The context handlers write through.
    pub fn context(&self) -> &P::Context {
        &self.engine.backend().context
    }

    /// The dead letters this runner parks into.
    pub fn dead_letters(&self) -> &InMemoryDeadLetters {
        &self.engine.backend().dead_letters
    }

    /// The runner's counters.
    #[must_use]
    pub fn metrics(&self) -> ProjectionMetrics {
        self.engine.metrics()
    }

    /// The counters, readable while the worker runs: take it before calling `run`.
    #[must_use]
    pub fn metrics_handle(&self) -> crate::telemetry::MetricsHandle<ProjectionMetrics> {
        self.engine.metrics_handle()
    }

    /// The checkpoint of the last event read.
    ///
    /// # Errors
    /// A failing checkpoint store.
    pub async fn checkpoint(&mut self) -> Result<Checkpoint, StoreError> {
        self.engine
            .backend_mut()
            .load_checkpoint()
            .await
            .map_err(store_error)
    }

    /// How far the projection is behind the head of the log, in global positions (exact for the
    /// in-memory store, whose positions are its commit order; an upper bound for others).
    ///
    /// # Errors
    /// A failing store.
    pub async fn lag(&mut self) -> Result<u64, StoreError> {
        let head = self
            .engine
            .backend()
            .store
            .head()
            .await?
            .unwrap_or(Checkpoint::START);
        let checkpoint = self.checkpoint().await?;
        Ok(head.position.saturating_sub(checkpoint.position))
    }

    /// Applies the next batch after the checkpoint and moves the checkpoint.
    ///
    /// # Errors
    /// A failing store or checkpoint store. Projection failures are not errors here: they are
    /// retried and parked as dead letters.
    pub async fn step(&mut self) -> Result<Batch, StoreError> {
        self.engine.step().await.map_err(store_error)
    }

    /// Steps until every event committed before the call is applied (or parked); returns how many
    /// were applied.
    ///
    /// # Errors
    /// As [`ProjectionRunner::step`].
    pub async fn catch_up(&mut self) -> Result<usize, StoreError> {
        self.engine.catch_up().await.map_err(store_error)
    }

    /// Keeps the projection up to date until `shutdown` completes, then returns the runner (with
    /// the projection and its state). It catches up, waits for the store's commit signal or `poll`
    /// (whichever comes first), and catches up again; a failing store is retried with a backoff.
    /// A shutdown during a batch lets that batch finish: in-process state has no rollback, so the
    /// runner stops only between batches, with the checkpoint moved.
    ///
    /// # Errors
    /// None today: every failure of an in-process runner is retried.
    pub async fn run(
        mut self,
        poll: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Self, StoreError> {
        self.engine.run(poll, shutdown).await.map_err(store_error)?;
        Ok(self)
    }

    /// Applies the dead letters of `stream` again, in version order: each one that applies is
    /// removed; the first that fails again stays (with the new error) and so do the ones after it.
    ///
    /// Each event is read again from the store (dead letters hold no copy of it); one the store
    /// cannot read (or no longer has) fails again with the reason.
    pub async fn retry(&mut self, stream: &StreamId) -> Redrive {
        self.engine.retry(stream).await.unwrap_or_else(|error| {
            tracing::warn!(projection = P::NAME, %stream, %error, "redrive failed");
            Redrive::default()
        })
    }

    /// [`ProjectionRunner::retry`] for every stream with dead letters.
    pub async fn retry_all(&mut self) -> Redrive {
        self.engine.retry_all().await.unwrap_or_else(|error| {
            tracing::warn!(projection = P::NAME, %error, "redrive failed");
            Redrive::default()
        })
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
        let (projection, backend) = self.engine.parts_mut();
        reset(projection, &mut backend.context);
        backend.checkpoint = Some(Checkpoint::START);
        backend.dead_letters.reset(P::NAME);
        backend.checkpoints.save(P::NAME, Checkpoint::START).await?;
        tracing::info!(projection = P::NAME, "rebuilding from the first event");
        self.catch_up().await
    }

    /// The runner's parts: the projection and its context.
    pub fn into_parts(self) -> (P, P::Context) {
        let (projection, backend) = self.engine.into_parts();
        (projection, backend.context)
    }
}
