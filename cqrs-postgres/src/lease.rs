//! A named checkpoint in the global order held by one owner at a time: what a projection worker
//! uses, open to other log followers (the Kafka outbox relay) that keep their effect outside
//! PostgreSQL and move the checkpoint after it.
//!
//! The lease lives in `projection_checkpoints`, so `cqrs projections list` shows these followers
//! with their lag and owner too.

use std::time::Duration;

use cqrs_core::{Checkpoint, StoreError};
use sqlx::{AssertSqlSafe, PgConnection, Row};

use crate::PostgresEventStore;
use crate::rows::{backend, to_i64};

/// One owner's hold on a named checkpoint: [`acquire`](Self::acquire) takes it (bumping the epoch
/// on a takeover), [`advance`](Self::advance) moves the checkpoint only while this owner's epoch
/// is current and its lease is live.
#[derive(Debug, Clone)]
pub struct CheckpointLease {
    store: PostgresEventStore,
    name: String,
    owner: String,
    lease: Duration,
    epoch: Option<i64>,
}

impl CheckpointLease {
    /// A lease on checkpoint `name` for `owner` (unique per process), lasting `lease` after each
    /// acquire or advance.
    pub fn new(
        store: PostgresEventStore,
        name: impl Into<String>,
        owner: impl Into<String>,
        lease: Duration,
    ) -> Self {
        Self {
            store,
            name: name.into(),
            owner: owner.into(),
            lease,
            epoch: None,
        }
    }

    /// The same lease lasting `lease` after each acquire or advance.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The checkpoint's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The owner this lease is taken for.
    #[must_use]
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// How long the lease lasts after each acquire or advance.
    #[must_use]
    pub fn duration(&self) -> Duration {
        self.lease
    }

    /// Forgets the epoch held: the database no longer grants it.
    pub(crate) fn forget(&mut self) {
        self.epoch = None;
    }

    /// The stored checkpoint ([`Checkpoint::START`] before the first advance).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn checkpoint(&self) -> Result<Checkpoint, StoreError> {
        read(&self.store, &self.name).await
    }

    /// The epoch held, if the last acquire or advance succeeded.
    #[must_use]
    pub fn epoch(&self) -> Option<i64> {
        self.epoch
    }

    /// Takes or renews the lease and returns the stored checkpoint; `None` while another owner's
    /// lease is live.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn acquire(&mut self) -> Result<Option<Checkpoint>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(self.store.sql.acquire_lease.clone()))
            .bind(&self.name)
            .bind(&self.owner)
            .bind(self.lease.as_secs_f64())
            .fetch_optional(self.store.pool())
            .await
            .map_err(backend)?;
        let Some(row) = row else {
            self.epoch = None;
            return Ok(None);
        };
        self.epoch = Some(row.try_get("epoch").map_err(backend)?);
        crate::rows::checkpoint(&row).map(Some)
    }

    /// Moves the checkpoint forward to `to` (never back) and renews the lease; `false` when this
    /// owner no longer holds it (another took it over, or it expired): then nothing moved and the
    /// owner must stop and [`acquire`](Self::acquire) again.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn advance(&mut self, to: Checkpoint) -> Result<bool, StoreError> {
        let mut conn = self.store.pool().acquire().await.map_err(backend)?;
        self.advance_on(&mut conn, to).await
    }

    /// [`advance`](Self::advance) on `conn`, e.g. inside the transaction of an effect.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn advance_on(
        &mut self,
        conn: &mut PgConnection,
        to: Checkpoint,
    ) -> Result<bool, StoreError> {
        let Some(epoch) = self.epoch else {
            return Ok(false);
        };
        let moved = sqlx::query(AssertSqlSafe(self.store.sql.move_checkpoint.clone()))
            .bind(&self.name)
            .bind(epoch)
            .bind(to.transaction.to_string())
            .bind(to_i64(to.position)?)
            .bind(self.lease.as_secs_f64())
            .execute(conn)
            .await
            .map_err(backend)?;
        if moved.rows_affected() == 1 {
            Ok(true)
        } else {
            self.epoch = None;
            Ok(false)
        }
    }
}

/// The stored checkpoint named `name` ([`Checkpoint::START`] when there is none).
pub(crate) async fn read(store: &PostgresEventStore, name: &str) -> Result<Checkpoint, StoreError> {
    let row = sqlx::query(AssertSqlSafe(store.sql.read_checkpoint.clone()))
        .bind(name)
        .fetch_optional(store.pool())
        .await
        .map_err(backend)?;
    Ok(row
        .map(|row| crate::rows::checkpoint(&row))
        .transpose()?
        .unwrap_or(Checkpoint::START))
}

/// The record of what a consumer has applied (the `inbox` table): claim an event id in the
/// transaction of its effect, and a redelivery of the same event finds it claimed.
#[derive(Debug, Clone)]
pub struct Inbox {
    claim: String,
}

impl Inbox {
    /// The inbox in `store`'s schema.
    #[must_use]
    pub fn new(store: &PostgresEventStore) -> Self {
        let s = &store.sql.quoted_schema;
        Self {
            claim: format!(
                "INSERT INTO {s}.inbox (consumer, event_id) VALUES ($1, $2) \
                 ON CONFLICT (consumer, event_id) DO NOTHING"
            ),
        }
    }

    /// Records that `consumer` applies `event_id`, in `conn`'s transaction: `false` when it already
    /// did (a redelivery: skip the effect). A concurrent claim of the same id waits for the first
    /// transaction and then gets `false` if it committed.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn claim(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        event_id: cqrs_core::EventId,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(AssertSqlSafe(self.claim.clone()))
            .bind(consumer)
            .bind(event_id.0)
            .execute(conn)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }
}
