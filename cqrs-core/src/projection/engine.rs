//! The one delivery engine every projection runs on: read a window of the global order -> apply
//! with retries -> park or block the stream -> move the checkpoint by compare-and-set -> catch up
//! -> wait for a wake-up -> serve operator requests, over a [`DeliveryBackend`] port.
//!
//! The backends only adapt: [`InMemoryBackend`](super::InMemoryBackend) here (checkpoints and dead
//! letters in process memory, for [`ProjectionRunner`](super::ProjectionRunner)) and the
//! PostgreSQL one in `cqrs-postgres` (a transaction per batch, a lease with an epoch, the dead-letter
//! table, operator requests, for `ProjectionWorker`). The rules are written once here: the same
//! retries and parking, the same per-stream blocking, the same handling of rows no reader can
//! decode, the same compare-and-set checkpoint, the same backoff over failures that heal.

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use chrono::Utc;
use futures::future::BoxFuture;
use tracing::Instrument as _;

use super::failure::{DeadLetter, Failure, FailureMode, FailurePolicy, Redrive, WAITS_BEHIND};
use super::runner::{Batch, ProjectionMetrics, event_span};
use super::{Lag, Projection, ProjectionError, Subscription};
use crate::envelope::{Checkpoint, EventId, Payload, RawStoredEvent, StoredEvent, StreamId};
use crate::store::{CorruptEvent, EventStore, StoreError};
use crate::telemetry::MetricsHandle;

fn lease_lost(projection: &str, epoch: Option<i64>) -> String {
    match epoch {
        None => format!(
            "this worker holds no lease on projection `{projection}`: call `acquire()` first (or \
             `run`, which takes it), or another worker owns it"
        ),
        Some(epoch) => format!(
            "projection `{projection}` is owned by another worker now (this worker held epoch \
             {epoch})"
        ),
    }
}

/// Why the engine stopped a batch (nothing of it was kept, for a transactional backend).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// Another worker owns the projection (its lease is live), or took it over from this one:
    /// this worker's last batch was rolled back and nothing it did after losing the lease was
    /// kept.
    #[error("{}", lease_lost(projection, *epoch))]
    LeaseLost {
        /// The projection.
        projection: &'static str,
        /// The epoch this worker held, if any.
        epoch: Option<i64>,
    },
    /// The window started at a checkpoint that is not the stored one any more: an earlier commit
    /// whose outcome was in doubt (its future dropped after `COMMIT` was sent) went through after
    /// all. Nothing of this batch was kept; step again from the stored checkpoint (`run` and
    /// `catch_up` do).
    #[error(
        "projection `{projection}`: the checkpoint moved to {stored} meanwhile; the batch was rolled back"
    )]
    CheckpointMoved {
        /// The projection.
        projection: &'static str,
        /// The stored checkpoint.
        stored: Checkpoint,
    },
    /// The projection failed on an event outside the retries (only a rebuild's reset can).
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// The store failed; the batch was rolled back.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A savepoint operation inside a unit of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Savepoint {
    /// Set a savepoint before one event.
    Set,
    /// The event applied: release it.
    Release,
    /// The event failed: roll back to it.
    Rollback,
}

/// An event (or a row that cannot be read as one) to park as a dead letter.
#[derive(Debug, Clone, Copy)]
pub struct Parked<'a> {
    /// The event's id.
    pub event_id: EventId,
    /// Its stream.
    pub stream: &'a StreamId,
    /// Its version.
    pub version: u64,
    /// Why it is parked.
    pub failure: &'a Failure,
}

/// An operator's request to a running projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Rebuild from the first event.
    Rebuild,
    /// Retry the dead letters of a stream.
    Retry(StreamId),
}

/// What became of an event handed to [`Engine::deliver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Applied.
    Applied,
    /// Applied before (the backend's inbox has it): nothing was done.
    Duplicate,
    /// Not an event the projection listens to (another aggregate type).
    Skipped,
    /// Parked as a dead letter (it failed every try, cannot be decoded, is of an unknown type
    /// of one of the projection's aggregates, or waits behind an earlier dead letter of its
    /// stream): send it to the broker's dead-letter place.
    Parked(Failure),
}

/// One try at an event, with its retries.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Applied,
    Duplicate,
    Failed(Failure),
}

/// Why an event that `P` does not subscribe to cannot be applied, when it should have been:
/// `None` when its aggregate type is not one of `P`'s (not for `P`: skip it), else a reason
/// naming the unknown event type and the known ones (the aggregate's event enum does not have
/// it: a producer newer than this consumer, or a message that is not ours).
#[must_use]
pub fn unknown_event_type<P: Projection, T>(event: &StoredEvent<T>) -> Option<String> {
    P::SUBSCRIPTIONS
        .iter()
        .find(|s| s.aggregate_type == Some(event.stream.aggregate_type.as_str()))
        .map(|subscription| {
            format!(
                "unknown event type `{}` of aggregate type `{}` (known: {})",
                event.event_type,
                event.stream.aggregate_type,
                subscription.event_types.join(", ")
            )
        })
}

/// An event the engine applies: parsed (what a broker consumer hands to
/// [`Engine::deliver`]) or with its payload still the stored text (what a window of the store
/// holds, applied through [`Projection::apply_raw`]).
trait Deliverable: Payload {
    fn apply_to<'a, P: Projection>(
        event: &'a StoredEvent<Self>,
        projection: &'a mut P,
        context: &'a mut P::Context,
    ) -> BoxFuture<'a, Result<bool, ProjectionError>>;
}

/// `apply`, with a panic of the handler turned into its failure on `event` (retried, then parked
/// by the policy like any other): one bad event never kills the worker.
fn guarded<'a, P: Projection, T: Sync>(
    event: &'a StoredEvent<T>,
    apply: BoxFuture<'a, Result<bool, ProjectionError>>,
) -> BoxFuture<'a, Result<bool, ProjectionError>> {
    use futures::FutureExt as _;
    Box::pin(async move {
        match std::panic::AssertUnwindSafe(apply).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(panic) => Err(ProjectionError::Handler {
                projection: P::NAME,
                stream: event.stream.clone(),
                version: event.version,
                source: format!("panicked: {}", crate::panic_message(&*panic)).into(),
            }),
        }
    })
}

