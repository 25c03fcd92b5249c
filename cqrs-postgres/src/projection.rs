//! PostgreSQL projections: the read-model change and the checkpoint commit in one transaction, and
//! one owner at a time through a lease whose epoch is checked by the statement that moves the
//! checkpoint.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use cqrs_core::projection::{
    DeadLetter, FailureMode, FailurePolicy, ProjectionMetrics, Redrive, Step,
};
use cqrs_core::projection::{Failure, Projection, ProjectionError, WAITS_BEHIND, event_span};
use cqrs_core::store::CorruptEvent;
use cqrs_core::{Checkpoint, EventStore, StoreError};
use sqlx::{AssertSqlSafe, PgConnection, Row};
use tracing::Instrument;

use crate::lease::Advance;
use crate::rows::{backend, to_i64, to_u64};
use crate::tx::Tx;
use crate::{CheckpointLease, PostgresEventStore};

/// Why a projection worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Another worker owns the projection (its lease is live), or took it over from this one: this
    /// worker's last batch was rolled back and nothing it did after losing the lease was kept.
    #[error("projection `{projection}` is owned by another worker (this worker's epoch {epoch:?})")]
    LeaseLost {
        /// The projection.
        projection: &'static str,
        /// The epoch this worker held, if any.
        epoch: Option<i64>,
    },
    /// The window started at a checkpoint that is not the stored one any more: an earlier commit
    /// of this worker whose outcome was in doubt (its future dropped after `COMMIT` was sent) went
    /// through after all. Nothing of this batch was kept; step again from the stored checkpoint
    /// ([`run`](ProjectionWorker::run) and [`catch_up`](ProjectionWorker::catch_up) do).
    #[error(
        "projection `{projection}`: the checkpoint moved to {stored} meanwhile; the batch was rolled back"
    )]
    CheckpointMoved {
        /// The projection.
        projection: &'static str,
        /// The stored checkpoint.
        stored: Checkpoint,
    },
    /// The projection failed on an event; the batch was rolled back.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// The store failed; the batch was rolled back.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl WorkerError {
    /// Whether waiting cannot heal it: the schema or its tables do not exist (run the
    /// migrations), the database refuses this user, or the projection failed outside its
    /// retries. Connection failures, a server restarting, a lost lease and timeouts heal, and
    /// [`ProjectionWorker::run`] rides them out.
    #[must_use]
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::LeaseLost { .. } | Self::CheckpointMoved { .. } => false,
            Self::Projection(_) => true,
            Self::Store(StoreError::Backend(source)) => {
                source.downcast_ref::<sqlx::Error>().is_some_and(|e| {
                    matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|code| {
                        // undefined_table, undefined_column, invalid_schema_name,
                        // insufficient_privilege, undefined_function
                        matches!(&*code, "42P01" | "42703" | "3F000" | "42501" | "42883")
                    }))
                })
            }
            Self::Store(_) => false,
        }
    }
}

/// How many dead letters a redrive reads at a time.
const REDRIVE_PAGE: i64 = 500;

/// Lists and purges a projection's dead letters; retrying them needs the projection, so it is
/// [`ProjectionWorker::retry`] and [`ProjectionWorker::retry_all`].
#[derive(Debug, Clone)]
pub struct DeadLetters {
    store: PostgresEventStore,
}

impl DeadLetters {
    /// The dead letters of the projections in `store`'s schema.
    #[must_use]
    pub fn new(store: PostgresEventStore) -> Self {
        Self { store }
    }

    /// The dead letters of `projection`, by stream and version.
    ///
    /// # Errors
    /// [`WorkerError::Store`] when the database fails.
    pub async fn list(&self, projection: &str) -> Result<Vec<DeadLetter>, WorkerError> {
        let rows = sqlx::query(AssertSqlSafe(self.store.sql.list_dead_letters.clone()))
            .bind(projection)
            .fetch_all(self.store.pool())
            .await
            .map_err(backend)?;
        rows.iter().map(dead_letter).collect()
    }

