//! PostgreSQL projections: the core's delivery engine ([`evently_core::projection::Engine`]) on a
//! PostgreSQL backend. The read-model change and the checkpoint move commit in one transaction,
//! the checkpoint moves by compare-and-set from the window's start under the epoch of the lease
//! that makes one worker the owner at a time, and dead letters and operator requests live in the
//! schema's tables.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use evently_core::projection::{
    Batch, DeadLetter, FailureMode, FailurePolicy, ProjectionMetrics, Redrive,
};
use evently_core::projection::{DeliveryBackend, DeliveryError, Engine, Projection};
use evently_core::{Checkpoint, StoreError, StreamId};
use futures::future::BoxFuture;
use sqlx::PgConnection;

use crate::{CheckpointLease, PostgresEventStore};

/// Why a projection worker stopped: the engine's [`DeliveryError`].
pub type WorkerError = DeliveryError;

/// Whether waiting cannot heal `error`: the schema or its tables do not exist (run the
/// migrations), the database refuses this user, or the projection failed outside its retries.
/// Connection failures, a server restarting, a lost lease and timeouts heal, and
/// [`ProjectionWorker::run`] rides them out.
#[must_use]
pub fn is_permanent(error: &WorkerError) -> bool {
    match error {
        DeliveryError::LeaseLost { .. } | DeliveryError::CheckpointMoved { .. } => false,
        DeliveryError::Projection(_) => true,
        DeliveryError::Store(StoreError::Backend(source)) => {
            source.downcast_ref::<sqlx::Error>().is_some_and(|e| {
                matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|code| {
                    // undefined_table, undefined_column, invalid_schema_name,
                    // insufficient_privilege, undefined_function
                    matches!(&*code, "42P01" | "42703" | "3F000" | "42501" | "42883")
                }))
            })
        }
        // A request the store refuses for good (a retired version's worker).
        DeliveryError::Store(StoreError::InvalidInput(_)) => true,
        DeliveryError::Store(_) => false,
    }
}

mod backend;
pub(crate) mod letters;
mod segments;

pub use backend::{InboxBackend, PostgresBackend};
pub use segments::SegmentedWorker;

/// Empties a read model inside the rebuild's transaction.
type Reset = Arc<
    dyn for<'c> Fn(&'c mut PgConnection) -> BoxFuture<'c, Result<(), sqlx::Error>> + Send + Sync,
>;

/// A one-shot reset given to [`ProjectionWorker::rebuild`].
type ResetOnce =
    Box<dyn for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<(), sqlx::Error>> + Send>;

/// Runs one projection whose handlers write through the transaction (`Context = PgConnection`):
/// the core's delivery [`Engine`] on a [`PostgresBackend`].
///
/// Each [`step`](ProjectionWorker::step) reads a batch after the checkpoint, applies it in one
/// transaction and moves the checkpoint in that same transaction by compare-and-set from the
/// window's start, naming this worker's lease epoch: a crash anywhere before the commit leaves
/// the read model and the checkpoint as they were, a worker that lost its lease (paused past it
/// while another took over) can never commit, and a step cut after `COMMIT` was sent and retried
/// at once applies nothing twice.
pub struct ProjectionWorker<P: Projection> {
    engine: Engine<P, PostgresBackend>,
}

impl<P: Projection> std::fmt::Debug for ProjectionWorker<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionWorker")
            .field("projection", &P::NAME)
            .field("backend", self.engine.backend())
            .field("batch", &self.engine.batch())
            .finish_non_exhaustive()
    }
}

impl<P: Projection<Context = PgConnection>> ProjectionWorker<P> {
    /// A worker named `owner` (unique per process) for `projection`, with a 30 s lease, batches of
    /// 2,000 events and the default [`FailurePolicy`].
    pub fn new(store: PostgresEventStore, projection: P, owner: impl Into<String>) -> Self {
        let backend = PostgresBackend {
            lease: CheckpointLease::new(store.clone(), P::NAME, owner, Duration::from_secs(30)),
            store,
            reset: None,
            reset_once: std::sync::Mutex::new(None),
            hold: false,
            held: None,
            segment: None,
            registered: false,
            auto_promote: None,
        };
        Self {
            engine: Engine::new(projection, backend, 2_000),
        }
    }

