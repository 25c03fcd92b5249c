//! Operator requests to the projection workers: rebuild a read model, redrive dead letters.
//!
//! Both run the projection's own code, which lives in the application, so an operator (the `cqrs`
//! command line) does not run them: it records a request on the projection's row (or on the dead
//! letters) and wakes the workers with a `NOTIFY`; the [`ProjectionWorker`] that owns the projection
//! answers it on its next wake-up, under its lease, exactly as its own
//! [`rebuild`](crate::projection::ProjectionWorker::rebuild) and [`retry`](crate::projection::ProjectionWorker::retry) would, and
//! records the outcome, which the operator reads back.
//!
//! [`ProjectionWorker`]: crate::projection::ProjectionWorker
//! [`ProjectionWorker::rebuild`]: crate::projection::ProjectionWorker::rebuild
//! [`ProjectionWorker::retry`](crate::projection::ProjectionWorker::retry): crate::projection::ProjectionWorker::retry

use chrono::{DateTime, Utc};
use evently_core::StoreError;
use sqlx::{AssertSqlSafe, Row};

use crate::PostgresEventStore;
use crate::errors::backend;
use crate::projection::WorkerError;
use crate::projection::letters::dead_letter;
use crate::rows::to_u64;
use evently_core::Checkpoint;
use evently_core::projection::DeadLetter;

/// The state of the requests on one projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requests {
    /// A rebuild asked for and not answered yet.
    pub rebuild_requested_at: Option<DateTime<Utc>>,
    /// When the last rebuild started (the read model was reset then, and caught up after).
    pub rebuilt_at: Option<DateTime<Utc>>,
    /// Why the last request could not be served, if it could not.
    pub error: Option<String>,
    /// Dead letters asked to be retried and not answered yet.
    pub retries_pending: u64,
}

/// A dead letter's state after a retry request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LetterState {
    /// No such dead letter (any more: applied or purged).
    Gone,
    /// Waiting for the worker.
    Pending,
    /// The worker retried it and it failed again (or it stayed behind an earlier letter of its
    /// stream that failed): its current error.
    Failed(String),
}

/// Records operator requests and reads their outcome.
#[derive(Debug, Clone)]
pub struct Control {
    store: PostgresEventStore,
}

impl Control {
    /// Requests on `store`'s projections.
    #[must_use]
    pub fn new(store: PostgresEventStore) -> Self {
        Self { store }
    }

    /// Wakes the workers (and relays) of the schema, as a commit does.
    async fn wake(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(self.store.channel())
            .execute(self.store.pool())
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// Asks the owner of `projection` to rebuild it; `false` when there is no such projection (it
    /// never ran). Returns the time of the request.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn request_rebuild(
        &self,
        projection: &str,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(self.store.sql.request_rebuild.clone()))
            .bind(projection)
            .fetch_optional(self.store.pool())
            .await
            .map_err(backend)?;
        let at = row
            .map(|r| r.try_get("rebuild_requested_at").map_err(backend))
            .transpose()?;
        if at.is_some() {
            self.wake().await?;
        }
        Ok(at)
    }

    /// Asks for dead letter `id` (with the letters before it in its stream: per-stream order) to
    /// be retried; returns its projection, `None` when there is no such letter.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn request_retry(&self, id: i64) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(self.store.sql.request_retry.clone()))
            .bind(id)
            .fetch_optional(self.store.pool())
            .await
            .map_err(backend)?;
        let projection = row
            .map(|r| r.try_get("projection").map_err(backend))
            .transpose()?;
        if projection.is_some() {
            self.wake().await?;
        }
        Ok(projection)
    }

    /// Asks for every dead letter of `projection` to be retried; returns how many there are.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn request_retry_all(&self, projection: &str) -> Result<u64, StoreError> {
        let marked = sqlx::query(AssertSqlSafe(self.store.sql.request_retry_all.clone()))
            .bind(projection)
            .execute(self.store.pool())
            .await
            .map_err(backend)?
            .rows_affected();
        if marked > 0 {
            self.wake().await?;
        }
        Ok(marked)
    }

    /// The requests on `projection`; `None` when there is no such projection.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn requests(&self, projection: &str) -> Result<Option<Requests>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(self.store.sql.requests.clone()))
            .bind(projection)
            .fetch_optional(self.store.pool())
            .await
            .map_err(backend)?;
        row.map(|row| {
            let pending: i64 = row.try_get("retries_pending").map_err(backend)?;
            Ok(Requests {
                rebuild_requested_at: row.try_get("rebuild_requested_at").map_err(backend)?,
                rebuilt_at: row.try_get("rebuilt_at").map_err(backend)?,
                error: row.try_get("request_error").map_err(backend)?,
                retries_pending: u64::try_from(pending).unwrap_or(0),
            })
        })
        .transpose()
    }

    /// Where dead letter `id` is after a retry request.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn letter(&self, id: i64) -> Result<LetterState, StoreError> {
        let row = sqlx::query(AssertSqlSafe(self.store.sql.letter_state.clone()))
            .bind(id)
            .fetch_optional(self.store.pool())
            .await
            .map_err(backend)?;
        let Some(row) = row else {
            return Ok(LetterState::Gone);
        };
        if row.try_get("pending").map_err(backend)? {
            Ok(LetterState::Pending)
        } else {
            Ok(LetterState::Failed(row.try_get("error").map_err(backend)?))
        }
    }
}

/// Lists and purges a projection's dead letters; retrying them needs the projection, so it is
/// [`ProjectionWorker::retry`](crate::projection::ProjectionWorker::retry) and [`ProjectionWorker::retry_all`](crate::projection::ProjectionWorker::retry_all).
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
        older_than: Option<DateTime<Utc>>,
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
    pub updated_at: DateTime<Utc>,
    /// On a projection that runs in segments: how many (its checkpoint and lag are then its
    /// slowest segment's).
    pub segments: Option<u32>,
    /// On a segment's row: the projection it is a segment of.
    pub segment_of: Option<String>,
}

/// Every projection with a checkpoint in `store`'s schema, by name.
///
/// # Errors
/// [`WorkerError::Store`] when the database fails.
pub async fn projections(store: &PostgresEventStore) -> Result<Vec<ProjectionStatus>, WorkerError> {
    let rows = sqlx::query(AssertSqlSafe(store.sql.projection_statuses.clone()))
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
                segments: row
                    .try_get::<Option<i32>, _>("segments")
                    .map_err(backend)?
                    .and_then(|n| u32::try_from(n).ok()),
                segment_of: row.try_get("segment_of").map_err(backend)?,
            })
        })
        .collect()
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