    /// Removes the dead letters of `projection` that last failed before `older_than` (all of them
    /// with `None`), without applying them; returns how many.
    ///
    /// # Errors
    /// [`WorkerError::Store`] when the database fails.
    pub async fn purge(
        &self,
        projection: &str,
        older_than: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<u64, WorkerError> {
        let done = sqlx::query(AssertSqlSafe(self.store.sql.purge_dead_letters.clone()))
            .bind(projection)
            .bind(older_than)
            .execute(self.store.pool())
            .await
            .map_err(backend)?;
        Ok(done.rows_affected())
    }
}

fn dead_letter(row: &sqlx::postgres::PgRow) -> Result<DeadLetter, WorkerError> {
    let aggregate_type: String = row.try_get("aggregate_type").map_err(backend)?;
    let aggregate_id: String = row.try_get("aggregate_id").map_err(backend)?;
    let attempts: i32 = row.try_get("attempts").map_err(backend)?;
    Ok(DeadLetter {
        id: row.try_get("id").map_err(backend)?,
        event_id: cqrs_core::EventId(row.try_get("event_id").map_err(backend)?),
        stream: cqrs_core::StreamId::new(aggregate_type, aggregate_id),
        version: to_u64(row.try_get("version").map_err(backend)?)?,
        error: row.try_get("error").map_err(backend)?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        first_failed_at: row.try_get("first_failed_at").map_err(backend)?,
        last_failed_at: row.try_get("last_failed_at").map_err(backend)?,
    })
}

/// Runs one projection whose handlers write through the transaction (`Context = PgConnection`).
///
/// Each [`step`](ProjectionWorker::step) reads a batch after the checkpoint, applies it in one
/// transaction and moves the checkpoint in that same transaction, naming this worker's lease epoch:
/// a crash anywhere before the commit leaves the read model and the checkpoint as they were, and a
/// worker that lost its lease (paused past it while another took over) can never commit.
pub struct ProjectionWorker<P> {
    store: PostgresEventStore,
    projection: P,
    lease: CheckpointLease,
    batch: usize,
    policy: FailurePolicy,
    metrics: ProjectionMetrics,
    /// Whether most events read lately were subscribed ones: then the plain ordered read (and
    /// filtering here) is cheaper than asking the server to filter.
    dense: bool,
    /// How to empty the read model, for rebuilds an operator asks for.
    reset: Option<Reset>,
}

/// Empties a read model inside the rebuild's transaction.
type Reset = Arc<
    dyn for<'c> Fn(&'c mut PgConnection) -> futures::future::BoxFuture<'c, Result<(), sqlx::Error>>
        + Send
        + Sync,
>;

