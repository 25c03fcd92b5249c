//! PostgreSQL projections: the read-model change and the checkpoint commit in one transaction, and
//! one owner at a time through a lease whose epoch is checked by the statement that moves the
//! checkpoint.

use std::future::Future;
use std::time::Duration;

use cqrs_core::projection::{Projection, ProjectionError};
use cqrs_core::{Checkpoint, EventStore, StoreError};
use sqlx::{AssertSqlSafe, PgConnection, Row};
use tracing::Instrument;

use crate::PostgresEventStore;
use crate::rows::{backend, to_i64, to_u64};

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
    /// The projection failed on an event; the batch was rolled back.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// The store failed; the batch was rolled back.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Events read from the global order (handled or skipped).
    pub read: usize,
    /// Events the projection handled.
    pub applied: usize,
    /// The checkpoint after the step.
    pub checkpoint: Checkpoint,
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
    owner: String,
    lease: Duration,
    batch: usize,
    epoch: Option<i64>,
}

impl<P> std::fmt::Debug for ProjectionWorker<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionWorker")
            .field("owner", &self.owner)
            .field("epoch", &self.epoch)
            .field("lease", &self.lease)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl<P: Projection<Context = PgConnection>> ProjectionWorker<P> {
    /// A worker named `owner` (unique per process) for `projection`, with a 30 s lease and batches of
    /// 500 events.
    pub fn new(store: PostgresEventStore, projection: P, owner: impl Into<String>) -> Self {
        Self {
            store,
            projection,
            owner: owner.into(),
            lease: Duration::from_secs(30),
            batch: 500,
            epoch: None,
        }
    }

    /// How long the lease lasts without a checkpoint move (each step renews it).
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How many events one step reads at most.
    #[must_use]
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
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
        let row = sqlx::query(AssertSqlSafe(self.store.sql.acquire_lease.clone()))
            .bind(P::NAME)
            .bind(&self.owner)
            .bind(self.lease.as_secs_f64())
            .fetch_optional(self.store.pool())
            .await
            .map_err(backend)?;
        self.epoch = row
            .map(|r| r.try_get::<i64, _>("epoch"))
            .transpose()
            .map_err(backend)?;
        Ok(self.epoch.is_some())
    }

    /// The stored checkpoint of the projection.
    ///
    /// # Errors
    /// [`WorkerError::Store`] when the database fails.
    pub async fn checkpoint(&self) -> Result<Checkpoint, WorkerError> {
        read_checkpoint(&self.store, P::NAME).await
    }

    /// Applies the next batch after the checkpoint in one transaction, with the checkpoint move.
    ///
    /// # Errors
    /// [`WorkerError::LeaseLost`] when this worker does not own the projection (nothing is
    /// committed), [`WorkerError::Projection`] when a handler or a decode fails (the batch is rolled
    /// back), [`WorkerError::Store`].
    pub async fn step(&mut self) -> Result<Step, WorkerError> {
        let Some(epoch) = self.epoch else {
            return Err(WorkerError::LeaseLost {
                projection: P::NAME,
                epoch: None,
            });
        };
        let from = self.checkpoint().await?;
        let page = self.store.read_all(from, self.batch).await?;
        let Some(last) = page.last().map(|e| e.checkpoint) else {
            return Ok(Step {
                read: 0,
                applied: 0,
                checkpoint: from,
            });
        };
        let span = tracing::debug_span!(
            "cqrs.projection.batch",
            projection = P::NAME,
            events = page.len()
        );
        self.apply_batch(epoch, &page, last).instrument(span).await
    }

    async fn apply_batch(
        &mut self,
        epoch: i64,
        page: &[cqrs_core::StoredEvent],
        last: Checkpoint,
    ) -> Result<Step, WorkerError> {
        let mut tx = self.store.pool().begin().await.map_err(backend)?;
        let mut applied = 0;
        for event in page {
            if P::subscribes_to(event) && self.projection.apply(event, &mut tx).await? {
                applied += 1;
            }
        }
        let moved = sqlx::query(AssertSqlSafe(self.store.sql.move_checkpoint.clone()))
            .bind(P::NAME)
            .bind(epoch)
            .bind(last.transaction.to_string())
            .bind(to_i64(last.position)?)
            .bind(self.lease.as_secs_f64())
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        if moved.rows_affected() != 1 {
            // Dropping the transaction rolls back the read-model change too.
            self.epoch = None;
            return Err(WorkerError::LeaseLost {
                projection: P::NAME,
                epoch: Some(epoch),
            });
        }
        tx.commit().await.map_err(backend)?;
        Ok(Step {
            read: page.len(),
            applied,
            checkpoint: last,
        })
    }

    /// Keeps the projection up to date until `shutdown` completes: catches up from the checkpoint,
    /// then waits for a commit notification (`LISTEN/NOTIFY`) or `poll` (a lost notification costs
    /// at most one poll interval), and catches up again. A shutdown rolls back the batch in flight
    /// (or finds it committed), never half of it. The lease is renewed on every wake-up; a worker that loses it
    /// keeps trying to take it back and otherwise stays idle. Returns the projection.
    ///
    /// # Errors
    /// The first event the projection fails on ([`WorkerError::Projection`], the batch rolled
    /// back), or a store failure.
    pub async fn run(
        mut self,
        poll: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<P, WorkerError> {
        let mut wakeups = self.store.listen().await?;
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            if self.acquire().await? {
                loop {
                    let step = tokio::select! {
                        // A shutdown drops the batch in flight: its transaction rolls back whole.
                        step = self.step() => step,
                        () = &mut shutdown => return Ok(self.projection),
                    };
                    match step {
                        Ok(step) if step.read == 0 => break,
                        Ok(_) => {}
                        Err(WorkerError::LeaseLost { .. }) => break,
                        Err(error) => return Err(error),
                    }
                }
            }
            tokio::select! {
                () = &mut shutdown => return Ok(self.projection),
                woken = wakeups.next_within(poll) => {
                    woken?;
                }
            }
        }
    }

    /// Steps until a step reads nothing; returns how many events were applied.
    ///
    /// # Errors
    /// As [`ProjectionWorker::step`].
    pub async fn catch_up(&mut self) -> Result<usize, WorkerError> {
        let mut applied = 0;
        loop {
            let step = self.step().await?;
            applied += step.applied;
            if step.read == 0 {
                return Ok(applied);
            }
        }
    }
}

/// The stored checkpoint of projection `name` ([`Checkpoint::START`] before its first step).
///
/// # Errors
/// [`WorkerError::Store`] when the database fails.
pub async fn read_checkpoint(
    store: &PostgresEventStore,
    name: &str,
) -> Result<Checkpoint, WorkerError> {
    let row = sqlx::query(AssertSqlSafe(store.sql.read_checkpoint.clone()))
        .bind(name)
        .fetch_optional(store.pool())
        .await
        .map_err(backend)?;
    let Some(row) = row else {
        return Ok(Checkpoint::START);
    };
    let transaction: String = row.try_get("transaction_text").map_err(backend)?;
    let position: i64 = row.try_get("global_position").map_err(backend)?;
    Ok(Checkpoint::new(
        transaction.parse().map_err(|e| {
            StoreError::backend(format!("checkpoint transaction `{transaction}`: {e}"))
        })?,
        to_u64(position)?,
    ))
}