impl Deliverable for serde_json::Value {
    fn apply_to<'a, P: Projection>(
        event: &'a StoredEvent<Self>,
        projection: &'a mut P,
        context: &'a mut P::Context,
    ) -> BoxFuture<'a, Result<bool, ProjectionError>> {
        guarded::<P, _>(event, projection.apply(event, context))
    }
}

impl Deliverable for Box<serde_json::value::RawValue> {
    fn apply_to<'a, P: Projection>(
        event: &'a StoredEvent<Self>,
        projection: &'a mut P,
        context: &'a mut P::Context,
    ) -> BoxFuture<'a, Result<bool, ProjectionError>> {
        guarded::<P, _>(event, projection.apply_raw(event, context))
    }
}

/// The subscribed events of a window of the global order.
#[derive(Debug)]
pub struct Window {
    /// The subscribed events, their payloads as the stored JSON text (decoded by the
    /// projection's handlers, [`Projection::apply_raw`]).
    pub events: Vec<RawStoredEvent>,
    /// The checkpoint of the last event scanned (subscribed or not).
    pub last: Checkpoint,
    /// Whether to read the next window plainly (see [`read_window`]).
    pub dense: bool,
}

/// Where a projection's checkpoint, dead letters and unit of work live: what the engine needs
/// from a backend. Implemented by [`InMemoryBackend`](super::InMemoryBackend) and by
/// `evently_postgres::projection::PostgresBackend`.
#[async_trait::async_trait]
pub trait DeliveryBackend<P: Projection>: Send {
    /// One unit of work: a database transaction, or nothing for state in the process.
    type Unit: Send;

    /// Whether a unit rolls back everything done in it. Then a batch is first applied without
    /// savepoints (one round trip less per event) and, if a handler fails, again event by event
    /// with a savepoint each; without it, each event is applied once, with its retries.
    const TRANSACTIONAL: bool;

    /// The store events are read from (cloned into the task that reads ahead).
    type Store: EventStore + Clone + 'static;

    /// The store.
    fn event_store(&self) -> &Self::Store;

    /// `Ok` while this backend may write the projection (holds its lease), else
    /// [`DeliveryError::LeaseLost`].
    ///
    /// # Errors
    /// As said.
    fn check_ownership(&self) -> Result<(), DeliveryError> {
        Ok(())
    }

    /// Takes or renews the ownership of the projection; `false` while another owner holds it.
    ///
    /// # Errors
    /// A failing backend.
    async fn acquire_ownership(&mut self) -> Result<bool, DeliveryError> {
        Ok(true)
    }

    /// The stored checkpoint.
    ///
    /// # Errors
    /// A failing backend.
    async fn load_checkpoint(&mut self) -> Result<Checkpoint, DeliveryError>;

    /// Opens a unit of work.
    ///
    /// # Errors
    /// A failing backend.
    async fn begin_unit(&mut self) -> Result<Self::Unit, DeliveryError>;

    /// What handlers write through, in `unit`.
    fn unit_context<'a>(&'a mut self, unit: &'a mut Self::Unit) -> &'a mut P::Context;

    /// A savepoint operation (only called on transactional backends).
    ///
    /// # Errors
    /// A failing backend.
    async fn savepoint(
        &mut self,
        unit: &mut Self::Unit,
        op: Savepoint,
    ) -> Result<(), DeliveryError>;

    /// The streams with dead letters.
    ///
    /// # Errors
    /// A failing backend.
    async fn blocked_streams(
        &mut self,
        unit: &mut Self::Unit,
    ) -> Result<HashSet<StreamId>, DeliveryError>;

    /// Parks an event as a dead letter.
    ///
    /// # Errors
    /// A failing backend.
    async fn park_event(
        &mut self,
        unit: &mut Self::Unit,
        parked: Parked<'_>,
    ) -> Result<(), DeliveryError>;

    /// Moves the checkpoint from exactly `from` to `to` (compare-and-set), renewing the ownership.
    ///
    /// # Errors
    /// [`DeliveryError::LeaseLost`], [`DeliveryError::CheckpointMoved`], a failing backend.
    async fn advance_checkpoint(
        &mut self,
        unit: &mut Self::Unit,
        from: Checkpoint,
        to: Checkpoint,
    ) -> Result<(), DeliveryError>;

    /// Claims `event` for this projection in `unit` (the inbox of a broker source): `false` when
    /// it was applied before (a redelivery), and then nothing is applied. Backends that read the
    /// store need none (their checkpoint says what was applied): the default claims everything.
    /// Called inside the event's savepoint, so a failed try releases its claim.
    ///
    /// # Errors
    /// A failing backend.
    async fn claim<T: Payload>(
        &mut self,
        _unit: &mut Self::Unit,
        _event: &StoredEvent<T>,
    ) -> Result<bool, DeliveryError> {
        Ok(true)
    }

    /// Whether a handler's error says that what the handler needs is down (its database
    /// unreachable, its connection terminated) rather than that the event cannot be applied.
    /// The engine then neither retries nor parks the event: the unit ends with the error and the
    /// caller tries again after the outage, so an outage never parks events. Default: never.
    fn is_outage(&self, _error: &ProjectionError) -> bool {
        false
    }

    /// Whether to keep a connection (or whatever a unit runs on) from one unit to the next: `true`
    /// while [`Engine::catch_up`] runs batch after batch, `false` after it. Default: nothing to
    /// keep.
    fn hold_connection(&mut self, _hold: bool) {}

    /// Ends `unit`: commits it, or rolls it back.
    ///
    /// # Errors
    /// A failing commit.
    async fn end_unit(&mut self, unit: Self::Unit, commit: bool) -> Result<(), DeliveryError>;