impl<P> std::fmt::Debug for ProjectionWorker<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionWorker")
            .field("owner", &self.lease.owner())
            .field("epoch", &self.lease.epoch())
            .field("lease", &self.lease.duration())
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl<P: Projection<Context = PgConnection>> ProjectionWorker<P> {
    /// A worker named `owner` (unique per process) for `projection`, with a 30 s lease, batches of
    /// 2,000 events and the default [`FailurePolicy`].
    pub fn new(store: PostgresEventStore, projection: P, owner: impl Into<String>) -> Self {
        Self {
            lease: CheckpointLease::new(store.clone(), P::NAME, owner, Duration::from_secs(30)),
            store,
            projection,
            batch: 2_000,
            policy: FailurePolicy::default(),
            metrics: ProjectionMetrics::default(),
            dense: false,
            reset: None,
        }
    }

    /// How to empty the read model (e.g. `TRUNCATE` its tables): lets an operator rebuild the
    /// projection with `cqrs projections rebuild` while this worker runs (see
    /// [`crate::control`]). Without it such a request is answered with an error saying so.
    #[must_use]
    pub fn with_reset<F>(mut self, reset: F) -> Self
    where
        F: for<'c> Fn(
                &'c mut PgConnection,
            ) -> futures::future::BoxFuture<'c, Result<(), sqlx::Error>>
            + Send
            + Sync
            + 'static,
    {
        self.reset = Some(Arc::new(reset));
        self
    }

    /// What to do with events the projection keeps failing on.
    #[must_use]
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How long the lease lasts without a checkpoint move (each step renews it).
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = self.lease.with_lease(lease);
        self
    }

    /// How many events one step reads at most.
    #[must_use]
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// The epoch of the lease this worker holds, or [`WorkerError::LeaseLost`].
    fn owned_epoch(&self) -> Result<i64, WorkerError> {
        self.lease.epoch().ok_or(WorkerError::LeaseLost {
            projection: P::NAME,
            epoch: None,
        })
    }

    /// Forgets the lease of `epoch`, which the database no longer grants.
    fn lease_lost(&mut self, epoch: i64) -> WorkerError {
        self.lease.forget();
        WorkerError::LeaseLost {
            projection: P::NAME,
            epoch: Some(epoch),
        }
    }

    /// The worker's counters.
    #[must_use]
    pub fn metrics(&self) -> ProjectionMetrics {
        self.metrics
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
    pub async fn lag_detail(&self) -> Result<cqrs_core::projection::Lag, WorkerError> {
        let checkpoint = self.checkpoint().await?;
        Ok(self.store.lag_after(checkpoint).await?)
    }

    /// The projection (e.g. to read in-process state in tests).
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// Takes (or renews) the lease; `false` while another worker's lease is live.
    ///
    /// # Errors
    /// [`WorkerError::Store`] when the database fails.
    pub async fn acquire(&mut self) -> Result<bool, WorkerError> {
        Ok(self.lease.acquire().await?.is_some())
    }

    /// The stored checkpoint of the projection.
    ///
    /// # Errors
    /// [`WorkerError::Store`] when the database fails.
    pub async fn checkpoint(&self) -> Result<Checkpoint, WorkerError> {
        Ok(self.lease.checkpoint().await?)
    }

    /// Applies the next batch after the checkpoint in one transaction, with the checkpoint move.
    ///
    /// # Errors
    /// [`WorkerError::LeaseLost`] when this worker does not own the projection (nothing is
    /// committed), [`WorkerError::Projection`] when a handler or a decode fails (the batch is rolled
    /// back), [`WorkerError::Store`].
    pub async fn step(&mut self) -> Result<Step, WorkerError> {
        let epoch = self.owned_epoch()?;
        let from = self.checkpoint().await?;
        let window = read_window(
            self.store.clone(),
            from,
            self.batch,
            self.dense,
            P::SUBSCRIPTIONS,
            P::subscribes_to,
        )
        .await;
        match window {
            Ok(window) => self.apply_window(epoch, from, window).await,
            Err(WorkerError::Store(StoreError::Corrupt(corrupt))) => {
                self.pass_corrupt(epoch, from, &corrupt).await
            }
            Err(error) => Err(error),
        }
    }

    /// Parks a stored row that cannot be read as an event (the first after `from`) as a dead
    /// letter naming it, if the projection subscribes to its type, and moves the checkpoint past it,
    /// in one transaction: one bad row never stops the projection. Under
    /// [`FailureMode::BlockStream`] later events of its stream wait behind it, as behind any dead
    /// letter.
    async fn pass_corrupt(
        &mut self,
        epoch: i64,
        from: Checkpoint,
        corrupt: &CorruptEvent,
    ) -> Result<Step, WorkerError> {
        let CorruptEvent {
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
        let mut tx = Tx::begin(self.store.pool()).await.map_err(backend)?;
        let outcome = async {
            if subscribed {
                tracing::warn!(projection = P::NAME, %stream, version, %checkpoint, error = %corrupt, "parking an unreadable stored event as a dead letter");
                let failure = Failure {
                    error: corrupt.to_string(),
                    attempts: 1,
                    first_failed_at: chrono::Utc::now(),
                };
                self.park_row(&mut tx, *event_id, stream, *version, &failure)
                    .await?;
            }
            self.advance_in(&mut tx, epoch, from, *checkpoint).await
        }
        .await;
        tx.end(outcome, |e| WorkerError::Store(backend(e))).await?;
        let step = Step {
            read: 1,
            applied: 0,
            parked: usize::from(subscribed),
            checkpoint: *checkpoint,
        };
        self.metrics.record(&step, Duration::ZERO);
        Ok(step)
    }

    /// Moves the checkpoint from `from` to `to` in `tx` under `epoch`, or the error that makes the
    /// caller roll back.
    async fn advance_in(
        &mut self,
        tx: &mut PgConnection,
        epoch: i64,
        from: Checkpoint,
        to: Checkpoint,
    ) -> Result<(), WorkerError> {
        match self.lease.advance_on(tx, from, to).await? {
            Advance::Done => Ok(()),
            Advance::LeaseLost => Err(self.lease_lost(epoch)),
            Advance::Moved { stored } => Err(WorkerError::CheckpointMoved {
                projection: P::NAME,
                stored,
            }),
        }
    }

    /// Applies a window read after `from` and moves the checkpoint to its end.
    async fn apply_window(
        &mut self,
        epoch: i64,
        from: Checkpoint,
        window: Window,
    ) -> Result<Step, WorkerError> {
        self.dense = window.dense;
        let (page, last) = (window.events, window.last);
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
        let mut step = match self
            .apply_batch(epoch, &page, from, last)
            .instrument(span)
            .await
        {
            Ok(step) => step,
            Err(error) => {
                self.metrics.failed_batches += 1;
                return Err(error);
            }
        };
        // Events scanned but filtered out by the store count as read: the checkpoint moved.
        step.read = step.read.max(1);
        self.metrics.record(&step, started.elapsed());
        Ok(step)
    }

    /// Applies a batch: first without per-event savepoints (the common case, one transaction and no
    /// extra round trips); if a handler fails, that transaction is rolled back whole and the batch
    /// runs again with a savepoint, retries and parking per event.
    async fn apply_batch(
        &mut self,
        epoch: i64,
        page: &[cqrs_core::StoredEvent],
        from: Checkpoint,
        last: Checkpoint,
    ) -> Result<Step, WorkerError> {
        match self.apply_batch_in(epoch, page, from, last, false).await {
            Err(WorkerError::Projection(error)) => {
                tracing::debug!(projection = P::NAME, %error, "a handler failed: running the batch event by event");
                self.apply_batch_in(epoch, page, from, last, true).await
            }
            done => done,
        }
    }

    /// One attempt at a batch in a transaction of its own, with the lease renewed beside it every
    /// third of its duration, so a batch longer than the lease keeps it (the move at its end then
    /// renews it from the commit's moment).
    async fn apply_batch_in(
        &mut self,
        epoch: i64,
        page: &[cqrs_core::StoredEvent],
        from: Checkpoint,
        last: Checkpoint,
        careful: bool,
    ) -> Result<Step, WorkerError> {
        let mut tx = Tx::begin(self.store.pool()).await.map_err(backend)?;
        let heartbeat = self.lease.heartbeat();
        let outcome = tokio::select! {
            outcome = self.apply_batch_on(&mut tx, epoch, page, from, last, careful) => outcome,
            never = heartbeat => match never {},
        };
        tx.end(outcome, |e| WorkerError::Store(backend(e))).await
    }

    /// The body of [`Self::apply_batch_in`], in transaction `tx`.
    async fn apply_batch_on(
        &mut self,
        tx: &mut PgConnection,
        epoch: i64,
        page: &[cqrs_core::StoredEvent],
        from: Checkpoint,
        last: Checkpoint,
        careful: bool,
    ) -> Result<Step, WorkerError> {
        let mut blocked = self.blocked_streams(&mut *tx).await?;
        let mut applied = 0;
        let mut parked = 0;
        for event in page {
            if !P::subscribes_to(event) {
                continue;
            }
            if self.policy.mode == FailureMode::BlockStream && blocked.contains(&event.stream) {
                let waits = Failure {
                    error: WAITS_BEHIND.to_owned(),
                    attempts: 0,
                    first_failed_at: chrono::Utc::now(),
                };
                self.park(&mut *tx, event, &waits).await?;
                parked += 1;
                continue;
            }
            if !careful {
                // Any failure rolls this transaction back; the caller runs the batch carefully.
                self.projection
                    .apply(event, &mut *tx)
                    .instrument(event_span(P::NAME, event))
                    .await?;
                applied += 1;
                continue;
            }
            let span = event_span(P::NAME, event);
            match self
                .apply_with_retries(&mut *tx, event)
                .instrument(span)
                .await?
            {
                None => applied += 1,
                Some(failure) => {
                    tracing::warn!(
                        projection = P::NAME, stream = %event.stream, version = event.version,
                        attempts = failure.attempts, error = %failure.error,
                        "parking the event as a dead letter"
                    );
                    self.park(&mut *tx, event, &failure).await?;
                    parked += 1;
                    blocked.insert(event.stream.clone());
                }
            }
        }
        // Compare-and-set from the window's start; on any other outcome the caller rolls back the
        // read-model change too.
        self.advance_in(&mut *tx, epoch, from, last).await?;
        Ok(Step {
            read: page.len(),
            applied,
            parked,
            checkpoint: last,
        })
    }

    /// Keeps the projection up to date until `shutdown` completes: catches up from the checkpoint,
    /// then waits for a commit wake-up ([`EventStore::commit_signal`]: one listening connection per
    /// store, outside the pool, whatever runs on it) or `poll` (a lost notification costs at most
    /// one poll interval), and catches up again. A shutdown rolls back the batch in flight (or finds
    /// it committed), never half of it. The lease is renewed on every wake-up; a worker that loses
    /// it keeps trying to take it back and otherwise stays idle.
    ///
    /// Failures that heal are ridden out: a broken connection, a server restarting or terminating
    /// connections, a timeout are logged (`warn`) and the work is tried again after a backoff
    /// (50 ms doubling to 5 s, with jitter); each try starts from the stored checkpoint, so nothing
    /// is applied twice or skipped. Returns the projection on shutdown.
    ///
    /// # Errors
    /// Only what waiting cannot heal ([`WorkerError::is_permanent`]): the schema or its tables do
    /// not exist (run the migrations), the database refuses this user.
    pub async fn run(
        mut self,
        poll: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<P, WorkerError> {
        let mut wakeups = self.store.commit_signal();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff =
            cqrs_core::Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            if let Some(signal) = &mut wakeups {
                signal.borrow_and_update();
            }
            let worked = tokio::select! {
                // A shutdown drops the batch in flight: its transaction rolls back whole.
                worked = self.work_once() => worked,
                () = &mut shutdown => return Ok(self.projection),
            };
            let wait = match worked {
                Ok(()) => {
                    backoff.reset();
                    poll
                }
                Err(error) if error.is_permanent() => return Err(error),
                Err(error) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(projection = P::NAME, %error, retry_in = ?wait, "projection worker failed; trying again");
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
                            tokio::time::sleep(wait).await;
                        }
                    }
                    None => tokio::time::sleep(wait).await,
                }
            };
            tokio::select! {
                () = &mut shutdown => return Ok(self.projection),
                () = woken => {}
            }
        }
    }

    /// One round of [`run`](Self::run): take or renew the lease, step until caught up, serve the
    /// operators' requests.
    async fn work_once(&mut self) -> Result<(), WorkerError> {
        if !self.acquire().await? {
            return Ok(());
        }
        loop {
            match self.step().await {
                Ok(step) if step.read == 0 => break,
                Ok(_) | Err(WorkerError::CheckpointMoved { .. }) => {}
                Err(WorkerError::LeaseLost { .. }) => return Ok(()),
                Err(error) => return Err(error),
            }
        }
        if let Err(error) = self.serve_requests().await {
            if matches!(error, WorkerError::Store(StoreError::Backend(_))) {
                return Err(error);
            }
            tracing::warn!(projection = P::NAME, %error, "serving an operator request failed");
        }
        Ok(())
    }

    async fn blocked_streams(
        &self,
        conn: &mut PgConnection,
    ) -> Result<std::collections::HashSet<cqrs_core::StreamId>, WorkerError> {
        let rows = sqlx::query(AssertSqlSafe(self.store.sql.blocked_streams.clone()))
            .bind(P::NAME)
            .fetch_all(&mut *conn)
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|row| {
                let aggregate_type: String = row.try_get(0).map_err(backend)?;
                let aggregate_id: String = row.try_get(1).map_err(backend)?;
                Ok(cqrs_core::StreamId::new(aggregate_type, aggregate_id))
            })
            .collect()
    }

    /// Applies one event inside a savepoint, retrying per the policy; `None` when it was applied,
    /// else how it failed.
    async fn apply_with_retries(
        &mut self,
        conn: &mut PgConnection,
        event: &cqrs_core::StoredEvent,
    ) -> Result<Option<Failure>, WorkerError> {
        let mut retries = self.policy.retries();
        loop {
            savepoint(conn, "SAVEPOINT cqrs_event").await?;
            match self.projection.apply(event, conn).await {
                Ok(_) => {
                    savepoint(conn, "RELEASE SAVEPOINT cqrs_event").await?;
                    return Ok(None);
                }
                Err(error) => {
                    savepoint(conn, "ROLLBACK TO SAVEPOINT cqrs_event").await?;
                    if let Some(failure) = retries.failed(&error).await {
                        return Ok(Some(failure));
                    }
                }
            }
        }
    }

    async fn park(
        &self,
        conn: &mut PgConnection,
        event: &cqrs_core::StoredEvent,
        failure: &Failure,
    ) -> Result<(), WorkerError> {
        self.park_row(conn, event.event_id, &event.stream, event.version, failure)
            .await
    }

    /// Parks the event `event_id`, version `version` of `stream`.
    async fn park_row(
        &self,
        conn: &mut PgConnection,
        event_id: cqrs_core::EventId,
        stream: &cqrs_core::StreamId,
        version: u64,
        failure: &Failure,
    ) -> Result<(), WorkerError> {
        sqlx::query(AssertSqlSafe(self.store.sql.park.clone()))
            .bind(P::NAME)
            .bind(event_id.0)
            .bind(&stream.aggregate_type)
            .bind(stream.aggregate_id.as_str())
            .bind(to_i64(version)?)
            .bind(&failure.error)
            .bind(i32::try_from(failure.attempts).unwrap_or(i32::MAX))
            .bind(failure.first_failed_at)
            .bind(chrono::Utc::now())
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
        Ok(())
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
        self.owned_epoch()?;
        let s = self.store.sql.quoted_schema.clone();
        let rebuild: Option<Option<chrono::DateTime<chrono::Utc>>> =
            sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT rebuild_requested_at FROM {s}.projection_checkpoints WHERE projection = $1"
            )))
            .bind(P::NAME)
            .fetch_optional(self.store.pool())
            .await
            .map_err(backend)?;
        let mut served = false;
        if rebuild.flatten().is_some() {
            served = true;
            let outcome = match self.reset.clone() {
                Some(reset) => self.rebuild(move |conn| reset(conn)).await.map(|_| ()),
                None => Err(WorkerError::Store(StoreError::InvalidInput(format!(
                    "the worker of `{}` ({}) has no reset: build it with ProjectionWorker::with_reset to allow rebuilds",
                    P::NAME,
                    self.lease.owner()
                )))),
            };
            if let Err(error) = &outcome {
                sqlx::query(AssertSqlSafe(format!(
                    "UPDATE {s}.projection_checkpoints SET rebuild_requested_at = NULL, request_error = $2 \
                     WHERE projection = $1"
                )))
                .bind(P::NAME)
                .bind(error.to_string())
                .execute(self.store.pool())
                .await
                .map_err(backend)?;
            }
            outcome?;
        }
        let streams: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT DISTINCT aggregate_type, aggregate_id FROM {s}.projection_dead_letters \
             WHERE projection = $1 AND retry_requested_at IS NOT NULL"
        )))
        .bind(P::NAME)
        .fetch_all(self.store.pool())
        .await
        .map_err(backend)?;
        for (aggregate_type, aggregate_id) in streams {
            served = true;
            let stream = cqrs_core::StreamId::new(aggregate_type, aggregate_id);
            let redrive = self.retry(&stream).await?;
            tracing::info!(projection = P::NAME, %stream, applied = redrive.applied, failed = redrive.failed, "dead letters retried on request");
        }
        Ok(served)
    }

    /// Applies the dead letters of `stream` again, in version order, in one transaction under this
    /// worker's lease: each one that applies is removed; the first that fails again stays (with the
    /// new error) and so do the ones after it.
    ///
    /// # Errors
    /// [`WorkerError::LeaseLost`] when this worker does not own the projection, store failures.
    pub async fn retry(&mut self, stream: &cqrs_core::StreamId) -> Result<Redrive, WorkerError> {
        let epoch = self.owned_epoch()?;
        let mut tx = Tx::begin(self.store.pool()).await.map_err(backend)?;
        let outcome = async {
            let held = sqlx::query(AssertSqlSafe(self.store.sql.hold_lease.clone()))
                .bind(P::NAME)
                .bind(epoch)
                .fetch_optional(&mut *tx)
                .await
                .map_err(backend)?;
            if held.is_none() {
                return Err(self.lease_lost(epoch));
            }
            // This retry answers any request on the stream, whatever its outcome.
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {}.projection_dead_letters SET retry_requested_at = NULL \
                 WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3",
                self.store.sql.quoted_schema
            )))
            .bind(P::NAME)
            .bind(&stream.aggregate_type)
            .bind(stream.aggregate_id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
            // A page of letters at a time: a long blocked stream is never loaded whole.
            let mut redrive = Redrive::default();
            let mut after = i64::MIN;
            'pages: loop {
                let letters =
                    sqlx::query(AssertSqlSafe(self.store.sql.stream_dead_letters.clone()))
                        .bind(P::NAME)
                        .bind(&stream.aggregate_type)
                        .bind(stream.aggregate_id.as_str())
                        .bind(after)
                        .bind(REDRIVE_PAGE)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(backend)?;
                let last_page = letters.len() < usize::try_from(REDRIVE_PAGE).unwrap_or(0);
                for row in &letters {
                    after = row.try_get("version").map_err(backend)?;
                    let letter = dead_letter(row)?;
                    let row = sqlx::query(AssertSqlSafe(self.store.sql.event_by_id.clone()))
                        .bind(letter.event_id.0)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(backend)?;
                    let outcome = match crate::rows::stored_event(&row) {
                        Ok(event) => self.apply_with_retries(&mut tx, &event).await?,
                        // Still unreadable: it stays parked, with the reason.
                        Err(corrupt @ StoreError::Corrupt(_)) => Some(Failure {
                            error: corrupt.to_string(),
                            attempts: 1,
                            first_failed_at: letter.first_failed_at,
                        }),
                        Err(error) => return Err(error.into()),
                    };
                    match outcome {
                        None => {
                            sqlx::query(AssertSqlSafe(self.store.sql.resolve_dead_letter.clone()))
                                .bind(letter.id)
                                .execute(&mut *tx)
                                .await
                                .map_err(backend)?;
                            redrive.applied += 1;
                        }
                        Some(failure) => {
                            sqlx::query(AssertSqlSafe(self.store.sql.fail_dead_letter.clone()))
                                .bind(letter.id)
                                .bind(failure.error)
                                .execute(&mut *tx)
                                .await
                                .map_err(backend)?;
                            redrive.failed += 1;
                            break 'pages;
                        }
                    }
                }
                if last_page {
                    break;
                }
            }
            Ok(redrive)
        }
        .await;
        tx.end(outcome, |e| WorkerError::Store(backend(e))).await
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
        F: for<'c> FnOnce(
            &'c mut PgConnection,
        ) -> futures::future::BoxFuture<'c, Result<(), sqlx::Error>>,
    {
        let epoch = self.owned_epoch()?;
        let mut tx = Tx::begin(self.store.pool()).await.map_err(backend)?;
        let outcome = async {
            let moved = sqlx::query(AssertSqlSafe(self.store.sql.reset_checkpoint.clone()))
                .bind(P::NAME)
                .bind(epoch)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
            if moved.rows_affected() != 1 {
                return Err(self.lease_lost(epoch));
            }
            reset(&mut tx).await.map_err(backend)?;
            sqlx::query(AssertSqlSafe(self.store.sql.reset_dead_letters.clone()))
                .bind(P::NAME)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
            Ok(())
        }
        .await;
        tx.end(outcome, |e| WorkerError::Store(backend(e))).await?;
        tracing::info!(projection = P::NAME, "rebuilding from the first event");
        self.catch_up().await
    }

    /// [`ProjectionWorker::retry`] for every stream with dead letters.
    ///
    /// # Errors
    /// As [`ProjectionWorker::retry`].
    pub async fn retry_all(&mut self) -> Result<Redrive, WorkerError> {
        let mut conn = self.store.pool().acquire().await.map_err(backend)?;
        let streams = self.blocked_streams(&mut conn).await?;
        drop(conn);
        let mut total = Redrive::default();
        for stream in streams {
            let done = self.retry(&stream).await?;
            total.applied += done.applied;
            total.failed += done.failed;
        }
        Ok(total)
    }

    /// Steps until every event committed before the call is applied (or parked); returns how
    /// many events were applied.
    ///
    /// Readers never pass the oldest transaction still open in the cluster (that is what keeps
    /// the global order gap-free), so right after an append the newest events can be unreadable
    /// for the moment another transaction stays open. `catch_up` does not stop there: it takes
    /// the head of the log first ([`EventStore::head`]) and waits (polling from 2 ms up to
    /// 100 ms) until its checkpoint has passed it. A transaction that stays open holds it back
    /// for as long, by design; bound the wait with `tokio::time::timeout` if needed.
    ///
    /// # Errors
    /// As [`ProjectionWorker::step`].
    pub async fn catch_up(&mut self) -> Result<usize, WorkerError> {
        let epoch = self.owned_epoch()?;
        let head = self.store.head().await?.unwrap_or(Checkpoint::START);
        let mut from = self.checkpoint().await?;
        let mut applied = 0;
        let mut pause = Duration::from_millis(2);
        let mut next = self.prefetch(from, self.dense);
        loop {
            let window = match next
                .await
                .map_err(|e| StoreError::backend(format!("read task: {e}")))?
            {
                Ok(window) => window,
                Err(WorkerError::Store(StoreError::Corrupt(corrupt))) => {
                    from = self.pass_corrupt(epoch, from, &corrupt).await?.checkpoint;
                    next = self.prefetch(from, self.dense);
                    continue;
                }
                Err(error) => return Err(error),
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
            // The next window is read while this one is applied: the checkpoint moves to `last`
            // when this batch commits, and if it does not, the prefetched window is dropped.
            next = self.prefetch(last, window.dense);
            let step = match self.apply_window(epoch, from, window).await {
                Ok(step) => step,
                Err(WorkerError::CheckpointMoved { stored, .. }) => {
                    // An earlier commit of ours went through after all: on from what it stored.
                    next.abort();
                    from = stored;
                    next = self.prefetch(from, self.dense);
                    continue;
                }
                Err(error) => {
                    next.abort();
                    return Err(error);
                }
            };
            applied += step.applied;
            from = last;
        }
    }

    /// Reads the window after `from` on another task.
    fn prefetch(
        &self,
        from: Checkpoint,
        dense: bool,
    ) -> tokio::task::JoinHandle<Result<Window, WorkerError>> {
        tokio::spawn(read_window(
            self.store.clone(),
            from,
            self.batch,
            dense,
            P::SUBSCRIPTIONS,
            P::subscribes_to,
        ))
    }
}