    /// How to empty the read model (e.g. `TRUNCATE` its tables): lets an operator rebuild the
    /// projection with `cqrs projections rebuild` while this worker runs (see
    /// [`crate::control`]). Without it such a request is answered with an error saying so.
    #[must_use]
    pub fn with_reset<F>(mut self, reset: F) -> Self
    where
        F: for<'c> Fn(&'c mut PgConnection) -> BoxFuture<'c, Result<(), sqlx::Error>>
            + Send
            + Sync
            + 'static,
    {
        self.engine.backend_mut().reset = Some(Arc::new(reset));
        self
    }

    /// What to do with events the projection keeps failing on.
    #[must_use]
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.engine.set_policy(policy);
        self
    }

    /// How long the lease lasts without a renewal (each checkpoint move renews it, and a
    /// heartbeat every third of it while a batch runs); clamped to between
    /// [`MIN_LEASE`](crate::lease::MIN_LEASE) and a day.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        let backend = self.engine.backend_mut();
        backend.lease = backend.lease.clone().with_lease(lease);
        self
    }

    /// Promotes this version of the projection by itself once it has caught up with the live
    /// one, as `promotion` says (checked after every catch-up, so its wait is not used; its
    /// [`retire_after`](crate::versions::Promotion::retire_after) is; see
    /// [`crate::versions::promote`]). Without it an operator promotes it (`cqrs projections
    /// promote`).
    #[must_use]
    pub fn with_auto_promote(mut self, promotion: crate::versions::Promotion) -> Self {
        self.engine.backend_mut().auto_promote = Some(promotion);
        self
    }

    /// How many events one step reads when the worker is not behind (2,000 unless set; one
    /// transaction each); while it is behind, each window that moved the checkpoint doubles the
    /// next, up to eight times this unless [`with_max_batch`](Self::with_max_batch) says
    /// otherwise.
    #[must_use]
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.engine.set_batch(batch);
        self
    }

    /// The most events one step reads while the worker is behind (a catch-up, a rebuild): 16,000
    /// by default, eight times the batch; the batch itself turns the growth off. A larger window
    /// pays the transaction, the checkpoint's compare-and-set and the commit's flush once for
    /// more events; it holds its read-model writes longer, and a batch that fails redoes more
    /// (see [`Engine::set_max_batch`](evently_core::projection::engine::Engine::set_max_batch)).
    /// Set it after [`with_batch`](Self::with_batch).
    #[must_use]
    pub fn with_max_batch(mut self, max_batch: usize) -> Self {
        self.engine.set_max_batch(max_batch);
        self
    }

    /// The worker's counters.
    #[must_use]
    pub fn metrics(&self) -> ProjectionMetrics {
        self.engine.metrics()
    }

    /// The counters, readable while the worker runs: take it before calling `run`.
    #[must_use]
    pub fn metrics_handle(&self) -> evently_core::telemetry::MetricsHandle<ProjectionMetrics> {
        self.engine.metrics_handle()
    }

    /// How many committed events the projection has still to read (an exact count; see
    /// [`lag_detail`](Self::lag_detail) for their age too).
    ///
    /// # Errors
    /// [`WorkerError::Store`] when the database fails.
    pub async fn lag(&self) -> Result<u64, WorkerError> {
        Ok(self.lag_detail().await?.events)
    }

    /// How far the projection is behind: the committed events after its checkpoint and how long
    /// ago the oldest of them was recorded.
    ///
    /// # Errors
    /// [`WorkerError::Store`] when the database fails.
    pub async fn lag_detail(&self) -> Result<evently_core::projection::Lag, WorkerError> {
        let checkpoint = self.checkpoint().await?;
        Ok(self.engine.backend().store.lag_after(checkpoint).await?)
    }

    /// The projection (e.g. to read in-process state in tests).
    pub fn projection(&self) -> &P {
        self.engine.projection()
    }

    /// Takes (or renews) the lease; `false` while another worker's lease is live.
    ///
    /// # Errors
    /// [`WorkerError::Store`] when the database fails.
    pub async fn acquire(&mut self) -> Result<bool, WorkerError> {
        DeliveryBackend::<P>::acquire_ownership(self.engine.backend_mut()).await
    }

    /// The stored checkpoint of the projection.
    ///
    /// # Errors
    /// [`WorkerError::Store`] when the database fails.
    pub async fn checkpoint(&self) -> Result<Checkpoint, WorkerError> {
        Ok(self.engine.backend().lease.checkpoint().await?)
    }

    /// Applies the next batch after the checkpoint in one transaction, with the checkpoint move.
    /// A stored row no reader can decode is parked as a dead letter naming its position, and
    /// passed.
    ///
    /// # Errors
    /// [`WorkerError::LeaseLost`] when this worker does not own the projection (nothing is
    /// committed), [`WorkerError::CheckpointMoved`] after an in-doubt commit of this worker went
    /// through (nothing of this batch is kept; step again), [`WorkerError::Store`].
    pub async fn step(&mut self) -> Result<Batch, WorkerError> {
        self.engine.step().await
    }

    /// Steps until every event committed before the call is applied (or parked); returns how
    /// many events were applied. See [`Engine::catch_up`].
    ///
    /// # Errors
    /// As [`ProjectionWorker::step`].
    pub async fn catch_up(&mut self) -> Result<usize, WorkerError> {
        self.engine.catch_up().await
    }

    /// Keeps the projection up to date until `shutdown` completes: catches up from the checkpoint,
    /// serves the operators' requests, then waits for a commit wake-up
    /// ([`EventStore::commit_signal`](evently_core::EventStore::commit_signal): one listening
    /// connection per store, outside the pool, whatever runs on it) or `poll` (a lost notification
    /// costs at most one poll interval), and again. A shutdown rolls back the batch in flight (or
    /// finds it committed), never half of it. The lease is renewed on every wake-up; a worker that
    /// loses it keeps trying to take it back and otherwise stays idle.
    ///
    /// Failures that heal are ridden out: a broken connection, a server restarting or terminating
    /// connections, a timeout are logged (`warn`) and the work is tried again after a backoff
    /// (50 ms doubling to 5 s, with jitter); each try starts from the stored checkpoint, so nothing
    /// is applied twice or skipped. Returns the projection on shutdown.
    ///
    /// # Errors
    /// Only what waiting cannot heal ([`is_permanent`]): the schema or its tables do not exist
    /// (run the migrations), the database refuses this user.
    pub async fn run(
        mut self,
        poll: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<P, WorkerError> {
        self.engine.run(poll, shutdown).await?;
        Ok(self.engine.into_parts().0)
    }

    /// Answers the operators' requests on this projection (see [`crate::control`]): a rebuild
    /// (with the reset given to [`with_reset`](Self::with_reset); without one the request is
    /// answered with an error saying so), then the dead letters asked to be retried, stream by
    /// stream. [`run`](Self::run) calls it after every catch-up; call it yourself when driving
    /// [`step`](Self::step). Returns whether there was anything to do.
    ///
    /// # Errors
    /// [`WorkerError::LeaseLost`] when this worker does not own the projection, store failures.
    /// A failed rebuild is recorded for the operator and returned.
    pub async fn serve_requests(&mut self) -> Result<bool, WorkerError> {
        self.engine.serve_requests().await
    }

    /// Applies the dead letters of `stream` again, in version order, in one transaction under this
    /// worker's lease (a page of letters at a time): each one that applies is removed; the first
    /// that fails again stays (with the new error) and so do the ones after it.
    ///
    /// # Errors
    /// [`WorkerError::LeaseLost`] when this worker does not own the projection, store failures.
    pub async fn retry(&mut self, stream: &StreamId) -> Result<Redrive, WorkerError> {
        self.engine.retry(stream).await
    }

    /// [`ProjectionWorker::retry`] for every stream with dead letters.
    ///
    /// # Errors
    /// As [`ProjectionWorker::retry`].
    pub async fn retry_all(&mut self) -> Result<Redrive, WorkerError> {
        self.engine.retry_all().await
    }

    /// Rebuilds the read model from the first event: in one transaction under this worker's lease,
    /// runs `reset` (which empties the read model, e.g. `TRUNCATE`), moves the checkpoint back to
    /// the start and drops the dead letters; then catches up. Writers may keep writing meanwhile: the
    /// catch-up reads the global order to its end, so the result equals a clean replay.
    ///
    /// # Errors
    /// [`WorkerError::LeaseLost`] when this worker does not own the projection (nothing is reset),
    /// a failing `reset` ([`WorkerError::Store`]), and the errors of [`ProjectionWorker::catch_up`].
    pub async fn rebuild<F>(&mut self, reset: F) -> Result<usize, WorkerError>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<(), sqlx::Error>>
            + Send
            + 'static,
    {
        *self
            .engine
            .backend_mut()
            .reset_once
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Box::new(reset));
        let rebuilt = self.engine.rebuild().await;
        self.engine
            .backend_mut()
            .reset_once
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        rebuilt
    }
}
