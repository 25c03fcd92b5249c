//! A named checkpoint in the global order held by one owner at a time: what a projection worker
//! uses, open to other log followers (the Kafka outbox relay) that keep their effect outside
//! PostgreSQL and move the checkpoint after it.
//!
//! The lease lives in `projection_checkpoints`, so `cqrs projections list` shows these followers
//! with their lag and owner too.

use std::future::Future;
use std::time::Duration;

pub use evently_core::projection::LeaseLoss;
use evently_core::{Checkpoint, StoreError};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgConnection, Row};

use crate::PostgresEventStore;
use crate::errors::backend;
use crate::rows::to_i64;

/// The shortest lease: shorter ones are raised to it (a lease must outlive the statement that
/// renews it).
pub const MIN_LEASE: Duration = Duration::from_millis(100);

/// `lease` between [`MIN_LEASE`] and a day (so it is always a valid interval and a valid wait).
fn clamp_lease(lease: Duration) -> Duration {
    lease.clamp(MIN_LEASE, evently_core::backoff::MAX_WAIT)
}

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
    /// A segment's lease: its row exists or the lease is never taken (see
    /// [`crate::projection::SegmentedWorker`]).
    segment: bool,
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
            lease: clamp_lease(lease),
            epoch: None,
            segment: false,
        }
    }

    /// The lease of a segment's row `name`, which a rescale creates: acquiring never creates it
    /// (a worker of a layout replaced meanwhile finds no row and takes nothing).
    pub(crate) fn segment(
        store: PostgresEventStore,
        name: impl Into<String>,
        owner: impl Into<String>,
        lease: Duration,
    ) -> Self {
        Self {
            segment: true,
            ..Self::new(store, name, owner, lease)
        }
    }

    /// The same lease lasting `lease` after each acquire or advance (clamped to between
    /// [`MIN_LEASE`] and a day).
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = clamp_lease(lease);
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
    /// Only a renewal by the holder of the current epoch keeps it; any other take gets a new epoch,
    /// including a process restarted under the same owner name (it takes over at once) and a
    /// second live process under that name (the two then fence each other out in turn: every
    /// checkpoint move is a compare-and-set, so neither applies anything twice, but give each
    /// process a name of its own).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn acquire(&mut self) -> Result<Option<Checkpoint>, StoreError> {
        let sql = if self.segment {
            &self.store.sql.acquire_segment
        } else {
            &self.store.sql.acquire_lease
        };
        let row = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(&self.name)
            .bind(&self.owner)
            .bind(self.lease.as_secs_f64())
            .bind(self.epoch)
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

    /// Moves the checkpoint from `from` (which must be the stored one) to `to` and renews the
    /// lease. [`Advance::LeaseLost`] when this owner no longer holds the lease (another took it
    /// over, or it expired): nothing moved and the owner must stop and [`acquire`](Self::acquire)
    /// again. [`Advance::Moved`] when the stored checkpoint is not `from` any more (an earlier move
    /// whose outcome was in doubt went through after all): nothing moved, the epoch is kept, and
    /// the owner goes on from the stored checkpoint.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn advance(
        &mut self,
        from: Checkpoint,
        to: Checkpoint,
    ) -> Result<Advance, StoreError> {
        let mut conn = self.store.pool().acquire().await.map_err(backend)?;
        self.advance_on(&mut conn, from, to).await
    }

    /// [`advance`](Self::advance) on `conn`, e.g. inside the transaction of an effect (which the
    /// caller rolls back unless the outcome is [`Advance::Done`]).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn advance_on(
        &mut self,
        conn: &mut PgConnection,
        from: Checkpoint,
        to: Checkpoint,
    ) -> Result<Advance, StoreError> {
        let Some(epoch) = self.epoch else {
            return Ok(Advance::LeaseLost(LeaseLoss::NotHeld));
        };
        let moved = sqlx::query(AssertSqlSafe(self.store.sql.move_checkpoint.clone()))
            .bind(&self.name)
            .bind(epoch)
            .bind(to.transaction.to_string())
            .bind(to_i64(to.position)?)
            .bind(self.lease.as_secs_f64())
            .bind(from.transaction.to_string())
            .bind(to_i64(from.position)?)
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
        if moved.rows_affected() == 1 {
            return Ok(Advance::Done);
        }
        // The update waited for any transaction holding the row: what it found is settled.
        match self.standing(conn, epoch).await? {
            Ok(row) => Ok(Advance::Moved {
                stored: crate::rows::checkpoint(&row)?,
            }),
            Err(loss) => Ok(Advance::LeaseLost(loss)),
        }
    }

    /// Why this owner's lease is lost, after a statement on `conn` that needed it (live, of the
    /// epoch held) found none; forgets the epoch (also when the database fails).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub(crate) async fn loss_on(
        &mut self,
        conn: &mut PgConnection,
    ) -> Result<LeaseLoss, StoreError> {
        let Some(epoch) = self.epoch.take() else {
            return Ok(LeaseLoss::NotHeld);
        };
        // A live lease of the epoch held is only ever extended while live, so the row cannot
        // show one after the statement found none; were it so, it is told as expired.
        Ok(self
            .standing(conn, epoch)
            .await?
            .err()
            .unwrap_or(LeaseLoss::Expired))
    }

    /// What the checkpoint row says of `epoch`'s lease: the row while that lease is live, else
    /// why it is lost (then the epoch is forgotten).
    async fn standing(
        &mut self,
        conn: &mut PgConnection,
        epoch: i64,
    ) -> Result<Result<PgRow, LeaseLoss>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(self.store.sql.checkpoint_state.clone()))
            .bind(&self.name)
            .fetch_optional(&mut *conn)
            .await
            .map_err(backend)?;
        let loss = match row {
            Some(row) => {
                let stored_epoch: i64 = row.try_get("epoch").map_err(backend)?;
                let live: bool = row.try_get("live").map_err(backend)?;
                if stored_epoch != epoch {
                    LeaseLoss::TakenOver {
                        epoch: stored_epoch,
                    }
                } else if live {
                    return Ok(Ok(row));
                } else {
                    LeaseLoss::Expired
                }
            }
            None => LeaseLoss::Gone,
        };
        self.epoch = None;
        Ok(Err(loss))
    }

    /// Extends the lease of the epoch held by its duration from now, without moving the
    /// checkpoint (a heartbeat while a long batch runs); `false` when it is no longer held.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails.
    pub async fn renew(&self) -> Result<bool, StoreError> {
        let Some(epoch) = self.epoch else {
            return Ok(false);
        };
        renew(&self.store, &self.name, epoch, self.lease).await
    }

    /// Gives the lease up (when this owner still holds it), so another owner takes it at once
    /// instead of after it expires; forgets the epoch.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the database fails (the lease then expires by itself).
    pub async fn release(&mut self) -> Result<(), StoreError> {
        let Some(epoch) = self.epoch.take() else {
            return Ok(());
        };
        sqlx::query(AssertSqlSafe(self.store.sql.release_lease.clone()))
            .bind(&self.name)
            .bind(epoch)
            .execute(self.store.pool())
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// A heartbeat for the epoch held: a future that renews the lease every third of its duration
    /// until it is lost or the database fails (then it waits forever, leaving the verdict to the
    /// next checkpoint move). Run it beside a long piece of work with `select!`.
    pub fn heartbeat(&self) -> impl Future<Output = std::convert::Infallible> + Send + 'static {
        let (store, name, epoch, lease) = (
            self.store.clone(),
            self.name.clone(),
            self.epoch,
            self.lease,
        );
        async move {
            let Some(epoch) = epoch else {
                return futures::future::pending::<std::convert::Infallible>().await;
            };
            loop {
                tokio::time::sleep(lease / 3).await;
                match renew(&store, &name, epoch, lease).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(error) => {
                        tracing::debug!(checkpoint = %name, %error, "lease heartbeat failed");
                        break;
                    }
                }
            }
            futures::future::pending::<std::convert::Infallible>().await
        }
    }
}

/// What a checkpoint move found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Advance {
    /// The checkpoint moved and the lease was renewed.
    Done,
    /// The lease is not this owner's any more (why: the [`LeaseLoss`]): nothing moved.
    LeaseLost(LeaseLoss),
    /// The stored checkpoint is not the expected start any more (an earlier in-doubt move went
    /// through): nothing moved; go on from `stored`.
    Moved {
        /// The stored checkpoint.
        stored: Checkpoint,
    },
}

/// Extends the lease of `epoch` on checkpoint `name` by `lease` from now.
async fn renew(
    store: &PostgresEventStore,
    name: &str,
    epoch: i64,
    lease: Duration,
) -> Result<bool, StoreError> {
    let renewed = sqlx::query(AssertSqlSafe(store.sql.renew_lease.clone()))
        .bind(name)
        .bind(epoch)
        .bind(lease.as_secs_f64())
        .execute(store.pool())
        .await
        .map_err(backend)?;
    Ok(renewed.rows_affected() == 1)
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