/// The subscribed events of a window of the global order.
struct Window {
    events: Vec<cqrs_core::StoredEvent>,
    /// The checkpoint of the last event scanned (subscribed or not).
    last: Checkpoint,
    /// Whether to read the next window plainly (see [`read_window`]).
    dense: bool,
}

/// The subscribed events among the next `batch` events after `from`.
///
/// Where few events are subscribed, the server filters (only those travel, and the checkpoint
/// still moves past the others); where most are, it is cheaper to read the window as it is and
/// filter here (the filtering query costs the server a materialized window). `dense` says which;
/// the result says which to use next, from what this window held: the plain read above half
/// subscribed, the filtered one below a quarter. Both give the same events.
async fn read_window(
    store: PostgresEventStore,
    from: Checkpoint,
    batch: usize,
    dense: bool,
    subscriptions: &'static [cqrs_core::projection::Subscription],
    subscribes_to: fn(&cqrs_core::StoredEvent) -> bool,
) -> Result<Window, WorkerError> {
    if !dense {
        let (events, last) = store.read_filtered(from, batch, subscriptions).await?;
        let dense = events.len() * 2 > batch;
        return Ok(Window {
            events,
            last,
            dense,
        });
    }
    let mut events = store.read_all(from, batch).await?;
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

/// Where a projection of the schema is, for operators (`cqrs projections list`).
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionStatus {
    /// The projection's name.
    pub name: String,
    /// The checkpoint it has applied up to.
    pub checkpoint: Checkpoint,
    /// Committed events after the checkpoint (an exact count).
    pub lag: u64,
    /// How long ago the oldest of them was recorded (0 when caught up).
    pub lag_seconds: f64,
    /// The worker holding (or last holding) the lease.
    pub owner: Option<String>,
    /// The lease's epoch: bumped by every takeover.
    pub epoch: i64,
    /// Whether the lease is live now.
    pub leased: bool,
    /// How many dead letters it has.
    pub dead_letters: u64,
    /// When its checkpoint last moved.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// Every projection with a checkpoint in `store`'s schema, by name.
///
/// # Errors
/// [`WorkerError::Store`] when the database fails.
pub async fn projections(store: &PostgresEventStore) -> Result<Vec<ProjectionStatus>, WorkerError> {
    let s = &store.sql.quoted_schema;
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT c.projection, c.transaction_id::text AS transaction_text, c.global_position, c.owner, c.epoch, \
                COALESCE(c.lease_until > now(), false) AS leased, c.updated_at, \
                (SELECT count(*) FROM {s}.projection_dead_letters d WHERE d.projection = c.projection) AS dead_letters, \
                l.lag, l.lag_seconds \
         FROM {s}.projection_checkpoints c, LATERAL ( \
           SELECT count(*) AS lag, \
                  COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(e.recorded_at))::float8, 0) AS lag_seconds \
           FROM {s}.events e WHERE (e.transaction_id, e.global_position) > (c.transaction_id, c.global_position)) l \
         ORDER BY c.projection"
    )))
    .fetch_all(store.pool())
    .await
    .map_err(backend)?;
    rows.iter()
        .map(|row| {
            let checkpoint = crate::rows::checkpoint(row)?;
            let lag: i64 = row.try_get("lag").map_err(backend)?;
            let dead_letters: i64 = row.try_get("dead_letters").map_err(backend)?;
            Ok(ProjectionStatus {
                name: row.try_get("projection").map_err(backend)?,
                lag: to_u64(lag)?,
                lag_seconds: row
                    .try_get::<f64, _>("lag_seconds")
                    .map_err(backend)?
                    .max(0.0),
                checkpoint,
                owner: row.try_get("owner").map_err(backend)?,
                epoch: row.try_get("epoch").map_err(backend)?,
                leased: row.try_get("leased").map_err(backend)?,
                dead_letters: to_u64(dead_letters)?,
                updated_at: row.try_get("updated_at").map_err(backend)?,
            })
        })
        .collect()
}

