//! Read-your-writes and the projection fixture for read models in PostgreSQL.
//!
//! [`PostgresEventStore`] is a [`Progress`]: hand it to
//! [`wait_until_caught_up`](evently_core::projection::wait_until_caught_up) with a command's
//! [`Executed::checkpoint`](evently_core::Executed::checkpoint) to wait until the projection's
//! worker (in this process or any other) has committed past the command's events. The
//! checkpoint is read from the checkpoint table, one indexed row per read; between reads the
//! waiter sleeps until a worker of the schema signals a committed batch (`NOTIFY` after the
//! commit, coalesced, on a channel of its own) or a short pause passes (a lost signal costs at
//! most that pause: 1 ms growing to 50 ms).
//!
//! [`PostgresFixture::caught_up_in`] runs a [`ProjectionFixture`] through a [`ProjectionWorker`]
//! on a store (a fresh schema per test), so a projection whose handlers write tables is tested
//! against the real database, with the worker's transactions, retries and dead-letter table.

use std::time::Duration;

use evently_core::projection::{
    DeadLetter, FixtureError, Progress, Projection, ProjectionFixture, assert_no_dead_letters,
};
use evently_core::{Checkpoint, StoreError};
use sqlx::PgConnection;

use crate::PostgresEventStore;
use crate::control::DeadLetters;
use crate::projection::{ProjectionWorker, WorkerError};

#[async_trait::async_trait]
impl Progress for PostgresEventStore {
    /// The projection's checkpoint; for one running in segments, the least of theirs (every
    /// segment has passed what comes before it).
    async fn checkpoint_of(&self, projection: &str) -> Result<Checkpoint, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(self.sql.progress_checkpoint.clone()))
            .bind(projection)
            .fetch_optional(self.pool())
            .await
            .map_err(crate::errors::backend)?;
        Ok(row
            .map(|row| crate::rows::checkpoint(&row))
            .transpose()?
            .unwrap_or(Checkpoint::START))
    }

    async fn moved(&self, _projection: &str, at_most: Duration) {
        self.moves.next(self.pool(), at_most).await;
    }
}

/// The worker's error as a fixture error (the fixture has no lease to lose to anyone).
fn fixture_error(error: WorkerError) -> FixtureError {
    match error {
        WorkerError::Store(error) => FixtureError::Store(error),
        other => FixtureError::Store(StoreError::backend(other.to_string())),
    }
}

/// The owner name the fixture's worker takes the projection's lease under.
const FIXTURE_OWNER: &str = "projection-fixture";

/// Runs a [`ProjectionFixture`] of a PostgreSQL projection on a [`PostgresEventStore`].
#[async_trait::async_trait]
pub trait PostgresFixture<P: Projection<Context = PgConnection>> {
    /// Appends the given events to `store` and catches the projection up through a
    /// [`ProjectionWorker`] (its transactions, retries and dead-letter table), then returns what
    /// came of it. Use a store of its own per test (a fresh schema): the projection starts from
    /// its stored checkpoint there.
    ///
    /// # Errors
    /// As [`ProjectionFixture::append_to`]; a store failure while catching up; another worker
    /// holding the projection's lease. A handler's failure is no error: the event is parked.
    async fn caught_up_in(self, store: &PostgresEventStore) -> Result<CaughtUpIn<P>, FixtureError>;
}

#[async_trait::async_trait]
impl<P> PostgresFixture<P> for ProjectionFixture<P>
where
    P: Projection<Context = PgConnection> + 'static,
{
    async fn caught_up_in(
        mut self,
        store: &PostgresEventStore,
    ) -> Result<CaughtUpIn<P>, FixtureError> {
        self.append_to(store).await?;
        // A short lease: a worker the test starts after the fixture takes over within a second.
        // A second fixture on the store takes it at once (same owner name).
        let mut worker =
            ProjectionWorker::new(store.clone(), self.into_projection(), FIXTURE_OWNER)
                .with_lease(Duration::from_secs(1));
        if !worker.acquire().await.map_err(fixture_error)? {
            return Err(FixtureError::Store(StoreError::backend(format!(
                "another worker holds the lease on projection `{}` in schema `{}`: give the \
                 fixture a store of its own",
                P::NAME,
                store.schema()
            ))));
        }
        let applied = worker.catch_up().await.map_err(fixture_error)?;
        let checkpoint = store.checkpoint_of(P::NAME).await?;
        let dead_letters = DeadLetters::new(store.clone())
            .list(P::NAME)
            .await
            .map_err(fixture_error)?;
        Ok(CaughtUpIn {
            store: store.clone(),
            worker,
            dead_letters,
            applied,
            checkpoint,
        })
    }
}

/// The *then* half of a PostgreSQL projection fixture: the read model is in the store's database.
pub struct CaughtUpIn<P: Projection<Context = PgConnection>> {
    store: PostgresEventStore,
    worker: ProjectionWorker<P>,
    dead_letters: Vec<DeadLetter>,
    applied: usize,
    checkpoint: Checkpoint,
}

impl<P: Projection<Context = PgConnection>> std::fmt::Debug for CaughtUpIn<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaughtUpIn")
            .field("projection", &P::NAME)
            .field("schema", &self.store.schema())
            .field("applied", &self.applied)
            .field("dead_letters", &self.dead_letters)
            .field("checkpoint", &self.checkpoint)
            .finish_non_exhaustive()
    }
}

impl<P: Projection<Context = PgConnection>> CaughtUpIn<P> {
    /// Checks the read model: `check` gets the store (its `pool()` and `schema()`) to query the
    /// projection's tables.
    pub async fn then<F>(self, check: F) -> Self
    where
        F: AsyncFnOnce(&PostgresEventStore),
    {
        check(&self.store).await;
        self
    }

    /// Asserts that every given event was applied (none parked as a dead letter).
    ///
    /// # Panics
    /// When an event was parked, naming each with its error.
    #[track_caller]
    pub fn then_no_dead_letters(self) -> Self {
        assert_no_dead_letters(P::NAME, &self.dead_letters);
        self
    }

    /// Checks the dead letters (in the order they were parked).
    pub fn then_dead_letters(self, check: impl FnOnce(&[DeadLetter])) -> Self {
        check(&self.dead_letters);
        self
    }

    /// How many events the projection applied.
    #[must_use]
    pub fn applied(&self) -> usize {
        self.applied
    }

    /// The checkpoint the projection reached.
    #[must_use]
    pub fn checkpoint(&self) -> Checkpoint {
        self.checkpoint
    }

    /// The worker that caught up (its lease still held), to step it further in a test.
    pub fn into_worker(self) -> ProjectionWorker<P> {
        self.worker
    }
}