    /// Renews the ownership while a long batch runs; never completes (the default waits).
    fn ownership_heartbeat(&self) -> BoxFuture<'static, Infallible> {
        Box::pin(futures::future::pending())
    }

    /// Prepares `unit` for a redrive of `stream` (holds the lease, answers requests on it).
    ///
    /// # Errors
    /// [`DeliveryError::LeaseLost`], a failing backend.
    async fn begin_redrive(
        &mut self,
        _unit: &mut Self::Unit,
        _stream: &StreamId,
    ) -> Result<(), DeliveryError> {
        Ok(())
    }

    /// Up to `limit` dead letters of `stream` after version `after`, in version order.
    ///
    /// # Errors
    /// A failing backend.
    async fn letters_of(
        &mut self,
        unit: &mut Self::Unit,
        stream: &StreamId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DeliveryError>;

    /// The event of a dead letter, read again (`Err(reason)` when it cannot be read: it stays
    /// parked with the reason).
    ///
    /// # Errors
    /// A failing backend.
    async fn reread_letter(
        &mut self,
        unit: &mut Self::Unit,
        letter: &DeadLetter,
    ) -> Result<Result<StoredEvent, String>, DeliveryError>;

    /// A dead letter applied: remove it.
    ///
    /// # Errors
    /// A failing backend.
    async fn resolve_letter(&mut self, unit: &mut Self::Unit, id: i64)
    -> Result<(), DeliveryError>;

    /// A dead letter failed again: record the new error.
    ///
    /// # Errors
    /// A failing backend.
    async fn fail_letter_again(
        &mut self,
        unit: &mut Self::Unit,
        id: i64,
        error: &str,
    ) -> Result<(), DeliveryError>;

    /// Resets the read model, the checkpoint and the dead letters for a rebuild an operator asked
    /// for, in `unit`.
    ///
    /// # Errors
    /// [`DeliveryError::Store`] with `InvalidInput` when the backend has no reset.
    async fn reset_for_rebuild(&mut self, _unit: &mut Self::Unit) -> Result<(), DeliveryError> {
        Err(StoreError::InvalidInput(format!(
            "projection `{}` has no reset: rebuilds on request are not available",
            P::NAME
        ))
        .into())
    }

    /// The operators' pending requests.
    ///
    /// # Errors
    /// A failing backend.
    async fn pending_requests(&mut self) -> Result<Vec<Request>, DeliveryError> {
        Ok(Vec::new())
    }

    /// Records the outcome of a served request.
    ///
    /// # Errors
    /// A failing backend.
    async fn request_answered(
        &mut self,
        _request: &Request,
        _outcome: Result<(), String>,
    ) -> Result<(), DeliveryError> {
        Ok(())
    }

    /// Whether waiting cannot heal `error` (a missing schema, refused privileges): then `run`
    /// returns it.
    fn is_permanent(&self, _error: &DeliveryError) -> bool {
        false
    }
}

/// How often a running engine counts its lag with the store.
const LAG_SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// How many dead letters a redrive reads at a time.
const REDRIVE_PAGE: usize = 500;

/// The engine: a projection, its backend, and the rules.
pub struct Engine<P: Projection, B> {
    projection: P,
    backend: B,
    batch: usize,
    policy: FailurePolicy,
    metrics: MetricsHandle<ProjectionMetrics>,
    /// When the lag was last counted by the store.
    lag_counted: Option<std::time::Instant>,
    /// Whether most events read lately were subscribed ones: then the plain ordered read (and
    /// filtering here) is cheaper than asking the store to filter.
    dense: bool,
    /// Known: the projection has no dead letters. Only the owner parks events (a unit that
    /// parks under a lost ownership rolls back), and operators, retries and rebuilds only remove
    /// letters, so once a batch found none, none appear until this engine parks one: the next
    /// batches skip asking the backend for blocked streams (a round trip per batch). Forgotten
    /// on any park, any failed batch and whenever ownership is lost or taken (again).
    no_dead_letters: bool,
}