/// Runs a savepoint statement.
async fn savepoint(conn: &mut PgConnection, statement: &'static str) -> Result<(), WorkerError> {
    sqlx::query(statement)
        .execute(conn)
        .await
        .map_err(backend)?;
    Ok(())
}

/// The stored checkpoint of projection `name` ([`Checkpoint::START`] before its first step).
///
/// # Errors
/// [`WorkerError::Store`] when the database fails.
pub async fn read_checkpoint(
    store: &PostgresEventStore,
    name: &str,
) -> Result<Checkpoint, WorkerError> {
    Ok(crate::lease::read(store, name).await?)
}

/// A projection run inside the append transaction; see [`PostgresEventStore::with_inline`].
pub(crate) trait InlineProjection: Send + Sync {
    /// Applies the subscribed ones of `events` through `conn`.
    fn apply_all<'a>(
        &'a self,
        events: &'a [cqrs_core::StoredEvent],
        conn: &'a mut PgConnection,
    ) -> futures::future::BoxFuture<'a, Result<(), StoreError>>;
}

/// The inline form of a projection: a clone applies each append's events.
pub(crate) struct Inline<P>(pub(crate) P);

impl<P> InlineProjection for Inline<P>
where
    P: Projection<Context = PgConnection> + Clone + Sync,
{
    fn apply_all<'a>(
        &'a self,
        events: &'a [cqrs_core::StoredEvent],
        conn: &'a mut PgConnection,
    ) -> futures::future::BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut projection = self.0.clone();
            for event in events.iter().filter(|e| P::subscribes_to(e)) {
                projection.apply(event, conn).await.map_err(|error| {
                    StoreError::InlineProjection {
                        projection: P::NAME,
                        source: Box::new(error),
                    }
                })?;
            }
            Ok(())
        })
    }
}
