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
//! [`ProjectionWorker::retry`]: crate::projection::ProjectionWorker::retry

use chrono::{DateTime, Utc};
use evently_core::StoreError;
use sqlx::{AssertSqlSafe, Row};

use crate::PostgresEventStore;
use crate::rows::backend;

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

    fn table(&self, name: &str) -> String {
        format!("{}.{name}", self.store.sql.quoted_schema)
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
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET rebuild_requested_at = now(), request_error = NULL \
             WHERE projection = $1 RETURNING rebuild_requested_at",
            self.table("projection_checkpoints")
        )))
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
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET retry_requested_at = now() WHERE id = $1 RETURNING projection",
            self.table("projection_dead_letters")
        )))
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
        let marked = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET retry_requested_at = now() WHERE projection = $1",
            self.table("projection_dead_letters")
        )))
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
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT rebuild_requested_at, rebuilt_at, request_error, \
                    (SELECT count(*) FROM {} d WHERE d.projection = c.projection \
                       AND d.retry_requested_at IS NOT NULL) AS retries_pending \
             FROM {} c WHERE projection = $1",
            self.table("projection_dead_letters"),
            self.table("projection_checkpoints")
        )))
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
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT retry_requested_at IS NOT NULL AS pending, error FROM {} WHERE id = $1",
            self.table("projection_dead_letters")
        )))
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