impl<P: Projection, B> std::fmt::Debug for Engine<P, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("projection", &P::NAME)
            .field("batch", &self.batch)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<P: Projection, B> Engine<P, B> {
    /// An engine for `projection` on `backend`, reading `batch` events at a time.
    pub fn new(projection: P, backend: B, batch: usize) -> Self {
        Self {
            projection,
            backend,
            batch: batch.max(1),
            policy: FailurePolicy::default(),
            metrics: MetricsHandle::default(),
            lag_counted: None,
            dense: false,
            no_dead_letters: false,
        }
    }

    /// What to do with events the projection keeps failing on.
    pub fn set_policy(&mut self, policy: FailurePolicy) {
        self.policy = policy;
        self.no_dead_letters = false;
    }

    /// How many events one step reads at most (at least 1).
    pub fn set_batch(&mut self, batch: usize) {
        self.batch = batch.max(1);
    }

    /// The batch size.
    #[must_use]
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The failure policy.
    #[must_use]
    pub fn policy(&self) -> FailurePolicy {
        self.policy
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// The projection, to change it (a reset).
    pub fn projection_mut(&mut self) -> &mut P {
        &mut self.projection
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, to change it.
    pub fn backend_mut(&mut self) -> &mut B {
        self.no_dead_letters = false;
        &mut self.backend
    }

    /// The counters.
    #[must_use]
    pub fn metrics(&self) -> ProjectionMetrics {
        self.metrics.get()
    }

    /// The counters of the running engine, readable while it runs.
    #[must_use]
    pub fn metrics_handle(&self) -> MetricsHandle<ProjectionMetrics> {
        self.metrics.clone()
    }

    /// Counts a step (and reports it to the metrics recorder).
    fn count(&self, step: &Batch, elapsed: Duration) {
        self.metrics.update(|m| m.record(step, elapsed));
        crate::telemetry::projection_step(P::NAME, step.applied, step.parked);
    }

    /// Counts a batch that failed.
    fn count_failure(&self) {
        self.metrics.update(|m| m.failed_batches += 1);
        crate::telemetry::projection_failed_batch(P::NAME);
    }

    /// Sets the lag (and reports it).
    fn set_lag(&self, lag: Lag) {
        self.metrics.update(|m| m.lag = Some(lag));
        crate::telemetry::projection_lag(P::NAME, lag.events, lag.seconds);
    }

    /// The projection and the backend, both to change (a reset).
    pub fn parts_mut(&mut self) -> (&mut P, &mut B) {
        self.no_dead_letters = false;
        (&mut self.projection, &mut self.backend)
    }

    /// The engine's parts.
    pub fn into_parts(self) -> (P, B) {
        (self.projection, self.backend)
    }
}

impl<P, B> Engine<P, B>
where
    P: Projection,
    B: DeliveryBackend<P>,
{
    /// Applies the next window after the checkpoint in one unit of work, with the checkpoint
    /// move. A row the store cannot read as an event is parked (if subscribed) and passed.
    ///
    /// # Errors
    /// [`DeliveryError::LeaseLost`] when the backend does not own the projection (nothing is
    /// kept), [`DeliveryError::CheckpointMoved`], [`DeliveryError::Store`].
    pub async fn step(&mut self) -> Result<Batch, DeliveryError> {
        // A catch-up cut short may have left a connection kept.
        self.backend.hold_connection(false);
        self.owns()?;
        let from = self.backend.load_checkpoint().await?;
        let window = read_window(
            self.backend.event_store().clone(),
            from,
            self.batch,
            self.dense,
            P::SUBSCRIPTIONS,
            P::subscribes_to,
        )
        .await;
        match window {
            Ok(window) => self.apply_window(from, window).await,
            Err(StoreError::Corrupt(corrupt)) => self.pass_corrupt(from, &corrupt).await,
            Err(error) => Err(error.into()),
        }
    }

    /// Steps until every event committed before the call is applied (or parked); returns how
    /// many were applied. The next window is read while one is applied.
    ///
    /// Readers never pass the oldest transaction still open (that keeps the global order
    /// gap-free), so right after an append the newest events can be unreadable for a moment:
    /// `catch_up` takes the head of the log first and waits (polling from 2 ms up to 100 ms)
    /// until its checkpoint has passed it. Bound it with `tokio::time::timeout` if needed.
    ///
    /// # Errors
    /// As [`Engine::step`].
    pub async fn catch_up(&mut self) -> Result<usize, DeliveryError> {
        self.backend.hold_connection(true);
        let outcome = self.catch_up_held().await;
        self.backend.hold_connection(false);
        outcome
    }

    /// [`Engine::catch_up`], the backend keeping its connection between batches.
    async fn catch_up_held(&mut self) -> Result<usize, DeliveryError> {
        self.owns()?;
        let head = self
            .backend
            .event_store()
            .head()
            .await?
            .unwrap_or(Checkpoint::START);
        let mut from = self.backend.load_checkpoint().await?;
        let mut applied = 0;
        let mut pause = Duration::from_millis(2);
        let mut next = self.prefetch(from, self.dense);
        loop {
            let window = match next
                .await
                .map_err(|e| StoreError::backend(format!("read task: {e}")))?
            {
                Ok(window) => window,
                Err(StoreError::Corrupt(corrupt)) => {
                    from = self.pass_corrupt(from, &corrupt).await?.checkpoint;
                    next = self.prefetch(from, self.dense);
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let last = window.last;
            if last == from {
                if from >= head {
                    return Ok(applied);
                }
                // The store holds committed events back for a moment (an older transaction is
                // still open): wait for them rather than stop short.
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
                next = self.prefetch(from, window.dense);
                continue;
            }
            pause = Duration::from_millis(2);
            // The next window is read while this one is applied; if this one does not commit,
            // the prefetched window is dropped.
            next = self.prefetch(last, window.dense);
            match self.apply_window(from, window).await {
                Ok(step) => {
                    applied += step.applied;
                    from = last;
                }
                Err(DeliveryError::CheckpointMoved { stored, .. }) => {
                    // An earlier commit went through after all: on from what it stored.
                    next.abort();
                    from = stored;
                    next = self.prefetch(from, self.dense);
                }
                Err(error) => {
                    next.abort();
                    return Err(error);
                }
            }
        }
    }

    /// Whether the backend owns the projection; when it does not, what was known about its dead
    /// letters is forgotten (another owner may have parked some meanwhile).
    fn owns(&mut self) -> Result<(), DeliveryError> {
        self.backend.check_ownership().inspect_err(|_| {
            self.no_dead_letters = false;
        })
    }

    /// Reads the window after `from` on another task.
    fn prefetch(
        &self,
        from: Checkpoint,
        dense: bool,
    ) -> tokio::task::JoinHandle<Result<Window, StoreError>> {
        tokio::spawn(read_window(
            self.backend.event_store().clone(),
            from,
            self.batch,
            dense,
            P::SUBSCRIPTIONS,
            P::subscribes_to::<Box<serde_json::value::RawValue>>,
        ))
    }

    /// After a step that read something: how far behind in time is the age of the last event it
    /// applied (every step); how many events are behind is counted by the store at most every
    /// ten seconds (a count over them), and kept in between.
    async fn sample_lag(&mut self, at: Checkpoint, newest: Option<chrono::DateTime<Utc>>) {
        let before = self.metrics.get().lag;
        let mut events = before.map(|lag| lag.events);
        if self
            .lag_counted
            .is_none_or(|counted| counted.elapsed() >= LAG_SAMPLE_EVERY)
        {
            self.lag_counted = Some(std::time::Instant::now());
            match self.backend.event_store().lag(at).await {
                Ok(Some(lag)) => events = Some(lag.events),
                Ok(None) => {}
                Err(error) => {
                    tracing::debug!(projection = P::NAME, %error, "could not count the lag");
                }
            }
        }
        let Some(events) = events else { return };
        let seconds = newest.map_or_else(
            || before.map_or(0.0, |lag| lag.seconds),
            |at| {
                (Utc::now() - at)
                    .to_std()
                    .map_or(0.0, |age| age.as_secs_f64())
            },
        );
        self.set_lag(Lag { events, seconds });
    }

    /// Applies a window read after `from` and moves the checkpoint to its end.
    async fn apply_window(
        &mut self,
        from: Checkpoint,
        window: Window,
    ) -> Result<Batch, DeliveryError> {
        self.dense = window.dense;
        let (page, last) = (window.events, window.last);
        if last == from {
            // Nothing new: exactly caught up.
            self.set_lag(Lag::default());
            return Ok(Batch {
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
        let outcome = async {
            if B::TRANSACTIONAL {
                match self.apply_batch(&page, from, last, false).await {
                    Err(DeliveryError::Projection(error)) => {
                        tracing::debug!(projection = P::NAME, %error, "a handler failed: running the batch event by event");
                        self.apply_batch(&page, from, last, true).await
                    }
                    done => done,
                }
            } else {
                self.apply_batch(&page, from, last, true).await
            }
        }
        .instrument(span)
        .await;
        let mut step = match outcome {
            Ok(step) => step,
            Err(error) => {
                self.count_failure();
                self.no_dead_letters = false;
                return Err(error);
            }
        };
        // Events scanned but filtered out by the store count as read: the checkpoint moved.
        step.read = step.read.max(1);
        self.count(&step, started.elapsed());
        self.sample_lag(step.checkpoint, page.last().map(|e| e.recorded_at))
            .await;
        Ok(step)
    }

    /// One attempt at a batch in a unit of its own, with the backend's heartbeat beside it.
    /// `careful`: each event with a savepoint (transactional backends), retries and parking;
    /// otherwise any failure ends the attempt (and the unit rolls back whole).
    async fn apply_batch(
        &mut self,
        page: &[RawStoredEvent],
        from: Checkpoint,
        last: Checkpoint,
        careful: bool,
    ) -> Result<Batch, DeliveryError> {
        let mut unit = self.backend.begin_unit().await?;
        let heartbeat = self.backend.ownership_heartbeat();
        let outcome = tokio::select! {
            outcome = self.apply_batch_in(&mut unit, page, from, last, careful) => outcome,
            never = heartbeat => match never {},
        };
        self.end(unit, outcome).await
    }

    /// Ends `unit` by `outcome`: commits an `Ok`, rolls back an `Err` and returns it.
    async fn end<T>(
        &mut self,
        unit: B::Unit,
        outcome: Result<T, DeliveryError>,
    ) -> Result<T, DeliveryError> {
        match outcome {
            Ok(value) => self.backend.end_unit(unit, true).await.map(|()| value),
            Err(error) => {
                // The first error is the one to report.
                let _ = self.backend.end_unit(unit, false).await;
                Err(error)
            }
        }
    }

    async fn apply_batch_in(
        &mut self,
        unit: &mut B::Unit,
        page: &[RawStoredEvent],
        from: Checkpoint,
        last: Checkpoint,
        careful: bool,
    ) -> Result<Batch, DeliveryError> {
        let mut blocked = match self.policy.mode {
            FailureMode::BlockStream if self.no_dead_letters => HashSet::new(),
            FailureMode::BlockStream => {
                let blocked = self.backend.blocked_streams(unit).await?;
                self.no_dead_letters = blocked.is_empty();
                blocked
            }
            FailureMode::Skip => HashSet::new(),
        };
        let (mut applied, mut parked) = (0, 0);
        for event in page.iter().filter(|e| P::subscribes_to(e)) {
            if blocked.contains(&event.stream) {
                let waits = Failure {
                    error: WAITS_BEHIND.to_owned(),
                    attempts: 0,
                    first_failed_at: Utc::now(),
                };
                self.park(unit, event, &waits).await?;
                parked += 1;
                continue;
            }
            if !careful {
                // Any failure rolls this unit back; the caller runs the batch carefully.
                let context = self.backend.unit_context(unit);
                let trace = crate::trace::TraceContext::of(&event.metadata);
                let apply = Deliverable::apply_to(event, &mut self.projection, context)
                    .instrument(event_span(P::NAME, event));
                crate::trace::scope_if_needed(trace, apply).await?;
                applied += 1;
                continue;
            }
            let span = event_span(P::NAME, event);
            match self
                .apply_with_retries(unit, event)
                .instrument(span)
                .await?
            {
                Attempt::Applied | Attempt::Duplicate => applied += 1,
                Attempt::Failed(failure) => {
                    tracing::warn!(
                        projection = P::NAME, stream = %event.stream, version = event.version,
                        attempts = failure.attempts, error = %failure.error,
                        "parking the event as a dead letter"
                    );
                    self.park(unit, event, &failure).await?;
                    parked += 1;
                    if self.policy.mode == FailureMode::BlockStream {
                        blocked.insert(event.stream.clone());
                    }
                }
            }
        }
        // Compare-and-set from the window's start; on any other outcome the unit rolls back.
        self.backend.advance_checkpoint(unit, from, last).await?;
        Ok(Batch {
            read: page.len(),
            applied,
            parked,
            checkpoint: last,
        })
    }

    async fn park<T>(
        &mut self,
        unit: &mut B::Unit,
        event: &StoredEvent<T>,
        failure: &Failure,
    ) -> Result<(), DeliveryError> {
        self.no_dead_letters = false;
        self.backend
            .park_event(
                unit,
                Parked {
                    event_id: event.event_id,
                    stream: &event.stream,
                    version: event.version,
                    failure,
                },
            )
            .await
    }

    /// Applies one event by the policy's retries (inside a savepoint on a transactional
    /// backend), claiming it first ([`DeliveryBackend::claim`]).
    ///
    /// # Errors
    /// A failing backend, or the handler's error when it is an outage
    /// ([`DeliveryBackend::is_outage`]): not the event's fault, so it is neither retried nor
    /// parked.
    async fn apply_with_retries<T: Deliverable>(
        &mut self,
        unit: &mut B::Unit,
        event: &StoredEvent<T>,
    ) -> Result<Attempt, DeliveryError> {
        let mut retries = self.policy.retries();
        loop {
            if B::TRANSACTIONAL {
                self.backend.savepoint(unit, Savepoint::Set).await?;
            }
            if !self.backend.claim(unit, event).await? {
                if B::TRANSACTIONAL {
                    self.backend.savepoint(unit, Savepoint::Release).await?;
                }
                return Ok(Attempt::Duplicate);
            }
            let context = self.backend.unit_context(unit);
            // In the event's trace: what the handler sends (a command) continues it.
            let trace = crate::trace::TraceContext::of(&event.metadata);
            let applied = T::apply_to(event, &mut self.projection, context);
            match crate::trace::scope_if_needed(trace, applied).await {
                Ok(_) => {
                    if B::TRANSACTIONAL {
                        self.backend.savepoint(unit, Savepoint::Release).await?;
                    }
                    return Ok(Attempt::Applied);
                }
                Err(error) => {
                    if B::TRANSACTIONAL {
                        self.backend.savepoint(unit, Savepoint::Rollback).await?;
                    }
                    if self.backend.is_outage(&error) {
                        return Err(error.into());
                    }
                    if let Some(failure) = retries.failed(&error).await {
                        return Ok(Attempt::Failed(failure));
                    }
                }
            }
        }
    }

    /// Applies events received from a broker (in the order received) in one unit of work, by
    /// the same rules as a window of the store: each is claimed in the backend's inbox (a
    /// redelivery is [`Delivered::Duplicate`]), applied with the policy's retries, and parked
    /// when it keeps failing; under [`FailureMode::BlockStream`] an event whose stream has a
    /// dead letter is parked behind it ([`WAITS_BEHIND`]). An event that is itself the first
    /// dead letter of its stream (an operator sent it back) is tried again: applied, its letter
    /// is removed and the events parked behind it may follow; failed, the letter keeps the new
    /// error. An event of one of the projection's aggregate types whose event type it does not
    /// know is parked at once (a producer newer than this consumer, or a foreign message).
    ///
    /// There is no checkpoint to move: the caller acknowledges the messages to the broker after
    /// this returns `Ok` (the unit committed), and sends the parked ones to the broker's
    /// dead-letter place first. On `Err` nothing of the batch was kept: acknowledge nothing and
    /// try again later (the inbox drops what a lost commit acknowledgment kept after all).
    ///
    /// # Errors
    /// [`DeliveryError::LeaseLost`] (a backend that owns nothing never says it), a failing
    /// backend, a handler's outage ([`DeliveryBackend::is_outage`]).
    pub async fn deliver(
        &mut self,
        events: &[StoredEvent],
    ) -> Result<Vec<Delivered>, DeliveryError> {
        self.owns()?;
        let started = std::time::Instant::now();
        let outcome = if B::TRANSACTIONAL {
            match self.deliver_unit(events, false).await {
                Err(DeliveryError::Projection(error)) if !self.backend.is_outage(&error) => {
                    tracing::debug!(projection = P::NAME, %error, "a handler failed: delivering event by event");
                    self.deliver_unit(events, true).await
                }
                done => done,
            }
        } else {
            self.deliver_unit(events, true).await
        };
        let delivered = match outcome {
            Ok(delivered) => delivered,
            Err(error) => {
                self.count_failure();
                return Err(error);
            }
        };
        let step = Batch {
            read: events.len(),
            applied: delivered
                .iter()
                .filter(|d| **d == Delivered::Applied)
                .count(),
            parked: delivered
                .iter()
                .filter(|d| matches!(d, Delivered::Parked(_)))
                .count(),
            checkpoint: Checkpoint::START,
        };
        self.count(&step, started.elapsed());
        Ok(delivered)
    }

    async fn deliver_unit(
        &mut self,
        events: &[StoredEvent],
        careful: bool,
    ) -> Result<Vec<Delivered>, DeliveryError> {
        let mut unit = self.backend.begin_unit().await?;
        let heartbeat = self.backend.ownership_heartbeat();
        let outcome = tokio::select! {
            outcome = async {
                let mut delivered = Vec::with_capacity(events.len());
                for event in events {
                    let one = self
                        .deliver_one(&mut unit, event, careful)
                        .instrument(event_span(P::NAME, event))
                        .await?;
                    delivered.push(one);
                }
                Ok(delivered)
            } => outcome,
            never = heartbeat => match never {},
        };
        self.end(unit, outcome).await
    }

    async fn deliver_one(
        &mut self,
        unit: &mut B::Unit,
        event: &StoredEvent,
        careful: bool,
    ) -> Result<Delivered, DeliveryError> {
        let unknown = if P::subscribes_to(event) {
            None
        } else {
            match unknown_event_type::<P, _>(event) {
                None => return Ok(Delivered::Skipped),
                Some(reason) => Some(reason),
            }
        };
        // The first dead letter of the stream, and this event's own letter if it has one.
        let head = self
            .backend
            .letters_of(unit, &event.stream, None, 1)
            .await?
            .pop();
        let own = match &head {
            None => None,
            Some(head) if head.event_id == event.event_id => Some(head.id),
            Some(_) => self
                .backend
                .letters_of(unit, &event.stream, event.version.checked_sub(1), 1)
                .await?
                .pop()
                .filter(|letter| letter.event_id == event.event_id)
                .map(|letter| letter.id),
        };
        // An earlier event than the dead letter (a redelivery) does not wait behind it.
        let behind = head
            .is_some_and(|head| head.event_id != event.event_id && event.version >= head.version);
        if behind && self.policy.mode == FailureMode::BlockStream {
            let waits = Failure {
                error: WAITS_BEHIND.to_owned(),
                attempts: 0,
                first_failed_at: Utc::now(),
            };
            // Already parked behind it (sent back too early): it stays as it was.
            if own.is_none() {
                self.park(unit, event, &waits).await?;
            }
            return Ok(Delivered::Parked(waits));
        }
        let attempt = if let Some(reason) = unknown {
            Attempt::Failed(Failure {
                error: reason,
                attempts: 0,
                first_failed_at: Utc::now(),
            })
        } else if careful {
            self.apply_with_retries(unit, event).await?
        } else if self.backend.claim(unit, event).await? {
            let context = self.backend.unit_context(unit);
            self.projection.apply(event, context).await?;
            Attempt::Applied
        } else {
            Attempt::Duplicate
        };
        match attempt {
            Attempt::Applied | Attempt::Duplicate => {
                if let Some(id) = own {
                    self.backend.resolve_letter(unit, id).await?;
                }
                Ok(if attempt == Attempt::Applied {
                    Delivered::Applied
                } else {
                    Delivered::Duplicate
                })
            }
            Attempt::Failed(failure) => {
                tracing::warn!(
                    projection = P::NAME, stream = %event.stream, version = event.version,
                    attempts = failure.attempts, error = %failure.error,
                    "parking the event as a dead letter"
                );
                match own {
                    Some(id) => {
                        self.backend
                            .fail_letter_again(unit, id, &failure.error)
                            .await?;
                    }
                    None => self.park(unit, event, &failure).await?,
                }
                Ok(Delivered::Parked(failure))
            }
        }
    }

    /// Parks a stored row that cannot be read as an event (the first after `from`) as a dead
    /// letter naming it, if the projection subscribes to its type, and moves the checkpoint past
    /// it, in one unit: one bad row never stops the projection. Under
    /// [`FailureMode::BlockStream`] later events of its stream wait behind it, as behind any dead
    /// letter.
    async fn pass_corrupt(
        &mut self,
        from: Checkpoint,
        corrupt: &CorruptEvent,
    ) -> Result<Batch, DeliveryError> {
        let subscribed = P::SUBSCRIPTIONS
            .iter()
            .any(|s| s.matches_type(&corrupt.stream.aggregate_type, &corrupt.event_type));
        self.no_dead_letters = false;
        let mut unit = self.backend.begin_unit().await?;
        let outcome = async {
            if subscribed {
                tracing::warn!(projection = P::NAME, stream = %corrupt.stream, version = corrupt.version, checkpoint = %corrupt.checkpoint, error = %corrupt, "parking an unreadable stored event as a dead letter");
                let failure = Failure {
                    error: corrupt.to_string(),
                    attempts: 1,
                    first_failed_at: Utc::now(),
                };
                self.backend
                    .park_event(
                        &mut unit,
                        Parked {
                            event_id: corrupt.event_id,
                            stream: &corrupt.stream,
                            version: corrupt.version,
                            failure: &failure,
                        },
                    )
                    .await?;
            }
            self.backend
                .advance_checkpoint(&mut unit, from, corrupt.checkpoint)
                .await
        }
        .await;
        self.end(unit, outcome).await?;
        let step = Batch {
            read: 1,
            applied: 0,
            parked: usize::from(subscribed),
            checkpoint: corrupt.checkpoint,
        };
        self.count(&step, Duration::ZERO);
        Ok(step)
    }

    /// Applies the dead letters of `stream` again, in version order, in one unit (a page of
    /// letters at a time, each event read again from the store): each one that applies is
    /// removed; the first that fails again stays (with the new error) and so do the ones after
    /// it.
    ///
    /// # Errors
    /// [`DeliveryError::LeaseLost`], a failing backend.
    pub async fn retry(&mut self, stream: &StreamId) -> Result<Redrive, DeliveryError> {
        self.owns()?;
        let mut unit = self.backend.begin_unit().await?;
        let outcome = self.retry_in(&mut unit, stream).await;
        self.end(unit, outcome).await
    }

    async fn retry_in(
        &mut self,
        unit: &mut B::Unit,
        stream: &StreamId,
    ) -> Result<Redrive, DeliveryError> {
        self.backend.begin_redrive(unit, stream).await?;
        let mut redrive = Redrive::default();
        let mut after = None;
        loop {
            let letters = self
                .backend
                .letters_of(unit, stream, after, REDRIVE_PAGE)
                .await?;
            let last_page = letters.len() < REDRIVE_PAGE;
            for letter in letters {
                after = Some(letter.version);
                let failure = match self.backend.reread_letter(unit, &letter).await? {
                    Ok(event) => match self.apply_with_retries(unit, &event).await? {
                        Attempt::Applied | Attempt::Duplicate => None,
                        Attempt::Failed(failure) => Some(failure),
                    },
                    Err(error) => Some(Failure {
                        error,
                        attempts: 1,
                        first_failed_at: letter.first_failed_at,
                    }),
                };
                match failure {
                    None => {
                        self.backend.resolve_letter(unit, letter.id).await?;
                        redrive.applied += 1;
                    }
                    Some(failure) => {
                        self.backend
                            .fail_letter_again(unit, letter.id, &failure.error)
                            .await?;
                        redrive.failed += 1;
                        return Ok(redrive);
                    }
                }
            }
            if last_page {
                return Ok(redrive);
            }
        }
    }

    /// [`Engine::retry`] for every stream with dead letters.
    ///
    /// # Errors
    /// As [`Engine::retry`].
    pub async fn retry_all(&mut self) -> Result<Redrive, DeliveryError> {
        self.owns()?;
        let mut unit = self.backend.begin_unit().await?;
        let streams = self.backend.blocked_streams(&mut unit).await;
        self.backend.end_unit(unit, false).await?;
        let mut total = Redrive::default();
        for stream in streams? {
            let done = self.retry(&stream).await?;
            total.applied += done.applied;
            total.failed += done.failed;
        }
        Ok(total)
    }

    /// Rebuilds from the first event with the backend's reset (read model, checkpoint and dead
    /// letters in one unit), then catches up. Writers may keep writing meanwhile: the result
    /// equals a clean replay.
    ///
    /// # Errors
    /// As [`DeliveryBackend::reset_for_rebuild`] and [`Engine::catch_up`].
    pub async fn rebuild(&mut self) -> Result<usize, DeliveryError> {
        self.owns()?;
        let mut unit = self.backend.begin_unit().await?;
        let outcome = self.backend.reset_for_rebuild(&mut unit).await;
        self.end(unit, outcome).await?;
        tracing::info!(projection = P::NAME, "rebuilding from the first event");
        self.catch_up().await
    }

    /// Answers the operators' requests (see [`DeliveryBackend::pending_requests`]): a rebuild, then the
    /// dead letters asked to be retried, stream by stream. Returns whether there was anything to
    /// do.
    ///
    /// # Errors
    /// [`DeliveryError::LeaseLost`], a failing backend; a failed rebuild is recorded for the
    /// operator and returned.
    pub async fn serve_requests(&mut self) -> Result<bool, DeliveryError> {
        self.owns()?;
        let requests = self.backend.pending_requests().await?;
        let served = !requests.is_empty();
        for request in requests {
            match &request {
                Request::Rebuild => {
                    let outcome = self.rebuild().await.map(|_| ());
                    if let Err(error) = &outcome {
                        self.backend
                            .request_answered(&request, Err(error.to_string()))
                            .await?;
                    }
                    outcome?;
                }
                Request::Retry(stream) => {
                    let redrive = self.retry(stream).await?;
                    tracing::info!(projection = P::NAME, %stream, applied = redrive.applied, failed = redrive.failed, "dead letters retried on request");
                }
            }
        }
        Ok(served)
    }

    /// Keeps the projection up to date until `shutdown` completes: catches up, serves the
    /// operators' requests, waits for the store's commit signal or `poll` (whichever comes
    /// first), and again. On a transactional backend a shutdown drops the batch in flight, which
    /// rolls back whole (or is found committed), never half of it; on one without rollback (state
    /// in the process) the batch in flight finishes first, so state and checkpoint never part.
    ///
    /// Failures that heal are ridden out: a broken connection, a server restarting or
    /// terminating connections, a timeout are logged (`warn`) and the work is tried again after
    /// a backoff (50 ms doubling to 5 s, with jitter); each try starts from the stored checkpoint,
    /// so nothing is applied twice or skipped.
    ///
    /// # Errors
    /// Only what the backend says waiting cannot heal ([`DeliveryBackend::is_permanent`]).
    pub async fn run(
        &mut self,
        poll: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), DeliveryError> {
        let mut wakeups = self.backend.event_store().commit_signal();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            if let Some(signal) = &mut wakeups {
                signal.borrow_and_update();
            }
            let worked = if B::TRANSACTIONAL {
                // A shutdown drops the batch in flight: its unit rolls back whole.
                tokio::select! {
                    worked = self.work_once(None::<std::pin::Pin<&mut std::future::Pending<()>>>) => worked,
                    () = &mut shutdown => return Ok(()),
                }
            } else {
                // In-process state has no rollback: stop only between batches, so state and
                // checkpoint never part.
                match self.work_once(Some(shutdown.as_mut())).await {
                    Ok(true) => return Ok(()),
                    other => other,
                }
            };
            let wait = match worked {
                Ok(_) => {
                    backoff.reset();
                    poll
                }
                Err(error) if self.backend.is_permanent(&error) => return Err(error),
                Err(error) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(projection = P::NAME, %error, retry_in = ?wait, "projection failed; trying again");
                    wait
                }
            };
            let woken = async {
                match &mut wakeups {
                    Some(signal) => {
                        if tokio::time::timeout(wait, signal.changed())
                            .await
                            .is_ok_and(|changed| changed.is_err())
                        {
                            // The store is gone: no more signals, poll from now on.
                            tokio::time::sleep(wait).await;
                        }
                    }
                    None => tokio::time::sleep(wait).await,
                }
            };
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = woken => {}
            }
        }
    }

    /// One round of [`run`](Self::run): take or renew ownership, step until caught up, serve the
    /// operators' requests. With `shutdown`, it is checked between steps: `Ok(true)` when it has
    /// completed.
    async fn work_once<F: Future<Output = ()>>(
        &mut self,
        mut shutdown: Option<std::pin::Pin<&mut F>>,
    ) -> Result<bool, DeliveryError> {
        self.no_dead_letters = false;
        if !self.backend.acquire_ownership().await? {
            return Ok(false);
        }
        loop {
            let step = self.step().await;
            if let Some(shutdown) = shutdown.as_mut()
                && futures::FutureExt::now_or_never(shutdown.as_mut()).is_some()
            {
                return Ok(true);
            }
            match step {
                Ok(step) if step.read == 0 => break,
                Ok(_) | Err(DeliveryError::CheckpointMoved { .. }) => {}
                Err(DeliveryError::LeaseLost { .. }) => return Ok(false),
                Err(error) => return Err(error),
            }
        }
        if let Err(error) = self.serve_requests().await {
            if matches!(error, DeliveryError::Store(StoreError::Backend(_))) {
                return Err(error);
            }
            tracing::warn!(projection = P::NAME, %error, "serving an operator request failed");
        }
        Ok(false)
    }
}

/// The subscribed events among the next `batch` events after `from`.
///
/// Where few events are subscribed, the store filters (only those travel, and the checkpoint
/// still moves past the others); where most are, it is cheaper to read the window as it is and
/// filter here (the filtering query costs the server a materialized window). `dense` says which;
/// the result says which to use next, from what this window held: the plain read above half
/// subscribed, the filtered one below a quarter. Both give the same events.
///
/// # Errors
/// The store's, including [`StoreError::Corrupt`] for a first row it cannot read.
pub async fn read_window<S: EventStore>(
    store: S,
    from: Checkpoint,
    batch: usize,
    dense: bool,
    subscriptions: &'static [Subscription],
    subscribes_to: fn(&RawStoredEvent) -> bool,
) -> Result<Window, StoreError> {
    if !dense {
        let (events, last) = store.read_filtered_raw(from, batch, subscriptions).await?;
        let dense = events.len() * 2 > batch;
        return Ok(Window {
            events,
            last,
            dense,
        });
    }
    let mut events = store.read_all_raw(from, batch).await?;
    let last = events.last().map_or(from, |e| e.checkpoint);
    let scanned = events.len();
    events.retain(subscribes_to);
    let dense = events.len() * 4 >= scanned;
    Ok(Window {
        events,
        last,
        dense,
    })
}
