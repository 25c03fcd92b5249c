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

mod apply;
mod backend;
mod deliver;
mod lag;
mod redrive;

use apply::Attempt;
pub use backend::{DeliveryBackend, Parked, Request, Savepoint};

use std::time::Duration;

use super::failure::{Failure, FailurePolicy};
use super::runner::{Batch, ProjectionMetrics};
use super::{Lag, LeaseLoss, Projection, ProjectionError, Subscription};
use crate::envelope::{Checkpoint, RawStoredEvent, StoredEvent};
use crate::store::{EventStore, StoreError};
use crate::telemetry::MetricsHandle;

fn lease_lost(projection: &str, epoch: Option<i64>, loss: LeaseLoss) -> String {
    match (loss, epoch) {
        (LeaseLoss::NotHeld, _) => format!(
            "this worker holds no lease on projection `{projection}`: call `acquire()` first (or \
             `run`, which takes it once no other worker holds it)"
        ),
        (loss, Some(epoch)) => format!(
            "the worker of projection `{projection}` lost its lease (it held epoch {epoch}): {loss}"
        ),
        (loss, None) => format!("the worker of projection `{projection}` lost its lease: {loss}"),
    }
}
/// Why the engine stopped a batch (nothing of it was kept, for a transactional backend).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// This worker does not own the projection (any more): it never took the lease, another
    /// worker took it over, its lease ran out while it stalled, or the checkpoint row is gone
    /// (`loss` says which). This worker's last batch was rolled back and nothing it did after
    /// losing the lease was kept.
    #[error("{}", lease_lost(projection, *epoch, *loss))]
    LeaseLost {
        /// The projection.
        projection: &'static str,
        /// The epoch this worker held when it found the lease lost, if any.
        epoch: Option<i64>,
        /// Why.
        loss: LeaseLoss,
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
/// How many dead letters a redrive reads at a time.
const REDRIVE_PAGE: usize = 500;
/// How many times the batch a window may grow to while the engine is behind, unless set
/// ([`Engine::set_max_batch`]).
const GROWTH: usize = 8;
/// The engine: a projection, its backend, and the rules.
pub struct Engine<P: Projection, B> {
    projection: P,
    backend: B,
    batch: usize,
    /// The most a window grows to while the engine is behind.
    max_batch: usize,
    /// How many events the next window reads: `batch`, doubled after each window that moved the
    /// checkpoint up to `max_batch`, back to `batch` once a window finds nothing new or a batch
    /// fails.
    window: usize,
    policy: FailurePolicy,
    metrics: MetricsHandle<ProjectionMetrics>,
    /// When the store last started counting the lag.
    lag_counted: Option<tokio::time::Instant>,
    /// The least time between the starts of two counts (see [`lag::count_spacing`]).
    lag_every: Duration,
    /// The store's count of the lag, running beside the batches.
    lag_count: Option<lag::Count>,
    /// Whether most events read lately were subscribed ones: then the plain ordered read (and
    /// filtering here) is cheaper than asking the store to filter.
    dense: bool,
    /// Known: the projection has no dead letters. Only the owner parks events (a unit that
    /// parks under a lost ownership rolls back), and operators, retries and rebuilds only remove
    /// letters, so once a batch found none, none appear until this engine parks one: the next
    /// batches skip asking the backend for blocked streams (a round trip per batch). Forgotten
    /// on any park, any failed batch and whenever ownership is lost or taken (again).
    no_dead_letters: bool,
    /// The segment this engine applies, if the projection runs in segments: events of other
    /// streams, and those an earlier segment applied, are passed.
    segment: Option<super::SegmentState>,
}
impl<P: Projection, B> std::fmt::Debug for Engine<P, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("projection", &P::NAME)
            .field("batch", &self.batch)
            .field("max_batch", &self.max_batch)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<P: Projection, B> Engine<P, B> {
    /// An engine for `projection` on `backend`, reading `batch` events at a time, and up to
    /// eight times as many while it is behind ([`Engine::set_max_batch`]).
    pub fn new(projection: P, backend: B, batch: usize) -> Self {
        let batch = batch.max(1);
        Self {
            projection,
            backend,
            batch,
            max_batch: batch.saturating_mul(GROWTH),
            window: batch,
            policy: FailurePolicy::default(),
            metrics: MetricsHandle::default(),
            lag_counted: None,
            lag_every: lag::LAG_SAMPLE_EVERY,
            lag_count: None,
            dense: false,
            no_dead_letters: false,
            segment: None,
        }
    }

    /// Applies only the events `segment` admits ([`SegmentState::admits`](super::SegmentState::admits));
    /// `None`: all of them.
    pub fn set_segment(&mut self, segment: Option<super::SegmentState>) {
        self.segment = segment;
    }

    /// The segment this engine applies, if any.
    #[must_use]
    pub fn segment(&self) -> Option<&super::SegmentState> {
        self.segment.as_ref()
    }

    /// What to do with events the projection keeps failing on.
    pub fn set_policy(&mut self, policy: FailurePolicy) {
        self.policy = policy;
        self.no_dead_letters = false;
    }

    /// How many events a step reads when the engine is not behind (at least 1); the most it
    /// reads while behind becomes eight times that (set it after with
    /// [`Engine::set_max_batch`]).
    pub fn set_batch(&mut self, batch: usize) {
        self.batch = batch.max(1);
        self.max_batch = self.batch.saturating_mul(GROWTH);
        self.window = self.batch;
    }

    /// The most events a step reads while the engine is behind (at least the batch; the batch
    /// itself turns the growth off).
    ///
    /// Each window that moved the checkpoint doubles the next one, up to this; a window that
    /// finds nothing new, or a batch that fails, brings it back to the batch. A projection that
    /// keeps up reads a few events at a time whatever this is; one catching up (a rebuild, a
    /// new version, a worker back after a pause) pays its unit of work's fixed costs (a
    /// transaction, the checkpoint's compare-and-set, the commit's flush) once per large window
    /// instead of once per batch. The price: a unit of work holds its read-model writes longer,
    /// and a batch rolled back redoes more.
    pub fn set_max_batch(&mut self, max_batch: usize) {
        self.max_batch = max_batch.max(self.batch);
        self.window = self.window.min(self.max_batch);
    }

    /// The batch size (when not behind).
    #[must_use]
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The most a window grows to while behind.
    #[must_use]
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// How many events the next window reads.
    #[must_use]
    pub fn window(&self) -> usize {
        self.window
    }

    /// After a window: doubles the next one (up to the maximum) when this one moved the
    /// checkpoint (more may be waiting), else back to the batch.
    fn next_window(&mut self, moved: bool) {
        self.window = if moved {
            self.window.saturating_mul(2).min(self.max_batch)
        } else {
            self.batch
        };
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
            self.window,
            self.dense,
            P::SUBSCRIPTIONS,
            P::subscribes_to,
        )
        .await;
        let step = match window {
            Ok(window) => self.apply_window(from, window).await,
            Err(StoreError::Corrupt(corrupt)) => self.pass_corrupt(from, &corrupt).await,
            Err(error) => Err(error.into()),
        };
        self.next_window(step.as_ref().is_ok_and(|step| step.checkpoint != from));
        step
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
        self.window = self.batch;
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
                    self.next_window(false);
                    self.caught_up();
                    return Ok(applied);
                }
                // The store holds committed events back for a moment (an older transaction is
                // still open): wait for them rather than stop short.
                self.next_window(false);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
                next = self.prefetch(from, window.dense);
                continue;
            }
            pause = Duration::from_millis(2);
            // The next window is read while this one is applied; if this one does not commit,
            // the prefetched window is dropped. More may be waiting: it is larger.
            self.next_window(true);
            next = self.prefetch(last, window.dense);
            match self.apply_window(from, window).await {
                Ok(step) => {
                    applied += step.applied;
                    from = last;
                }
                Err(DeliveryError::CheckpointMoved { stored, .. }) => {
                    // An earlier commit went through after all: on from what it stored.
                    next.abort();
                    self.next_window(false);
                    from = stored;
                    next = self.prefetch(from, self.dense);
                }
                Err(error) => {
                    next.abort();
                    self.next_window(false);
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
            self.window,
            dense,
            P::SUBSCRIPTIONS,
            P::subscribes_to::<Box<serde_json::value::RawValue>>,
        ))
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
                Err(error @ DeliveryError::LeaseLost { .. }) => {
                    // Taken again once free, from the stored checkpoint; say why it was lost
                    // (a stalled worker and a twin under one name need different fixes).
                    tracing::warn!(projection = P::NAME, %error, "projection lease lost");
                    return Ok(false);
                }
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
